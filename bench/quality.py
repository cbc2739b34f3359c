"""Benchmark: the paper's multi-level cosine loss vs DPSH, IDHN and HashNet, measured.

    python bench/quality.py            # full grid: 4 losses x 16/32/64 bits x fine-tune/scratch
    python bench/quality.py --quick    # reduced grid, under 10 minutes on a 2-core CPU

Every setting trains ``hashray train`` on the same synthetic data set with the
same backbone, schedule, batch size, learning rates and seed; only the loss,
the code length and the initial backbone change. It then encodes the query
and database splits and evaluates them (``hashray encode`` / ``evaluate``).

Fine-tuning, as in the paper, starts from a backbone that already knows the
images. Nothing is downloaded: the backbone is first trained on the synthetic
train split as a multi-label classifier (``--loss classify``, the same training
loop) and its ``model.pt`` is passed as ``--weights PATH``. Scratch starts from
a random backbone.

Output (under ``--out``, default ``build/quality-<preset>``): ``results.md``
and ``results.json`` (mAP@K, NDCG@K and P@r2 per setting, the ratio of the
cosine loss's figure over each baseline's, and the epochs each initialisation
needs to reach a validation mAP), ``pr_curves.png`` (precision/recall over
Hamming radius, one panel per initialisation and code length), and the table
on stdout. The data set, the pre-trained backbone and finished settings are
cached in ``--out`` and reused by a rerun with the same preset, so an
interrupted grid resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contracts.dataset import DatasetDir  # noqa: E402
from contracts.run import HISTORY_JSON  # noqa: E402
from models.errors import HashrayError  # noqa: E402
from models.loss import LOSSES  # noqa: E402
from models.network import MODEL_PT  # noqa: E402
from pipelines.encode import EncodeConfig  # noqa: E402
from pipelines.encode import run as encode  # noqa: E402
from pipelines.evaluate import METRICS_JSON, EvaluateConfig  # noqa: E402
from pipelines.evaluate import run as evaluate  # noqa: E402
from pipelines.ingest import IngestConfig  # noqa: E402
from pipelines.ingest import run as ingest  # noqa: E402
from pipelines.train import TrainConfig  # noqa: E402
from pipelines.train import run as train  # noqa: E402

logger = logging.getLogger("bench.quality")

BASELINES = ("dpsh", "idhn", "hashnet")
INITS = ("finetune", "scratch")
METRICS = ("mAP", "NDCG", "P@r2")


@dataclass(frozen=True)
class QualityConfig:
    """One benchmark: the data set, the shared training schedule and the grid.

    Args:
        num_classes, train, query, database, source_size: the synthetic data set
            (``hashray ingest synthetic``); train rows are the first database rows.
        image_size: network input side (the synthetic images are drawn at ``source_size``).
        epochs: epochs of every hashing run; ``pretrain_epochs`` of the classifier.
        batch_size, lr, backbone_lr_ratio, quant_weight: the schedule, the same for every loss.
        topk: K of mAP@K and NDCG@K.
        seed: data, initialisation and augmentation seed.
        losses, bits, inits: the grid.
    """

    num_classes: int = 16
    train: int = 600
    query: int = 200
    database: int = 1500
    source_size: int = 32
    image_size: int = 32
    epochs: int = 5
    pretrain_epochs: int = 5
    batch_size: int = 32
    lr: float = 3e-3
    backbone_lr_ratio: float = 0.1
    quant_weight: float = 0.1
    topk: int = 1000
    seed: int = 0
    losses: tuple[str, ...] = ("cosine",) + BASELINES
    bits: tuple[int, ...] = (16, 32, 64)
    inits: tuple[str, ...] = INITS


PRESETS = {
    "full": QualityConfig(),
    "quick": QualityConfig(
        train=256, query=100, database=512, epochs=3, pretrain_epochs=3, topk=500, losses=("cosine", "dpsh"), bits=(32,)
    ),
}


def check_grid(cfg: QualityConfig) -> None:
    """Reject a grid the script cannot compare, naming the allowed values."""
    unknown = [name for name in cfg.losses if name not in LOSSES]
    if unknown:
        raise HashrayError(f"unknown loss(es) {unknown}; choose from {', '.join(LOSSES)}")
    if "cosine" not in cfg.losses:
        raise HashrayError("the grid must include the cosine loss: every ratio is cosine over a baseline")
    if any(init not in INITS for init in cfg.inits):
        raise HashrayError(f"unknown init(s) in {list(cfg.inits)}; choose from {', '.join(INITS)}")


def data_key(cfg: QualityConfig) -> dict[str, Any]:
    """What the cached data set and pre-trained backbone depend on."""
    fields = (
        "num_classes",
        "train",
        "query",
        "database",
        "source_size",
        "image_size",
        "pretrain_epochs",
        "batch_size",
        "lr",
        "backbone_lr_ratio",
        "seed",
    )
    return {name: getattr(cfg, name) for name in fields}


def prepare_out(cfg: QualityConfig, out: Path) -> None:
    """Bind ``out`` to one data set + schedule so that cached runs are never mixed across configs."""
    out.mkdir(parents=True, exist_ok=True)
    key_file = out / "bench.json"
    key = {**data_key(cfg), "epochs": cfg.epochs, "quant_weight": cfg.quant_weight, "topk": cfg.topk}
    if key_file.exists() and json.loads(key_file.read_text()) != key:
        raise HashrayError(f"{out} holds a benchmark with another configuration ({key_file}); use another --out")
    key_file.write_text(json.dumps(key, indent=2))


def ensure_dataset(cfg: QualityConfig, out: Path) -> str:
    """The synthetic data set, ingested once per ``out``."""
    data = out / "dataset"
    if not (data / "dataset.json").exists():
        ingest(
            IngestConfig(
                source="synthetic",
                out=str(data),
                train=cfg.train,
                query=cfg.query,
                database=cfg.database,
                image_size=cfg.source_size,
                num_classes=cfg.num_classes,
                seed=cfg.seed,
            )
        )
    return str(data)


def train_config(
    cfg: QualityConfig, data: str, run_dir: Path, *, loss: str, bits: int, epochs: int, weights: str
) -> TrainConfig:
    """The one training configuration every setting shares; only loss, bits, epochs and weights vary."""
    return TrainConfig(
        data=data,
        run=str(run_dir),
        bits=bits,
        epochs=epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        backbone_lr_ratio=cfg.backbone_lr_ratio,
        loss=loss,
        quant_weight=cfg.quant_weight,
        weights=weights,
        image_size=cfg.image_size,
        seed=cfg.seed,
        val_queries=min(cfg.query, 100),
        val_database=min(cfg.database, 500),
    )


def ensure_pretrained(cfg: QualityConfig, data: str, out: Path) -> str:
    """Path of the classifier backbone (``model.pt`` of a ``--loss classify`` run), trained once per ``out``."""
    run_dir = out / "pretrain"
    if not (run_dir / MODEL_PT).exists():
        classes = len(DatasetDir.open(data).classes)
        bits = -(-classes // 8) * 8  # one output per class, rounded up to whole bytes
        train(train_config(cfg, data, run_dir, loss="classify", bits=bits, epochs=cfg.pretrain_epochs, weights="none"))
    return str(run_dir / MODEL_PT)


def run_setting(
    cfg: QualityConfig, data: str, out: Path, *, loss: str, bits: int, init: str, weights: str
) -> dict[str, Any]:
    """Train, encode and evaluate one setting (reused when its metrics exist); returns its table row."""
    name = f"{init}-{loss}-{bits}"
    base = out / "runs" / name
    metrics_file = base / "eval" / METRICS_JSON
    if not metrics_file.exists():
        started = time.perf_counter()
        train(
            train_config(
                cfg,
                data,
                base / "run",
                loss=loss,
                bits=bits,
                epochs=cfg.epochs,
                weights=weights if init == "finetune" else "none",
            )
        )
        trained = time.perf_counter() - started
        for split in ("query", "database"):
            encode(EncodeConfig(run=str(base / "run"), data=data, split=split, out=str(base / split), overwrite=True))
        evaluate(
            EvaluateConfig(
                query=str(base / "query"), database=str(base / "database"), out=str(base / "eval"), topk=cfg.topk
            )
        )
        (base / "timing.json").write_text(json.dumps({"train_s": trained, "total_s": time.perf_counter() - started}))
    metrics = json.loads(metrics_file.read_text())
    history = json.loads((base / "run" / HISTORY_JSON).read_text())["epochs"]
    timing = json.loads((base / "timing.json").read_text())
    return {
        "setting": name,
        "init": init,
        "loss": loss,
        "bits": bits,
        "topk": metrics["topk"],
        **{key: metrics[key] for key in METRICS},
        "mAP_random": metrics["mAP_random"],
        "val_mAP": [epoch.get("val_mAP") for epoch in history],
        "train_s": timing["train_s"],
        "pr_curve": metrics["curves"]["hamming_radius"],
    }


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cosine's mAP, NDCG and P@r2 over each baseline's, per initialisation and code length."""
    by_key = {(row["init"], row["bits"], row["loss"]): row for row in rows}
    result = []
    for (init, bits, loss), row in by_key.items():
        cosine = by_key.get((init, bits, "cosine"))
        if loss == "cosine" or cosine is None:
            continue
        result.append(
            {
                "init": init,
                "bits": bits,
                "baseline": loss,
                **{key: cosine[key] / row[key] if row[key] else float("nan") for key in METRICS},
            }
        )
    return result


