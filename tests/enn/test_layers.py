from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from enn_neuro.enn import ENNConv1d, ENNConv2d, ENNConv3d, ENNLinear, ForwardMode
from tests.conftest import relative_error

CONVS = {1: (ENNConv1d, nn.Conv1d), 2: (ENNConv2d, nn.Conv2d), 3: (ENNConv3d, nn.Conv3d)}
MODES = ["dense", "factored", "auto"]


def _torch_twin(layer, torch_class, *args, **kwargs) -> nn.Module:
    """The torch layer built with the same arguments, holding the ENN layer's weight and bias."""
    twin = torch_class(*args, **kwargs)
    with torch.no_grad():
        twin.weight.copy_(layer.weight)
        if layer.bias is not None:
            twin.bias.copy_(layer.bias)
    return twin


def _random_bias_(layer) -> None:
    # a bias is initialised at zero: a random one makes its place in the output visible
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.normal_()


class TestForward:
    @pytest.mark.parametrize("mode", MODES)
    def test_linear_equals_torch_linear_with_the_same_weight(self, mode):
        layer = ENNLinear(12, 5)
        _random_bias_(layer)
        layer.forward_mode = mode
        x = torch.randn(3, 7, 12)
        expected = _torch_twin(layer, nn.Linear, 12, 5)(x)
        assert layer(x).shape == (3, 7, 5)
        assert relative_error(layer(x), expected) < 1e-5

    @pytest.mark.parametrize("dims", [1, 2, 3])
    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize(
        "kwargs",
        [
            {"kernel_size": 3},
            {"kernel_size": 3, "stride": 2, "padding": 1},
            {"kernel_size": 3, "padding": "same", "dilation": 2},
            {"kernel_size": 1, "bias": False},
            {"kernel_size": 3, "padding": "valid", "groups": 2},
            {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
            {"kernel_size": 2, "padding": "same", "padding_mode": "circular"},
            {"kernel_size": 3, "padding": 2, "padding_mode": "replicate", "stride": 2},
            # even kernels with "same": torch puts the odd pixel of padding on the far side
            {"kernel_size": 4, "padding": "same"},
            {"kernel_size": 4, "padding": "same", "padding_mode": "reflect"},
            {"kernel_size": 2, "padding": "same", "dilation": 3, "padding_mode": "replicate"},
        ],
    )
    # torch's note that "same" with an even kernel may pad a copy of the input
    @pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
    def test_conv_equals_torch_conv_with_the_same_weight(self, dims, mode, kwargs):
        enn_class, torch_class = CONVS[dims]
        layer = enn_class(4, 6, **kwargs)
        _random_bias_(layer)
        layer.forward_mode = mode
        x = torch.randn(2, 4, *[9] * dims)
        expected = _torch_twin(layer, torch_class, 4, 6, **kwargs)(x)
        assert layer(x).shape == expected.shape
        assert relative_error(layer(x), expected) < 1e-5

    @pytest.mark.parametrize("dims", [1, 2, 3])
    def test_depthwise_conv_equals_torch_conv(self, dims):
        enn_class, torch_class = CONVS[dims]
        layer = enn_class(8, 8, 3, padding=1, groups=8)
        _random_bias_(layer)
        assert layer.fan_in == 3**dims and layer.rank == min(8, 3**dims)
        x = torch.randn(2, 8, *[7] * dims)
        expected = _torch_twin(layer, torch_class, 8, 8, 3, padding=1, groups=8)(x)
        assert relative_error(layer(x), expected) < 1e-5

    def test_low_rank_weight_has_that_rank(self):
        layer = ENNConv2d(16, 32, 3, rank=5)
        assert layer.Q.shape == (32, 5) and layer.lam.shape == (5,) and layer.P.shape == (144, 5)
        assert torch.linalg.matrix_rank(layer.weight.reshape(32, -1)).item() == 5

    def test_auto_mode_picks_factored_for_few_positions_and_dense_for_many(self):
        layer = ENNConv3d(64, 64, 3, padding=1)  # fan_in 1728
        assert layer._use_factored(torch.randn(1, 64, 4, 4, 4))  # 64 positions
        assert not layer._use_factored(torch.randn(2, 64, 16, 16, 16))  # 8192 positions
        grouped = ENNConv3d(64, 64, 3, padding=1, groups=4)
        assert not grouped._use_factored(torch.randn(1, 64, 4, 4, 4))


class TestInitialisation:
    def test_new_layer_is_svd_of_kaiming_normal_fan_out(self):
        torch.manual_seed(3)
        layer = ENNConv3d(32, 64, 3)
        torch.manual_seed(3)
        expected = torch.empty(64, 32, 3, 3, 3)
        nn.init.kaiming_normal_(expected, mode="fan_out", nonlinearity="relu")
        assert relative_error(layer.weight, expected) < 1e-6
        # λ is the sorted spectrum; the bias starts at zero
        assert torch.all(layer.lam[:-1] >= layer.lam[1:])
        assert torch.count_nonzero(layer.bias) == 0

    def test_p_has_logical_shape_and_transposed_layout(self):
        layer = ENNConv3d(8, 16, 3)
        assert layer.P.shape == (216, 16)
        assert layer.P.T.is_contiguous()
        assert layer.weight.shape == (16, 8, 3, 3, 3)

    def test_set_weight_rejects_wrong_shape(self):
        layer = ENNConv2d(3, 4, 3)
        with pytest.raises(
            ValueError, match=r"weight must have shape \(4, 3, 3, 3\).*got \(4, 3\)"
        ):
            layer.set_weight_(torch.randn(4, 3))


class TestGradients:
    @pytest.mark.parametrize("mode", ["dense", "factored"])
    def test_gradients_reach_q_lambda_p_and_bias(self, mode):
        layer = ENNConv3d(3, 5, 3, padding=1)
        layer.forward_mode = mode
        layer(torch.randn(2, 3, 6, 6, 6)).square().sum().backward()
        for name in ("Q", "lam", "P", "bias"):
            grad = getattr(layer, name).grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name

    def test_dense_and_factored_gradients_agree(self):
        x = torch.randn(2, 4, 8, 8)
        grads = {}
        for mode in ("dense", "factored"):
            torch.manual_seed(1)
            layer = ENNConv2d(4, 6, 3, stride=2, padding=1)
            layer.forward_mode = mode
            layer(x).square().sum().backward()
            grads[mode] = [layer.Q.grad, layer.lam.grad, layer.P.grad]
        for dense, factored in zip(grads["dense"], grads["factored"], strict=True):
            assert relative_error(factored, dense) < 1e-4

    def test_gradient_of_p_keeps_its_layout(self):
        layer = ENNConv2d(4, 6, 3)
        layer(torch.randn(1, 4, 5, 5)).sum().backward()
        assert layer.P.grad.stride() == layer.P.stride()


class TestStateDict:
    def test_round_trip_restores_the_function(self, tmp_path):
        source = ENNConv3d(4, 6, 3, padding=1)
        torch.save(source.state_dict(), tmp_path / "layer.pt")
        target = ENNConv3d(4, 6, 3, padding=1)
        target.load_state_dict(torch.load(tmp_path / "layer.pt", weights_only=True))
        x = torch.randn(1, 4, 5, 5, 5)
        assert torch.equal(source(x), target(x))
        assert set(target.state_dict()) == {"Q", "lam", "P", "bias"}


class TestBadArguments:
    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"in_channels": 0}, r"in_channels must be a positive integer, got 0"),
            ({"groups": 3}, r"divisible by groups \(3\)"),
            (
                {"rank": 100},
                r"rank must be an integer in \[1, min\(out, fan_in\)\] = \[1, 8\], got 100",
            ),
            ({"rank": 0}, r"got 0"),
            ({"padding": "full"}, r"padding must be 'same', 'valid' or integers, got 'full'"),
            ({"padding": "same", "stride": 2}, r"padding='same' needs stride 1"),
            ({"padding_mode": "mirror"}, r"padding_mode must be one of .*got 'mirror'"),
            ({"kernel_size": (3, 3)}, r"kernel_size must be .*3 of them, got \(3, 3\)"),
            ({"stride": 0}, r"stride must be an integer ≥ 1"),
        ],
    )
    def test_bad_argument_names_field_and_value(self, kwargs, message):
        arguments = {"in_channels": 4, "out_channels": 8, "kernel_size": 3, **kwargs}
        with pytest.raises(ValueError, match=message):
            ENNConv3d(**arguments)

    def test_bad_forward_mode_is_named_at_assignment(self):
        layer = ENNLinear(3, 2)
        layer.forward_mode = "dense"
        with pytest.raises(
            ValueError,
            match=r"forward_mode must be one of \['auto', 'dense', 'factored'\], got 'fast'",
        ):
            layer.forward_mode = "fast"
        assert layer.forward_mode is ForwardMode.DENSE  # the bad value was not kept

    def test_forward_mode_string_becomes_the_enum(self):
        layer = ENNConv2d(3, 4, 3)
        assert layer.forward_mode is ForwardMode.AUTO
        layer.forward_mode = "factored"
        assert layer.forward_mode is ForwardMode.FACTORED


