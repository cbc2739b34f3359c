"""ResNetHash: a torchvision ResNet whose classifier is replaced by a hash layer.

The network outputs ``tanh(W f(x) + b)`` in (-1, 1) -- continuous, so the
pairwise losses can be trained by gradient descent -- and ``sign`` of that
output is the binary code (bit = 1 for a positive output).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from models.codes import check_bits
from models.errors import HashrayError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class HashNetConfig:
    """Everything encode and serve need to rebuild and feed a trained model."""

    arch: str
    bits: int
    image_size: int
    classes: tuple[str, ...]
    loss: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> "HashNetConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in payload.items() if k in known}
        for key in ("classes", "mean", "std"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise HashrayError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return arch


class ResNetHash(nn.Module):
    """ResNet backbone + linear hash layer of ``bits`` outputs.

    Args:
        arch: one of ``ARCHS``.
        bits: code length, a positive multiple of 8.
        weights: ``"none"`` (random init), ``"imagenet"`` (torchvision's weights
            from its local cache) or the path of a local ResNet ``state_dict``.
        allow_download: let torchvision download the ImageNet weights when they
            are not cached; off by default so nothing is fetched unasked.
    """

    def __init__(self, arch: str, bits: int, weights: str = "none", allow_download: bool = False) -> None:
        super().__init__()
        self.arch = check_arch(arch)
        self.bits = check_bits(bits)
        self.backbone = getattr(torchvision.models, arch)(weights=None)
        feature_dim = self.backbone.fc.in_features
        self.backbone.fc = nn.Identity()
        self.hash_layer = nn.Linear(feature_dim, bits)
        if weights != "none":
            self.backbone.load_state_dict(load_backbone_weights(arch, weights, allow_download))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Relaxed codes in (-1, 1), shape (batch, bits)."""
        return torch.tanh(self.hash_layer(self.backbone(images)))

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Binary codes as a bool tensor (batch, bits): True where the output is positive."""
        return self.hash_layer(self.backbone(images)) > 0


def imagenet_weights_file(arch: str) -> Path:
    """Where torchvision keeps the ImageNet weights of ``arch`` in its cache."""
    enum = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    filename = enum.url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def load_backbone_weights(arch: str, weights: str, allow_download: bool = False) -> dict[str, torch.Tensor]:
    """A backbone ``state_dict`` (without ``fc.*``) from ImageNet cache or a local file."""
    if weights == "imagenet":
        path = imagenet_weights_file(arch)
        if not path.exists():
            if not allow_download:
                raise HashrayError(
                    f"ImageNet weights for {arch} are not in torchvision's cache: expected {path}. "
                    f"Copy the file there (it comes from {torchvision.models.get_model_weights(arch).IMAGENET1K_V1.url}), "
                    "pass --weights PATH, or pass --allow-download to fetch it"
                )
            torchvision.models.get_model_weights(arch).IMAGENET1K_V1.get_state_dict(progress=True)
    else:
        path = Path(weights)
        if not path.is_file():
            raise HashrayError(f"weights file {path} does not exist (use --weights none|imagenet|PATH)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file; all mean the same to the user
        raise HashrayError(f"{path}: cannot be loaded as a torch state_dict ({type(error).__name__})") from error
    return _backbone_state(arch, state, path)


def _backbone_state(arch: str, state: Any, path: Path) -> dict[str, torch.Tensor]:
    """Keep the backbone entries of a ResNet state_dict and check they match ``arch``."""
    if not isinstance(state, dict):
        raise HashrayError(f"{path}: expected a ResNet state_dict, found a {type(state).__name__}")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise HashrayError(f"{path}: expected a ResNet state_dict (parameter names -> tensors), found other entries")
    # Accept a bare ResNet state_dict or one saved from ResNetHash ("backbone." prefix).
    state = {k.removeprefix("backbone."): v for k, v in state.items() if not k.startswith("hash_layer.")}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = {k: v.shape for k, v in getattr(torchvision.models, arch)(weights=None).state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))  # e.g. a deeper ResNet's extra blocks
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    if missing or unexpected or mismatched:
        detail = (
            f"missing {missing[:3]}" if missing
            else f"unexpected {unexpected[:3]}" if unexpected
            else f"wrong shape for {mismatched[:3]}"
        )
        raise HashrayError(f"{path} is not a {arch} state_dict: {detail}")
    return {k: state[k] for k in expected}
