"""bench/quality.py: the loss-comparison grid, on the tiny dataset, and its table arithmetic."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from contracts.fs import read_json
from models.errors import HashrayError
from models.network import ResNetHash

_SPEC = importlib.util.spec_from_file_location(
    "bench_quality", Path(__file__).resolve().parents[1] / "bench" / "quality.py"
)
quality = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = quality  # dataclasses look their module up there
_SPEC.loader.exec_module(quality)

report = sys.modules["quality_report"]  # bench/quality.py imports it by that name

# Two losses, one code length, one rate, fine-tuning only: two hashing runs (the backbone file is given).
TINY_GRID = dataclasses.replace(
    quality.PRESETS["quick"],
    epochs=1,
    pretrain_epochs=1,
    batch_size=16,
    topk=50,
    lrs=(3e-3,),
    seeds=(0,),
    val_queries=8,
    val_database=32,
    losses=("cosine", "dpsh"),
    bits=(16,),
    inits=("finetune",),
)


@pytest.mark.heavy
def test_grid_writes_a_row_per_setting_ratios_and_the_pr_plot(ray_session, tiny_dataset, tmp_path) -> None:
    out = tmp_path / "quality"
    # A cached backbone file is reused instead of pre-training one (a Ray Train run
    # less; test_loss covers the classify objective, bench/quality.py --quick the run).
    (out / "pretrain").mkdir(parents=True)
    torch.save(ResNetHash("resnet18", 8).state_dict(), out / "pretrain" / "model.pt")
    payload = quality.run_grid(TINY_GRID, out, data=tiny_dataset)

    rows = {row["loss"]: row for row in payload["rows"]}
    assert [row["setting"] for row in payload["rows"]] == [
        "finetune-cosine-16-lr0.003-seed0",
        "finetune-dpsh-16-lr0.003-seed0",
    ]
    for row in rows.values():
        metrics = read_json(str(out / "runs" / row["setting"] / "eval" / "metrics.json"))
        assert row["mAP"] == metrics["mAP"] and 0.0 < row["mAP"] <= 1.0
        assert row["topk"] == 50 and len(row["val_mAP"]) == 1
    (ratio,) = payload["ratios"]
    assert ratio["baseline"] == "dpsh" and ratio["seeds"] == 1
    assert ratio["mAP"] == pytest.approx(rows["cosine"]["mAP"] / rows["dpsh"]["mAP"])
    assert ratio["mAP_low"] <= ratio["mAP"] <= ratio["mAP_high"]
    assert [entry["lr"] for entry in payload["tuning"]] == [3e-3, 3e-3]
    # The fine-tuned runs started from the cached backbone file, not from scratch.
    run_dir = out / "runs" / rows["cosine"]["setting"] / "run"
    (checkpoint,) = sorted(run_dir.glob("checkpoint_*/checkpoint.pt"))[-1:]
    assert torch.load(checkpoint, weights_only=True)["config"]["weights"] == str(out / "pretrain" / "model.pt")

    assert json.loads((out / "results.json").read_text())["ratios"] == payload["ratios"]
    table = (out / "results.md").read_text()
    assert "| finetune | 16 | cosine | 0.003 | 1 |" in table and "| finetune | 16 | dpsh |" in table
    assert f"{ratio['mAP']:.3f} [" in table and "Targets:" in table
    assert (out / "pr_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _row(init: str, loss: str, value: float, val_maps: list[float], seed: int = 0) -> dict:
    return {
        "setting": f"{init}-{loss}-{seed}",
        "init": init,
        "bits": 32,
        "loss": loss,
        "lr": 1e-3,
        "seed": seed,
        "mAP": value,
        "NDCG": value / 2,
        "P@r2": value / 4,
        "mAP_random": 0.25,
        "largest_bucket_share": 0.01,
        "val_mAP": val_maps,
    }


def test_epochs_to_reach_come_from_the_first_seed() -> None:
    rows = [
        _row("scratch", "cosine", 0.6, [0.50, 0.55, 0.60]),
        _row("scratch", "dpsh", 0.5, [0.50, 0.52, 0.58]),
        _row("finetune", "cosine", 0.8, [0.61, 0.70, 0.80]),
        _row("finetune", "dpsh", 0.4, [0.40, 0.45, 0.50]),
        _row("finetune", "dpsh", 0.9, [0.90, 0.90, 0.90], seed=1),  # another seed: not the one compared
    ]
    convergence = {r["loss"]: r for r in report.convergence(rows)}
    assert convergence["cosine"]["finetune_epochs"] == 1 and convergence["cosine"]["scratch_epochs"] == 3
    assert convergence["dpsh"]["finetune_epochs"] is None  # never reaches scratch's 0.58
    assert report.epochs_to_reach([None, 0.3, 0.7], 0.5) == 3


def test_summary_is_the_mean_and_spread_over_seeds() -> None:
    rows = [_row("scratch", "cosine", value, [0.4, 0.5], seed) for seed, value in enumerate((0.5, 0.6, 0.7))]
    (entry,) = report.summarise(rows)
    assert entry["seeds"] == [0, 1, 2] and entry["mAP"] == pytest.approx(0.6)
    assert entry["mAP_std"] == pytest.approx(0.1)  # sample standard deviation
    assert entry["over_random"] == pytest.approx(0.6 / 0.25) and entry["val_gain"] == pytest.approx(0.1)


def test_bootstrap_interval_is_exact_for_a_constant_ratio_and_shrinks_with_queries() -> None:
    rng = np.random.default_rng(0)
    theirs = rng.uniform(0.2, 0.8, (3, 400))
    assert report.bootstrap_ratio(2 * theirs, theirs) == pytest.approx((2.0, 2.0, 2.0))
    noisy = theirs * 1.1 + rng.normal(0, 0.2, theirs.shape)
    point, low, high = report.bootstrap_ratio(noisy, theirs)
    assert point == pytest.approx(noisy.mean() / theirs.mean()) and low < point < high and low > 1.0
    _, few_low, few_high = report.bootstrap_ratio(noisy[:, :40], theirs[:, :40])
    assert few_high - few_low > high - low
    with pytest.raises(ValueError, match="seeds, queries"):
        report.bootstrap_ratio(noisy, theirs[:, :10])


def test_comparisons_pair_runs_by_seed_and_the_checks_name_every_target() -> None:
    rows = [_row("scratch", loss, 0.5, [0.5, 0.5], seed) for loss in ("cosine", "dpsh") for seed in (0, 1)]
    rng = np.random.default_rng(1)
    base = {seed: rng.uniform(0.3, 0.7, 200) for seed in (0, 1)}
    per_query = {}
    for row in rows:
        scale = 1.2 if row["loss"] == "cosine" else 1.0
        per_query[row["setting"]] = {"mAP": base[row["seed"]] * scale, "NDCG": base[row["seed"]]}
    (entry,) = report.compare(rows, per_query)
    assert entry["seeds"] == 2 and entry["queries"] == 200
    assert (entry["mAP"], entry["mAP_low"], entry["mAP_high"]) == pytest.approx((1.2, 1.2, 1.2))
    assert entry["NDCG"] == pytest.approx(1.0)
    lines = report.checks(report.summarise(rows), [entry])
    assert "cosine/dpsh mAP 1.200 [1.200, 1.200]" in lines[0] and lines[0].endswith("-> met")
    assert any("dpsh: 2.00x random codes" in line and line.endswith("-> met") for line in lines)


def test_tuning_picks_the_best_validation_rate(monkeypatch, tmp_path) -> None:
    finals = {1e-3: 0.41, 3e-3: 0.47, 1e-2: 0.47}
    seen = []

    def fake_run(cfg, data, out, setting, weights):
        seen.append(setting)
        return {"val_mAP": [0.1, finals[setting.lr]]}

    monkeypatch.setattr(quality, "run_setting", fake_run)
    cfg = dataclasses.replace(TINY_GRID, lrs=(1e-3, 3e-3, 1e-2), bits=(64, 32), seeds=(5, 6))
    entry = quality.tune(cfg, "data", tmp_path, "scratch", "dpsh", "none")
    assert entry["lr"] == 3e-3  # the tie with 1e-2 goes to the rate listed first
    assert {(s.bits, s.seed) for s in seen} == {(64, 5)}  # the first code length and seed only


def test_a_grid_without_the_cosine_loss_or_with_unknown_names_is_rejected() -> None:
    with pytest.raises(HashrayError, match="must include the cosine loss"):
        quality.check_grid(dataclasses.replace(TINY_GRID, losses=("dpsh",)))
    with pytest.raises(HashrayError, match="choose from cosine, dpsh, idhn, hashnet, csq"):
        quality.check_grid(dataclasses.replace(TINY_GRID, losses=("cosine", "triplet")))
    with pytest.raises(HashrayError, match="finetune, scratch"):
        quality.check_grid(dataclasses.replace(TINY_GRID, inits=("imagenet",)))
    with pytest.raises(HashrayError, match="at least one learning rate"):
        quality.check_grid(dataclasses.replace(TINY_GRID, lrs=()))
    with pytest.raises(HashrayError, match="--scratch-losses must include cosine"):
        quality.check_grid(dataclasses.replace(TINY_GRID, inits=("scratch",), scratch_losses=("dpsh",)))


def test_the_full_grid_fine_tunes_every_loss_and_trains_cosine_and_dpsh_from_scratch(monkeypatch, tmp_path) -> None:
    trained = []

    def fake_run(cfg, data, out, setting, weights):
        trained.append(setting)
        return {"setting": setting.name, **dataclasses.asdict(setting), "topk": 10, "val_mAP": [0.5]}

    monkeypatch.setattr(quality, "run_setting", fake_run)
    monkeypatch.setattr(quality, "ensure_pretrained", lambda cfg, data, out: "backbone.pt")
    monkeypatch.setattr(quality, "per_query", lambda out, setting: {"mAP": np.ones(4), "NDCG": np.ones(4)})
    for name in ("summarise", "compare", "convergence", "checks", "plot_pr_curves"):
        monkeypatch.setattr(report, name, lambda *args, **kwargs: [])
    monkeypatch.setattr(report, "markdown", lambda *args, **kwargs: "")
    cfg = quality.PRESETS["full"]
    quality.run_grid(cfg, tmp_path, data="data")

    settings = set(trained)  # a sweep run is asked for again as the first seed's row (cached in a real run)
    by_init = {init: {s.loss for s in settings if s.init == init} for init in quality.INITS}
    assert by_init == {"finetune": set(cfg.losses), "scratch": {"cosine", "dpsh"}}
    assert len(settings) == quality.run_count(cfg) == 5 * 8 + 2 * 8
    for init, loss in [("finetune", "csq"), ("scratch", "dpsh")]:
        runs = {(s.bits, s.seed) for s in settings if (s.init, s.loss) == (init, loss)}
        assert runs == {(bits, seed) for bits in (32, 64) for seed in (0, 1, 2)}
