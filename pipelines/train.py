"""``hashray train``: distributed fine-tuning of ResNetHash on Ray Train (V2).

The driver validates the inputs, plans the reading order (a fresh seeded
shuffle of the train split every epoch and the held-out validation rows,
:mod:`pipelines.epochs`) and runs a ``TorchTrainer``. Each worker trains a
DDP replica on its share of each epoch; pairs for the loss are formed
between the worker's batch and the batches of *all* workers (codes and labels
all-gathered), so the pair pool grows with the cluster. Every epoch ends with a checkpoint and a validation
mAP; re-running the same command resumes from the last checkpoint, and a
crashed worker restarts the run from it (``--max-failures``). At the end the
run dir holds ``model.pt`` and ``config.json`` (``contracts.run.RunDir``).
What each worker runs is :mod:`pipelines.train_loop`.
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from contracts.dataset import DatasetDir
from contracts.fs import Location, absolute, exists, join, read_json, write_json
from contracts.run import HISTORY_JSON
from models.codes import check_bits
from models.errors import HashrayError
from models.loss import LOSSES, PRETRAIN_LOSSES
from models.network import ARCHS, CONFIG_JSON, HashNetConfig, ResNetHash, check_arch, load_backbone_weights
from pipelines.epochs import EpochPlan, data_tasks, row_groups, segments_dataset
from pipelines.preprocess import PreprocessConfig
from pipelines.train_loop import EpochHook, read_checkpoint, train_loop, training_loss

logger = logging.getLogger(__name__)

MIN_IMAGE_SIZE = 32
# Validation holds out at most 1/10 of the train rows: the rest train.
MAX_HOLDOUT_SHARE = 10
# --placement -> Ray Train's placement group strategy. Both are soft: a run that
# lost a node restarts its workers on the nodes left.
PLACEMENTS = {"pack": "PACK", "spread": "SPREAD"}


# --backbone-lr-ratio's defaults: fine-tune a pretrained backbone gently; a random one learns at full rate.
FINE_TUNE_BACKBONE_RATIO = 0.1
FROM_SCRATCH_BACKBONE_RATIO = 1.0


@dataclass(frozen=True)
class TrainConfig:
    """Inputs of ``hashray train``.

    Args:
        data: dataset dir (``hashray ingest`` output).
        run: run dir; re-running with the same dir resumes from its last checkpoint.
        arch: ResNet backbone of the network (``models.network.ResNetHash``).
        bits: code length, a positive multiple of 8.
        epochs: total epochs of the run (a resumed run continues up to this count).
        batch_size: images per worker per step (also the preprocessing batch).
        lr: learning rate of the hash layer (AdamW).
        backbone_lr_ratio: backbone learning rate as a fraction of ``lr`` (default: 0.1 for a pretrained
            ``--weights``, the fine-tuning rate; 1.0 for ``--weights none``, where the backbone learns from scratch).
        weight_decay: AdamW weight decay.
        freeze_epochs: first epochs with the backbone frozen (only the hash layer trains).
        loss: a key of ``models.loss.LOSSES`` (``cosine`` is the paper's), or
            ``classify``: multi-label pre-training of a backbone for ``--weights PATH``
            (needs ``--bits`` >= classes).
        quant_weight: weight of the quantisation term.
        balance_weight: weight of the bit-balance term against collapse (models.regularizers; 0: off).
        decorrelation_weight: weight of the bit-decorrelation term against collapse (0: off).
        weights: initial backbone: ``none``, ``imagenet`` or the path of a ResNet state_dict.
        allow_download: let torchvision fetch missing ImageNet weights.
        workers: Ray Train workers (DDP when > 1).
        placement: where the workers go: ``pack`` fills one node before the next, ``spread`` puts them
            on as many nodes as there are (both fall back to whatever fits when nodes are lost).
        gpu: one GPU per worker, bf16 autocast and channels_last.
        cpus_per_worker: CPUs reserved per training worker in Ray's scheduling.
        threads: torch threads per training worker on CPU; 0: the node's cores shared among the
            training workers on it (the data tasks run between steps and take little).
        data_cpus: CPUs per Ray Data read + preprocess task; leave room for it next to the workers.
        data_workers: most read + preprocess tasks running at once; 0: each batch is prepared in the
            training worker between steps (unset: 0 on CPU, 2 with --gpu; see pipelines.epochs.data_tasks).
        image_size: network input size in pixels.
        seed: initialisation and augmentation seed.
        max_failures: worker failures to recover from (from the last checkpoint).
        val_queries: train rows held out of training as the per-epoch validation queries, at most a tenth
            of the train split (0: no validation).
        val_database: training rows the validation queries are ranked against.
        keep_checkpoints: how many epoch checkpoints the run dir keeps.
    """

    data: str
    run: str
    arch: str = field(default="resnet18", metadata={"choices": ARCHS})
    bits: int = 32
    epochs: int = 10
    batch_size: int = 32
    lr: float = 3e-3
    backbone_lr_ratio: float | None = None
    weight_decay: float = 1e-4
    freeze_epochs: int = 0
    loss: str = field(default="cosine", metadata={"choices": (*LOSSES, *PRETRAIN_LOSSES)})
    quant_weight: float = 0.1
    balance_weight: float = 0.0
    decorrelation_weight: float = 0.0
    weights: str = "none"
    allow_download: bool = False
    workers: int = 1
    placement: str = field(default="pack", metadata={"choices": tuple(PLACEMENTS)})
    gpu: bool = False
    cpus_per_worker: float = 0.5
    threads: int = 0
    data_cpus: float = 0.5
    data_workers: int | None = None
    image_size: int = 224
    seed: int = 0
    max_failures: int = 2
    val_queries: int = 100
    val_database: int = 500
    keep_checkpoints: int = 2

    @property
    def backbone_ratio(self) -> float:
        """``backbone_lr_ratio``, or its default for the start: fine-tuning a pretrained backbone, or from scratch."""
        if self.backbone_lr_ratio is not None:
            return self.backbone_lr_ratio
        return FROM_SCRATCH_BACKBONE_RATIO if self.weights == "none" else FINE_TUNE_BACKBONE_RATIO

    @property
    def data_tasks(self) -> int:
        """``data_workers``, or its default for the device (:func:`pipelines.epochs.data_tasks`)."""
        return data_tasks(self.data_workers, gpu=self.gpu)


# ---------------------------------------------------------------- driver


def run(cfg: TrainConfig, *, on_epoch_start: EpochHook | None = None) -> dict[str, Any]:
    """Train (or resume) a run; write ``model.pt`` + ``config.json``; return the last epoch's metrics.

    ``on_epoch_start(epoch, rank, world_size)``, when given, runs in every
    worker at the start of every epoch; it must pickle (tests inject faults with it).
    """
    return fit(cfg, *validate(cfg), on_epoch_start=on_epoch_start)


def fit(
    cfg: TrainConfig,
    dataset: DatasetDir,
    backbone: dict[str, torch.Tensor] | None,
    *,
    on_epoch_start: EpochHook | None = None,
) -> dict[str, Any]:
    """:func:`run` after :func:`validate`: the Ray Train part."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = dataclasses.replace(cfg, data=dataset.uri, run=absolute(cfg.run))
    net = net_config(cfg, dataset.classes)
    plan = epoch_plan(cfg, dataset)
    write_json(join(cfg.run, CONFIG_JSON), net.to_dict())  # binds the run dir to this network (check_resumable)
    # Through the object store: worker nodes need not see the driver's weights file.
    initial_weights = None if backbone is None else ray.put(backbone)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": cfg,
            "net_config": net,
            "initial_weights": initial_weights,
            "on_epoch_start": on_epoch_start,
            "plan": plan,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=cfg.gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
            placement_strategy=PLACEMENTS[cfg.placement],
        ),
        run_config=run_config(cfg),
        datasets=validation_datasets(cfg, plan, len(dataset.classes)),
        # Each worker reads its own share of each epoch (pipelines.epochs); the
        # validation samples are small and read whole by rank 0.
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    # Ray Train installs a SIGINT handler (Ctrl-C aborts the run) and leaves it in
    # place: put the caller's back, or Ctrl-C would not stop what follows (the demo's server).
    sigint_handler = signal.getsignal(signal.SIGINT)
    try:
        result = trainer.fit()
    finally:
        if sigint_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint_handler)
    if result.checkpoint is None:
        raise HashrayError(f"{cfg.run}: training ended without a checkpoint")
    state = read_checkpoint(result.checkpoint)
    export(cfg, net, state)
    final = state["history"][-1] if state["history"] else {}
    logger.info("train: %s done after %d epochs (val mAP %s)", cfg.run, state["epoch"], final.get("val_mAP"))
    return final


