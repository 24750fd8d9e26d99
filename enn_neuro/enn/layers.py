"""Eigen layers: Linear and Conv1d/2d/3d whose weight is held as W = Q · diag(λ) · Pᵀ.

A layer's weight of shape ``(out, in/groups, *kernel)`` is flattened to a matrix
``(out, fan_in)`` with ``fan_in = in/groups · prod(kernel)``. It is stored as

- ``Q``: ``(out, r)``, near-orthonormal columns,
- ``lam``: ``(r,)``, the spectrum λ,
- ``P``: ``(fan_in, r)``, near-orthonormal columns,

with ``r = min(out, fan_in)`` unless a lower ``rank`` is asked for. Near-orthonormality is
kept by :func:`enn_neuro.enn.orthogonality_penalty`, added to the task loss.

One N-d implementation serves every layer type (``spatial_dims`` 0 for Linear). See
``Note [forward paths]`` for the two ways a forward pass can be computed.

Note [forward paths]:
    The obvious forward pass rebuilds W = (Q·λ) Pᵀ and calls ``F.conv*``; rebuilding costs
    ``out · r · fan_in`` multiply-adds whatever the input size, and its backward twice that.
    The factored pass instead convolves with Pᵀ (``r`` output channels), scales by λ and mixes
    the channels with a 1×1 convolution by Q: ``r · fan_in · n + out · r · n`` for ``n``
    output positions (batch × spatial). Deep 3D layers see few positions and a large
    ``fan_in`` (27 · 512 = 13 824 for the last ResNet stage), where rebuilding W would cost
    more than the convolution itself. ``forward_mode="auto"`` picks the cheaper of the two per
    call from the input's shape; both compute the same function.

Note [P layout]:
    ``P`` has shape ``(fan_in, r)`` but its memory is laid out as the contiguous ``(r, fan_in)``
    matrix Pᵀ, which is exactly the kernel ``(r, in/groups, *kernel)`` of the factored pass
    and the right operand of ``(Q·λ) Pᵀ``: both become views instead of copies. Transposing
    a 13 824 × 512 matrix, and its gradient back, took more time per step than the 3D
    ResNet-18's convolutions (``benchmarks/enn_overhead.py``). Gradients and optimizer state
    follow the parameter's strides, and ``state_dict`` values keep the logical shape.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from enn_neuro.choices import parse_choice

__all__ = [
    "ENNConv1d",
    "ENNConv2d",
    "ENNConv3d",
    "ENNLayer",
    "ENNLinear",
    "ForwardMode",
]


class ForwardMode(str, enum.Enum):
    """How an ENN layer computes its forward pass (see ``Note [forward paths]``)."""

    AUTO = "auto"
    DENSE = "dense"
    FACTORED = "factored"


class _PaddingMode(str, enum.Enum):
    ZEROS = "zeros"
    REFLECT = "reflect"
    REPLICATE = "replicate"
    CIRCULAR = "circular"


_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class ENNLayer(nn.Module):
    """Base of every ENN layer: the factors, their initialisation and the forward paths.

    Subclasses fix ``spatial_dims`` (0 for Linear) and the constructor signature of the torch
    layer they replace. Code that needs "any ENN layer" tests ``isinstance(m, ENNLayer)``.

    Attributes:
        Q: Left factor, ``(out, r)``.
        lam: Spectrum λ, ``(r,)``.
        P: Right factor, ``(fan_in, r)``.
        bias: ``(out,)`` or ``None``.
        forward_mode: A :class:`ForwardMode`; ``"auto"`` by default. Assigning a string
            checks it at once.
    """

    spatial_dims: int = 0

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        groups: int,
        bias: bool,
        *,
        rank: int | None,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(groups, int) or groups <= 0:
            raise ValueError(f"groups must be a positive integer, got {groups!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must both be "
                f"divisible by groups ({groups})"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(kernel_size)
        self.groups = groups
        self.fan_in = in_channels // groups * math.prod(self.kernel_size)
        full_rank = min(out_channels, self.fan_in)
        if rank is None:
            rank = full_rank
        if not isinstance(rank, int) or not 1 <= rank <= full_rank:
            raise ValueError(
                f"rank must be an integer in [1, min(out, fan_in)] = [1, {full_rank}], got {rank!r}"
            )
        self.rank = rank
        self.forward_mode = ForwardMode.AUTO

        factory = {"device": device, "dtype": dtype}
        self.Q = nn.Parameter(torch.empty(out_channels, rank, **factory))
        self.lam = nn.Parameter(torch.empty(rank, **factory))
        # (fan_in, r) stored as the transpose of a contiguous (r, fan_in): see Note [P layout]
        self.P = nn.Parameter(torch.empty(rank, self.fan_in, **factory).T)
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    # initialisation

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the equivalent torch layer's weight: ``(out, in/groups, *kernel)``."""
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def reset_parameters(self) -> None:
        """Draws W from Kaiming normal (fan_out, ReLU gain) and sets Q, λ, P to its SVD."""
        if self.Q.is_meta:  # built on the meta device: materialised and set later
            return
        weight = torch.empty(self.weight_shape, device=self.Q.device, dtype=self.Q.dtype)
        nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")
        self.set_weight_(weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @torch.no_grad()
    def set_weight_(self, weight: torch.Tensor) -> ENNLayer:
        """Sets Q, λ, P to the economy SVD of ``weight`` (truncated to ``rank``).

        Args:
            weight: ``(out, in/groups, *kernel)`` or the flattened ``(out, fan_in)``.

        Returns:
            This layer.

        Raises:
            ValueError: If ``weight`` has neither shape.
        """
        if tuple(weight.shape) not in (self.weight_shape, (self.out_channels, self.fan_in)):
            raise ValueError(
                f"weight must have shape {self.weight_shape} or "
                f"{(self.out_channels, self.fan_in)}, got {tuple(weight.shape)}"
            )
        # SVD in float64: the factors of a float32 layer then round once, not twice
        matrix = weight.detach().reshape(self.out_channels, self.fan_in).double()
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        r = self.rank
        self.Q.copy_(U[:, :r])
        self.lam.copy_(S[:r])
        self.P.copy_(Vh[:r].T)  # (fan_in, r)
        return self

    # the forward mode

    @property
    def forward_mode(self) -> ForwardMode:
        """How the forward pass is computed: ``"auto"``, ``"dense"`` or ``"factored"``.

        Raises:
            ValueError: On assignment of any other value.
        """
        return self._forward_mode

    @forward_mode.setter
    def forward_mode(self, mode: ForwardMode | str) -> None:
        # checked here rather than in forward(): the error then points at the assignment
        self._forward_mode = parse_choice(ForwardMode, mode, "forward_mode")

    # the weight

    @property
    def weight(self) -> torch.Tensor:
        """The reconstructed weight ``(Q·λ) Pᵀ``, shaped like the torch layer's weight."""
        matrix = (self.Q * self.lam) @ self.P.T  # (out, fan_in)
        return matrix.reshape(self.weight_shape)

    # forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the layer; same input and output shapes as the torch layer."""
        if self._use_factored(x):
            return self._forward_factored(x)
        return self._apply_kernel(x, self.weight, self.bias)

    def _use_factored(self, x: torch.Tensor) -> bool:
        mode = self._forward_mode
        if mode is ForwardMode.DENSE or self.groups != 1:
            # grouped convolutions would need one copy of P per group: always rebuild W
            return False
        if mode is ForwardMode.FACTORED:
            return True
        out, fan_in, r = self.out_channels, self.fan_in, self.rank
        positions = self._output_positions(x)
        dense_cost = out * r * fan_in + out * fan_in * positions
        factored_cost = r * fan_in * positions + out * r * positions
        return factored_cost < dense_cost

    def _output_positions(self, x: torch.Tensor) -> int:
        """Approximate batch × output spatial size, for the cost model only."""
        return x.numel() // self.in_channels

    def _forward_factored(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _apply_kernel(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, rank={self.rank}"
        if self.spatial_dims:
            text += f", kernel_size={self.kernel_size}"
        if self.bias is None:
            text += ", bias=False"
        return text


class ENNLinear(ENNLayer):
    """Drop-in replacement for :class:`torch.nn.Linear` with W = Q·diag(λ)·Pᵀ.

    Args:
        in_features: Size of each input sample.
        out_features: Size of each output sample.
        bias: Whether to learn an additive bias.
        device: Device of the parameters.
        dtype: Dtype of the parameters.
        rank: Number of eigen-directions kept; ``min(in, out)`` when ``None``. Keyword-only,
            so that positional arguments mean what they mean for :class:`torch.nn.Linear`.

    Example:
        >>> layer = ENNLinear(16, 4)
        >>> layer(torch.randn(8, 16)).shape
        torch.Size([8, 4])
    """

    spatial_dims = 0

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        rank: int | None = None,
    ) -> None:
        super().__init__(
            in_features, out_features, (), 1, bias, rank=rank, device=device, dtype=dtype
        )

    @property
    def in_features(self) -> int:
        """Alias of ``in_channels``, as on :class:`torch.nn.Linear`."""
        return self.in_channels

    @property
    def out_features(self) -> int:
        """Alias of ``out_channels``, as on :class:`torch.nn.Linear`."""
        return self.out_channels

    def _apply_kernel(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def _forward_factored(self, x: torch.Tensor) -> torch.Tensor:
        coefficients = (x @ self.P) * self.lam  # (..., r)
        return F.linear(coefficients, self.Q, self.bias)  # (..., out)


class _ENNConvNd(ENNLayer):
    """The N-d convolution shared by :class:`ENNConv1d`, :class:`ENNConv2d`, :class:`ENNConv3d`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: str | int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        rank: int | None = None,
    ) -> None:
        d = self.spatial_dims
        kernel_size = _ntuple(kernel_size, d, "kernel_size", minimum=1)
        self.stride = _ntuple(stride, d, "stride", minimum=1)
        self.dilation = _ntuple(dilation, d, "dilation", minimum=1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be 'same', 'valid' or integers, got {padding!r}")
            if padding == "same" and any(s != 1 for s in self.stride):
                raise ValueError(
                    f"padding='same' needs stride 1 in every dimension, got {self.stride}"
                )
            self.padding: str | tuple[int, ...] = padding
        else:
            self.padding = _ntuple(padding, d, "padding", minimum=0)
        self.padding_mode = parse_choice(_PaddingMode, padding_mode, "padding_mode").value
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            groups,
            bias,
            rank=rank,
            device=device,
            dtype=dtype,
        )
        self._explicit_padding = self._padding_per_side()

    def _padding_per_side(self) -> tuple[int, ...]:
        """Padding for ``F.pad`` (last dimension first), used by non-zero padding modes."""
        if self.padding == "valid":
            return (0, 0) * self.spatial_dims
        if self.padding == "same":
            sides = []
            for k, dil in zip(self.kernel_size, self.dilation, strict=True):
                total = dil * (k - 1)
                sides.append((total // 2, total - total // 2))
        else:
            sides = [(p, p) for p in self.padding]
        return tuple(side for pair in reversed(sides) for side in pair)

    def _output_positions(self, x: torch.Tensor) -> int:
        return x.numel() // self.in_channels // math.prod(self.stride)

    def _apply_kernel(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        conv = _CONV_FUNCTIONS[self.spatial_dims]
        if self.padding_mode != "zeros":
            x = F.pad(x, self._explicit_padding, mode=self.padding_mode)
            return conv(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _forward_factored(self, x: torch.Tensor) -> torch.Tensor:
        # project onto the r right eigen-directions: a convolution with r output channels
        projection = self.P.T.reshape(self.rank, self.in_channels, *self.kernel_size)
        coefficients = self._apply_kernel(x, projection, None)  # (B, r, *spatial)

        # mix the r channels into the outputs: a 1×1 convolution by Q·λ
        mixing = (self.Q * self.lam).reshape(self.out_channels, self.rank, *[1] * self.spatial_dims)
        conv = _CONV_FUNCTIONS[self.spatial_dims]
        return conv(coefficients, mixing, self.bias)  # (B, out, *spatial)

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", stride={self.stride}"
        if self.padding != (0,) * self.spatial_dims:
            text += f", padding={self.padding}"
        if self.dilation != (1,) * self.spatial_dims:
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode!r}"
        return text


class ENNConv1d(_ENNConvNd):
    """Drop-in replacement for :class:`torch.nn.Conv1d` with W = Q·diag(λ)·Pᵀ.

    Takes the same arguments as :class:`torch.nn.Conv1d`, in the same positions, plus the
    keyword-only ``rank``. Input ``(B, C, L)``.
    """

    spatial_dims = 1


class ENNConv2d(_ENNConvNd):
    """Drop-in replacement for :class:`torch.nn.Conv2d` with W = Q·diag(λ)·Pᵀ.

    Takes the same arguments as :class:`torch.nn.Conv2d`, in the same positions, plus the
    keyword-only ``rank``. Input ``(B, C, H, W)``.
    """

    spatial_dims = 2


class ENNConv3d(_ENNConvNd):
    """Drop-in replacement for :class:`torch.nn.Conv3d` with W = Q·diag(λ)·Pᵀ.

    The workhorse of the 3D pipeline. Takes the same arguments as :class:`torch.nn.Conv3d`, in
    the same positions, plus the keyword-only ``rank``. Input ``(B, C, D, H, W)``.

    Example:
        >>> conv = ENNConv3d(1, 8, kernel_size=3, padding="same")
        >>> conv(torch.randn(2, 1, 16, 16, 16)).shape
        torch.Size([2, 8, 16, 16, 16])
    """

    spatial_dims = 3


def _ntuple(value: int | Sequence[int], n: int, name: str, minimum: int) -> tuple[int, ...]:
    """Expands an int to an n-tuple and checks every entry is an integer ≥ ``minimum``."""
    values = (value,) * n if isinstance(value, int) else tuple(value)
    if len(values) != n or not all(isinstance(v, int) and v >= minimum for v in values):
        raise ValueError(f"{name} must be an integer ≥ {minimum} or {n} of them, got {value!r}")
    return values
