"""Decoding images, the train and eval transforms, and the network's input: one definition for every stage.

A query image posted to the server must get exactly the code that ``hashray
encode`` gave the same image, and ingest must call an image what training and
serving call an image, so all of them decode and transform here. Transforms
stop at uint8 tensors; :func:`model_input` normalises a batch with the run's
own mean and std on the device that runs the network.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Protocol

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

# Decompression-bomb guard: 64 megapixels is an 8000x8000 photo, far beyond any
# model input, yet a 1 KB file can claim it.
MAX_PIXELS = 64_000_000
EVAL_RESIZE_RATIO = 256 / 224  # resize then centre-crop, as ImageNet evaluation does
# Smallest crop area of the train augmentation. torchvision's ImageNet default
# (0.08) suits one centred object; a multi-label image keeps all its labels
# while an 8% crop usually shows one object or none, so the labels would lie.
TRAIN_CROP_SCALE = (0.5, 1.0)


class Normalisation(Protocol):
    """The part of a network's config that says how its input is normalised."""

    mean: Sequence[float]
    std: Sequence[float]


class BadImage(ValueError):
    """Bytes that are not a usable image; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS, formats: Sequence[str] | None = None) -> Image.Image:
    """Decode encoded image bytes fully into an RGB image.

    The header is checked against ``max_pixels`` before any pixel is decoded,
    so a decompression bomb costs nothing.

    Args:
        formats: Pillow format names to try (all when None); untrusted uploads
            pass a short list so no plugin that runs an external program is reached.

    Raises:
        BadImage: with reason ``empty_file``, ``not_an_image``,
            ``too_many_pixels`` or ``truncated_image``.
    """
    if not data:
        raise BadImage("empty_file", "the file has 0 bytes")
    try:
        image = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as error:
        raise BadImage("too_many_pixels", str(error)) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise BadImage("not_an_image", f"not a readable image format ({type(error).__name__})") from error
    width, height = image.size
    if width * height > max_pixels:
        raise BadImage("too_many_pixels", f"{width}x{height} is over the limit of {max_pixels} pixels")
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise BadImage("truncated_image", f"the {image.format} data is truncated or corrupt ({error})") from error


def eval_transform(image_size: int) -> v2.Compose:
    """RGB PIL image -> uint8 tensor (3, S, S): shorter side to S*256/224, centre crop S.

    Normalisation is left to :func:`model_input`, done once per batch.
    """
    return v2.Compose(
        [v2.Resize(int(image_size * EVAL_RESIZE_RATIO), antialias=True), v2.CenterCrop(image_size), v2.PILToTensor()]
    )


def train_transform(image_size: int) -> v2.Compose:
    """RGB PIL image -> uint8 tensor (3, S, S): random resized crop (``TRAIN_CROP_SCALE``) + horizontal flip."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=TRAIN_CROP_SCALE, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.PILToTensor(),
        ]
    )


def image_transform(image_size: int, *, train: bool) -> v2.Compose:
    """The train or the eval transform of ``image_size``."""
    return train_transform(image_size) if train else eval_transform(image_size)


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (n, 3, S, S) -> float32 normalised with per-channel ``mean``/``std``."""
    # (x/255 - mean)/std folded into one scale and one shift, in place: two passes
    # over the batch instead of four, the largest cost of preprocessing small images.
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    scale, shift = 1.0 / (255.0 * std_t), mean_t / std_t
    return images.to(torch.float32, copy=True).mul_(scale).sub_(shift)  # never scales the input in place


def model_input(images: torch.Tensor, config: Normalisation, *, channels_last: bool = False) -> torch.Tensor:
    """uint8 batch (n, 3, S, S) from a transform -> the network's float input, on the batch's device.

    Every consumer (training, bulk encoding, the query encoder) feeds the
    network through here, with the run's own ``config.mean``/``config.std``.
    """
    pixels = normalise(images, config.mean, config.std)
    return pixels.contiguous(memory_format=torch.channels_last) if channels_last else pixels
