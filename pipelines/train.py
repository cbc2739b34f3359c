"""``hashray train``: distributed fine-tuning of ResNetHash on Ray Train (V2).

The driver validates the inputs, builds the Ray Data pipelines (the train
split sharded across workers, a small held-out query/database sample for
validation) and runs a ``TorchTrainer``. Each worker trains a DDP replica on
its shard; pairs for the loss are formed between the worker's batch and the
batches of *all* workers (codes and labels all-gathered), so the pair pool
grows with the cluster. Every epoch ends with a checkpoint and a validation
mAP; re-running the same command resumes from the last checkpoint, and a
crashed worker restarts the run from it (``--max-failures``). At the end the
run dir holds ``model.pt`` and ``config.json`` (``pipelines.contracts``).

Why gathered codes carry no gradient: worker a's loss covers the pairs
(i in a, j anywhere) and differentiates only its own h_i; the pair (i, j) with
j on worker b appears in b's loss too, differentiated w.r.t. h_j. DDP then
averages the parameter gradients, which is exactly the gradient of the mean
loss over all pairs -- no differentiable all-gather needed.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import posixpath
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from models.codes import check_bits, hamming_distances, pack_codes, topk_by_hamming
from models.errors import HashrayError
from models.loss import build_loss
from models.network import IMAGENET_MEAN, IMAGENET_STD, HashNetConfig, ResNetHash, check_arch, load_backbone_weights
from models.transforms import normalise
from pipelines import contracts
from pipelines.evaluate import average_precision

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_JSON = "history.json"
# Test-only fault hook: a worker exits once at the start of this (0-based) epoch.
FAULT_ENV = "HASHRAY_TEST_FAIL_AT_EPOCH"
FAULT_MARKER = ".test_fault_fired"
MIN_IMAGE_SIZE = 32


@dataclass(frozen=True)
class TrainConfig:
    """Inputs of ``hashray train``.

    Args:
        data: dataset dir (``hashray ingest`` output).
        run: run dir; re-running with the same dir resumes from its last checkpoint.
        arch, bits: the network (``models.network.ResNetHash``).
        epochs: total epochs of the run (a resumed run continues up to this count).
        batch_size: images per worker per step (also the preprocessing batch).
        lr: learning rate of the hash layer (AdamW).
        backbone_lr_ratio: backbone learning rate as a fraction of ``lr``.
        weight_decay: AdamW weight decay.
        freeze_epochs: first epochs with the backbone frozen (only the hash layer trains).
        loss: a key of ``models.loss.LOSSES``.
        quant_weight: weight of the quantisation term.
        weights: initial backbone: ``none``, ``imagenet`` or a state_dict path.
        allow_download: let torchvision fetch missing ImageNet weights.
        workers: Ray Train workers (DDP when > 1).
        gpu: one GPU per worker, bf16 autocast and channels_last.
        cpus_per_worker: CPUs reserved per training worker (torch threads follow it).
        data_cpus: CPUs per Ray Data read + preprocess task; leave room for it next to the workers.
        data_workers: most read + preprocess tasks running at once.
        image_size: network input size in pixels.
        seed: initialisation and augmentation seed.
        max_failures: worker failures to recover from (from the last checkpoint).
        val_queries: held-out query images for the per-epoch mAP (0: no validation).
        val_database: database images the validation queries are ranked against.
        keep_checkpoints: how many epoch checkpoints the run dir keeps.
    """

    data: str
    run: str
    arch: str = "resnet18"
    bits: int = 32
    epochs: int = 10
    batch_size: int = 32
    lr: float = 3e-3
    backbone_lr_ratio: float = 0.1
    weight_decay: float = 1e-4
    freeze_epochs: int = 0
    loss: str = "cosine"
    quant_weight: float = 0.1
    weights: str = "none"
    allow_download: bool = False
    workers: int = 1
    gpu: bool = False
    cpus_per_worker: float = 0.5
    data_cpus: float = 0.5
    data_workers: int = 2
    image_size: int = 224
    seed: int = 0
    max_failures: int = 2
    val_queries: int = 100
    val_database: int = 500
    keep_checkpoints: int = 2


# ---------------------------------------------------------------- driver


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) a run; write ``model.pt`` + ``config.json``; return the last epoch's metrics."""
    return fit(cfg, *validate(cfg))


