"""Hashing losses: the paper's multi-level cosine loss, three pairwise baselines and
CSQ (hash centres), plus a multi-label classification loss used to pre-train a backbone.

Every loss takes the relaxed codes ``h`` in (-1, 1) of the local batch, their
multi-hot labels, and optionally codes/labels gathered from other workers.
Pairs are (local row i, pool row j) where the pool is the local batch followed
by the gathered rows, self-pairs excluded. Only the local codes carry
gradient; the gathered ones are constants, so with data parallelism each
worker differentiates its own rows' share of the global pair sum and the
all-reduce of gradients adds the shares up.

Notation, for K bits and a pair (i, j):

* ``ip_ij = h_i . h_j / K`` -- the normalised code inner product, in [-1, 1];
  for binary codes ``ip = 1 - 2 * hamming / K``.
* ``s_ij = y_i . y_j / (|y_i| |y_j|)`` -- the cosine of the multi-hot label
  vectors (0 when either has no label).
* ``b_ij = 1 if s_ij > 0 else 0`` -- "shares at least one label".
* ``Q = mean_{i,k} (|h_ik| - 1)^2`` -- the quantisation term every loss adds
  with weight ``quant_weight`` (so that the losses differ only in the pair term).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import HashrayError
from models.regularizers import Regularized

# IDHN's thresholds for "hard" similarity (s near 0 or 1), as in its reference code.
_HARD_LOW, _HARD_HIGH = 0.01, 0.99


def label_cosine(labels: torch.Tensor, pool_labels: torch.Tensor) -> torch.Tensor:
    """Cosine of multi-hot label vectors, (n, C) x (p, C) -> (n, p); 0 for empty rows."""
    left = F.normalize(labels.float(), dim=1)
    right = F.normalize(pool_labels.float(), dim=1)
    return (left @ right.T).clamp(0.0, 1.0)


class PairLoss(nn.Module):
    """Shared pair pooling and quantisation; subclasses define :meth:`pair_term`.

    Args:
        quant_weight: weight ``lambda`` of the quantisation term ``Q``.
    """

    def __init__(self, quant_weight: float = 0.1) -> None:
        super().__init__()
        self.quant_weight = float(quant_weight)

    def forward(
        self,
        codes: torch.Tensor,
        labels: torch.Tensor,
        other_codes: torch.Tensor | None = None,
        other_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of the pairs (local row, local or gathered row), as a scalar."""
        codes = codes.float()  # pair sums in fp32 also under bf16 autocast
        pool_codes, pool_labels = codes, labels
        if other_codes is not None and other_codes.shape[0] > 0:
            pool_codes = torch.cat([codes, other_codes.detach().float()])
            pool_labels = torch.cat([labels, other_labels])
        n, bits = codes.shape
        inner = codes @ pool_codes.T / bits
        similarity = label_cosine(labels, pool_labels)
        valid = torch.ones_like(inner, dtype=torch.bool)
        valid[:, :n].fill_diagonal_(False)  # self-pairs say nothing about similarity
        quantisation = (codes.abs() - 1.0).pow(2).mean()
        # A lone row has no pair: the pair term is then an exact (graph-connected) zero.
        pairs = self.pair_term(inner[valid], similarity[valid], bits) if valid.any() else inner.sum() * 0.0
        return pairs + self.quant_weight * quantisation

    def pair_term(self, inner: torch.Tensor, similarity: torch.Tensor, bits: int) -> torch.Tensor:
        """Loss of the valid pairs given ``ip`` and ``s`` as flat tensors and the code length."""
        raise NotImplementedError


class CosineLoss(PairLoss):
    """The paper's multi-level loss (Qiang et al., ICACI 2019).

    ``L = mean_ij (ip_ij - (2 s_ij - 1))^2 + lambda Q``

    The target ``2 s - 1`` is monotone in the label cosine: identical label sets
    -> +1 (equal codes), disjoint -> -1 (opposite codes), and partial overlap in
    between, so sharing 2 of 3 labels ranks closer than sharing 1 of 5.
    """

    def pair_term(self, inner: torch.Tensor, similarity: torch.Tensor, bits: int) -> torch.Tensor:
        return (inner - (2.0 * similarity - 1.0)).pow(2).mean()


