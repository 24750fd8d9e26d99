"""Layer factories: the one place where a model's layer type and dimensionality are chosen.

Models ask for ``conv``, ``linear`` and ``norm`` here, so a 2D and a 3D network, or an ENN
and a plain one, come from the same code and differ only in what these return.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from torch import nn

from enn_neuro.choices import parse_choice
from enn_neuro.enn import ENNConv1d, ENNConv2d, ENNConv3d, ENNLayer, ENNLinear
from enn_neuro.models.pooling import IndexMaxPool

__all__ = ["LayerKind", "LayerSpec", "NormKind", "init_weights_"]


class LayerKind(str, enum.Enum):
    """Which layers carry the weights: eigen layers or ordinary torch layers."""

    ENN = "enn"
    PLAIN = "plain"


class NormKind(str, enum.Enum):
    """Normalisation after each convolution."""

    BATCH = "batch"
    GROUP = "group"
    INSTANCE = "instance"


_CONV = {
    LayerKind.ENN: {1: ENNConv1d, 2: ENNConv2d, 3: ENNConv3d},
    LayerKind.PLAIN: {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d},
}
_BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE_NORM = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_AVG_POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


@dataclass(frozen=True)
class LayerSpec:
    """Layer type, dimensionality and normalisation shared by every layer of one model.

    Args:
        spatial_dims: 1, 2 or 3.
        layer: ``"enn"`` or ``"plain"``.
        norm: ``"batch"``, ``"group"`` or ``"instance"``.
        norm_groups: Groups of group normalisation (capped at the channel count).
    """

    spatial_dims: int
    layer: LayerKind | str = LayerKind.ENN
    norm: NormKind | str = NormKind.BATCH
    norm_groups: int = 8

    def __post_init__(self) -> None:
        if self.spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {self.spatial_dims!r}")
        object.__setattr__(self, "layer", parse_choice(LayerKind, self.layer, "layer"))
        object.__setattr__(self, "norm", parse_choice(NormKind, self.norm, "norm"))
        if not isinstance(self.norm_groups, int) or self.norm_groups < 1:
            raise ValueError(f"norm_groups must be a positive integer, got {self.norm_groups!r}")

    def conv(self, in_channels: int, out_channels: int, kernel_size: int, **kwargs) -> nn.Module:
        """A convolution of the model's layer type and dimensionality."""
        conv_class = _CONV[self.layer][self.spatial_dims]
        return conv_class(in_channels, out_channels, kernel_size, **kwargs)

    def linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        """A fully connected layer of the model's layer type."""
        linear_class = ENNLinear if self.layer is LayerKind.ENN else nn.Linear
        return linear_class(in_features, out_features, bias=bias)

    def norm_layer(self, channels: int) -> nn.Module:
        """The normalisation layer for ``channels`` feature maps."""
        if self.norm is NormKind.BATCH:
            return _BATCH_NORM[self.spatial_dims](channels)
        if self.norm is NormKind.INSTANCE:
            return _INSTANCE_NORM[self.spatial_dims](channels, affine=True)
        groups = min(self.norm_groups, channels)
        while channels % groups:
            groups -= 1
        return nn.GroupNorm(groups, channels)

    def max_pool(self, kernel_size: int, stride: int, padding: int) -> nn.Module:
        """Max pooling of the model's dimensionality that saves only indices for backward."""
        return IndexMaxPool(self.spatial_dims, kernel_size, stride, padding)

    def global_pool(self) -> nn.Module:
        """Global average pooling to one value per channel: ``(B, C, *S) → (B, C, 1, ...)``."""
        return _AVG_POOL[self.spatial_dims](1)


def init_weights_(model: nn.Module, linear_std: float = 0.01) -> nn.Module:
    """Initialises every weight of ``model`` in module order, identically for ENN and plain.

    Convolutions draw W from Kaiming normal (fan_out, ReLU gain); linear layers from
    N(0, ``linear_std``²) so that the first logits are near zero; biases start at zero and
    normalisation layers at identity. An ENN layer receives the very W a plain layer would,
    through its SVD, so two models built from the same seed compute the same function
    whatever their layer type.

    Args:
        model: The model to initialise in place.
        linear_std: Standard deviation of linear weights.

    Returns:
        ``model``.
    """
    for module in model.modules():
        is_enn = isinstance(module, ENNLayer)
        if is_enn or isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            # same device and dtype as the layer: (out, in/groups, *kernel)
            weight = (
                module.Q.new_empty(module.weight_shape)
                if is_enn
                else module.weight.new_empty(module.weight.shape)
            )
            if isinstance(module, (ENNLinear, nn.Linear)):
                nn.init.normal_(weight, std=linear_std)
            else:
                nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")
            if is_enn:
                module.set_weight_(weight)
            else:
                module.weight.data.copy_(weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
            module.reset_parameters()
    return model
