"""bench/quality.py: the loss-comparison grid, on the tiny dataset, and its table arithmetic."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

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

# Two losses, one code length, fine-tuning only: two hashing runs (the backbone file is given).
TINY_GRID = dataclasses.replace(
    quality.PRESETS["quick"],
    epochs=1,
    pretrain_epochs=1,
    batch_size=16,
    topk=50,
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

    rows = {row["setting"]: row for row in payload["rows"]}
    assert set(rows) == {"finetune-cosine-16", "finetune-dpsh-16"}
    for row in rows.values():
        metrics = read_json(str(out / "runs" / row["setting"] / "eval" / "metrics.json"))
        assert row["mAP"] == metrics["mAP"] and 0.0 < row["mAP"] <= 1.0
        assert row["topk"] == 50 and len(row["val_mAP"]) == 1
    (ratio,) = payload["ratios"]
    assert ratio["baseline"] == "dpsh"
    for key in quality.METRICS:
        assert ratio[key] == pytest.approx(rows["finetune-cosine-16"][key] / rows["finetune-dpsh-16"][key])
    # The fine-tuned runs started from the cached backbone file, not from scratch.
    (checkpoint,) = sorted((out / "runs" / "finetune-cosine-16" / "run").glob("checkpoint_*/checkpoint.pt"))[-1:]
    assert torch.load(checkpoint, weights_only=True)["config"]["weights"] == str(out / "pretrain" / "model.pt")

    assert json.loads((out / "results.json").read_text())["ratios"] == payload["ratios"]
    table = (out / "results.md").read_text()
    assert "| finetune | 16 | cosine |" in table and "| finetune | 16 | dpsh |" in table
    assert f"{ratio['mAP']:.4f}" in table
    assert (out / "pr_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _row(init: str, loss: str, value: float, val_maps: list[float]) -> dict:
    return {
        "init": init,
        "bits": 32,
        "loss": loss,
        "mAP": value,
        "NDCG": value / 2,
        "P@r2": value / 4,
        "val_mAP": val_maps,
    }


def test_ratios_and_epochs_to_reach_come_from_the_rows() -> None:
    rows = [
        _row("scratch", "cosine", 0.6, [0.50, 0.55, 0.60]),
        _row("scratch", "dpsh", 0.5, [0.50, 0.52, 0.58]),
        _row("finetune", "cosine", 0.8, [0.61, 0.70, 0.80]),
        _row("finetune", "dpsh", 0.4, [0.40, 0.45, 0.50]),
    ]
    ratios = {(r["init"], r["baseline"]): r for r in quality.ratios(rows)}
    assert ratios[("finetune", "dpsh")]["mAP"] == pytest.approx(2.0)
    assert ratios[("scratch", "dpsh")]["NDCG"] == pytest.approx(0.6 / 0.5)
    convergence = {r["loss"]: r for r in quality.convergence(rows)}
    assert convergence["cosine"]["finetune_epochs"] == 1 and convergence["cosine"]["scratch_epochs"] == 3
    assert convergence["dpsh"]["finetune_epochs"] is None  # never reaches scratch's 0.58
    assert quality.epochs_to_reach([None, 0.3, 0.7], 0.5) == 3


def test_a_grid_without_the_cosine_loss_or_with_unknown_names_is_rejected() -> None:
    with pytest.raises(HashrayError, match="must include the cosine loss"):
        quality.check_grid(dataclasses.replace(TINY_GRID, losses=("dpsh",)))
    with pytest.raises(HashrayError, match="choose from cosine, dpsh, idhn, hashnet"):
        quality.check_grid(dataclasses.replace(TINY_GRID, losses=("cosine", "triplet")))
    with pytest.raises(HashrayError, match="finetune, scratch"):
        quality.check_grid(dataclasses.replace(TINY_GRID, inits=("imagenet",)))
