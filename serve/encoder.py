"""The Encoder deployment: the run's model, turning query images into packed codes for the ingress."""

from __future__ import annotations

import torch
from ray import serve

from contracts.run import RunDir
from models.codes import pack_codes
from models.transforms import model_input


@serve.deployment
class Encoder:
    """The run's model; concurrent queries share one forward pass (``@serve.batch``)."""

    def __init__(self, run: RunDir, max_batch_size: int, batch_wait_s: float) -> None:
        # A replica sees a GPU only when it was given one (encoder_gpus).
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.config = run.config
        self.model = run.load_model(map_location=self.device)
        self.encode.set_max_batch_size(max_batch_size)
        self.encode.set_batch_wait_timeout_s(batch_wait_s)

    @serve.batch
    async def encode(self, images: list[torch.Tensor]) -> list[bytes]:
        """uint8 (3, S, S) images from :func:`eval_transform` -> packed codes, one per image."""
        batch = model_input(torch.stack(images).to(self.device), self.config)
        return [row.tobytes() for row in pack_codes(self.model.encode(batch).cpu().numpy())]
