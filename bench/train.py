"""Benchmark: `hashray train` (Ray Train, 1 worker) vs a plain single-process PyTorch loop.

    python bench/train.py [--rows 480] [--image-size 224] [--epochs 3] [--batch-size 32] [--gpu]

Both sides train the same ResNetHash with the same loss, optimiser, batch size
and images. The plain loop gets the images decoded and transformed once,
up front, as tensors in memory (the best case for a single process); hashray
decodes them every epoch in Ray Data tasks, streams them to the Ray Train
worker and checkpoints every epoch. The plain loop runs with as many torch
threads as the machine has cores (--plain-threads): what a user's own script
gets; hashray's worker takes the threads `hashray train` gives it (--threads, 0:
every core of the node).

Images/s is taken over the epochs after the first on both sides (steady
state, warm-up excluded); hashray's per-epoch figure is wall time and so
includes the start of each epoch's Ray Data pipeline and the checkpoint.
With --gpu: one GPU, bf16 autocast and channels_last on both sides (use
--arch resnet50 --image-size 224 for the GPU figure of the README).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from contracts.dataset import DATASET_JSON, DatasetDir  # noqa: E402
from contracts.fs import exists, join  # noqa: E402
from models.network import ResNetHash  # noqa: E402
from models.transforms import model_input  # noqa: E402
from pipelines.ingest import IngestConfig  # noqa: E402
from pipelines.ingest import run as ingest  # noqa: E402
from pipelines.preprocess import PreprocessConfig, Preprocessor  # noqa: E402
from pipelines.train import TrainConfig, net_config, run  # noqa: E402
from pipelines.train_loop import build_optimizer, cpu_threads, training_loss  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", help="dataset dir (default build/bench-train-ds-<rows>, ingested when missing)")
    parser.add_argument("--rows", type=int, default=480, help="train rows of the synthetic dataset when it is created")
    parser.add_argument("--source-size", type=int, default=64, help="synthetic image side when the dataset is created")
    parser.add_argument("--arch", default="resnet18", help="ResNet of both sides")
    parser.add_argument("--bits", type=int, default=32, help="code length")
    parser.add_argument("--image-size", type=int, default=224, help="network input side")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per side (the first is warm-up)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step on both sides")
    parser.add_argument("--loss", default="cosine", help="loss of both sides")
    parser.add_argument("--cpus-per-worker", type=float, default=0.5, help="CPUs of the Ray Train worker")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the Ray Train worker (0: every core)")
    parser.add_argument("--data-cpus", type=float, default=0.5, help="CPUs per Ray Data read + preprocess task")
    parser.add_argument(
        "--data-workers",
        type=int,
        default=None,
        help="most read + preprocess tasks at once (default: as `hashray train`, 0 on CPU: in the worker)",
    )
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs given to Ray (default: all)")
    parser.add_argument("--gpu", action="store_true", help="one GPU, bf16 autocast, channels_last")
    parser.add_argument(
        "--plain-threads",
        type=int,
        default=os.cpu_count(),
        help="torch threads of the plain loop (default: every core)",
    )
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is warm-up)")
    args.dataset = args.dataset or f"build/bench-train-ds-{args.rows}"
    return args


def ensure_dataset(args: argparse.Namespace) -> DatasetDir:
    if not exists(join(args.dataset, DATASET_JSON)):
        ingest(
            IngestConfig(
                source="synthetic",
                out=args.dataset,
                train=args.rows,
                query=1,
                database=args.rows,
                image_size=args.source_size,
                num_classes=8,
            )
        )
    return DatasetDir.open(args.dataset)


def config(args: argparse.Namespace, run_dir: str) -> TrainConfig:
    return TrainConfig(
        data=args.dataset,
        run=run_dir,
        arch=args.arch,
        bits=args.bits,
        epochs=args.epochs,
        batch_size=args.batch_size,
        loss=args.loss,
        gpu=args.gpu,
        cpus_per_worker=args.cpus_per_worker,
        threads=args.threads,
        data_cpus=args.data_cpus,
        data_workers=args.data_workers,
        image_size=args.image_size,
        val_queries=0,
    )


def with_hashray(args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Images/s and seconds spent waiting for data, per epoch of a fresh `hashray train` run."""
    with tempfile.TemporaryDirectory() as scratch:
        run(config(args, str(Path(scratch) / "run")))
        history = json.loads(Path(scratch, "run", "history.json").read_text())["epochs"]
    return [epoch["images_per_s"] for epoch in history], [epoch["data_wait_s"] for epoch in history]


