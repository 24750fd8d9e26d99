"""ResNet-18/34/50/101/152 in 1D, 2D and 3D, with ENN or plain layers, from one code path.

He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), with the stride on
the 3×3 convolution of bottleneck blocks (the variant usually called v1.5). Tensors are
``(B, C, *spatial)``: ``(B, C, H, W)`` in 2D, ``(B, C, D, H, W)`` in 3D.

The stem (7-wide convolution with stride 2, then max pooling with stride 2) reduces every
side by 4 and the network by 32 overall, so a 3D MRI volume of 64³–192³ reaches the last
stage at 2³–6³: enough context for whole-brain classification at a cost that fits one GPU.

Note [stem order]:
    The stem computes ReLU(MaxPool(Norm(Conv(x)))) rather than the textbook
    MaxPool(ReLU(Norm(Conv(x)))). The two are equal, values and gradients alike: ReLU is
    monotone, so it commutes with a maximum, and where a window's maximum is ≤ 0 both
    orders pass no gradient. The order matters for memory. The normalised map, the largest
    of the network, is then read only by the pooling, which keeps just its argmax indices
    (:class:`enn_neuro.models.pooling.IndexMaxPool`), so the map is freed after the forward
    pass instead of being saved for ReLU's and the pooling's backward. For the 3D ResNet-18 at
    96³ this takes 54 MiB off the peak of a training step, in bp and in local mode alike
    (``benchmarks/memory_local_vs_bp.py``), and ReLU runs on an eighth of the voxels.

Each model is a sequence of *units* (the stem, every residual block, the classifier) that a
trainer can cut into local blocks; see :mod:`enn_neuro.models.local`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from enn_neuro.models.layers import LayerSpec
from enn_neuro.models.local import Unit

__all__ = ["BasicBlock", "Bottleneck", "Classifier", "ResNet", "Stem"]


class Stem(nn.Module):
    """7-wide convolution with stride 2, normalisation, ReLU, 3-wide max pooling with stride 2.

    The ReLU is applied after the pooling, which computes the same values and gradients
    with less memory: see ``Note [stem order]``.

    Args:
        in_channels: Channels of the input image (1 for a T1w volume, 3 for RGB).
        out_channels: Channels after the stem.
        spec: Layer type and dimensionality.
    """

    def __init__(self, in_channels: int, out_channels: int, spec: LayerSpec) -> None:
        super().__init__()
        self.conv = spec.conv(in_channels, out_channels, 7, stride=2, padding=3, bias=False)
        self.norm = spec.norm_layer(out_channels)
        self.act = nn.ReLU(inplace=True)
        self.pool = spec.max_pool(3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, *S) → (B, C_out, *S/4)``."""
        features = self.norm(self.conv(x))  # (B, C_out, *S/2)
        return self.act(self.pool(features))  # (B, C_out, *S/4)


