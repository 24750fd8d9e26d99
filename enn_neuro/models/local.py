"""Cutting a model into local blocks for ENN-ℓ training, and the small heads they learn with.

In local mode the network is cut into K blocks. Every block but the last gets a small pooled
classifier head; the last block keeps the model's own classifier. Each block's input is
detached, so no gradient crosses a boundary and each block minimises its own loss.

A model that can be cut exposes ``units()``: the list of :class:`Unit` whose composition is
its forward pass. A cut is the list of unit indices where a new block starts.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from enn_neuro.choices import parse_choice
from enn_neuro.models.layers import LayerSpec, init_weights_

__all__ = [
    "HeadKind",
    "LocalBlock",
    "LocalHead",
    "Unit",
    "cut_points",
    "split_model",
]


@dataclass(frozen=True)
class Unit:
    """One step of a model's forward pass.

    Attributes:
        name: Qualified name of ``module`` in the model.
        module: The module; shared with the model, not a copy.
        out_channels: Channels of its output (classes for the classifier).
        stage: Index of the stage it belongs to (stem 0, classifier last).
    """

    name: str
    module: nn.Module
    out_channels: int
    stage: int


class HeadKind(str, enum.Enum):
    """The pooled head a local block learns with."""

    POOL_LINEAR = "pool_linear"
    """Global average pooling, then a linear layer."""
    CONV_POOL_LINEAR = "conv_pool_linear"
    """A 1-wide convolution with normalisation and ReLU, global pooling, a linear layer."""


class LocalHead(nn.Module):
    """A small classifier on a block's feature map, pooled before any dense layer.

    Pooling first keeps the cost independent of the feature map's size, which matters for 3D
    maps: a linear layer on a flattened 64-channel 16³ map would hold 262 144 weights per
    class, the pooled head holds 64.

    Args:
        in_channels: Channels of the block's output.
        num_classes: Outputs (1 for regression).
        spec: Layer type and dimensionality, as in the model.
        kind: ``"pool_linear"`` or ``"conv_pool_linear"``.
        hidden_channels: Width of the 1-wide convolution; ``in_channels`` when ``None``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        spec: LayerSpec,
        kind: HeadKind | str = HeadKind.POOL_LINEAR,
        hidden_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.kind = parse_choice(HeadKind, kind, "head kind")
        if self.kind is HeadKind.CONV_POOL_LINEAR:
            hidden_channels = hidden_channels or in_channels
            self.mix = nn.Sequential(
                spec.conv(in_channels, hidden_channels, 1, bias=False),
                spec.norm_layer(hidden_channels),
                nn.ReLU(inplace=True),
            )
            features = hidden_channels
        else:
            self.mix = nn.Identity()
            features = in_channels
        self.pool = spec.global_pool()
        self.fc = spec.linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S) → (B, num_classes)``."""
        mixed = self.mix(x)  # (B, C', *S)
        pooled = self.pool(mixed).flatten(1)  # (B, C')
        return self.fc(pooled)  # (B, num_classes)


class LocalBlock(nn.Module):
    """A run of consecutive units and the head that scores their output.

    The block detaches its input, so its loss trains its own units and head and nothing
    before it, whoever calls it.

    Attributes:
        body: The units, in order (shared with the model).
        head: A :class:`LocalHead`, or the model's classifier for the last block.
        unit_names: Names of the units in ``body``.
    """

    def __init__(self, body: nn.Sequential, head: nn.Module, unit_names: Sequence[str]) -> None:
        super().__init__()
        self.body = body
        self.head = head
        self.unit_names = list(unit_names)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the block's features (the next block's input) and its head's logits.

        Args:
            x: The previous block's features (or the images), ``(B, C, *S)``; detached here.
        """
        # the boundary of local training: no gradient flows back into the previous block
        features = self.body(x.detach())
        return features, self.head(features)


def cut_points(model: nn.Module, cut: str | Sequence[int]) -> list[int]:
    """Unit indices where local blocks start, from a named cut or an explicit list.

    Args:
        model: A model with ``units()``.
        cut: ``"stage"`` (one block per residual stage, the stem joined to the first),
            ``"unit"`` (one block per residual block) or a list of start indices, the first
            being 0.

    Returns:
        Sorted start indices; the classifier always ends the last block.

    Raises:
        ValueError: For an unknown name or an invalid list.
    """
    units = _units_of(model)
    last_body = len(units) - 2  # the classifier joins the last block, never starts one
    if cut == "stage":
        stages = [u.stage for u in units[:-1]]
        starts = [0] + [i for i in range(2, len(stages)) if stages[i] != stages[i - 1]]
    elif cut == "unit":
        starts = [0, *range(2, last_body + 1)]
    elif isinstance(cut, str):
        raise ValueError(f"cut must be 'stage', 'unit' or a list of unit indices, got {cut!r}")
    else:
        starts = sorted(set(int(i) for i in cut))
        if not starts or starts[0] != 0 or starts[-1] > last_body:
            raise ValueError(
                f"cut indices must start at 0 and lie in [0, {last_body}] "
                f"(the model has {len(units)} units), got {list(cut)!r}"
            )
    return starts


def split_model(
    model: nn.Module,
    cut: str | Sequence[int] = "stage",
    head: HeadKind | str = HeadKind.POOL_LINEAR,
    hidden_channels: int | None = None,
) -> nn.ModuleList:
    """Cuts ``model`` into local blocks, each with its own head.

    The blocks share their units with ``model``: training the blocks trains the model, and
    ``model.state_dict()`` still describes the whole network (the heads of the inner blocks
    are new modules and have their own parameters). The new heads take the device and dtype
    of the model's parameters.

    Args:
        model: A model with ``units()`` and a ``spec`` (:class:`LayerSpec`).
        cut: Where blocks start; see :func:`cut_points`.
        head: Kind of the inner blocks' heads.
        hidden_channels: Width of ``conv_pool_linear`` heads.

    Returns:
        A ``ModuleList`` of :class:`LocalBlock`, the last one ending with the classifier.
    """
    units = _units_of(model)
    starts = cut_points(model, cut)
    ends = [*starts[1:], len(units) - 1]
    num_classes = units[-1].out_channels
    device, dtype = _device_and_dtype(model)
    blocks = []
    for start, end in zip(starts, ends, strict=True):
        members = units[start:end]
        body = nn.Sequential(*[u.module for u in members])
        if end == len(units) - 1:
            block_head = units[-1].module  # the model's own classifier
        else:
            block_head = LocalHead(
                members[-1].out_channels, num_classes, model.spec, head, hidden_channels
            )
            # drawn on the default device, where create_model draws the model before the
            # learner moves it, so that a seed gives the same heads whatever the training
            # device; drawn in the model's dtype, so that an ENN head's factors are
            # orthonormal to that precision
            init_weights_(block_head.to(dtype=dtype)).to(device=device)
        blocks.append(LocalBlock(body, block_head, [u.name for u in members]))
    return nn.ModuleList(blocks)


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first parameter (the defaults if none)."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.device, parameter.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _units_of(model: nn.Module) -> list[Unit]:
    units_method = getattr(model, "units", None)
    if units_method is None:
        raise TypeError(
            f"{type(model).__name__} has no units() method: only models that expose their "
            "sequence of units can be cut into local blocks"
        )
    return units_method()
