"""Decoding and transforming dataset images in Ray Data workers.

Training and encoding read a split with :func:`preprocess_split`: Ray Data
reads the Parquet files, and a pool of :class:`Preprocessor` actors decodes the
JPEG/PNG bytes and applies the torchvision transforms in ``map_batches``, so
the training loop only receives ready float tensors from ``iter_torch_batches``.

Decoding and the eval transform come from :mod:`models.transforms`, shared with
ingest (which rejects what does not decode) and the server (query uploads), so
an image means the same thing and gets the same code at every stage.
"""
from __future__ import annotations

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


@dataclass(frozen=True)
class PreprocessConfig:
    """The transform: output size, train-time augmentation or not, normalisation."""

    image_size: int = 224
    train: bool = False
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD


def image_transform(config: PreprocessConfig) -> v2.Compose:
    """PIL image -> uint8 tensor (3, S, S).

    Train: random resized crop + horizontal flip. Eval: resize the shorter side
    to S*256/224, then centre crop S. Normalisation is done per batch, later.
    """
    if not config.train:
        return eval_transform(config.image_size)
    return v2.Compose(
        [v2.RandomResizedCrop(config.image_size, antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor()]
    )


class Preprocessor:
    """Ray Data worker: encoded bytes + class lists -> normalised images + multi-hot labels.

    A row whose bytes do not decode gets a zero image and its message in
    ``error`` instead of failing the whole batch, so encode can skip and list it.

    Args:
        config: the transform.
        num_classes: width of the multi-hot label vectors.
        seed: seeds the random augmentation (train mode); ``None`` draws a seed.
            Inside a Ray actor the actor id is mixed in, so the actors of a pool
            do not repeat each other's crops (which actor gets which batch is
            Ray's choice, so a pool's output is not reproducible anyway).
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
    """``seed``, made distinct per Ray actor when running in one."""
    actor_id = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
    if actor_id is None:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:{actor_id}".encode()).digest()[:8], "big")


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
    """A lazy Ray Dataset of one split, decoded and transformed in a Preprocessor actor pool.

    Output columns: ``id`` (str), ``image`` float32 (3, S, S), ``labels``
    float32 multi-hot, ``error`` (str, "" when the row decoded). Select
    ``image`` and ``labels`` before ``iter_torch_batches`` (strings are not tensors).

    Args:
        batch_size: rows per ``map_batches`` call.
        num_cpus: CPUs reserved by each Preprocessor actor.
        seed: augmentation seed (train mode), see :class:`Preprocessor`.
        max_workers: the actor pool grows from 1 up to this many actors while CPUs
            are free (starting them all up front could take the CPUs the read tasks need).
    """
    files = split_files(dataset_uri, split)
    # Ray reads small Parquet files into one big block, and an actor gets whole
    # blocks: cut the encoded rows into batch-sized blocks (cheap, streaming) so
    # every actor of the pool gets work.
    rows = ray.data.read_parquet(files).repartition(target_num_rows_per_block=batch_size)
    return rows.map_batches(
        Preprocessor,
        fn_constructor_kwargs={"config": config, "num_classes": num_classes, "seed": seed},
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=num_cpus,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_workers),
    )
