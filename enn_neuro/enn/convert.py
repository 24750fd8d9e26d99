"""Conversion between plain torch layers and their ENN twins.

``to_enn`` keeps the function: each weight is replaced by its own SVD, so outputs stay equal
up to float rounding. ``to_plain`` fuses W = Q·diag(λ)·Pᵀ back into ordinary layers, for
inference at no overhead and for export (torch.export, ONNX); the fused model's state_dict
loads into the plain architecture built by the registry with ``layer="plain"``.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from enn_neuro.enn.layers import ENNConv1d, ENNConv2d, ENNConv3d, ENNLayer, ENNLinear

__all__ = ["enn_class_for", "plain_class_for", "to_enn", "to_plain"]

_ENN_OF_PLAIN: dict[type[nn.Module], type[ENNLayer]] = {
    nn.Linear: ENNLinear,
    nn.Conv1d: ENNConv1d,
    nn.Conv2d: ENNConv2d,
    nn.Conv3d: ENNConv3d,
}
_PLAIN_OF_ENN = {enn: plain for plain, enn in _ENN_OF_PLAIN.items()}


def enn_class_for(plain_class: type[nn.Module]) -> type[ENNLayer]:
    """The ENN twin of a torch layer class (``nn.Conv3d`` → ``ENNConv3d``).

    Raises:
        TypeError: If the class has no ENN twin.
    """
    try:
        return _ENN_OF_PLAIN[plain_class]
    except KeyError:
        names = sorted(c.__name__ for c in _ENN_OF_PLAIN)
        raise TypeError(f"no ENN twin for {plain_class.__name__}; supported: {names}") from None


def plain_class_for(enn_class: type[ENNLayer]) -> type[nn.Module]:
    """The torch layer class an ENN layer class replaces (``ENNConv3d`` → ``nn.Conv3d``)."""
    return _PLAIN_OF_ENN[enn_class]


def to_enn(model: nn.Module, rank: int | None = None, inplace: bool = False) -> nn.Module:
    """Turns every Linear and Conv1d/2d/3d of ``model`` into its ENN twin.

    Each new layer holds the economy SVD of the old weight, so the model computes the same
    function (exactly, up to float rounding) when ``rank`` is ``None``. A frozen layer stays
    frozen: Q, λ and P take the ``requires_grad`` of the weight, the bias keeps its own.

    Only the exact types ``nn.Linear`` and ``nn.Conv1d/2d/3d`` are converted. A subclass may
    compute something else or read its weight directly (``nn.MultiheadAttention`` does so
    with its ``out_proj``), so subclasses are left alone with a warning that names them, as
    are layers that are already ENN.

    Args:
        model: Any module, or a single layer.
        rank: Rank for every converted layer, capped at each layer's full rank; ``None`` for
            full rank. A lower rank keeps the best rank-r approximation of each weight.
        inplace: Modify ``model`` instead of a deep copy.

    Returns:
        The converted model (``model`` itself when ``inplace``).

    Warns:
        UserWarning: Once, naming every subclass of a supported layer that was left as it is.
    """
    skipped = [
        f"{name or '<model>'} ({type(m).__name__})"
        for name, m in model.named_modules()
        if isinstance(m, tuple(_ENN_OF_PLAIN)) and type(m) not in _ENN_OF_PLAIN
    ]
    if skipped:
        warnings.warn(
            f"to_enn left {len(skipped)} layer(s) unconverted: {', '.join(skipped)}. Each "
            "subclasses a torch layer without being one: its forward pass, or code that reads "
            "its weight directly, may not work with an ENN layer. Convert by hand where safe.",
            stacklevel=2,
        )
    model = model if inplace else copy.deepcopy(model)
    return _replace(model, lambda m: _enn_from_plain(m, rank) if type(m) in _ENN_OF_PLAIN else m)


def to_plain(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fuses every ENN layer of ``model`` into the torch layer it replaces.

    Args:
        model: Any module, or a single ENN layer.
        inplace: Modify ``model`` instead of a deep copy.

    Returns:
        The fused model: same function, plain layers, parameter names ``weight``/``bias``.
        The weight requires a gradient if any of Q, λ, P did; the bias keeps its own flag.
    """
    model = model if inplace else copy.deepcopy(model)
    return _replace(model, lambda m: _plain_from_enn(m) if isinstance(m, ENNLayer) else m)


def _replace(model: nn.Module, convert) -> nn.Module:
    """Applies ``convert`` to the root and to every descendant, replacing children.

    A module reached under two names (weight sharing) is converted once and stays shared.
    """
    root = convert(model)
    if root is not model:
        return root
    converted: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        # _modules, not named_children(): the latter yields a shared child only once
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in converted:
                converted[id(child)] = convert(child)
            if converted[id(child)] is not child:
                setattr(parent, child_name, converted[id(child)])
    return model


@torch.no_grad()
def _enn_from_plain(layer: nn.Module, rank: int | None) -> ENNLayer:
    enn_class = _ENN_OF_PLAIN[type(layer)]
    factory = {"device": "meta", "dtype": layer.weight.dtype}
    has_bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        full_rank = min(layer.in_features, layer.out_features)
        new_rank = None if rank is None else min(rank, full_rank)
        enn = enn_class(layer.in_features, layer.out_features, has_bias, rank=new_rank, **factory)
    else:
        fan_in = layer.weight[0].numel()
        new_rank = None if rank is None else min(rank, layer.out_channels, fan_in)
        enn = enn_class(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            bias=has_bias,
            rank=new_rank,
            **_conv_arguments(layer),
            **factory,
        )
    # built on the meta device so that no throw-away initialisation (and SVD) is computed
    enn = enn.to_empty(device=layer.weight.device)
    enn.set_weight_(layer.weight)
    if has_bias:
        enn.bias.copy_(layer.bias)
    # a frozen layer stays frozen (fine-tuning a pretrained backbone, for one)
    for factor in (enn.Q, enn.lam, enn.P):
        factor.requires_grad_(layer.weight.requires_grad)
    if has_bias:
        enn.bias.requires_grad_(layer.bias.requires_grad)
    enn.train(layer.training)
    return enn


@torch.no_grad()
def _plain_from_enn(layer: ENNLayer) -> nn.Module:
    plain_class = _PLAIN_OF_ENN[type(layer)]
    factory = {"device": "meta", "dtype": layer.Q.dtype}
    has_bias = layer.bias is not None
    if isinstance(layer, ENNLinear):
        plain = plain_class(layer.in_features, layer.out_features, has_bias, **factory)
    else:
        plain = plain_class(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            bias=has_bias,
            **_conv_arguments(layer),
            **factory,
        )
    plain = plain.to_empty(device=layer.Q.device)
    plain.weight.copy_(layer.weight)
    if has_bias:
        plain.bias.copy_(layer.bias)
    # the fused weight is trainable if any of its factors was
    plain.weight.requires_grad_(any(f.requires_grad for f in (layer.Q, layer.lam, layer.P)))
    if has_bias:
        plain.bias.requires_grad_(layer.bias.requires_grad)
    plain.train(layer.training)
    return plain


def _conv_arguments(layer: nn.Module) -> dict:
    """The constructor keywords that torch and ENN convolutions share, read off ``layer``."""
    return {
        "stride": layer.stride,
        "padding": layer.padding,
        "dilation": layer.dilation,
        "groups": layer.groups,
        "padding_mode": layer.padding_mode,
    }
