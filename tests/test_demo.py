"""``hashray demo --quick --no-serve``: the whole pipeline, then a second run that reuses every stage."""

from __future__ import annotations

import dataclasses
import json

import pytest

from hashray.cli import main
from hashray.demo import QUICK, DemoConfig, pretrain_config, train_config


@pytest.mark.heavy
def test_quick_demo_runs_every_stage_then_reuses_them(ray_session, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--no-serve", "--out", str(out)]) == 0
    first = capsys.readouterr().out

    for stage in ("[1/5] ingest", "[2/5] train", "[3/5] encode", "[4/5] evaluate"):
        assert f"{stage}" in first and "finished in" in first
    assert "mAP" in first and "random codes" in first
    info = json.loads((out / "data" / "dataset.json").read_text())
    assert info["splits"] == {"train": QUICK.train, "query": QUICK.query, "database": QUICK.database}
    assert (out / "run" / "model.pt").exists() and (out / "run" / "config.json").exists()
    # The backbone was pre-trained as a classifier first, and hashing started from it.
    assert QUICK.pretrain_epochs and (out / "pretrain" / "model.pt").exists()
    assert json.loads((out / "pretrain" / "config.json").read_text())["loss"] == "classify"
    for split, rows in (("query", QUICK.query), ("database", QUICK.database)):
        assert json.loads((out / "codes" / split / "manifest.json").read_text())["count"] == rows
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert sorted(path.name for path in (out / "eval").glob("*.png"))
    # Two tiny epochs need not beat chance (test_encode asserts a trained model does);
    # the demo must report both figures, consistently with metrics.json.
    assert 0.0 < metrics["mAP"] <= 1.0 and 0.0 < metrics["mAP_random"] <= 1.0
    assert f"{metrics['mAP']:.4f}   (random codes: {metrics['mAP_random']:.4f})" in first

    # A second run reuses every finished stage and prints the same metrics.
    model_time = (out / "run" / "model.pt").stat().st_mtime_ns
    assert main(["demo", "--quick", "--no-serve", "--out", str(out)]) == 0
    second = capsys.readouterr().out
    assert second.count("done before, reusing") == 4 and "finished in" not in second
    assert f"{metrics['mAP']:.4f}" in second
    assert (out / "run" / "model.pt").stat().st_mtime_ns == model_time

    # Losing the evaluation output reruns evaluate only.
    (out / "eval" / "metrics.json").unlink()
    assert main(["demo", "--quick", "--no-serve", "--out", str(out)]) == 0
    third = capsys.readouterr().out
    assert third.count("done before, reusing") == 3 and "[4/5] evaluate: finished in" in third


def test_demo_rejects_bad_epochs(capsys):
    assert main(["demo", "--quick", "--no-serve", "--epochs", "0"]) == 2
    assert "--epochs must be at least 1" in capsys.readouterr().err


def test_only_the_hashing_run_after_pretraining_slows_the_backbone():
    cfg = DemoConfig()
    assert cfg.pretrain_epochs and cfg.backbone_lr_ratio < 1.0
    assert train_config(cfg).backbone_ratio == cfg.backbone_lr_ratio
    # The classifier itself, and a hashing run from random weights, train the whole network at --lr.
    assert pretrain_config(cfg).backbone_ratio == 1.0
    assert train_config(dataclasses.replace(cfg, pretrain_epochs=0)).backbone_ratio == 1.0


@pytest.mark.parametrize("pretrain_epochs", ["0", "1"])
def test_demo_rejects_a_negative_backbone_ratio(capsys, pretrain_epochs):
    flags = ["--backbone-lr-ratio", "-0.5", "--pretrain-epochs", pretrain_epochs]
    assert main(["demo", "--quick", "--no-serve", *flags]) == 2
    assert "--backbone-lr-ratio must be >= 0, got -0.5" in capsys.readouterr().err
