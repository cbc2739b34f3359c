"""ResNetHash: a torchvision ResNet whose classifier is replaced by a hash layer.

The network outputs ``tanh(W f(x) + b)`` in (-1, 1) -- continuous, so the
pairwise losses can be trained by gradient descent -- and ``sign`` of that
output is the binary code (bit = 1 for a positive output).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torchvision
from torch import nn

from models.codes import check_bits
from models.errors import HashrayError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The two files of a saved network, the run-dir contract of encode and serve.
MODEL_PT = "model.pt"
CONFIG_JSON = "config.json"


class Directory(Protocol):
    """What :meth:`ResNetHash.save` and :meth:`ResNetHash.from_run` need of a directory.

    ``pathlib.Path`` is one; ``contracts.fs.Location`` is one on object storage.
    """

    def joinpath(self, *parts: str) -> Any: ...


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
    def from_dict(cls, payload: dict[str, Any]) -> HashNetConfig:
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
        self.config: HashNetConfig | None = None  # set by from_config/from_run: what save() writes beside the weights
        self.backbone = getattr(torchvision.models, arch)(weights=None)
        feature_dim = self.backbone.fc.in_features
        self.backbone.fc = nn.Identity()
        self.hash_layer = nn.Linear(feature_dim, bits)
        if weights != "none":
            self.backbone.load_state_dict(load_backbone_weights(arch, weights, allow_download))

    @classmethod
    def from_config(cls, config: HashNetConfig, weights: str = "none", allow_download: bool = False) -> ResNetHash:
        """A network of ``config``'s architecture and code length that remembers the config for :meth:`save`."""
        model = cls(config.arch, config.bits, weights=weights, allow_download=allow_download)
        model.config = config
        return model

    @classmethod
    def from_run(
        cls,
        directory: str | os.PathLike | Directory,
        *,
        map_location: str | torch.device = "cpu",
        config: HashNetConfig | None = None,
    ) -> ResNetHash:
        """Load a saved network (eval mode): ``config.json`` then ``model.pt`` (``weights_only``).

        ``config`` skips reading ``config.json`` when the caller already has it.
        """
        directory = _as_directory(directory)
        if config is None:
            config = HashNetConfig.from_dict(json.loads(directory.joinpath(CONFIG_JSON).read_bytes()))
        state = torch.load(
            io.BytesIO(directory.joinpath(MODEL_PT).read_bytes()), map_location=map_location, weights_only=True
        )
        model = cls.from_config(config)
        model.load_state_dict(state)
        return model.to(map_location).eval()

    def save(self, directory: str | os.PathLike | Directory) -> None:
        """Write ``model.pt`` (a plain state_dict) then ``config.json`` into ``directory``."""
        if self.config is None:
            raise HashrayError("this network has no HashNetConfig to save; build it with ResNetHash.from_config")
        directory = _as_directory(directory, create=True)
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        directory.joinpath(MODEL_PT).write_bytes(buffer.getvalue())
        payload = json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n"
        directory.joinpath(CONFIG_JSON).write_bytes(payload.encode())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Relaxed codes in (-1, 1), shape (batch, bits)."""
        return torch.tanh(self.hash_layer(self.backbone(images)))

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Binary codes as a bool tensor (batch, bits): True where the output is positive."""
        return self.hash_layer(self.backbone(images)) > 0


def _as_directory(directory: str | os.PathLike | Directory, *, create: bool = False) -> Directory:
    """A local path becomes a ``Path`` (made when ``create``); a Directory stays as it is."""
    if isinstance(directory, (str, os.PathLike)):
        path = Path(directory)
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path
    return directory


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
    expected = {
        k: v.shape
        for k, v in getattr(torchvision.models, arch)(weights=None).state_dict().items()
        if not k.startswith("fc.")
    }
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))  # e.g. a deeper ResNet's extra blocks
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    if missing or unexpected or mismatched:
        detail = (
            f"missing {missing[:3]}"
            if missing
            else f"unexpected {unexpected[:3]}"
            if unexpected
            else f"wrong shape for {mismatched[:3]}"
        )
        raise HashrayError(f"{path} is not a {arch} state_dict: {detail}")
    return {k: state[k] for k in expected}
