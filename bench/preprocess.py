"""Benchmark: Ray Data preprocessing vs a plain single-process loop, same transforms, same Parquet.

    python bench/preprocess.py [--rows 4000] [--source-size 256] [--image-size 224] [--num-cpus 2]

Both sides run the very same :class:`pipelines.preprocess.Preprocessor` (PIL
decode + torchvision RandomResizedCrop/flip + ImageNet normalisation) over the
same split; the baseline calls it in a loop over ``pyarrow`` batches in this
process, Ray Data maps it over a pool of actors and the driver consumes
``iter_torch_batches`` as a training loop would. Ray's figure is end to end,
actor start-up included; the steady-state rate (after the first batch) is
printed next to it.

The synthetic split is drawn at 256 px by default: the images of the
multi-label sets this mirrors (MS-COCO, NUS-WIDE, VOC) are a few hundred pixels
a side, and decoding + resizing them is the work worth spreading over CPUs.
With tiny images (``--source-size 64``) the float32 224 px output that must
travel to the training loop costs more than the transform itself.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from pipelines.contracts import exists, join, read_dataset_info, split_files  # noqa: E402
from pipelines.ingest import IngestConfig, run  # noqa: E402
from pipelines.preprocess import PreprocessConfig, Preprocessor, preprocess_split  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", help="dataset dir (default build/bench-ds-<source size>px, ingested when missing)")
    parser.add_argument("--split", default="database", help="split to preprocess (default database)")
    parser.add_argument("--rows", type=int, default=4000, help="database rows of the synthetic dataset when it is created")
    parser.add_argument("--source-size", type=int, default=256, help="synthetic image side when the dataset is created")
    parser.add_argument("--image-size", type=int, default=224, help="transform output side (default 224, the ResNet input)")
    parser.add_argument("--eval", action="store_true", help="eval transform (resize + centre crop) instead of train augmentation")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per batch on both sides")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs given to Ray (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="max Preprocessor actors (default 2)")
    args = parser.parse_args()
    args.dataset = args.dataset or f"build/bench-ds-{args.source_size}px"
    return args


def ensure_dataset(args: argparse.Namespace) -> dict:
    if not exists(join(args.dataset, "dataset.json")):
        run(IngestConfig(source="synthetic", out=args.dataset, train=0, query=1, database=args.rows, image_size=args.source_size))
    return read_dataset_info(args.dataset)


def baseline(args: argparse.Namespace, config: PreprocessConfig, num_classes: int) -> tuple[int, float]:
    """One process: pyarrow batches -> Preprocessor -> torch tensors."""
    preprocess = Preprocessor(config, num_classes, seed=0)
    start, images = time.perf_counter(), 0
    for path in split_files(args.dataset, args.split):
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size=args.batch_size):
            batch = {name: record_batch.column(name).to_numpy(zero_copy_only=False) for name in ("id", "image", "labels")}
            out = preprocess(batch)
            images += len(torch.from_numpy(out["image"]))
    return images, time.perf_counter() - start


def with_ray(args: argparse.Namespace, config: PreprocessConfig, num_classes: int) -> tuple[int, float, float]:
    """Ray Data: (images, seconds end to end, seconds from the first batch to the last)."""
    dataset = preprocess_split(
        args.dataset, args.split, config, num_classes, batch_size=args.batch_size, seed=0, max_workers=args.workers
    ).select_columns(["image", "labels"])
    start, first, images = time.perf_counter(), None, 0
    for batch in dataset.iter_torch_batches(batch_size=args.batch_size):
        if first is None:
            first, first_images = time.perf_counter(), len(batch["image"])
        images += len(batch["image"])
    end = time.perf_counter()
    return images, end - start, (images - first_images) / (end - first)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    info = ensure_dataset(args)
    config = PreprocessConfig(image_size=args.image_size, train=not args.eval)
    num_classes = len(info["classes"])
    plain_images, plain_seconds = baseline(args, config, num_classes)
    ray_images, ray_seconds, steady_rate = with_ray(args, config, num_classes)
    if ray_images != plain_images:
        raise SystemExit(f"Ray Data produced {ray_images} images, the plain loop {plain_images}")
    plain_rate, ray_rate = plain_images / plain_seconds, ray_images / ray_seconds
    mode = "eval" if args.eval else "train"
    print(f"preprocess {plain_images} images of {args.dataset}/{args.split} -> {args.image_size}px ({mode} transform)")
    print(f"  plain PIL+torchvision loop, 1 process : {plain_rate:8.1f} images/s ({plain_seconds:.1f} s)")
    print(f"  Ray Data map_batches, {args.num_cpus} CPUs       : {ray_rate:8.1f} images/s ({ray_seconds:.1f} s, actor start-up included)")
    print(f"  Ray Data steady state (after 1st batch): {steady_rate:8.1f} images/s")
    print(f"  ratio Ray / plain: {ray_rate / plain_rate:.2f} end to end, {steady_rate / plain_rate:.2f} steady state (target >= 1.3)")
    ray.shutdown()


if __name__ == "__main__":
    main()
