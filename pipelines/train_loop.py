"""What each Ray Train worker of ``hashray train`` runs: restore, train, validate, checkpoint, per epoch.

The driver (:mod:`pipelines.train`) hands every worker the same loop config:
the :class:`pipelines.train.TrainConfig`, the run's
:class:`models.network.HashNetConfig` (the network and its input
normalisation: the one that ``config.json`` holds, so training feeds the
network exactly as encode and serve will), the initial backbone (an object
ref) and an optional ``on_epoch_start(epoch, rank, world_size)`` callable.

Why gathered codes carry no gradient: worker a's loss covers the pairs
(i in a, j anywhere) and differentiates only its own h_i; the pair (i, j) with
j on worker b appears in b's loss too, differentiated w.r.t. h_j. DDP then
averages the parameter gradients, which is exactly the gradient of the mean
loss over all pairs -- no differentiable all-gather needed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from models.codes import pack_codes
from models.loss import build_loss
from models.metrics import mean_average_precision, multi_hot_words
from models.network import HashNetConfig, ResNetHash
from models.transforms import model_input
from pipelines.epochs import EpochPlan, epoch_batches
from pipelines.preprocess import PreprocessConfig

if TYPE_CHECKING:
    from pipelines.train import TrainConfig

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
# Images travel uint8 (4x smaller through the object store and to the GPU) and
# are normalised on the training device by models.transforms.model_input.
BATCH_DTYPES = {"image": torch.uint8, "labels": torch.float32}
# Called by every worker at the start of every epoch as (epoch, rank, world_size).
EpochHook = Callable[[int, int, int], None]


def train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: restore or initialise, then train, validate and checkpoint every epoch."""
    import ray
    import ray.train
    import ray.train.torch

    cfg: TrainConfig = loop_config["config"]
    net: HashNetConfig = loop_config["net_config"]
    on_epoch_start: EpochHook | None = loop_config.get("on_epoch_start")
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.threads, context.get_local_world_size()))
    torch.manual_seed(cfg.seed)
    module = ResNetHash.from_config(net).to(device)
    if cfg.gpu:
        module = module.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(module, cfg)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    state = restore(ray.train.get_checkpoint(), module, optimizer, scheduler, cfg)
    if state is None and loop_config["initial_weights"] is not None:
        module.backbone.load_state_dict(ray.get(loop_config["initial_weights"]))
    start_epoch, history = (state["epoch"], state["history"]) if state else (0, [])
    loss_fn = training_loss(cfg)
    plan: EpochPlan = loop_config["plan"]
    model = None
    for epoch in range(start_epoch, cfg.epochs):
        if on_epoch_start is not None:
            on_epoch_start(epoch, rank, world_size)
        frozen = epoch < cfg.freeze_epochs
        if model is None or epoch == cfg.freeze_epochs:
            model = wrap_model(module, frozen)
        model.train()
        if frozen:
            module.backbone.eval()  # keep the pretrained BatchNorm statistics too
        data = epoch_data(plan, cfg, len(net.classes), epoch=epoch, rank=rank, workers=world_size)
        metrics = train_one_epoch(model, data, loss_fn, optimizer, device, cfg, net)
        metrics.update(
            epoch=epoch + 1, resumed_from=start_epoch, lr=optimizer.param_groups[-1]["lr"], nodes=worker_nodes()
        )
        scheduler.step()
        if rank == 0 and cfg.val_queries:
            metrics["val_mAP"] = validation_map(module, device, cfg, net)
        history.append(metrics)
        report_epoch(metrics, rank, module, optimizer, scheduler, history, cfg)


