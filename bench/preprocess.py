"""Benchmark: Ray Data preprocessing vs a plain single-process loop, same transforms, same Parquet.

    python bench/preprocess.py [--rows 4000] [--source-size 256] [--image-size 224] [--num-cpus 2]

Both sides run the very same :class:`pipelines.preprocess.Preprocessor` (PIL
decode + torchvision RandomResizedCrop/flip to uint8) over the same split, and
the consumer turns each batch into network input with the training loop's own
:func:`models.transforms.model_input`. The baseline calls the Preprocessor in a
loop over ``pyarrow`` batches in this process; Ray Data runs it in read +
preprocess tasks and the driver consumes ``iter_torch_batches`` as a training
loop would. Both sides are timed by the
same function: end to end (Ray Data's per-run start-up included) and after the
first batch; the target applies to the end-to-end ratio. The sides
alternate pass by pass and the median round counts, so drift in the speed of a
shared machine falls on both sides alike. Ray's worker
processes are started once before timing (printed apart), as a training job
starts them in its first epoch and reuses them after.

The synthetic split is drawn at 256 px by default: the images of the
multi-label sets this mirrors (MS-COCO, NUS-WIDE, VOC) are a few hundred pixels
a side, and decoding + resizing them is the work worth spreading over CPUs.
With tiny images (``--source-size 64``) moving the 224 px output to the
training loop costs more than the transform itself.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from contracts.dataset import DATASET_JSON, DatasetDir  # noqa: E402
from contracts.fs import exists, join  # noqa: E402
from models.network import HashNetConfig  # noqa: E402
from models.transforms import model_input  # noqa: E402
from pipelines.ingest import IngestConfig, run  # noqa: E402
from pipelines.preprocess import PreprocessConfig, Preprocessor, preprocess_split  # noqa: E402

TARGET_RATIO = 1.3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", help="dataset dir (default build/bench-ds-<source size>px, ingested when missing)")
    parser.add_argument("--split", default="database", help="split to preprocess (default database)")
    parser.add_argument(
        "--rows", type=int, default=4000, help="database rows of the synthetic dataset when it is created"
    )
    parser.add_argument("--source-size", type=int, default=256, help="synthetic image side when the dataset is created")
    parser.add_argument(
        "--image-size", type=int, default=224, help="transform output side (default 224, the ResNet input)"
    )
    parser.add_argument(
        "--eval", action="store_true", help="eval transform (resize + centre crop) instead of train augmentation"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="rows per batch on both sides")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs given to Ray (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="most preprocess tasks at once (default 2)")
    parser.add_argument(
        "--task-cpus", type=float, default=1.0, help="CPUs reserved per read + preprocess task (default 1)"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="rounds of one timed pass per side; medians are printed (default 5)"
    )
    args = parser.parse_args()
    args.dataset = args.dataset or f"build/bench-ds-{args.source_size}px"
    return args


def ensure_dataset(args: argparse.Namespace) -> DatasetDir:
    if not exists(join(args.dataset, DATASET_JSON)):
        run(
            IngestConfig(
                source="synthetic", out=args.dataset, train=0, query=1, database=args.rows, image_size=args.source_size
            )
        )
    return DatasetDir.open(args.dataset)


def network(args: argparse.Namespace, dataset: DatasetDir) -> HashNetConfig:
    """A network's config as training builds it: its mean/std are what model_input normalises with."""
    return HashNetConfig(arch="resnet18", bits=32, image_size=args.image_size, classes=dataset.classes, loss="cosine")


def timed(batches: Iterator[torch.Tensor]) -> tuple[int, float, float]:
    """Drain ``batches``: (images, images/s end to end, images/s after the first batch).

    Both sides are timed by this one function, so start-up and warm-up count
    the same way for each.
    """
    start, first, images = time.perf_counter(), None, 0
    for images_batch in batches:
        if first is None:
            first, first_images = time.perf_counter(), len(images_batch)
        images += len(images_batch)
    end = time.perf_counter()
    return images, images / (end - start), (images - first_images) / (end - first)