def validate(cfg: TrainConfig) -> tuple[DatasetDir, dict[str, torch.Tensor] | None]:
    """Check every user input before Ray Train starts.

    Returns:
        The dataset dir, opened once here and handed down to every later
        step, and the initial backbone state_dict (None for ``--weights none``).
    """
    check_arch(cfg.arch)
    check_bits(cfg.bits)
    if cfg.placement not in PLACEMENTS:
        raise HashrayError(f"unknown placement {cfg.placement!r}; choose one of {', '.join(PLACEMENTS)}")
    training_loss(cfg)
    check_numbers(cfg)
    dataset = DatasetDir.open(cfg.data)
    dataset.split_files("train")  # validation reads held-out train rows, never the query or database split
    check_split_sizes(cfg, dataset.rows("train"))
    check_resumable(cfg, dataset)
    backbone = None if cfg.weights == "none" else load_backbone_weights(cfg.arch, cfg.weights, cfg.allow_download)
    return dataset, backbone


def check_numbers(cfg: TrainConfig) -> None:
    """Counts, rates and sizes in their ranges, named by their command-line flag."""
    positive = ("epochs", "batch_size", "workers", "lr", "cpus_per_worker", "data_cpus", "keep_checkpoints")
    non_negative = ("freeze_epochs", "backbone_lr_ratio", "weight_decay", "max_failures", "val_queries", "threads")
    non_negative += ("data_workers", "balance_weight", "decorrelation_weight")
    for name in positive + non_negative:
        value = getattr(cfg, name)
        if value is None:  # unset: a default chosen from other flags
            continue
        if value < 0 or (value == 0 and name in positive):
            raise HashrayError(
                f"--{name.replace('_', '-')} must be {'> 0' if name in positive else '>= 0'}, got {value}"
            )
    if cfg.image_size < MIN_IMAGE_SIZE:
        raise HashrayError(f"--image-size must be at least {MIN_IMAGE_SIZE} pixels, got {cfg.image_size}")
    if cfg.val_queries and cfg.val_database <= 0:
        raise HashrayError(f"--val-database must be > 0 when validating, got {cfg.val_database}")