def decoded_train_split(args: argparse.Namespace, dataset: DatasetDir) -> tuple[torch.Tensor, torch.Tensor]:
    """The train split as (images, multi-hot labels) tensors, transformed once."""
    preprocess = Preprocessor(PreprocessConfig(image_size=args.image_size, train=True), len(dataset.classes), seed=0)
    images, labels = [], []
    for path in dataset.split_files("train"):
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size=args.batch_size):
            out = preprocess(
                {name: record_batch.column(name).to_numpy(zero_copy_only=False) for name in ("id", "image", "labels")}
            )
            images.append(torch.from_numpy(out["image"]))
            labels.append(torch.from_numpy(out["labels"]))
    return torch.cat(images), torch.cat(labels)


def plain_loop(
    args: argparse.Namespace, dataset: DatasetDir, images: torch.Tensor, labels: torch.Tensor
) -> list[float]:
    """Images/s of every epoch of the textbook loop over in-memory tensors."""
    cfg = config(args, "")
    net = net_config(cfg, dataset.classes)  # the same network and input normalisation as the Ray side
    device = torch.device("cuda" if args.gpu else "cpu")
    torch.manual_seed(cfg.seed)
    model = ResNetHash.from_config(net).to(device)
    if args.gpu:
        model = model.to(memory_format=torch.channels_last)
    optimizer, loss_fn = build_optimizer(model, cfg), training_loss(cfg)
    model.train()
    rates = []
    for _ in range(args.epochs):
        order = torch.randperm(len(images))
        start = time.perf_counter()
        for first in range(0, len(images), args.batch_size):
            index = order[first : first + args.batch_size]
            batch = model_input(images[index].to(device), net, channels_last=args.gpu)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.gpu):
                codes = model(batch)
            loss = loss_fn(codes, labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if args.gpu:
            torch.cuda.synchronize()
        rates.append(len(images) / (time.perf_counter() - start))
    return rates


# hashray against a plain loop that uses every core, as a user's own script would.
TARGET_RATIO = 0.8


def main() -> None:
    args = parse_args()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    dataset = ensure_dataset(args)
    worker_threads = cpu_threads(args.threads, local_workers=1)
    hashray, waits = with_hashray(args)
    torch.set_num_threads(args.plain_threads)
    plain = plain_loop(args, dataset, *decoded_train_split(args, dataset))
    ray.shutdown()
    ours, theirs = statistics.mean(hashray[1:]), statistics.mean(plain[1:])
    print(
        f"\ntrain images/s: {args.arch} {args.image_size}px, batch {args.batch_size}, {dataset.rows('train')} rows, "
        f"{'GPU bf16' if args.gpu else f'CPU, hashray worker {worker_threads} / plain loop {args.plain_threads} torch thread(s)'}, "
        f"epochs 2..{args.epochs}"
    )
    print(f"{'':24}{'per epoch':>28}{'steady':>10}")
    print(f"{'hashray train (Ray)':24}{' '.join(f'{r:8.1f}' for r in hashray):>28}{ours:10.1f}")
    print(f"{'plain PyTorch loop':24}{' '.join(f'{r:8.1f}' for r in plain):>28}{theirs:10.1f}")
    print(f"hashray seconds waiting for data per epoch: {' '.join(f'{w:.1f}' for w in waits)}")
    ratio = ours / theirs
    print(
        f"ratio hashray / plain: {ratio:.3f}; target applies to this ratio of the steady epochs: "
        f">= {TARGET_RATIO} -> {'met' if ratio >= TARGET_RATIO else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