def alternating(
    repeats: int, plain: Callable[[], tuple[int, float, float]], ours: Callable[[], tuple[int, float, float]]
) -> dict[str, list[tuple[int, float, float]]]:
    """``repeats`` rounds of one plain pass then one Ray Data pass: every pass's (images, rate, rate after the 1st batch).

    Alternating, because the speed of a shared machine drifts over a minute:
    all plain passes first and all Ray passes after would put that drift into
    the ratio. Each round's ratio compares two passes run back to back.
    """
    runs: dict[str, list[tuple[int, float, float]]] = {"plain": [], "ray": []}
    for _ in range(repeats):
        runs["plain"].append(plain())
        runs["ray"].append(ours())
    return runs


def baseline(args: argparse.Namespace, config: PreprocessConfig, dataset: DatasetDir) -> Iterator[torch.Tensor]:
    """One process: pyarrow batches -> Preprocessor -> torch tensors."""
    preprocess, net = Preprocessor(config, len(dataset.classes), seed=0), network(args, dataset)
    for path in dataset.split_files(args.split):
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size=args.batch_size):
            batch = {
                name: record_batch.column(name).to_numpy(zero_copy_only=False) for name in ("id", "image", "labels")
            }
            yield model_input(torch.from_numpy(preprocess(batch)["image"]), net)


def with_ray(
    args: argparse.Namespace, config: PreprocessConfig, dataset: DatasetDir, limit: int | None = None
) -> Iterator[torch.Tensor]:
    """Ray Data tasks, consumed by ``iter_torch_batches`` as a training loop would."""
    net = network(args, dataset)
    prepared = preprocess_split(
        dataset,
        args.split,
        config,
        batch_size=args.batch_size,
        num_cpus=args.task_cpus,
        seed=0,
        max_workers=args.workers,
        keep_errors=False,
    )
    for batch in (prepared.limit(limit) if limit else prepared).iter_torch_batches(batch_size=args.batch_size):
        yield model_input(batch["image"], net)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    # The consumer (this process) normalises each batch on one thread on both sides:
    # the plain loop is the one-CPU baseline, and on the Ray side a second torch
    # thread would only fight the two workers for the two cores.
    torch.set_num_threads(1)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = ensure_dataset(args)
    config = PreprocessConfig(image_size=args.image_size, train=not args.eval)
    # Start the worker processes and import torch in them once, as the first epoch of a
    # training job does (the plain loop has torch imported already): later epochs reuse them.
    started = time.perf_counter()
    for _ in with_ray(args, config, dataset, limit=args.workers * args.batch_size):
        pass
    warm_up_s = time.perf_counter() - started
    runs = alternating(
        args.repeats,
        lambda: timed(baseline(args, config, dataset)),
        lambda: timed(with_ray(args, config, dataset)),
    )
    plain_images, ray_images = runs["plain"][0][0], runs["ray"][0][0]
    if ray_images != plain_images:
        raise SystemExit(f"Ray Data produced {ray_images} images, the plain loop {plain_images}")
    median = {side: [statistics.median(run[column] for run in runs[side]) for column in (1, 2)] for side in runs}
    ratios = [
        statistics.median(ray[column] / plain[column] for plain, ray in zip(runs["plain"], runs["ray"]))
        for column in (1, 2)
    ]
    mode = "eval" if args.eval else "train"
    print(
        f"preprocess {plain_images} images of {args.dataset}/{args.split} -> {args.image_size}px ({mode} transform), "
        f"batch {args.batch_size}, {args.repeats} rounds of one pass per side (medians)"
    )
    print(f"  {'':<40} {'end to end':>12} {'after 1st batch':>16}")
    print(
        f"  {'plain PIL+torchvision loop, 1 process':<40} {median['plain'][0]:8.1f} im/s {median['plain'][1]:11.1f} im/s"
    )
    print(f"  {f'Ray Data tasks, {args.num_cpus} CPUs':<40} {median['ray'][0]:8.1f} im/s {median['ray'][1]:11.1f} im/s")
    print(f"  (before that: {warm_up_s:.1f} s to start {args.workers} Ray workers, once per job, not per epoch)")
    print(
        "  ratio Ray / plain per round, end to end: "
        + ", ".join(f"{ray[1] / plain[1]:.2f}" for plain, ray in zip(runs["plain"], runs["ray"]))
    )
    print(f"  ratio Ray / plain (median of rounds): {ratios[0]:.2f} end to end, {ratios[1]:.2f} after the 1st batch")
    print(
        f"  target applies to the end-to-end ratio: >= {TARGET_RATIO} -> {'met' if ratios[0] >= TARGET_RATIO else 'NOT met'}"
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
