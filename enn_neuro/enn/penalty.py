"""The orthogonality penalty, its per-layer drift for logging, and the hard retraction.

L_ortho = Σ_layers ‖QᵀQ − I‖²_F + ‖PᵀP − I‖²_F keeps every ENN layer's factors near
orthonormal; it is added to the task loss with a small weight (2e-4 by default).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from enn_neuro.enn.layers import ENNLayer

__all__ = [
    "DEFAULT_ORTHO_EVERY",
    "DEFAULT_ORTHO_WEIGHT",
    "LayerDrift",
    "enn_layers",
    "gram_deviation",
    "orthogonality_drift",
    "orthogonality_penalty",
    "retract_",
    "scheduled_penalty",
    "weight_decay_groups",
]

DEFAULT_ORTHO_WEIGHT = 2e-4
# the training schedule's default interval: see Note [lazy penalty]
DEFAULT_ORTHO_EVERY = 16


class LayerDrift(NamedTuple):
    """Distance of one layer's factors from orthonormality (Frobenius norms)."""

    q: float
    """‖QᵀQ − I‖_F"""
    p: float
    """‖PᵀP − I‖_F"""


def enn_layers(model: nn.Module) -> list[tuple[str, ENNLayer]]:
    """Every ENN layer of ``model`` with its qualified name, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ENNLayer)]


def gram_deviation(factor: torch.Tensor) -> torch.Tensor:
    """‖MᵀM − I‖²_F for a tall matrix ``M`` of shape ``(n, r)``; differentiable.

    The backward pass is written by hand (``4 · M (MᵀM − I)``) because autograd would form
    the gradient of the Gram matrix through both of its operands: two ``n · r²`` products
    instead of one, and this is the penalty's whole cost.
    """
    return _GramDeviation.apply(factor)


def orthogonality_penalty(model: nn.Module) -> torch.Tensor:
    """Σ over every ENN layer of ``‖QᵀQ − I‖²_F + ‖PᵀP − I‖²_F`` (0-dim, differentiable).

    Args:
        model: Any module; layers other than :class:`ENNLayer` contribute nothing.

    Returns:
        The penalty, on the device of the first ENN layer (a CPU zero if there is none).
    """
    layers = enn_layers(model)
    if not layers:
        return torch.zeros(())
    terms = [gram_deviation(layer.Q) + gram_deviation(layer.P) for _, layer in layers]
    return torch.stack(terms).sum()


def scheduled_penalty(
    model: nn.Module,
    step: int,
    weight: float = DEFAULT_ORTHO_WEIGHT,
    every: int = DEFAULT_ORTHO_EVERY,
) -> torch.Tensor | None:
    """The weighted penalty term for training step ``step``, computed every ``every`` steps.

    With ``every = k > 1`` the penalty is evaluated on one step in k, the last of each group
    of k (steps k − 1, 2k − 1, ...), with weight ``k · weight``: lazy regularisation, as
    for the R1 penalty of Karras et al. (2020). Over k steps the factors receive the same
    total push towards orthonormality at 1/k of the cost; see ``Note [lazy penalty]``.
    ``every = 1`` is the exact penalty on every step.

    Args:
        model: Any module.
        step: Index of the training step, from 0.
        weight: λ_ortho, the weight of the penalty in the loss.
        every: Evaluate on steps where ``(step + 1) % every == 0``.

    Returns:
        ``every · weight · L_ortho``, or ``None`` on steps that skip it (or if weight is 0).

    Raises:
        ValueError: If ``weight`` is negative or ``every`` is not a positive integer.
    """
    if weight < 0:
        raise ValueError(f"penalty weight must be ≥ 0, got {weight!r}")
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"penalty interval 'every' must be a positive integer, got {every!r}")
    # the last step of each group: a new layer is exactly orthonormal, so evaluating on the
    # group's first step would spend the first evaluation on a zero gradient
    if weight == 0 or (step + 1) % every:
        return None
    return (weight * every) * orthogonality_penalty(model)


# Note [lazy penalty]:
#     The penalty needs two ``fan_in · r²`` products per factor (the Gram matrix PᵀP and the
#     gradient 4 P (PᵀP − I)) whatever the batch: 30 G multiply-adds for the 3D ResNet-18,
#     1.3 times its weight layers' work in a training step at 64³ and batch 2, and 8.5% of
#     the 2D ResNet-50's at 224² and batch 32 (``benchmarks/enn_overhead.py``). Evaluating
#     it every k steps with weight × k divides that by k. The penalty acts slowly: with SGD
#     at learning rate η (momentum β) it shrinks PᵀP − I by about 8 η λ_ortho / (1 − β) per
#     step, 1.6e-3 for the ImageNet recipe (η 0.1, β 0.9), so a push of k times that every k
#     steps (k = 16: 2.6%) is the same first-order correction, well inside the stable range.
#     With Adam the drift builds faster. On the demo study (AdamW, lr 1e-3; 5 folds × 3
#     seeds) the factors' drift at k = 16 followed the every-step penalty's and the test
#     metrics stayed within their spread, while at k = 64 the drift grew as if unpenalised
#     until the first evaluation (``benchmarks/penalty_schedule.py``). Hence 16 by default;
#     ``every = 1`` is the exact penalty on every step.


@torch.no_grad()
def orthogonality_drift(model: nn.Module) -> dict[str, LayerDrift]:
    """Per layer ``‖QᵀQ − I‖_F`` and ``‖PᵀP − I‖_F``, for logging.

    Args:
        model: Any module.

    Returns:
        Layer name → :class:`LayerDrift`, in module order.
    """
    return {
        name: LayerDrift(q=_gram_distance(layer.Q), p=_gram_distance(layer.P))
        for name, layer in enn_layers(model)
    }


@torch.no_grad()
def retract_(model: nn.Module, keep_weight: bool = False) -> nn.Module:
    """Makes every layer's Q and P orthonormal again, in place.

    Two retractions, for two purposes (see ``Note [retraction]``):

    - ``keep_weight=False`` (the default, for training): each factor is replaced by its
      nearest matrix with orthonormal columns (the polar factor ``U Vᵀ`` of its SVD), and λ is
      refitted so that ``Q' diag(λ') P'ᵀ`` is as close as possible to the old weight; with
      orthonormal factors the best diagonal is ``λ'_i = q'_iᵀ W p'_i``. Every column moves the
      least possible and keeps its place and sign, so optimizer state (Adam's moments) stays
      attached to the same eigen-direction; the weight moves by about the drift, which after
      one optimizer step is small.
    - ``keep_weight=True``: the factors become W's own singular vectors (QR of Q and P, SVD of
      the r × r core ``R_Q diag(λ) R_Pᵀ``), matched to the old columns' order and signs, with λ
      taking the sign flips. W, hence the function, is kept up to rounding however far the
      factors had drifted; but where two |λ| are close the singular vectors turn far within
      their plane (by about drift / gap), so columns can move far although W does not.

    Both compute in float64.

    Args:
        model: Any module.
        keep_weight: Keep W exactly instead of keeping the columns close.

    Returns:
        ``model``.

    Raises:
        ValueError: If a layer's factors hold NaN or infinite values; that layer and the
            ones after it are left as they were.
    """
    retract = _orthonormal_factors if keep_weight else _projected_factors
    for name, layer in enn_layers(model):
        Q, lam, P = layer.Q.double(), layer.lam.double(), layer.P.double()
        # a diverged layer: the SVD would fail with a message that names no layer
        if not all(torch.isfinite(factor).all() for factor in (Q, lam, P)):
            raise ValueError(f"cannot retract layer {name!r}: Q, λ or P is not finite")
        Q, lam, P = retract(Q, lam, P)
        layer.Q.copy_(Q)
        layer.lam.copy_(lam)
        layer.P.copy_(P)  # copy_ keeps P's transposed layout (Note [P layout] in layers.py)
    return model


# Note [retraction]:
#     An orthonormal Q' and P' with Q' diag(λ') P'ᵀ = W exist (W has rank ≤ r), but they are
#     W's singular vectors, which W alone fixes: after an optimizer step that left two nearly
#     equal |λ|, they lie far from the old columns (one Adam step at lr 1e-3 from a Kaiming
#     initialisation turned an ENNConv2d(32, 64, 3)'s Q by 34% against 0.7% for the polar
#     projection). Called after every step, that would scramble the directions the optimizer's
#     moments belong to; the projection instead moves W by the drift of one step, which the
#     next step sees and corrects. Hence projection for training, the exact form for a
#     one-off clean-up of a trained network.


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups that decay every weight but the ENN factors Q and P.

    Decaying λ alone shrinks an ENN layer's weight exactly as decaying a plain layer's W
    would: with decoupled decay (AdamW) ``Q diag((1 − η·wd) λ) Pᵀ = (1 − η·wd) W``, and with
    L2 decay (SGD, Adam) ``‖λ‖² = ‖W‖²_F`` while Q and P are orthonormal. Decaying Q and P as
    well would pull them away from orthonormality against the penalty: under SGD's decay
    ``wd`` a column's squared norm settles where the two forces balance, near
    ``1 − wd / (4 λ_ortho)``; for the ImageNet configs (1e-4, 2e-4) that is 0.875.

    Args:
        model: The module an optimizer will train.
        weight_decay: Decay of every parameter but Q and P.

    Returns:
        ``[{"params": decayed, "weight_decay": weight_decay}, {"params": [Q, P, ...],
        "weight_decay": 0.0}]``; the second group only if ``model`` has ENN layers.

    Example:
        >>> from enn_neuro.enn import ENNLinear
        >>> optimizer = torch.optim.AdamW(weight_decay_groups(ENNLinear(8, 4), 1e-4))
        >>> [len(group["params"]) for group in optimizer.param_groups]  # (λ, bias), (Q, P)
        [2, 2]
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be ≥ 0, got {weight_decay!r}")
    factors = {id(p) for _, layer in enn_layers(model) for p in (layer.Q, layer.P)}
    parameters = list(model.parameters())
    groups = [
        {
            "params": [p for p in parameters if id(p) not in factors],
            "weight_decay": weight_decay,
        }
    ]
    if factors:
        groups.append({"params": [p for p in parameters if id(p) in factors], "weight_decay": 0.0})
    return groups


class _GramDeviation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, factor: torch.Tensor) -> torch.Tensor:
        gram = _gram(factor)  # (r, r)
        deviation = gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        ctx.save_for_backward(factor, deviation)
        return deviation.square().sum()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        factor, deviation = ctx.saved_tensors
        scaled = (4 * grad_output) * deviation  # (r, r): scaling it is cheaper than the product
        if factor.T.is_contiguous():
            # P is stored transposed (Note [P layout] in layers.py): a gradient in the same
            # layout accumulates without a strided copy; the deviation is symmetric
            return (scaled @ factor.T).T  # (n, r), transposed layout
        return factor @ scaled  # (n, r)


def _gram(factor: torch.Tensor) -> torch.Tensor:
    """``MᵀM`` for ``M`` of shape ``(n, r)``, from its upper block rows only.

    Splitting the columns in halves ``[A B]``, the Gram matrix is ``[[AᵀA, AᵀB], [BᵀA,
    BᵀB]]`` with ``BᵀA = (AᵀB)ᵀ``: two products, ``Aᵀ[A B]`` and ``BᵀB``, compute 3/4 of
    the multiply-adds of one ``MᵀM`` and took 22% less time for the 512-column factors of
    the 3D ResNet-18 on the CPU. torch has no symmetric rank-k product to call instead.
    """
    r = factor.shape[1]
    if r < 128:  # small factors: one product, the split saves less than it costs
        return factor.T @ factor
    half = r // 2
    left, right = factor[:, :half], factor[:, half:]  # (n, h), (n, r − h)
    upper = left.T @ factor  # (h, r)
    gram = torch.empty((r, r), dtype=factor.dtype, device=factor.device)
    gram[:half] = upper
    gram[half:, :half] = upper[:, half:].T
    gram[half:, half:] = right.T @ right
    return gram


def _gram_distance(factor: torch.Tensor) -> float:
    gram = factor.T @ factor
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.matrix_norm(gram - eye).item()


def _projected_factors(
    Q: torch.Tensor, lam: torch.Tensor, P: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The nearest orthonormal ``Q'``, ``P'`` and the λ' that best keeps W (least squares).

    Args:
        Q: ``(out, r)``.
        lam: ``(r,)``.
        P: ``(fan_in, r)``.

    Returns:
        ``Q'`` ``(out, r)``, ``λ'`` ``(r,)``, ``P'`` ``(fan_in, r)``.
    """
    Q_new, P_new = _polar(Q), _polar(P)
    # λ'_i = q'_iᵀ (Q diag(λ) Pᵀ) p'_i without forming the (out, fan_in) weight
    left = Q_new.T @ Q  # (r, r)
    right = P.T @ P_new  # (r, r)
    lam_new = torch.einsum("ij,j,ji->i", left, lam, right)  # (r,)
    return Q_new, lam_new, P_new