def fit(cfg: TrainConfig, classes: list[str], backbone: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """:func:`run` after :func:`validate`: the Ray Train part."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = dataclasses.replace(cfg, data=contracts.absolute(cfg.data), run=contracts.absolute(cfg.run))
    contracts.write_json(contracts.join(cfg.run, contracts.CONFIG_JSON), net_config(cfg, classes).to_dict())
    # Through the object store: worker nodes need not see the driver's weights file.
    initial_weights = None if backbone is None else ray.put(backbone)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": dataclasses.asdict(cfg), "initial_weights": initial_weights},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=run_config(cfg),
        datasets=build_datasets(cfg, len(classes)),
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
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
    export(cfg, classes, state)
    final = state["history"][-1] if state["history"] else {}
    logger.info("train: %s done after %d epochs (val mAP %s)", cfg.run, state["epoch"], final.get("val_mAP"))
    return final


def validate(cfg: TrainConfig) -> tuple[list[str], dict[str, torch.Tensor] | None]:
    """Check every user input before Ray Train starts.

    Returns:
        The dataset's classes and the initial backbone state_dict (None for ``--weights none``).
    """
    check_arch(cfg.arch)
    check_bits(cfg.bits)
    build_loss(cfg.loss, cfg.quant_weight)
    check_numbers(cfg)
    classes = list(contracts.read_dataset_info(cfg.data)["classes"])
    for split in ("train", "query", "database") if cfg.val_queries else ("train",):
        contracts.split_files(cfg.data, split)
    check_resumable(cfg, classes)
    backbone = None if cfg.weights == "none" else load_backbone_weights(cfg.arch, cfg.weights, cfg.allow_download)
    return classes, backbone


def check_numbers(cfg: TrainConfig) -> None:
    """Counts, rates and sizes in their ranges, named by their command-line flag."""
    positive = ("epochs", "batch_size", "workers", "lr", "cpus_per_worker", "data_cpus", "data_workers", "keep_checkpoints")
    non_negative = ("freeze_epochs", "backbone_lr_ratio", "weight_decay", "max_failures", "val_queries")
    for name in positive + non_negative:
        value = getattr(cfg, name)
        if value < 0 or (value == 0 and name in positive):
            raise HashrayError(f"--{name.replace('_', '-')} must be {'> 0' if name in positive else '>= 0'}, got {value}")
    if cfg.image_size < MIN_IMAGE_SIZE:
        raise HashrayError(f"--image-size must be at least {MIN_IMAGE_SIZE} pixels, got {cfg.image_size}")
    if cfg.val_queries and cfg.val_database <= 0:
        raise HashrayError(f"--val-database must be > 0 when validating, got {cfg.val_database}")


def net_config(cfg: TrainConfig, classes: list[str]) -> HashNetConfig:
    return HashNetConfig(arch=cfg.arch, bits=cfg.bits, image_size=cfg.image_size, classes=tuple(classes), loss=cfg.loss)


def check_resumable(cfg: TrainConfig, classes: list[str]) -> None:
    """A run dir is bound to the network it started: refuse to resume it with another one."""
    config_uri = contracts.join(cfg.run, contracts.CONFIG_JSON)
    if not contracts.exists(config_uri):
        return
    previous = HashNetConfig.from_dict(contracts.read_json(config_uri))
    current = net_config(cfg, classes)
    if previous.classes != current.classes:
        raise HashrayError(
            f"{cfg.data} has classes {_preview(current.classes)} but run {cfg.run} was trained on "
            f"{_preview(previous.classes)}; use a new --run dir"
        )
    changed = [f"{f.name} {getattr(previous, f.name)!r} -> {getattr(current, f.name)!r}"
               for f in dataclasses.fields(HashNetConfig) if getattr(previous, f.name) != getattr(current, f.name)]
    if changed:
        raise HashrayError(f"run {cfg.run} was started with other settings ({'; '.join(changed)}); use a new --run dir")


def _preview(classes: tuple[str, ...], limit: int = 5) -> str:
    shown = ", ".join(classes[:limit]) + (", ..." if len(classes) > limit else "")
    return f"[{shown}] ({len(classes)} classes)"


def run_config(cfg: TrainConfig) -> Any:
    """Ray's run storage is the run dir itself, so the same --run resumes."""
    import ray.train

    storage_path, name = posixpath.split(contracts.absolute(cfg.run))
    fault = {FAULT_ENV: os.environ[FAULT_ENV]} if FAULT_ENV in os.environ else {}
    return ray.train.RunConfig(
        name=name,
        storage_path=storage_path,
        failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        worker_runtime_env={"env_vars": fault} if fault else None,
    )


def build_datasets(cfg: TrainConfig, num_classes: int) -> dict[str, Any]:
    """Preprocessed ``train`` (sharded per worker) and the validation sample (read by rank 0 only)."""
    from pipelines.preprocess import PreprocessConfig, preprocess_split

    def prepared(split: str, train: bool, limit: int | None = None) -> Any:
        dataset = preprocess_split(
            cfg.data, split, PreprocessConfig(image_size=cfg.image_size, train=train), num_classes,
            batch_size=cfg.batch_size, num_cpus=cfg.data_cpus, seed=cfg.seed, max_workers=cfg.data_workers, keep_errors=False,
            share_cpus=True,  # with the training workers
        )
        return dataset.limit(limit) if limit else dataset

    datasets = {"train": prepared("train", True)}
    if cfg.val_queries:
        # Small by design: preprocess once here rather than in every epoch's validation.
        datasets["val_query"] = prepared("query", False, cfg.val_queries).materialize()
        datasets["val_database"] = prepared("database", False, cfg.val_database).materialize()
    return datasets


def read_checkpoint(checkpoint: Any) -> dict[str, Any]:
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def export(cfg: TrainConfig, classes: list[str], state: dict[str, Any]) -> None:
    """``model.pt`` + ``config.json`` (the encode/serve contract) and the epoch history."""
    model = ResNetHash(cfg.arch, cfg.bits)
    model.load_state_dict(state["model"])
    contracts.save_model(cfg.run, model, net_config(cfg, classes))
    contracts.write_json(contracts.join(cfg.run, HISTORY_JSON), {"epochs": state["history"]})


# ---------------------------------------------------------------- workers


def train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: restore or initialise, then train, validate and checkpoint every epoch."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = TrainConfig(**loop_config["config"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    module = ResNetHash(cfg.arch, cfg.bits).to(device)
    if cfg.gpu:
        module = module.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(module, cfg)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    state = restore(ray.train.get_checkpoint(), module, optimizer, scheduler, cfg)
    if state is None and loop_config["initial_weights"] is not None:
        module.backbone.load_state_dict(ray.get(loop_config["initial_weights"]))
    start_epoch, history = (state["epoch"], state["history"]) if state else (0, [])
    loss_fn = build_loss(cfg.loss, cfg.quant_weight)
    shard = ray.train.get_dataset_shard("train")
    model = None
    for epoch in range(start_epoch, cfg.epochs):
        fail_once_for_tests(cfg.run, epoch, rank)
        frozen = epoch < cfg.freeze_epochs
        if model is None or epoch == cfg.freeze_epochs:
            model = wrap_model(module, frozen)
        model.train()
        if frozen:
            module.backbone.eval()  # keep the pretrained BatchNorm statistics too
        metrics = train_one_epoch(model, shard, loss_fn, optimizer, device, cfg)
        metrics.update(epoch=epoch + 1, resumed_from=start_epoch, lr=optimizer.param_groups[-1]["lr"])
        scheduler.step()
        if rank == 0 and cfg.val_queries:
            metrics["val_mAP"] = validation_map(module, device, cfg)
        history.append(metrics)
        report_epoch(metrics, rank, module, optimizer, scheduler, history, cfg)


def build_optimizer(module: ResNetHash, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the backbone at ``backbone_lr_ratio`` of the hash layer's rate (fine-tuning)."""
    groups = [
        {"params": list(module.backbone.parameters()), "lr": cfg.lr * cfg.backbone_lr_ratio},
        {"params": list(module.hash_layer.parameters()), "lr": cfg.lr},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def restore(checkpoint: Any, module: ResNetHash, optimizer: torch.optim.Optimizer, scheduler: Any, cfg: TrainConfig) -> dict[str, Any] | None:
    """Load the last checkpoint into model, optimiser and scheduler; None on a fresh run."""
    if checkpoint is None:
        return None
    state = read_checkpoint(checkpoint)
    module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scheduler.T_max = cfg.epochs  # a re-run with more --epochs stretches the cosine to the new end
    logger.info("train: resuming from epoch %d of %d", state["epoch"], cfg.epochs)
    return state


def wrap_model(module: ResNetHash, frozen: bool) -> torch.nn.Module:
    """(Re)wrap for data parallelism with the backbone trainable or frozen.

    DDP registers the parameters that require gradients when it is built, so
    the wrapper is rebuilt when the backbone thaws instead of asking DDP to
    search for unused parameters every step.
    """
    import ray.train.torch

    module.backbone.requires_grad_(not frozen)
    return ray.train.torch.prepare_model(module)


def train_one_epoch(model: torch.nn.Module, shard: Any, loss_fn: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    device: torch.device, cfg: TrainConfig) -> dict[str, float]:
    """One pass over the worker's shard.

    Returns the mean loss, global images/s (wall time, data pipeline start
    included), the seconds spent waiting for input, and the mean pair-pool rows.
    """
    steps, rows, loss_sum, pool_sum, waited = 0, 0, 0.0, 0, 0.0
    started = ready = time.perf_counter()
    for batch in shard.iter_torch_batches(batch_size=cfg.batch_size, dtypes=BATCH_DTYPES, device=device):
        waited += time.perf_counter() - ready
        if len(batch["image"]) >= 2:  # BatchNorm cannot train on one row; every rank sees the same sizes
            loss, pool = train_step(model, batch, loss_fn, optimizer, device, cfg)
            steps, rows, loss_sum, pool_sum = steps + 1, rows + len(batch["image"]), loss_sum + loss, pool_sum + pool
        ready = time.perf_counter()
    seconds = time.perf_counter() - started
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {
        "loss": loss_sum / max(steps, 1),
        "images_per_s": rows * world / max(seconds, 1e-9),  # shards are equal-sized
        "data_wait_s": waited,
        "pair_pool": pool_sum / max(steps, 1),
    }


# Images travel uint8 (4x smaller through the object store and to the GPU) and
# are normalised on the training device by model_input.
BATCH_DTYPES = {"image": torch.uint8, "labels": torch.float32}


def model_input(images: torch.Tensor, gpu: bool) -> torch.Tensor:
    """uint8 batch from the data pipeline -> the network's normalised float input, on the batch's device."""
    pixels = normalise(images, IMAGENET_MEAN, IMAGENET_STD)
    return pixels.contiguous(memory_format=torch.channels_last) if gpu else pixels


def train_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], loss_fn: torch.nn.Module,
               optimizer: torch.optim.Optimizer, device: torch.device, cfg: TrainConfig) -> tuple[float, int]:
    """One optimiser step on a batch; returns the loss and the rows in the pair pool."""
    images, labels = model_input(batch["image"], cfg.gpu), batch["labels"]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.gpu):
        codes = model(images)
    other_codes, other_labels = gather_others(codes.detach(), labels)
    loss = loss_fn(codes, labels, other_codes, other_labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), len(images) + (0 if other_codes is None else len(other_codes))


