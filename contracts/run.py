"""The run dir of ``hashray train``: Ray Train's checkpoints, then ``model.pt`` and ``config.json``.

``model.pt`` is a plain ``state_dict`` (loaded with ``weights_only=True``) and
``config.json`` the :class:`models.network.HashNetConfig` that rebuilds and
feeds the network; :meth:`models.network.ResNetHash.save` writes both. A
command that encodes or serves opens the run once (:meth:`RunDir.open`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from contracts.fs import Location, absolute, exists, join, read_bytes, read_json
from models.errors import HashrayError
from models.network import CONFIG_JSON, MODEL_PT, HashNetConfig, ResNetHash

HISTORY_JSON = "history.json"


@dataclass(frozen=True)
class RunDir:
    """A finished training run: its config read once; the weights loaded on demand."""

    uri: str
    config: HashNetConfig

    @classmethod
    def open(cls, uri: str) -> RunDir:
        """Check that both files exist and read the config, without loading the weights."""
        uri = absolute(uri)
        for name in (MODEL_PT, CONFIG_JSON):
            if not exists(join(uri, name)):
                raise HashrayError(f"{uri} has no {name}: is it a finished `hashray train` run dir?")
        return cls(uri, HashNetConfig.from_dict(read_json(join(uri, CONFIG_JSON))))

    def load_model(self, map_location: str | torch.device = "cpu") -> ResNetHash:
        """The network in eval mode on ``map_location``."""
        return ResNetHash.from_run(Location(self.uri), map_location=map_location, config=self.config)

    def model_sha256(self) -> str:
        """Checksum of ``model.pt``: two codes dirs made with the same weights are interchangeable."""
        return hashlib.sha256(read_bytes(join(self.uri, MODEL_PT))).hexdigest()