def _likelihood(theta: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood ``log(1 + e^theta) - s theta``, stable for large |theta|."""
    return F.softplus(theta) - target * theta


class DPSHLoss(PairLoss):
    """DPSH's pairwise likelihood (Li et al., IJCAI 2016), binary similarity.

    ``L = mean_ij [log(1 + e^theta_ij) - b_ij theta_ij] + lambda Q`` with
    ``theta_ij = h_i . h_j / 2 = (K / 2) ip_ij``.
    """

    def pair_term(self, inner: torch.Tensor, similarity: torch.Tensor, bits: int) -> torch.Tensor:
        return _likelihood(bits / 2.0 * inner, (similarity > 0).float()).mean()


class IDHNLoss(PairLoss):
    """IDHN's soft-similarity loss (Zhang et al., IEEE TMM 2019).

    Pairs with hard similarity (``s <= 0.01`` or ``s >= 0.99``, mask ``M``) get
    the likelihood, the soft pairs in between a squared error:

    ``L = mean_ij [M_ij (log(1 + e^theta_ij) - s_ij theta_ij)
    + gamma (1 - M_ij) (ip_ij - (2 s_ij - 1))^2] + lambda Q``,
    ``theta_ij = alpha ip_ij``.

    alpha = 5 follows the reference code's ``5 / K`` scale on the raw inner
    product. The squared error is on ``ip`` (divided by K^2 relative to the
    paper's ``(h_i . h_j - K(2 s_ij - 1))^2``) so that both parts have the same
    order of magnitude for every K; gamma = 1 accordingly.
    """

    def __init__(self, quant_weight: float = 0.1, alpha: float = 5.0, gamma: float = 1.0) -> None:
        super().__init__(quant_weight)
        self.alpha, self.gamma = float(alpha), float(gamma)

    def pair_term(self, inner: torch.Tensor, similarity: torch.Tensor, bits: int) -> torch.Tensor:
        hard = (similarity <= _HARD_LOW) | (similarity >= _HARD_HIGH)
        likelihood = _likelihood(self.alpha * inner, similarity)
        squared = self.gamma * (inner - (2.0 * similarity - 1.0)).pow(2)
        return torch.where(hard, likelihood, squared).mean()


class HashNetLoss(PairLoss):
    """HashNet's weighted pairwise likelihood (Cao et al., ICCV 2017).

    ``L = sum_ij w_ij [log(1 + e^theta_ij) - b_ij theta_ij] / sum_ij w_ij + lambda Q``,
    ``theta_ij = alpha ip_ij`` (alpha = 10, HashNet's ``10 / K`` on the raw inner
    product), ``w_ij = |S| / |S_1|`` for similar pairs and ``|S| / |S_0|`` for
    dissimilar ones, counted over the pairs of the step -- so both kinds weigh
    the same however unbalanced the batch is. HashNet's tanh continuation is
    not used: the network's tanh is fixed and the quantisation term does its job.
    """

    def __init__(self, quant_weight: float = 0.1, alpha: float = 10.0) -> None:
        super().__init__(quant_weight)
        self.alpha = float(alpha)

    def pair_term(self, inner: torch.Tensor, similarity: torch.Tensor, bits: int) -> torch.Tensor:
        similar = (similarity > 0).float()
        total = float(similar.numel())
        positives = similar.sum().clamp(min=1.0)
        negatives = (total - similar.sum()).clamp(min=1.0)
        weights = torch.where(similar > 0, total / positives, total / negatives)
        loss = _likelihood(self.alpha * inner, similar)
        return (weights * loss).sum() / weights.sum()


class ClassifierLoss(nn.Module):
    """Multi-label classification through the hash layer, to pre-train a backbone.

    Output ``k < C`` (C classes) is read as the relaxed indicator of class k:
    ``L = mean_{i,k<C} [log(1 + e^(alpha h_ik)) - y_ik alpha h_ik]``, alpha = 5
    (``h`` is bounded by tanh, so the logit range is (-5, 5): probabilities up
    to 0.993). Outputs beyond C and the pairs are unused. A run with this loss
    gives a backbone that already separates the data set's classes -- the
    fine-tuning start the paper takes from ImageNet, made from the data set's
    own train labels and without a download -- and its ``model.pt`` is then a
    ``--weights PATH`` for the hashing runs. ``quant_weight`` is accepted for a
    uniform constructor and ignored: these outputs are not codes.
    """

    def __init__(self, quant_weight: float = 0.0, alpha: float = 5.0) -> None:
        super().__init__()
        self.alpha = float(alpha)

    def forward(
        self,
        codes: torch.Tensor,
        labels: torch.Tensor,
        other_codes: torch.Tensor | None = None,
        other_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        classes = labels.shape[1]
        if codes.shape[1] < classes:
            raise HashrayError(
                f"loss 'classify' needs at least one output per class: --bits {codes.shape[1]} < {classes} classes"
            )
        return _likelihood(self.alpha * codes[:, :classes].float(), labels.float()).mean()


def hadamard(order: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of a power-of-two ``order``: +-1 rows, pairwise orthogonal."""
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < order:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)])
    return matrix


