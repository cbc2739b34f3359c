"""Optional terms against code collapse, added to any hashing loss with a weight each.

A pairwise loss is satisfied by codes that agree where labels agree; nothing
in it asks the bits to carry different information, and a network trained
from scratch can settle on a few codes that serve many label sets. Two terms
standard in the deep-hashing literature push back, on the relaxed codes ``h``
(n, K) of the local batch:

* bit balance, ``B = mean_k (mean_i h_ik)^2``: each bit on for half the batch;
* decorrelation, ``D = ||h^T h / n - I||_F^2 / K^2``: bits uncorrelated and of
  unit power, so no two bits say the same thing.

Both are 0 at their optimum (balanced, orthogonal +-1 codes) and have finite
gradients everywhere. They are off (weight 0) unless asked for, so the
paper's loss stays exactly the paper's by default.
"""

from __future__ import annotations

import torch
from torch import nn

from models.errors import HashrayError


def bit_balance(codes: torch.Tensor) -> torch.Tensor:
    """``mean_k (mean_i h_ik)^2``: 0 when every bit's batch mean is 0."""
    return codes.float().mean(dim=0).pow(2).mean()


def decorrelation(codes: torch.Tensor) -> torch.Tensor:
    """``||h^T h / n - I||_F^2 / K^2``: 0 when the bits are uncorrelated with unit power."""
    codes = codes.float()
    n, bits = codes.shape
    covariance = codes.T @ codes / n
    return (covariance - torch.eye(bits, device=codes.device)).pow(2).sum() / bits**2


class Regularized(nn.Module):
    """``loss(...) + balance_weight * B + decorrelation_weight * D`` on the local batch's codes.

    Args:
        loss: any hashing loss of :mod:`models.loss` (same call signature).
        balance_weight, decorrelation_weight: weights of :func:`bit_balance` and :func:`decorrelation`.
    """

    def __init__(self, loss: nn.Module, balance_weight: float = 0.0, decorrelation_weight: float = 0.0) -> None:
        super().__init__()
        for name, weight in (("balance weight", balance_weight), ("decorrelation weight", decorrelation_weight)):
            if weight < 0:
                raise HashrayError(f"{name} must be >= 0, got {weight}")
        self.loss = loss
        self.balance_weight = float(balance_weight)
        self.decorrelation_weight = float(decorrelation_weight)

    def forward(
        self,
        codes: torch.Tensor,
        labels: torch.Tensor,
        other_codes: torch.Tensor | None = None,
        other_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        total = self.loss(codes, labels, other_codes, other_labels)
        if self.balance_weight:
            total = total + self.balance_weight * bit_balance(codes)
        if self.decorrelation_weight:
            total = total + self.decorrelation_weight * decorrelation(codes)
        return total