class TestSignature:
    @pytest.mark.parametrize(
        ("enn_class", "torch_class"),
        [(ENNLinear, nn.Linear), *CONVS.values()],
        ids=["linear", "conv1d", "conv2d", "conv3d"],
    )
    def test_positional_arguments_are_torch_s_and_rank_is_keyword_only(
        self, enn_class, torch_class
    ):
        def positional(cls):
            parameters = inspect.signature(cls.__init__).parameters.values()
            return [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD][1:]

        assert positional(enn_class) == positional(torch_class)
        rank = inspect.signature(enn_class.__init__).parameters["rank"]
        assert rank.kind is rank.KEYWORD_ONLY

    def test_torch_s_positional_call_builds_the_same_layer(self):
        arguments = (4, 8, 3, 1, 1, 1, 2, False, "zeros", "cpu", torch.float64)
        layer, twin = ENNConv3d(*arguments), nn.Conv3d(*arguments)
        assert layer.Q.dtype == torch.float64 and layer.bias is None
        assert (layer.padding, layer.groups) == (twin.padding, twin.groups)
        assert layer.weight.shape == twin.weight.shape
        linear = ENNLinear(6, 3, False, "cpu", torch.float64)
        assert linear.Q.dtype == torch.float64 and linear.bias is None

    def test_rank_cannot_be_passed_by_position(self):
        with pytest.raises(TypeError):
            ENNLinear(6, 3, True, None, None, 2)
        assert ENNLinear(6, 3, rank=2).rank == 2
