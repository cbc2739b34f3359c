"""Decoding and transforming dataset images in Ray Data workers.

Encoding (and the benches) read a split with :func:`preprocess_split`: Ray
Data tasks read the Parquet files, decode the JPEG/PNG bytes and apply the
torchvision transforms (a :class:`Preprocessor` per worker process, in
``map_batches``), so the consumer only receives ready uint8 tensors from
``iter_torch_batches``. Training reads its split in a seeded order of its own
(:mod:`pipelines.epochs`) with the same :class:`Preprocessor`. They stay uint8 until the consumer normalises
them (:func:`models.transforms.model_input`, on its own device): a 224 px image
is 150 KB that way instead of 600 KB of float32 through the object store and
to the GPU.

Decoding and the train and eval transforms come from :mod:`models.transforms`, shared with
ingest (which rejects what does not decode) and the server (query uploads), so
an image means the same thing and gets the same code at every stage.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch

from contracts.dataset import DatasetDir, multi_hot
from contracts.parquet import open_parquet
from models.errors import HashrayError
from models.transforms import MAX_PIXELS, BadImage, decode_image, image_transform

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreprocessConfig:
    """The transform: output size, train-time augmentation or not (``models.transforms.image_transform``)."""

    image_size: int = 224
    train: bool = False


class Preprocessor:
    """Ray Data worker: encoded bytes + class lists -> uint8 images + multi-hot labels.

    A row whose bytes do not decode gets a black image and its message in
    ``error`` instead of failing the whole batch, so encode can skip and list it.

    Args:
        config: the transform.
        num_classes: width of the multi-hot label vectors.
        seed: seeds the random augmentation (train mode); ``None`` draws a seed.
            While Ray runs, the process's worker id is mixed in, so parallel
            workers do not repeat each other's crops (which worker gets which batch is
            Ray's choice, so a pipeline's output is not reproducible anyway).
        max_pixels: decompression-bomb limit for one image.
        per_process: mix the process's worker id into ``seed`` (above); off when
            the caller derives a seed per piece itself (pipelines.epochs).
    """

    def __init__(
        self,
        config: PreprocessConfig,
        num_classes: int,
        seed: int | None = None,
        max_pixels: int = MAX_PIXELS,
        *,
        per_process: bool = True,
    ) -> None:
        self.config = config
        self.num_classes = num_classes
        self.max_pixels = max_pixels
        self.transform = image_transform(config.image_size, train=config.train)
        # The augmentation draws from its own generator: seeding it must not
        # touch the process-wide torch RNG of whoever calls us.
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(_worker_seed(seed) if per_process else seed)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        size = self.config.image_size
        images = torch.zeros((len(batch["id"]), 3, size, size), dtype=torch.uint8)
        errors = np.full(len(batch["id"]), "", dtype=object)
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.generator.get_state())
            for row, data in enumerate(batch["image"]):
                try:
                    images[row] = self.transform(decode_image(data, max_pixels=self.max_pixels))
                except BadImage as error:
                    errors[row] = str(error)
            self.generator.set_state(torch.get_rng_state())
        return {
            "id": np.asarray(batch["id"]),
            "image": images.numpy(),
            "labels": self._multi_hot(batch["labels"]),
            "error": errors.astype(str),
        }

    def _multi_hot(self, labels: np.ndarray) -> np.ndarray:
        largest = max((int(np.max(row)) for row in labels if len(row)), default=-1)
        if largest >= self.num_classes:
            raise HashrayError(
                f"a row has class index {largest} but num_classes is {self.num_classes}: "
                "pass the number of classes in the dataset's dataset.json"
            )
        return multi_hot(list(labels), self.num_classes)


def _worker_seed(seed: int) -> int:
    """``seed``, made distinct per Ray process (worker or driver) when Ray is running."""
    if not ray.is_initialized():
        return seed
    worker_id = ray.get_runtime_context().get_worker_id()
    return int.from_bytes(hashlib.sha256(f"{seed}:{worker_id}".encode()).digest()[:8], "big")


def preprocess_split(
    dataset: DatasetDir,
    split: str,
    config: PreprocessConfig,
    *,
    batch_size: int = 64,
    num_cpus: float = 1.0,
    seed: int | None = None,
    max_workers: int = 2,
    keep_errors: bool = True,
    share_cpus: bool = False,
    min_pieces: int = 1,
) -> ray.data.Dataset:
    """A lazy Ray Dataset of one split, read, decoded and transformed by Ray Data tasks.

    Each task reads its own piece of the split (a run of row groups, see
    :func:`split_pieces`) and transforms it, so reading, decoding and
    transforming are one fused stage: the encoded bytes never travel between
    processes, and no separate read, repartition or projection tasks compete
    for the CPUs.

    Output columns: ``id`` (str), ``image`` uint8 (3, S, S) (feed it to the
    network with :func:`models.transforms.model_input`), ``labels`` float32
    multi-hot over the dataset's classes,
    ``error`` (str, "" when the row decoded). With ``keep_errors=False`` rows
    that do not decode are dropped (and logged) and only ``image`` and
    ``labels`` remain, ready for ``iter_torch_batches``.

    Args:
        dataset: the dataset dir, opened once by the command (its files and
            row counts are not read again here).
        batch_size: rows per Preprocessor call and per output batch.
        num_cpus: CPUs reserved by each task.
        seed: augmentation seed (train mode), see :class:`Preprocessor`.
        max_workers: most tasks running at once.
        keep_errors: keep rows that fail to decode (encode lists them as rejects).
        share_cpus: the dataset runs beside other Ray work that needs the same
            CPUs (encoder actors, training workers). Ray Data's per-operator
            resource reservation then keeps the tasks within what the others
            leave. Off for a lone consumer, which gets every task at once.
        min_pieces: cut the split into at least this many pieces (else one
            per worker): for a consumer that spreads the pieces itself, as
            encode's actor pool does once Ray Data fuses decoding into it.
    """
    files = dataset.split_files(split)  # listed when the command opened the dir: no request here
    rows = dataset.rows(split)
    num_classes = len(dataset.classes)  # the width of the multi-hot labels
    least = max(max_workers, min_pieces)
    pieces = split_pieces(files, least * max(1, math.ceil(rows / (least * MAX_PIECE_ROWS))))
    prepared = ray.data.from_items(pieces, override_num_blocks=len(pieces)).map_batches(
        preprocess_pieces,
        fn_kwargs={
            "config": config,
            "num_classes": num_classes,
            "seed": seed,
            "batch_size": batch_size,
            "keep_errors": keep_errors,
        },
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=num_cpus,
        compute=ray.data.TaskPoolStrategy(size=max_workers),
    )
    # Each yielded batch leaves the task as its own block (Ray Data's default
    # gathers 128 MiB first), so the consumer starts after one batch, not a piece.
    prepared.context.target_max_block_size = batch_size * 3 * config.image_size**2
    # Ray Data's per-operator reservation starts every execution (each epoch)
    # from zero cluster resources for its first second, so a lone consumer gets
    # one task where max_workers could run (bench/preprocess.py: ratio 1.36 with
    # it, 1.50 without). Beside training workers it is worth its cost: Ray Train
    # tells it which CPUs the workers hold, and on 2 CPUs the data tasks then
    # stay off the worker's core (bench/train.py: ratio 0.98 with it, 0.92
    # without). Without it, output stays bounded all the same: Ray Data's
    # downstream-capacity backpressure pauses the tasks a few blocks ahead of a
    # slow consumer (about 100 MB at 224 px).
    prepared.context.op_resource_reservation_enabled = share_cpus
    return prepared


# Most rows of one task. A split is cut into pieces of equal rows, one per
# worker (or min_pieces), and more only to stay under this. Each task start
# left its worker idle for 50-700 ms on a busy 2-CPU machine (the driver has to
# see the last task end and schedule the next): with 4 pieces per worker the
# bench ratio was 1.42, with one 1.50. Equal pieces, a multiple of the workers,
# end together. The cap keeps a failed task's retry, and one worker's lead at
# the end of an epoch, to a minute or so of work.
MAX_PIECE_ROWS = 20_000


def split_pieces(files: list[str], pieces: int) -> list[dict[str, Any]]:
    """Cut a split's files into ``pieces`` runs of about equal rows, at row-group boundaries.

    The files are laid end to end, each one unit long (ingest writes files of
    equal rows, save the last), and piece ``k`` is the stretch
    ``[k, k + 1) * len(files) / pieces`` of that line: a piece may take a whole
    file, part of one, or the end of one and the start of the next. Which row
    groups fall in it is decided by the task that reads the file's footer
    (:func:`read_piece`), so planning reads no file here.
    """
    count = len(files)
    plan = []
    for piece in range(pieces):
        first, end = piece * count // pieces, -(-(piece + 1) * count // pieces)  # files [first, end) overlap the piece
        plan.append({"paths": files[first:end], "first_file": first, "files": count, "piece": piece, "pieces": pieces})
    return plan


def preprocess_pieces(
    pieces: pa.Table,
    *,
    config: PreprocessConfig,
    num_classes: int,
    seed: int | None,
    batch_size: int,
    keep_errors: bool,
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data task: read the given file pieces and yield them preprocessed, ``batch_size`` rows at a time.

    Tasks rather than an actor pool: there is no pool to start (and, in
    training, to restart every epoch) while a stateless transform needs none;
    the worker process keeps one Preprocessor per settings, so the
    augmentation stream carries on from task to task instead of restarting.
    """
    preprocessor = _process_preprocessor(config, num_classes, seed)
    for piece in pieces.to_pylist():
        for path, rows in read_piece(piece, batch_size):
            batch = preprocessor(rows)
            yield batch if keep_errors else without_errors(batch, path)


