"""Max pooling whose backward pass keeps only the argmax indices, not the input.

The stem of a 3D ResNet pools the largest feature map of the network (64 channels at half
the input's side: 54 MiB per 96³ volume pair in float32). PyTorch's max pooling saves that
input for its backward pass, although the gradient only needs the position of each window's
maximum. :class:`IndexMaxPool` saves the indices alone and scatters the gradient back to
them, so in a stem that normalises, pools, then applies ReLU (see ``Note [stem order]`` in
:mod:`enn_neuro.models.resnet`) no full-size activation outlives the forward pass but the
normalisation's input. Values and gradients equal those of :class:`torch.nn.MaxPool3d`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["IndexMaxPool"]

_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


class IndexMaxPool(nn.Module):
    """Max pooling over 1, 2 or 3 spatial dimensions that saves only indices for backward.

    In evaluation mode, or without gradients, it is plain ``F.max_pool*d`` (so traced and
    exported models see the standard operator).

    Args:
        spatial_dims: 1, 2 or 3.
        kernel_size: Window size.
        stride: Window stride.
        padding: Implicit negative-infinity padding on every side.

    Example:
        >>> pool = IndexMaxPool(3, kernel_size=3, stride=2, padding=1)
        >>> pool(torch.randn(2, 4, 8, 8, 8)).shape
        torch.Size([2, 4, 4, 4, 4])
    """

    def __init__(self, spatial_dims: int, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        if spatial_dims not in _MAX_POOL:
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
        self.spatial_dims = spatial_dims
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S) → (B, C, *S')`` with the usual max-pooling output size."""
        if self.training and torch.is_grad_enabled() and x.requires_grad:
            return _IndexMaxPoolFunction.apply(x, self.spatial_dims, self._arguments())
        return _MAX_POOL[self.spatial_dims](x, *self._arguments())

    def _arguments(self) -> tuple[int, int, int]:
        return self.kernel_size, self.stride, self.padding

    def extra_repr(self) -> str:
        return (
            f"spatial_dims={self.spatial_dims}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )


class _IndexMaxPoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, spatial_dims: int, arguments: tuple) -> torch.Tensor:
        pooled, indices = _MAX_POOL[spatial_dims](x, *arguments, return_indices=True)
        ctx.save_for_backward(indices)  # (B, C, *S'), flat positions within each (B, C) map
        ctx.input_shape = x.shape
        return pooled

    @staticmethod
    def backward(ctx, grad_pooled: torch.Tensor):
        (indices,) = ctx.saved_tensors
        batch, channels = ctx.input_shape[:2]
        # overlapping windows can share a maximum: their gradients add up
        grad_input = grad_pooled.new_zeros(batch, channels, ctx.input_shape[2:].numel())
        grad_input.scatter_add_(
            2, indices.reshape(batch, channels, -1), grad_pooled.reshape(batch, channels, -1)
        )
        return grad_input.view(ctx.input_shape), None, None
