"""IndexMaxPool equals torch's max pooling, and the stem keeps one full-size map for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from enn_neuro.models import LayerSpec
from enn_neuro.models.pooling import IndexMaxPool
from enn_neuro.models.resnet import Stem

TORCH_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize(("kernel_size", "stride", "padding"), [(3, 2, 1), (2, 2, 0), (3, 1, 1)])
def test_values_and_gradients_equal_torch_max_pooling(spatial_dims, kernel_size, stride, padding):
    # integers in a small range: many ties, and windows that share their maximum
    x = torch.randint(-3, 4, (2, 3, *[9] * spatial_dims)).double().requires_grad_(True)
    ours = IndexMaxPool(spatial_dims, kernel_size, stride, padding)
    theirs = TORCH_POOL[spatial_dims](kernel_size, stride, padding)

    out = ours(x)
    expected = theirs(x)
    assert out.shape == expected.shape
    assert torch.equal(out, expected)

    weights = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), x)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)


def test_gradcheck():
    x = torch.randn(1, 2, 6, 6, 6, dtype=torch.double, requires_grad=True)
    pool = IndexMaxPool(3, 3, 2, 1)
    assert torch.autograd.gradcheck(pool, (x,))


def test_evaluation_mode_uses_the_standard_operator():
    pool = IndexMaxPool(2, 3, 2, 1).eval()
    x = torch.randn(1, 1, 8, 8, requires_grad=True)
    assert pool(x).grad_fn.name().startswith("MaxPool2DWithIndicesBackward")
    assert pool.train()(x).grad_fn.name() == "_IndexMaxPoolFunctionBackward"


def test_bad_spatial_dims_are_refused():
    with pytest.raises(ValueError, match="spatial_dims must be 1, 2 or 3, got 4"):
        IndexMaxPool(4, 3, 2, 1)


class TestStem:
    def _stem(self, layer: str, channels: int = 8) -> Stem:
        return Stem(1, channels, LayerSpec(spatial_dims=3, layer=layer)).train()

    @pytest.mark.parametrize("layer", ["enn", "plain"])
    def test_equals_the_textbook_order(self, layer):
        stem = self._stem(layer)
        x = torch.randn(2, 1, 20, 20, 20)
        out = stem(x)
        weights = torch.randn_like(out)
        grads = torch.autograd.grad((out * weights).sum(), list(stem.parameters()))

        # conv, norm, ReLU, then torch's max pooling (fresh statistics: same batch)
        stem.norm.reset_running_stats()
        textbook = F.max_pool3d(torch.relu(stem.norm(stem.conv(x))), 3, 2, 1)
        textbook_grads = torch.autograd.grad((textbook * weights).sum(), list(stem.parameters()))
        torch.testing.assert_close(out, textbook, rtol=0, atol=0)
        for grad, expected in zip(grads, textbook_grads, strict=True):
            torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-7)

    def test_saves_one_full_size_map_for_backward(self):
        stem = self._stem("enn", channels=16)
        x = torch.randn(2, 1, 24, 24, 24)
        full_size = 2 * 16 * 12**3  # (B, C, *S/2): the normalised map
        saved = []

        def pack(tensor):
            saved.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            stem(x)
        # the normalisation's input alone; the textbook order also saves the ReLU's output
        assert saved.count(full_size) == 1