def read_piece(piece: dict[str, Any], batch_size: int) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """(path, rows ``id``, ``image``, ``labels``) of one piece of :func:`split_pieces`, ``batch_size`` rows at a time.

    Row group ``g`` of ``G`` in file ``f`` of ``F`` sits at ``f + (g + 0.5) / G``
    on the line of files; it belongs to the piece whose stretch holds that
    point. Integer arithmetic, so every row group lands in exactly one piece.
    """
    pieces, files = piece["pieces"], piece["files"]
    for offset, path in enumerate(piece["paths"]):
        file_index = piece["first_file"] + offset
        with open_parquet(path) as parquet:
            groups = parquet.metadata.num_row_groups
            mine = [
                g
                for g in range(groups)
                if (2 * file_index * groups + 2 * g + 1) * pieces // (2 * files * groups) == piece["piece"]
            ]
            if not mine:
                continue
            for record_batch in parquet.iter_batches(
                batch_size=batch_size, row_groups=mine, columns=["id", "image", "labels"]
            ):
                yield (
                    path,
                    {
                        name: record_batch.column(name).to_numpy(zero_copy_only=False)
                        for name in ("id", "image", "labels")
                    },
                )


def without_errors(batch: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    ok = batch["error"] == ""
    if ok.all():  # the usual case: no copy of the images
        return {"image": batch["image"], "labels": batch["labels"]}
    logger.warning(
        "preprocess: skipped %d rows of %s that do not decode: %s", (~ok).sum(), path, batch["error"][~ok][0]
    )
    return {"image": batch["image"][ok], "labels": batch["labels"][ok]}


@functools.lru_cache(maxsize=8)
def _process_preprocessor(config: PreprocessConfig, num_classes: int, seed: int | None) -> Preprocessor:
    return Preprocessor(config, num_classes, seed=seed)
