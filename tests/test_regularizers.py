"""The anti-collapse terms: zero at their optimum, positive away from it, finite gradients, off by default."""

from __future__ import annotations

import pytest
import torch

from models.errors import HashrayError
from models.loss import LOSSES, build_loss, hadamard
from models.regularizers import Regularized, bit_balance, decorrelation


def test_both_terms_are_zero_for_balanced_orthogonal_codes() -> None:
    codes = hadamard(8)[:, :]  # 8 rows x 8 bits of +-1, pairwise orthogonal
    codes = codes[:, 1:]  # drop the all-ones column: every remaining bit is on for half the rows
    assert bit_balance(codes).item() == pytest.approx(0.0, abs=1e-7)
    assert decorrelation(codes).item() == pytest.approx(0.0, abs=1e-7)


def test_collapsed_codes_are_penalised() -> None:
    collapsed = torch.ones(16, 8)
    assert bit_balance(collapsed).item() == pytest.approx(1.0)
    # Every pair of bits perfectly correlated: off-diagonal covariance 1 everywhere.
    assert decorrelation(collapsed).item() == pytest.approx((64 - 8) / 64)


def test_gradients_are_finite_and_push_towards_balance() -> None:
    raw = torch.tensor([[30.0] * 8, [30.0] * 8, [0.0] * 8, [-1.0] * 8], requires_grad=True)
    total = bit_balance(torch.tanh(raw)) + decorrelation(torch.tanh(raw))
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(raw.grad).all()
    raw = torch.full((4, 8), 0.5, requires_grad=True)  # every bit leans positive
    bit_balance(torch.tanh(raw)).backward()
    assert (raw.grad > 0).all()  # descending the gradient lowers the outputs towards a zero mean


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_the_terms_add_to_any_loss_only_when_weighted(name: str) -> None:
    torch.manual_seed(0)
    codes = torch.tanh(torch.randn(6, 16))
    labels = torch.eye(3)[[0, 0, 1, 1, 2, 2]]
    plain = build_loss(name)
    assert not isinstance(plain, Regularized)  # weight 0: the loss as published
    weighted = build_loss(name, balance_weight=0.5, decorrelation_weight=2.0)
    expected = plain(codes, labels) + 0.5 * bit_balance(codes) + 2.0 * decorrelation(codes)
    assert weighted(codes, labels).item() == pytest.approx(expected.item())


def test_negative_weights_are_refused() -> None:
    with pytest.raises(HashrayError, match="balance weight must be >= 0"):
        build_loss("cosine", balance_weight=-1.0)
    with pytest.raises(HashrayError, match="decorrelation weight must be >= 0"):
        build_loss("cosine", decorrelation_weight=-0.1)