def epochs_to_reach(val_maps: list[float | None], target: float) -> int | None:
    """First epoch (1-based) whose validation mAP is at least ``target``; None if never."""
    return next((epoch for epoch, value in enumerate(val_maps, 1) if value is not None and value >= target), None)


def convergence(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Epochs fine-tuning and scratch need to reach the validation mAP scratch ends with."""
    by_key = {(row["init"], row["bits"], row["loss"]): row for row in rows}
    result = []
    for (init, bits, loss), scratch in by_key.items():
        finetune = by_key.get(("finetune", bits, loss))
        if init != "scratch" or finetune is None or scratch["val_mAP"][-1] is None:
            continue
        target = scratch["val_mAP"][-1]
        result.append(
            {
                "bits": bits,
                "loss": loss,
                "target_val_mAP": target,
                "finetune_epochs": epochs_to_reach(finetune["val_mAP"], target),
                "scratch_epochs": epochs_to_reach(scratch["val_mAP"], target),
            }
        )
    return result


def markdown(
    cfg: QualityConfig,
    rows: list[dict[str, Any]],
    ratio_rows: list[dict[str, Any]],
    convergence_rows: list[dict[str, Any]],
) -> str:
    """The three result tables as Markdown."""
    k = rows[0]["topk"] if rows else cfg.topk
    lines = [
        f"| init | bits | loss | mAP@{k} | NDCG@{k} | P@r2 | mAP random codes | val mAP per epoch | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        curve = " ".join(f"{value:.3f}" for value in row["val_mAP"] if value is not None)
        lines.append(
            f"| {row['init']} | {row['bits']} | {row['loss']} | {row['mAP']:.4f} | {row['NDCG']:.4f} "
            f"| {row['P@r2']:.4f} | {row['mAP_random']:.4f} | {curve} | {row['train_s']:.0f} |"
        )
    lines += [
        "",
        "Cosine loss over each baseline (> 1: cosine is better):",
        "",
        "| init | bits | baseline | mAP ratio | NDCG ratio | P@r2 ratio |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['init']} | {r['bits']} | {r['baseline']} | {r['mAP']:.4f} | {r['NDCG']:.4f} | {r['P@r2']:.4f} |"
        for r in ratio_rows
    ]
    if convergence_rows:
        lines += [
            "",
            "Epochs to reach the validation mAP that training from scratch ends with (- : never):",
            "",
            "| bits | loss | target val mAP | fine-tune epochs | scratch epochs |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['bits']} | {r['loss']} | {r['target_val_mAP']:.4f} | {r['finetune_epochs'] or '-'} "
            f"| {r['scratch_epochs'] or '-'} |"
            for r in convergence_rows
        ]
    return "\n".join(lines) + "\n"


def plot_pr_curves(rows: list[dict[str, Any]], path: Path) -> None:
    """Precision/recall over Hamming radius: one panel per (init, bits), one line per loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inits = sorted({row["init"] for row in rows})
    bits = sorted({row["bits"] for row in rows})
    figure, axes = plt.subplots(len(inits), len(bits), figsize=(4 * len(bits), 3.5 * len(inits)), squeeze=False)
    for row in rows:
        axis = axes[inits.index(row["init"])][bits.index(row["bits"])]
        axis.plot(row["pr_curve"]["recall"], row["pr_curve"]["precision"], marker=".", label=row["loss"])
        axis.set(
            title=f"{row['init']}, {row['bits']} bits", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02)
        )
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_grid(cfg: QualityConfig, out: Path, data: str | None = None) -> dict[str, Any]:
    """Every setting of the grid, then the tables and the plot; returns the JSON payload.

    ``data`` is an existing dataset dir to use instead of ingesting the
    configured synthetic one (the test passes its shared tiny dataset).
    """
    check_grid(cfg)
    prepare_out(cfg, out)
    data = data or ensure_dataset(cfg, out)
    weights = ensure_pretrained(cfg, data, out) if "finetune" in cfg.inits else "none"
    rows = [
        run_setting(cfg, data, out, loss=loss, bits=bits, init=init, weights=weights)
        for init in cfg.inits
        for bits in cfg.bits
        for loss in cfg.losses
    ]
    ratio_rows, convergence_rows = ratios(rows), convergence(rows)
    payload = {
        "config": dataclasses.asdict(cfg),
        "rows": [{k: v for k, v in row.items() if k != "pr_curve"} for row in rows],
        "ratios": ratio_rows,
        "convergence": convergence_rows,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    (out / "results.md").write_text(markdown(cfg, rows, ratio_rows, convergence_rows))
    plot_pr_curves(rows, out / "pr_curves.png")
    return payload


def parse_args(argv: list[str] | None = None) -> tuple[QualityConfig, Path, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the reduced grid (cosine vs DPSH, 32 bits, both inits)")
    parser.add_argument("--out", help="output and cache dir (default build/quality-<preset>)")
    parser.add_argument("--epochs", type=int, help="override the preset's epochs (every loss alike)")
    parser.add_argument("--lr", type=float, help="override the preset's hash-layer learning rate (every loss alike)")
    parser.add_argument(
        "--quant-weight", type=float, help="override the preset's quantisation weight (every loss alike)"
    )
    parser.add_argument("--losses", help=f"comma-separated subset of {','.join(LOSSES)}")
    parser.add_argument("--bits", help="comma-separated code lengths")
    parser.add_argument("--inits", help="comma-separated subset of finetune,scratch")
    parser.add_argument("--num-cpus", type=int, help="CPUs given to Ray (default: all)")
    args = parser.parse_args(argv)
    preset = "quick" if args.quick else "full"
    overrides = {
        name: getattr(args, name) for name in ("epochs", "lr", "quant_weight") if getattr(args, name) is not None
    }
    if args.losses:
        overrides["losses"] = tuple(args.losses.split(","))
    if args.bits:
        overrides["bits"] = tuple(int(value) for value in args.bits.split(","))
    if args.inits:
        overrides["inits"] = tuple(args.inits.split(","))
    cfg = dataclasses.replace(PRESETS[preset], **overrides)
    return cfg, Path(args.out or f"build/quality-{preset}"), args


def main(argv: list[str] | None = None) -> int:
    from pipelines.runtime import init_ray, setup_logging

    cfg, out, args = parse_args(argv)
    setup_logging()
    check_grid(cfg)
    init_ray(num_cpus=args.num_cpus)
    started = time.perf_counter()
    run_grid(cfg, out)
    print((out / "results.md").read_text())
    print(
        f"grid of {len(cfg.inits) * len(cfg.bits) * len(cfg.losses)} settings in {time.perf_counter() - started:.0f} s; "
        f"tables in {out}/results.md and results.json, PR curves in {out}/pr_curves.png"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except HashrayError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