def cpu_threads(requested: int, local_workers: int) -> int:
    """Torch threads of a CPU training worker: ``requested``, or 0 for the node's cores shared among its workers.

    Ray sets a worker's threads from its CPU reservation (one for 0.5 CPU), which
    leaves the rest of the machine idle: the reservation only schedules, while the
    data tasks that share the node run between steps and need little compute.
    """
    if requested:
        return requested
    return max(1, len(os.sched_getaffinity(0)) // max(local_workers, 1))


def worker_nodes() -> list[str]:
    """The Ray node id of every worker, by rank: where an epoch ran (a resumed run may have moved)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [node]
    nodes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return [str(n) for n in nodes]


def epoch_data(plan: EpochPlan, cfg: TrainConfig, num_classes: int, *, epoch: int, rank: int, workers: int) -> Any:
    """This worker's rows of ``epoch``, shuffled and augmented as the seed says (:mod:`pipelines.epochs`)."""
    return epoch_batches(
        plan.pieces(epoch, rank, workers, count=max(cfg.data_tasks, 1)),
        PreprocessConfig(image_size=cfg.image_size, train=True),
        num_classes,
        batch_size=cfg.batch_size,
        num_cpus=cfg.data_cpus,
        tasks=cfg.data_tasks,
    )


def training_loss(cfg: TrainConfig) -> torch.nn.Module:
    """The configured loss with its quantisation and anti-collapse weights (one place for driver, workers, benches)."""
    return build_loss(
        cfg.loss,
        cfg.quant_weight,
        balance_weight=cfg.balance_weight,
        decorrelation_weight=cfg.decorrelation_weight,
    )


def build_optimizer(module: ResNetHash, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the backbone at ``cfg.backbone_ratio`` of the hash layer's rate."""
    groups = [
        {"params": list(module.backbone.parameters()), "lr": cfg.lr * cfg.backbone_ratio},
        {"params": list(module.hash_layer.parameters()), "lr": cfg.lr},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def read_checkpoint(checkpoint: Any) -> dict[str, Any]:
    """The state a worker saved with :func:`report_epoch` (model, optimiser, scheduler, epoch, history)."""
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def restore(
    checkpoint: Any, module: ResNetHash, optimizer: torch.optim.Optimizer, scheduler: Any, cfg: TrainConfig
) -> dict[str, Any] | None:
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


def train_one_epoch(
    model: torch.nn.Module,
    shard: Any,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    cfg: TrainConfig,
    net: HashNetConfig,
) -> dict[str, float]:
    """One pass over the worker's shard.

    Returns the mean loss, global images/s (wall time, data pipeline start
    included), the seconds spent waiting for input, and the mean pair-pool rows.
    """
    steps, rows, loss_sum, pool_sum, waited = 0, 0, 0.0, 0, 0.0
    started = ready = time.perf_counter()
    # The last partial batch waits for another epoch (the rows differ every epoch):
    # every step then pairs a full batch, and every rank takes the same steps.
    for batch in torch_batches(shard, cfg.batch_size, device, drop_last=True):
        waited += time.perf_counter() - ready
        if len(batch["image"]) >= 2:  # BatchNorm cannot train on one row; every rank sees the same sizes
            loss, pool = train_step(model, batch, loss_fn, optimizer, device, cfg, net)
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


def torch_batches(
    dataset: Any, batch_size: int, device: torch.device, *, drop_last: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """The dataset's ``image``/``labels`` batches as tensors on ``device``, made in the calling thread.

    ``iter_torch_batches`` builds its tensors in Ray Data's prefetch threads.
    Torch gives every thread that runs a parallel op the worker's thread count,
    so each of those threads starts an OpenMP team of its own; once there are
    more OpenMP threads than cores, libgomp stops spinning between parallel
    regions and sleeps on futexes, and every op of the training step pays a
    wake-up: half the speed on 2 cores. NumPy batches from the prefetch threads
    and a zero-copy ``torch.from_numpy`` here keep one team, the training
    thread's. Arrays read straight from Arrow are read-only and are copied
    (a batch is a few hundred KB), so no tensor aliases memory torch may not write.
    """
    for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last):
        yield {
            name: torch.from_numpy(np.require(batch[name], requirements=("C", "W"))).to(device, dtype)
            for name, dtype in BATCH_DTYPES.items()
        }


def train_step(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    cfg: TrainConfig,
    net: HashNetConfig,
) -> tuple[float, int]:
    """One optimiser step on a batch; returns the loss and the rows in the pair pool."""
    images, labels = model_input(batch["image"], net, channels_last=cfg.gpu), batch["labels"]
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
    others = torch.cat(
        [block[: int(size)] for rank, (block, size) in enumerate(zip(gathered, sizes)) if rank != dist.get_rank()]
    )
    return others[:, : codes.shape[1]], others[:, codes.shape[1] :]


def validation_map(module: ResNetHash, device: torch.device, cfg: TrainConfig, net: HashNetConfig) -> float:
    """mAP of the held-out queries ranked against the database sample by Hamming distance.

    Scored by :func:`models.metrics.mean_average_precision`, the code ``hashray
    evaluate`` uses, so the per-epoch figure means what the final one means.
    """
    import ray.train

    query_codes, query_labels = encode_sample(module, ray.train.get_dataset_shard("val_query"), device, cfg, net)
    db_codes, db_labels = encode_sample(module, ray.train.get_dataset_shard("val_database"), device, cfg, net)
    return mean_average_precision(query_codes, multi_hot_words(query_labels), db_codes, multi_hot_words(db_labels))


def encode_sample(
    module: ResNetHash, dataset: Any, device: torch.device, cfg: TrainConfig, net: HashNetConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Packed codes and multi-hot labels of a small preprocessed dataset."""
    module.eval()
    codes, labels = [], []
    for batch in torch_batches(dataset, cfg.batch_size, device):
        images = model_input(batch["image"], net, channels_last=cfg.gpu)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.gpu):
            codes.append(pack_codes(module.encode(images).cpu().numpy()))
        labels.append(batch["labels"].cpu().numpy())
    return np.concatenate(codes), np.concatenate(labels)


def report_epoch(
    metrics: dict[str, float],
    rank: int,
    module: ResNetHash,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    history: list[dict[str, float]],
    cfg: TrainConfig,
) -> None:
    """Report the epoch's metrics; rank 0 attaches the checkpoint and logs a line."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    logger.info(
        "train: epoch %d/%d loss %.4f val mAP %s %.1f images/s (%.1f s waiting for data)",
        metrics["epoch"],
        cfg.epochs,
        metrics["loss"],
        f"{metrics['val_mAP']:.4f}" if "val_mAP" in metrics else "-",
        metrics["images_per_s"],
        metrics["data_wait_s"],
    )
    state = {
        "model": module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": metrics["epoch"],
        "history": history,
        "config": dataclasses.asdict(cfg),
    }
    with tempfile.TemporaryDirectory() as directory:
        torch.save(state, Path(directory) / CHECKPOINT_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
