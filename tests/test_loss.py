"""Properties of the pairwise hashing losses (models/loss.py) on tiny tensors."""

from __future__ import annotations

import pytest
import torch

from models.errors import HashrayError
from models.loss import LOSSES, PAIR_LOSSES, build_loss, hash_centers, label_cosine


def _labels(*rows: list[int], classes: int = 4) -> torch.Tensor:
    matrix = torch.zeros(len(rows), classes)
    for i, row in enumerate(rows):
        matrix[i, row] = 1.0
    return matrix


def test_label_cosine_is_the_cosine_of_multi_hot_vectors() -> None:
    labels = _labels([0, 1, 2], [0, 1], [3], [])
    similarity = label_cosine(labels, labels)
    assert similarity[0, 1] == pytest.approx(2 / (3**0.5 * 2**0.5))
    assert similarity[0, 2] == 0.0
    assert similarity[0, 0] == pytest.approx(1.0)
    assert similarity[3].eq(0).all()  # a row without labels is similar to nothing


def test_cosine_loss_is_zero_at_its_target() -> None:
    # Identical labels -> equal codes (ip = +1), disjoint labels -> opposite codes (ip = -1).
    codes = torch.tensor([[1.0] * 8, [1.0] * 8, [-1.0] * 8])
    labels = _labels([0, 1], [0, 1], [2])
    assert build_loss("cosine")(codes, labels).item() == pytest.approx(0.0, abs=1e-7)
    # The target of a partial overlap is 2 s - 1: s = 1/2 needs ip = 0, i.e. half the bits differ.
    codes = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0]])
    assert build_loss("cosine")(codes, _labels([0], [0, 1, 2, 3])).item() == pytest.approx(0.0, abs=1e-7)
    assert build_loss("cosine")(codes, _labels([0], [0])).item() > 0.4


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_identical_labels_pull_codes_together(name: str) -> None:
    torch.manual_seed(0)
    raw = torch.randn(6, 16, requires_grad=True)
    labels = _labels([0, 1], [0, 1], [0, 1], [2, 3], [2, 3], [2, 3])
    optimiser = torch.optim.Adam([raw], lr=0.05)
    loss_fn = build_loss(name)

    def inner_same() -> float:
        codes = torch.tanh(raw).detach()
        return float((codes[0] @ codes[1] + codes[3] @ codes[4]) / 2)

    before = inner_same()
    for _ in range(50):
        optimiser.zero_grad()
        loss_fn(torch.tanh(raw), labels).backward()
        optimiser.step()
    assert inner_same() > before + 4.0


def test_cosine_loss_ranks_by_how_many_labels_are_shared() -> None:
    # Multi-level similarity: B shares 2 of A's 3 labels, C shares 1; after fitting
    # free codes, A's code must be closer to B's than to C's. DPSH cannot tell.
    torch.manual_seed(0)
    raw = torch.randn(3, 32, requires_grad=True)
    labels = _labels([0, 1, 2], [0, 1], [0, 3])
    optimiser = torch.optim.Adam([raw], lr=0.05)
    for _ in range(300):
        optimiser.zero_grad()
        build_loss("cosine", quant_weight=0.0)(torch.tanh(raw), labels).backward()
        optimiser.step()
    codes = torch.tanh(raw).detach()
    assert codes[0] @ codes[1] > codes[0] @ codes[2] + 2.0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_are_finite_at_saturation_and_with_empty_labels(name: str) -> None:
    raw = torch.tensor([[30.0] * 64, [-30.0] * 64, [30.0] * 32 + [-30.0] * 32, [0.0] * 64], requires_grad=True)
    labels = _labels([0], [0], [1], [])
    loss = build_loss(name)(torch.tanh(raw), labels, torch.tanh(torch.full((2, 64), 25.0)), _labels([0], [1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(raw.grad).all()


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
def test_gathered_rows_join_the_pairs_without_gradient(name: str) -> None:
    torch.manual_seed(1)
    local = torch.tanh(torch.randn(3, 16)).requires_grad_()
    other = torch.tanh(torch.randn(4, 16)).requires_grad_()
    local_labels, other_labels = _labels([0], [1], [0, 1]), _labels([0], [1], [2], [0, 2])
    loss_fn = build_loss(name)
    with_others = loss_fn(local, local_labels, other, other_labels)
    assert with_others.item() != pytest.approx(loss_fn(local, local_labels).item())
    with_others.backward()
    assert other.grad is None and local.grad.abs().sum() > 0


def test_a_single_row_has_no_pairs_but_still_a_quantisation_gradient() -> None:
    codes = torch.tensor([[0.5, -0.5, 0.9, -0.1, 0.2, 0.3, -0.7, 0.8]], requires_grad=True)
    loss = build_loss("cosine", quant_weight=1.0)(codes, _labels([0]))
    loss.backward()
    assert loss.item() == pytest.approx(((codes.detach().abs() - 1) ** 2).mean().item())


def test_build_loss_rejects_unknown_names_and_negative_weights() -> None:
    with pytest.raises(HashrayError, match="cosine, dpsh, idhn, hashnet, csq"):
        build_loss("triplet")
    with pytest.raises(HashrayError, match="quant weight"):
        build_loss("cosine", quant_weight=-1.0)


def test_classify_loss_trains_one_output_per_class_and_needs_enough_outputs() -> None:
    # Pre-training objective: output k predicts class k; the outputs beyond the classes are free.
    torch.manual_seed(0)
    raw = torch.randn(3, 8, requires_grad=True)
    labels = _labels([0, 1], [2], [], classes=4)
    optimiser = torch.optim.Adam([raw], lr=0.1)
    loss_fn = build_loss("classify")
    for _ in range(100):
        optimiser.zero_grad()
        loss_fn(torch.tanh(raw), labels).backward()
        optimiser.step()
    assert torch.equal(raw.detach()[:, :4] > 0, labels > 0)
    with pytest.raises(HashrayError, match="--bits 8 < 12 classes"):
        loss_fn(torch.zeros(2, 8), torch.zeros(2, 12))


def test_csq_pulls_each_image_to_the_centroid_of_its_labels_centres() -> None:
    centers = hash_centers(4, 16)
    assert torch.equal(centers @ centers.T, 16 * torch.eye(4))  # Hadamard rows: pairwise orthogonal
    assert not torch.equal(hash_centers(40, 16), hash_centers(40, 16, seed=1))  # too many classes: seeded random
    loss_fn = build_loss("csq", quant_weight=0.0)
    labels = _labels([0], [1], [0, 1], classes=4)
    targets = loss_fn.targets(labels, 16)
    assert torch.equal(targets[0], centers[0]) and torch.equal(targets[1], centers[1])
    # Two labels: the sign of the sum of both centres, a fixed sign where they cancel.
    summed = centers[0] + centers[1]
    assert torch.equal(targets[2][summed != 0], torch.sign(summed[summed != 0]))
    assert torch.equal(loss_fn.targets(labels, 16), targets)  # the same targets every step
    near = build_loss("csq", quant_weight=0.0)(0.999 * targets, labels)
    far = build_loss("csq", quant_weight=0.0)(-0.999 * targets, labels)
    assert near.item() < 0.01 < far.item()
