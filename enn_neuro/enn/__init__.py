"""The ENN core shared by the 2D and 3D pipelines: layers, penalty, drift, retraction, conversion.

Example:
    >>> import torch
    >>> from enn_neuro.enn import ENNConv3d, orthogonality_penalty
    >>> conv = ENNConv3d(1, 8, kernel_size=3, padding=1)
    >>> float(orthogonality_penalty(conv)) < 1e-8
    True
"""

from enn_neuro.enn.convert import enn_class_for, plain_class_for, to_enn, to_plain
from enn_neuro.enn.layers import (
    ENNConv1d,
    ENNConv2d,
    ENNConv3d,
    ENNLayer,
    ENNLinear,
    ForwardMode,
)
from enn_neuro.enn.penalty import (
    DEFAULT_ORTHO_EVERY,
    DEFAULT_ORTHO_WEIGHT,
    LayerDrift,
    enn_layers,
    gram_deviation,
    orthogonality_drift,
    orthogonality_penalty,
    retract_,
    scheduled_penalty,
    weight_decay_groups,
)

__all__ = [
    "DEFAULT_ORTHO_EVERY",
    "DEFAULT_ORTHO_WEIGHT",
    "ENNConv1d",
    "ENNConv2d",
    "ENNConv3d",
    "ENNLayer",
    "ENNLinear",
    "ForwardMode",
    "LayerDrift",
    "enn_class_for",
    "enn_layers",
    "gram_deviation",
    "orthogonality_drift",
    "orthogonality_penalty",
    "plain_class_for",
    "retract_",
    "scheduled_penalty",
    "to_enn",
    "to_plain",
    "weight_decay_groups",
]