class BasicBlock(nn.Module):
    """Two 3-wide convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int, spec: LayerSpec) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = spec.conv(in_channels, width, 3, stride=stride, padding=1, bias=False)
        self.norm1 = spec.norm_layer(width)
        self.conv2 = spec.conv(width, out_channels, 3, padding=1, bias=False)
        self.norm2 = spec.norm_layer(out_channels)
        self.act = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out_channels, stride, spec)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, *S) → (B, C_out, *S/stride)``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + identity)


class Bottleneck(nn.Module):
    """1-wide, 3-wide (strided), 1-wide convolutions with a residual connection (ResNet-50+)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, spec: LayerSpec) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = spec.conv(in_channels, width, 1, bias=False)
        self.norm1 = spec.norm_layer(width)
        self.conv2 = spec.conv(width, width, 3, stride=stride, padding=1, bias=False)
        self.norm2 = spec.norm_layer(width)
        self.conv3 = spec.conv(width, out_channels, 1, bias=False)
        self.norm3 = spec.norm_layer(out_channels)
        self.act = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out_channels, stride, spec)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, *S) → (B, C_out, *S/stride)``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act(self.norm1(self.conv1(x)))
        out = self.act(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return self.act(out + identity)


class Classifier(nn.Module):
    """Global average pooling, then a linear layer: ``(B, C, *S) → (B, num_classes)``."""

    def __init__(self, in_channels: int, num_classes: int, spec: LayerSpec) -> None:
        super().__init__()
        self.pool = spec.global_pool()
        self.fc = spec.linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S) → (B, num_classes)``."""
        pooled = self.pool(x).flatten(1)  # (B, C)
        return self.fc(pooled)  # (B, num_classes)


class ResNet(nn.Module):
    """A ResNet of any depth, dimensionality and layer type.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        depths: Residual blocks in each of the four stages, e.g. ``(2, 2, 2, 2)``.
        spec: Layer type (ENN or plain), dimensionality and normalisation.
        in_channels: Channels of the input.
        num_classes: Outputs of the classifier (1 for regression).
        base_width: Channels of the first stage; doubled at each later stage.
        zero_init_residual: Start the last normalisation of every residual block at zero,
            so each block begins as the identity (Goyal et al., 2017).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        depths: Sequence[int],
        spec: LayerSpec,
        in_channels: int,
        num_classes: int,
        base_width: int = 64,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(depths) != 4 or not all(isinstance(d, int) and d >= 1 for d in depths):
            raise ValueError(f"depths must be four positive integers, got {depths!r}")
        for name, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("base_width", base_width),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.spec = spec
        self.num_classes = num_classes
        self.zero_init_residual = zero_init_residual

        self.stem = Stem(in_channels, base_width, spec)
        channels = base_width
        for stage_index, depth in enumerate(depths):
            width = base_width * 2**stage_index
            stride = 1 if stage_index == 0 else 2
            blocks = []
            for block_index in range(depth):
                blocks.append(block(channels, width, stride if block_index == 0 else 1, spec))
                channels = width * block.expansion
            self.add_module(f"layer{stage_index + 1}", nn.Sequential(*blocks))
        self.classifier = Classifier(channels, num_classes, spec)
        self.feature_channels = channels

    def units(self) -> list[Unit]:
        """The model as a sequence: stem, each residual block, classifier.

        Applying the units in order is the forward pass. Stage 0 is the stem, stages 1–4 the
        residual stages, stage 5 the classifier.
        """
        units = [Unit("stem", self.stem, self.stem.conv.out_channels, stage=0)]
        for stage_index in range(1, 5):
            stage = getattr(self, f"layer{stage_index}")
            for block_index, residual_block in enumerate(stage):
                name = f"layer{stage_index}.{block_index}"
                units.append(Unit(name, residual_block, residual_block.out_channels, stage_index))
        units.append(Unit("classifier", self.classifier, self.num_classes, stage=5))
        return units

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, *S) → (B, num_classes)``."""
        features = self.stem(x)  # (B, w, *S/4)
        features = self.layer1(features)  # (B, w·e, *S/4)
        features = self.layer2(features)  # (B, 2w·e, *S/8)
        features = self.layer3(features)  # (B, 4w·e, *S/16)
        features = self.layer4(features)  # (B, 8w·e, *S/32)
        return self.classifier(features)  # (B, num_classes)

    @torch.no_grad()
    def reset_residual_norms_(self) -> None:
        """Zeroes the last normalisation scale of every residual block (if so configured)."""
        if not self.zero_init_residual:
            return
        for module in self.modules():
            if isinstance(module, Bottleneck):
                nn.init.zeros_(module.norm3.weight)
            elif isinstance(module, BasicBlock):
                nn.init.zeros_(module.norm2.weight)


def _shortcut(
    in_channels: int, out_channels: int, stride: int, spec: LayerSpec
) -> nn.Module | None:
    """1-wide strided projection when the residual changes shape, else the identity."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        spec.conv(in_channels, out_channels, 1, stride=stride, bias=False),
        spec.norm_layer(out_channels),
    )
