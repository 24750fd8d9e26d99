"""Property tests: one invariant, every shape (hypothesis draws the layer arguments)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from enn_neuro.enn import ENNConv1d, ENNConv2d, ENNConv3d, ENNLinear, to_enn, to_plain
from tests.conftest import relative_error

ENN = {1: ENNConv1d, 2: ENNConv2d, 3: ENNConv3d}
PLAIN = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@st.composite
def conv_arguments(draw):
    dims = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2, 3]))
    in_channels = groups * draw(st.integers(1, 3))
    out_channels = groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    use_same = draw(st.booleans())
    stride = 1 if use_same else draw(st.integers(1, 3))
    padding = "same" if use_same else draw(st.integers(0, 2))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    rank_fraction = draw(st.sampled_from([None, 0.5]))
    full_rank = min(out_channels, in_channels // groups * kernel**dims)
    rank = None if rank_fraction is None else max(1, int(full_rank * rank_fraction))
    smallest = dilation * (kernel - 1) + 1
    if padding_mode != "zeros":
        # reflect padding needs more input than padding on a side, and no draw pads over 2
        smallest = max(smallest, 3)
    side = draw(st.integers(smallest, 7))
    mode = draw(st.sampled_from(["auto", "dense", "factored"]))
    kwargs = {
        "kernel_size": kernel,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "groups": groups,
        "bias": draw(st.booleans()),
        "padding_mode": padding_mode,
    }
    return dims, in_channels, out_channels, kwargs, rank, side, mode


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@settings(max_examples=60, deadline=None)
@given(conv_arguments())
def test_conv_equals_the_torch_conv_holding_its_weight(arguments):
    dims, in_channels, out_channels, kwargs, rank, side, mode = arguments
    layer = ENN[dims](in_channels, out_channels, rank=rank, **kwargs)
    layer.forward_mode = mode
    twin = PLAIN[dims](in_channels, out_channels, **kwargs)
    with torch.no_grad():
        twin.weight.copy_(layer.weight)
        if layer.bias is not None:
            layer.bias.normal_()  # zero at initialisation: a random one shows where it lands
            twin.bias.copy_(layer.bias)
    x = torch.randn(2, in_channels, *[side] * dims)
    output = layer(x)
    expected = twin(x)
    assert output.shape == expected.shape
    assert relative_error(output, expected) < 1e-5


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@settings(max_examples=40, deadline=None)
@given(conv_arguments())
def test_to_enn_then_to_plain_preserves_a_plain_conv(arguments):
    dims, in_channels, out_channels, kwargs, _, side, _ = arguments
    plain = PLAIN[dims](in_channels, out_channels, **kwargs)
    x = torch.randn(2, in_channels, *[side] * dims)
    expected = plain(x)
    enn = to_enn(plain)
    assert relative_error(enn(x), expected) < 1e-5
    assert relative_error(to_plain(enn)(x), expected) < 1e-5


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 5))
def test_linear_starts_orthonormal_and_matches_f_linear(in_features, out_features, batch):
    layer = ENNLinear(in_features, out_features)
    r = min(in_features, out_features)
    assert layer.Q.shape == (out_features, r) and layer.P.shape == (in_features, r)
    eye = torch.eye(r)
    assert (layer.Q.T @ layer.Q - eye).norm() < 1e-5
    assert (layer.P.T @ layer.P - eye).norm() < 1e-5
    x = torch.randn(batch, in_features)
    with torch.no_grad():
        actual, expected = layer(x), F.linear(x, layer.weight, layer.bias)
        # error relative to the size of the summed terms, not of the sum: one output can
        # cancel (0.0793 from 32 terms of order 1 differed by 2.7e-5 relative, in float32)
        scale = (x.abs() @ layer.weight.abs().T).norm()  # (batch, out) magnitudes, summed
    assert float((actual - expected).norm() / scale) < 1e-5