def gather_others(codes: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Codes and labels of the other workers' current batches (no gradient); (None, None) alone.

    One all-gather carries codes and labels side by side; rows are padded to
    the largest batch so ranks with a shorter batch still take part.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None, None
    rows = torch.cat([codes.float(), labels.float()], dim=1)
    sizes = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(rows)], device=rows.device))
    padded = rows.new_zeros((int(max(sizes)), rows.shape[1]))
    padded[: len(rows)] = rows
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    others = torch.cat([block[: int(size)] for rank, (block, size) in enumerate(zip(gathered, sizes)) if rank != dist.get_rank()])
    return others[:, : codes.shape[1]], others[:, codes.shape[1]:]


def validation_map(module: ResNetHash, device: torch.device, cfg: TrainConfig) -> float:
    """mAP of the held-out queries ranked against the database sample by Hamming distance."""
    import ray.train

    query_codes, query_labels = encode_sample(module, ray.train.get_dataset_shard("val_query"), device, cfg)
    db_codes, db_labels = encode_sample(module, ray.train.get_dataset_shard("val_database"), device, cfg)
    return mean_average_precision(query_codes, query_labels, db_codes, db_labels)


def encode_sample(module: ResNetHash, dataset: Any, device: torch.device, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Packed codes and multi-hot labels of a small preprocessed dataset."""
    module.eval()
    codes, labels = [], []
    for batch in dataset.iter_torch_batches(batch_size=cfg.batch_size, dtypes=BATCH_DTYPES, device=device):
        images = model_input(batch["image"], cfg.gpu)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.gpu):
            codes.append(pack_codes(module.encode(images).cpu().numpy()))
        labels.append(batch["labels"].cpu().numpy())
    return np.concatenate(codes), np.concatenate(labels)


def mean_average_precision(query_codes: np.ndarray, query_labels: np.ndarray, db_codes: np.ndarray, db_labels: np.ndarray) -> float:
    """mAP over the whole (small) database; relevant = shares a label; ties by database position."""
    distances = hamming_distances(query_codes, db_codes)
    ranked = np.stack([topk_by_hamming(row, len(db_codes)) for row in distances])
    relevant = np.einsum("qkc,qc->qk", db_labels[ranked], query_labels) > 0
    return float(average_precision(relevant).mean())


def report_epoch(metrics: dict[str, float], rank: int, module: ResNetHash, optimizer: torch.optim.Optimizer,
                 scheduler: Any, history: list[dict[str, float]], cfg: TrainConfig) -> None:
    """Report the epoch's metrics; rank 0 attaches the checkpoint and logs a line."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    logger.info(
        "train: epoch %d/%d loss %.4f val mAP %s %.1f images/s (%.1f s waiting for data)",
        metrics["epoch"], cfg.epochs, metrics["loss"],
        f"{metrics['val_mAP']:.4f}" if "val_mAP" in metrics else "-", metrics["images_per_s"], metrics["data_wait_s"],
    )
    state = {
        "model": module.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "epoch": metrics["epoch"], "history": history, "config": dataclasses.asdict(cfg),
    }
    with tempfile.TemporaryDirectory() as directory:
        torch.save(state, Path(directory) / CHECKPOINT_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def fail_once_for_tests(run_uri: str, epoch: int, rank: int) -> None:
    """Test-only fault hook: with ``HASHRAY_TEST_FAIL_AT_EPOCH=k`` the last worker dies
    at the start of epoch k, once per run dir (a marker file remembers it).

    It first waits until Ray Train has committed the reports in flight: a worker
    that dies right after ``report`` can beat the controller to the checkpoint,
    and the run would then resume from the one before -- correct, but not the
    case the test wants to pin down.
    """
    import ray.train

    fail_at = os.environ.get(FAULT_ENV)
    if fail_at is None or int(fail_at) != epoch or rank != ray.train.get_context().get_world_size() - 1:
        return
    marker = contracts.join(run_uri, FAULT_MARKER)
    if contracts.exists(marker):
        return
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    contracts.write_bytes(marker, b"")
    logger.warning("train: %s=%s, worker %d exits now", FAULT_ENV, fail_at, rank)
    os._exit(1)


# ---------------------------------------------------------------- CLI


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    defaults = TrainConfig(data="", run="")
    parser = subparsers.add_parser("train", help="fine-tune a ResNet hash network on Ray Train",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="dataset dir written by `hashray ingest`")
    parser.add_argument("--run", required=True, help="run dir (checkpoints, model.pt, config.json); the same dir resumes")
    parser.add_argument("--arch", default=defaults.arch, help="resnet18|resnet34|resnet50|resnet101|resnet152")
    parser.add_argument("--bits", type=int, default=defaults.bits, help="code length, a positive multiple of 8")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="total epochs")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per worker per step")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="hash-layer learning rate (AdamW)")
    parser.add_argument("--backbone-lr-ratio", type=float, default=defaults.backbone_lr_ratio,
                        help="backbone learning rate as a fraction of --lr")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay")
    parser.add_argument("--freeze-epochs", type=int, default=defaults.freeze_epochs,
                        help="first epochs with the backbone frozen")
    parser.add_argument("--loss", default=defaults.loss, help="cosine (the paper's) | dpsh | idhn | hashnet | classify "
                        "(multi-label pre-training of a backbone for --weights PATH; --bits >= classes)")
    parser.add_argument("--quant-weight", type=float, default=defaults.quant_weight, help="weight of the quantisation term")
    parser.add_argument("--weights", default=defaults.weights, help="initial backbone: none | imagenet | PATH to a ResNet state_dict")
    parser.add_argument("--allow-download", action="store_true", help="let torchvision download missing ImageNet weights")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="Ray Train workers (DDP when > 1)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16 autocast, channels_last")
    parser.add_argument("--cpus-per-worker", type=float, default=defaults.cpus_per_worker,
                        help="CPUs reserved per training worker; leave some for Ray Data")
    parser.add_argument("--data-cpus", type=float, default=defaults.data_cpus, help="CPUs per read + preprocess task")
    parser.add_argument("--data-workers", type=int, default=defaults.data_workers, help="most read + preprocess tasks at once")
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="network input size in pixels")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="initialisation and augmentation seed")
    parser.add_argument("--max-failures", type=int, default=defaults.max_failures,
                        help="worker failures to recover from, each from the last checkpoint")
    parser.add_argument("--val-queries", type=int, default=defaults.val_queries,
                        help="held-out queries for the per-epoch validation mAP (0: none)")
    parser.add_argument("--val-database", type=int, default=defaults.val_database,
                        help="database images the validation queries are ranked against")
    parser.add_argument("--keep-checkpoints", type=int, default=defaults.keep_checkpoints, help="epoch checkpoints to keep")
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    from pipelines.runtime import init_ray

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    checked = validate(cfg)  # fail fast, before a Ray cluster is started
    init_ray(args.address)
    final = fit(cfg, *checked)
    print(f"trained {cfg.run}: epoch {final.get('epoch')}, loss {final.get('loss', float('nan')):.4f}, "
          f"val mAP {final.get('val_mAP', float('nan')):.4f}")
    return 0