def check_split_sizes(cfg: TrainConfig, train_rows: int) -> None:
    """Every worker needs rows to train on beside the held-out validation rows."""
    if train_rows - validation_sizes(cfg, train_rows)[0] < cfg.workers * 2:
        raise HashrayError(f"{train_rows} train rows leave under 2 rows for each of --workers {cfg.workers}")


def validation_sizes(cfg: TrainConfig, train_rows: int) -> tuple[int, int]:
    """(held-out queries, database rows) of the validation: at most a tenth of the train split is held out."""
    if not cfg.val_queries:
        return 0, 0
    holdout = min(cfg.val_queries, max(1, train_rows // MAX_HOLDOUT_SHARE))
    return holdout, min(cfg.val_database, train_rows - holdout)


def net_config(cfg: TrainConfig, classes: tuple[str, ...] | list[str]) -> HashNetConfig:
    """The run's network: what ``config.json`` holds and every worker builds and feeds."""
    return HashNetConfig(arch=cfg.arch, bits=cfg.bits, image_size=cfg.image_size, classes=tuple(classes), loss=cfg.loss)


def check_resumable(cfg: TrainConfig, dataset: DatasetDir) -> None:
    """A run dir is bound to the network it started: refuse to resume it with another one."""
    config_uri = join(cfg.run, CONFIG_JSON)
    if not exists(config_uri):
        return
    previous = HashNetConfig.from_dict(read_json(config_uri))
    current = net_config(cfg, dataset.classes)
    if previous.classes != current.classes:
        raise HashrayError(
            f"{cfg.data} has classes {_preview(current.classes)} but run {cfg.run} was trained on "
            f"{_preview(previous.classes)}; use a new --run dir"
        )
    changed = [
        f"{f.name} {getattr(previous, f.name)!r} -> {getattr(current, f.name)!r}"
        for f in dataclasses.fields(HashNetConfig)
        if getattr(previous, f.name) != getattr(current, f.name)
    ]
    if changed:
        raise HashrayError(f"run {cfg.run} was started with other settings ({'; '.join(changed)}); use a new --run dir")


def _preview(classes: tuple[str, ...], limit: int = 5) -> str:
    shown = ", ".join(classes[:limit]) + (", ..." if len(classes) > limit else "")
    return f"[{shown}] ({len(classes)} classes)"


def run_config(cfg: TrainConfig) -> Any:
    """Ray's run storage is the run dir itself, so the same --run resumes."""
    import ray.train

    storage_path, name = posixpath.split(absolute(cfg.run))
    return ray.train.RunConfig(
        name=name,
        storage_path=storage_path,
        failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
    )


def epoch_plan(cfg: TrainConfig, dataset: DatasetDir) -> EpochPlan:
    """The run's reading order: the train split's row groups, the seed, and the held-out validation rows."""
    holdout, database = validation_sizes(cfg, dataset.rows("train"))
    if cfg.val_queries and (holdout, database) != (cfg.val_queries, cfg.val_database):
        logger.info("train: validation on %d held-out train rows against %d training rows", holdout, database)
    return EpochPlan(tuple(row_groups(dataset)), seed=cfg.seed, holdout=holdout, val_database=database)


def validation_datasets(cfg: TrainConfig, plan: EpochPlan, num_classes: int) -> dict[str, Any]:
    """The validation queries (held-out train rows) and database (training rows), preprocessed once here."""
    if not cfg.val_queries:
        return {}
    evaluation = PreprocessConfig(image_size=cfg.image_size, train=False)

    def prepared(segments: list) -> Any:
        pieces = [{"segments": [dataclasses.asdict(s) for s in segments], "seed": [cfg.seed]}]
        dataset = segments_dataset(
            pieces,
            evaluation,
            num_classes,
            batch_size=cfg.batch_size,
            num_cpus=cfg.data_cpus,
            max_workers=1,
            shuffle=False,
        ).materialize()
        # Read again every epoch: its progress bars would leave a finished
        # line behind each time, beside the epoch's own progress line.
        dataset.context.enable_progress_bars = False
        return dataset

    return {"val_query": prepared(plan.validation_queries()), "val_database": prepared(plan.validation_database())}


def export(cfg: TrainConfig, net: HashNetConfig, state: dict[str, Any]) -> None:
    """``model.pt`` + ``config.json`` (the encode/serve contract, written by the network itself) and the epoch history."""
    model = ResNetHash.from_config(net)
    model.load_state_dict(state["model"])
    model.save(Location(cfg.run))
    write_json(join(cfg.run, HISTORY_JSON), {"epochs": state["history"]})