def _orthonormal_factors(
    Q: torch.Tensor, lam: torch.Tensor, P: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthonormal ``Q'``, ``P'`` and a ``λ'`` with the same product, in the old columns' order.

    Args:
        Q: ``(out, r)``.
        lam: ``(r,)``.
        P: ``(fan_in, r)``.

    Returns:
        ``Q'`` ``(out, r)``, ``λ'`` ``(r,)``, ``P'`` ``(fan_in, r)`` with
        ``Q' diag(λ') P'ᵀ = Q diag(λ) Pᵀ``.
    """
    # orthonormal bases of the column spaces: Q = Q_basis R_Q, P = P_basis R_P
    Q_basis, R_Q = torch.linalg.qr(Q)  # (out, r), (r, r)
    P_basis, R_P = torch.linalg.qr(P)  # (fan_in, r), (r, r)

    # W = Q_basis (R_Q diag(λ) R_Pᵀ) P_basisᵀ: the SVD of the small core is that of W
    U, S, Vh = torch.linalg.svd((R_Q * lam) @ R_P.T)  # (r, r), (r,), (r, r)
    Q_new, P_new = Q_basis @ U, P_basis @ Vh.T  # (out, r), (fan_in, r)

    # same order as the old columns: the SVD sorts by singular value, the old λ need not be
    # sorted, and a step can swap two nearly equal ones
    overlap = _column_cosines(Q, Q_new) + _column_cosines(P, P_new)  # (r, r), old × new
    # the assignment runs on the host: one r × r copy per layer, about a millisecond at r = 512
    _, order = linear_sum_assignment(overlap.cpu().numpy(), maximize=True)
    order = torch.as_tensor(order, device=Q.device)
    Q_new, lam_new, P_new = Q_new[:, order], S[order], P_new[:, order]

    # same signs: each new column of Q and P points like the old one; λ absorbs the flips
    q_sign = _sign_of_overlap(Q, Q_new)  # (r,)
    p_sign = _sign_of_overlap(P, P_new)  # (r,)
    return Q_new * q_sign, lam_new * (q_sign * p_sign), P_new * p_sign


def _column_cosines(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``|cos|`` between every old column and every new (unit) column, ``(r, r)``."""
    norms = old.norm(dim=0).clamp_min(torch.finfo(old.dtype).tiny)  # (r,)
    return (old.T @ new).abs() / norms[:, None]


def _sign_of_overlap(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """+1 where column i of ``new`` points like column i of ``old`` (or is orthogonal), else −1."""
    overlap = (old * new).sum(dim=0)  # (r,)
    return torch.where(overlap < 0, -1.0, 1.0).to(new.dtype)


def _polar(matrix: torch.Tensor) -> torch.Tensor:
    """Nearest matrix with orthonormal columns (Frobenius norm): ``U Vᵀ`` from the SVD."""
    U, _, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return U @ Vh
