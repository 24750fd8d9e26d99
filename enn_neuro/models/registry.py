"""Models by name: ``create_model("resnet18", spatial_dims=3, in_channels=1, num_classes=2)``.

Every entry is built for any dimensionality and for either layer type by the same code, so
an ENN-vs-plain comparison differs in nothing but the layers, and two models built from the
same seed start from the same function (see :func:`~enn_neuro.models.layers.init_weights_`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from enn_neuro.models.layers import LayerKind, LayerSpec, NormKind, init_weights_
from enn_neuro.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["create_model", "list_models", "register_model", "structure_twin"]

ModelBuilder = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator adding a builder ``(spec, in_channels, num_classes, **kwargs) -> Module``.

    Raises:
        ValueError: If the name is taken.
    """

    def decorate(builder: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return decorate


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_REGISTRY)


def create_model(
    name: str,
    spatial_dims: int = 3,
    in_channels: int = 1,
    num_classes: int = 2,
    layer: LayerKind | str = LayerKind.ENN,
    norm: NormKind | str = NormKind.BATCH,
    device: torch.device | str | None = None,
    **kwargs,
) -> nn.Module:
    """Builds a registered model.

    The model is laid out on the meta device first and initialised once, in module order,
    by :func:`~enn_neuro.models.layers.init_weights_`; ENN layers thus pay for one SVD each.

    Args:
        name: A name from :func:`list_models`, e.g. ``"resnet50"``.
        spatial_dims: 2 for images, 3 for volumes (1 for signals).
        in_channels: Channels of the input (1 for a T1w volume, 3 for RGB).
        num_classes: Outputs of the classifier (1 for regression).
        layer: ``"enn"`` or ``"plain"``.
        norm: ``"batch"``, ``"group"`` or ``"instance"``.
        device: Where to place the parameters (CPU when ``None``).
        **kwargs: Passed to the builder, e.g. ``base_width`` or ``zero_init_residual``.

    Returns:
        The initialised model, in training mode.

    Raises:
        ValueError: For an unknown name or a bad argument.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {list_models()}")
    spec = LayerSpec(spatial_dims=spatial_dims, layer=layer, norm=norm)
    with torch.device("meta"):
        model = _REGISTRY[name](spec, in_channels, num_classes, **kwargs)
    model = model.to_empty(device=device or "cpu")
    init_weights_(model)
    if isinstance(model, ResNet):
        model.reset_residual_norms_()
    return model


def _resnet(block, depths):
    def build(spec: LayerSpec, in_channels: int, num_classes: int, **kwargs) -> ResNet:
        return ResNet(block, depths, spec, in_channels, num_classes, **kwargs)

    return build


register_model("resnet18")(_resnet(BasicBlock, (2, 2, 2, 2)))
register_model("resnet34")(_resnet(BasicBlock, (3, 4, 6, 3)))
register_model("resnet50")(_resnet(Bottleneck, (3, 4, 6, 3)))
register_model("resnet101")(_resnet(Bottleneck, (3, 4, 23, 3)))
register_model("resnet152")(_resnet(Bottleneck, (3, 8, 36, 3)))


def structure_twin(name: str) -> nn.Module:
    """A registered model at width 1, in 1-D, with plain layers: its units at almost no cost.

    A network's units (and so its local-mode blocks) depend on its depth alone; this twin
    lets the configuration and the launch checks count them before the real model exists.
    """
    return create_model(
        name, spatial_dims=1, in_channels=1, num_classes=1, layer=LayerKind.PLAIN, base_width=1
    )
