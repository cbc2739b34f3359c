"""Decoding and transforming dataset images in Ray Data workers.

Training and encoding read a split with :func:`preprocess_split`: Ray Data
reads the Parquet files, and Ray Data tasks decode the JPEG/PNG bytes and
apply the torchvision transforms (a :class:`Preprocessor` per worker process,
in ``map_batches``), so the training loop only receives ready float tensors
from ``iter_torch_batches``.

Decoding and the eval transform come from :mod:`models.transforms`, shared with
ingest (which rejects what does not decode) and the server (query uploads), so
an image means the same thing and gets the same code at every stage.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np
import ray
import ray.data
import torch
from torchvision.transforms import v2

from models.errors import HashrayError
from models.network import IMAGENET_MEAN, IMAGENET_STD
from models.transforms import MAX_PIXELS, BadImage, decode_image, eval_transform, normalise
from pipelines.contracts import multi_hot, split_files


# Smallest crop area of the train augmentation. torchvision's ImageNet default
# (0.08) suits one centred object; a multi-label image keeps all its labels
# while an 8% crop usually shows one object or none, so the labels would lie.
TRAIN_CROP_SCALE = (0.5, 1.0)


@dataclass(frozen=True)
class PreprocessConfig:
    """The transform: output size, train-time augmentation or not, normalisation."""

    image_size: int = 224
    train: bool = False
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD


def image_transform(config: PreprocessConfig) -> v2.Compose:
    """PIL image -> uint8 tensor (3, S, S).

    Train: random resized crop (``TRAIN_CROP_SCALE`` of the area) + horizontal flip. Eval: resize the shorter side
    to S*256/224, then centre crop S. Normalisation is done per batch, later.
    """
    if not config.train:
        return eval_transform(config.image_size)
    return v2.Compose(
        [v2.RandomResizedCrop(config.image_size, scale=TRAIN_CROP_SCALE, antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor()]
    )


class Preprocessor:
    """Ray Data worker: encoded bytes + class lists -> normalised images + multi-hot labels.

    A row whose bytes do not decode gets a zero image and its message in
    ``error`` instead of failing the whole batch, so encode can skip and list it.

    Args:
        config: the transform.
        num_classes: width of the multi-hot label vectors.
        seed: seeds the random augmentation (train mode); ``None`` draws a seed.
            Inside a Ray worker the worker id is mixed in, so parallel workers
            do not repeat each other's crops (which worker gets which batch is
            Ray's choice, so a pipeline's output is not reproducible anyway).
        max_pixels: decompression-bomb limit for one image.
    """

    def __init__(self, config: PreprocessConfig, num_classes: int, seed: int | None = None, max_pixels: int = MAX_PIXELS) -> None:
        self.config = config
        self.num_classes = num_classes
        self.max_pixels = max_pixels
        self.transform = image_transform(config)
        # The augmentation draws from its own generator: seeding it must not
        # touch the process-wide torch RNG of whoever calls us.
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(_worker_seed(seed))

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
        pixels = normalise(images, self.config.mean, self.config.std)
        pixels[torch.from_numpy(errors != "")] = 0.0
        return {
            "id": np.asarray(batch["id"]),
            "image": pixels.numpy(),
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
    """``seed``, made distinct per Ray worker process when running in one (not on the driver)."""
    if not ray.is_initialized():
        return seed
    context = ray.get_runtime_context()
    if context.get_actor_id() is None and context.get_task_id() is None:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:{context.get_worker_id()}".encode()).digest()[:8], "big")


def preprocess_batch(
    batch: dict[str, np.ndarray], *, config: PreprocessConfig, num_classes: int, seed: int | None = None
) -> dict[str, np.ndarray]:
    """Ray Data map task: :class:`Preprocessor` on one batch.

    Tasks rather than an actor pool: there is no pool to start (and, in
    training, to restart every epoch) while a stateless transform needs none;
    the worker process keeps one Preprocessor per settings, so the
    augmentation stream carries on from task to task instead of restarting.
    """
    return _process_preprocessor(config, num_classes, seed)(batch)


@functools.lru_cache(maxsize=8)
def _process_preprocessor(config: PreprocessConfig, num_classes: int, seed: int | None) -> Preprocessor:
    return Preprocessor(config, num_classes, seed=seed)


def preprocess_split(
    dataset_uri: str,
    split: str,
    config: PreprocessConfig,
    num_classes: int,
    *,
    batch_size: int = 64,
    num_cpus: float = 1.0,
    seed: int | None = None,
    max_workers: int = 2,
) -> ray.data.Dataset:
    """A lazy Ray Dataset of one split, read, decoded and transformed by Ray Data tasks.

    Output columns: ``id`` (str), ``image`` float32 (3, S, S), ``labels``
    float32 multi-hot, ``error`` (str, "" when the row decoded). Select
    ``image`` and ``labels`` before ``iter_torch_batches`` (strings are not tensors).

    Args:
        batch_size: rows per ``map_batches`` call.
        num_cpus: CPUs reserved by each read and each preprocess task.
        seed: augmentation seed (train mode), see :class:`Preprocessor`.
        max_workers: most preprocess tasks running at once.
    """
    files = split_files(dataset_uri, split)
    # Ray reads small Parquet files into one big block, and a task gets whole
    # blocks: cut the encoded rows into batch-sized blocks (cheap, streaming)
    # so that up to ``max_workers`` tasks share the work.
    rows = ray.data.read_parquet(files, num_cpus=num_cpus).repartition(target_num_rows_per_block=batch_size)
    return rows.map_batches(
        preprocess_batch,
        fn_kwargs={"config": config, "num_classes": num_classes, "seed": seed},
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=num_cpus,
        compute=ray.data.TaskPoolStrategy(size=max_workers),
    )