def hash_centers(classes: int, bits: int, seed: int = 0) -> torch.Tensor:
    """CSQ's hash centres, one +-1 row of ``bits`` per class, the same on every worker.

    Rows of a Hadamard matrix and of its negation when they suffice (any two
    centres then differ in K/2 or K bits); otherwise seeded Bernoulli(0.5)
    rows, as in the CSQ paper.
    """
    if bits & (bits - 1) == 0 and classes <= 2 * bits:
        square = hadamard(bits)
        return torch.cat([square, -square])[:classes]
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (classes, bits), generator=generator).float() * 2 - 1


class CSQLoss(nn.Module):
    """Central similarity quantisation (Yuan et al., CVPR 2020), for multi-label data.

    Each class has a fixed hash centre (:func:`hash_centers`); an image's target
    ``c`` is the sign of the sum of its labels' centres (a 0 sum takes a fixed
    random sign, as in the reference code). The loss is the binary cross-entropy
    of ``(h + 1) / 2`` against ``(c + 1) / 2`` plus ``lambda Q``. Pointwise:
    the gathered codes of other workers are not needed.
    """

    def __init__(self, quant_weight: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        self.quant_weight = float(quant_weight)
        self.seed = seed
        self._centers: torch.Tensor | None = None
        self._tie_signs: torch.Tensor | None = None

    def targets(self, labels: torch.Tensor, bits: int) -> torch.Tensor:
        """The +-1 target code of each row of multi-hot ``labels``."""
        if self._centers is None or self._centers.shape != (labels.shape[1], bits):
            self._centers = hash_centers(labels.shape[1], bits, self.seed)
            generator = torch.Generator().manual_seed(self.seed + 1)
            self._tie_signs = torch.randint(0, 2, (bits,), generator=generator).float() * 2 - 1
        summed = labels.float() @ self._centers.to(labels.device)
        return torch.where(summed == 0, self._tie_signs.to(labels.device), torch.sign(summed))

    def forward(
        self,
        codes: torch.Tensor,
        labels: torch.Tensor,
        other_codes: torch.Tensor | None = None,
        other_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        codes = codes.float()
        target = (self.targets(labels, codes.shape[1]) + 1) / 2
        probability = ((codes + 1) / 2).clamp(1e-6, 1 - 1e-6)
        central = F.binary_cross_entropy(probability, target)
        return central + self.quant_weight * (codes.abs() - 1.0).pow(2).mean()


LOSSES: dict[str, type[nn.Module]] = {
    "cosine": CosineLoss,
    "dpsh": DPSHLoss,
    "idhn": IDHNLoss,
    "hashnet": HashNetLoss,
    "csq": CSQLoss,
}
# The losses of pairs, which also pair each row with the rows gathered from other workers.
PAIR_LOSSES = {name: loss for name, loss in LOSSES.items() if issubclass(loss, PairLoss)}
# Not a hashing loss (its outputs are class scores): kept apart so that whatever
# iterates over LOSSES compares hashing losses only.
PRETRAIN_LOSSES: dict[str, type[nn.Module]] = {"classify": ClassifierLoss}


def build_loss(
    name: str, quant_weight: float = 0.1, *, balance_weight: float = 0.0, decorrelation_weight: float = 0.0
) -> nn.Module:
    """The loss called ``name`` (a key of :data:`LOSSES` or :data:`PRETRAIN_LOSSES`).

    Args:
        quant_weight: weight of the quantisation term.
        balance_weight, decorrelation_weight: weights of the anti-collapse terms
            of :mod:`models.regularizers` (0: the loss alone, as published).
    """
    known = {**LOSSES, **PRETRAIN_LOSSES}
    if name not in known:
        raise HashrayError(f"unknown loss {name!r}; choose one of {', '.join(known)}")
    if quant_weight < 0:
        raise HashrayError(f"quant weight must be >= 0, got {quant_weight}")
    loss = known[name](quant_weight=quant_weight)
    if balance_weight or decorrelation_weight:
        return Regularized(loss, balance_weight=balance_weight, decorrelation_weight=decorrelation_weight)
    return loss
