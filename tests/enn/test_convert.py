from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from enn_neuro.enn import ENNConv2d, ENNLayer, ENNLinear, to_enn, to_plain
from enn_neuro.models import create_model
from tests.conftest import relative_error


def _mixed_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(3, 8, 5, padding=2, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv1d(8, 8, 3, groups=4, dilation=2),
        nn.Flatten(),
        nn.Linear(8 * 12, 7),
    )


class TestToEnn:
    def test_preserves_outputs_of_every_layer_type(self):
        models = [
            _mixed_model(),
            nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding="valid"), nn.ReLU(), nn.Conv2d(16, 32, 1)
            ),
            nn.Sequential(
                nn.Conv3d(1, 8, 3, padding="same"), nn.GELU(), nn.Conv3d(8, 4, 3, groups=4)
            ),
        ]
        inputs = [torch.randn(4, 3, 16), torch.randn(2, 3, 11, 11), torch.randn(2, 1, 6, 6, 6)]
        for model, x in zip(models, inputs, strict=True):
            enn = to_enn(model)
            assert all(
                not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
                for m in enn.modules()
            )
            assert relative_error(enn(x), model(x)) < 1e-5

    def test_leaves_the_original_untouched_unless_inplace(self):
        model = _mixed_model()
        to_enn(model)
        assert isinstance(model[0], nn.Conv1d)
        converted = to_enn(model, inplace=True)
        assert converted is model and isinstance(model[0], ENNLayer)

    def test_converts_a_bare_layer(self):
        layer = nn.Linear(5, 3)
        enn = to_enn(layer)
        assert isinstance(enn, ENNLinear)
        x = torch.randn(2, 5)
        assert relative_error(enn(x), layer(x)) < 1e-5

    def test_low_rank_keeps_best_approximation(self):
        layer = nn.Linear(20, 10)
        enn = to_enn(layer, rank=4)
        assert enn.rank == 4
        singular_values = torch.linalg.svdvals(layer.weight.detach())
        error = (enn.weight - layer.weight).norm()
        # Eckart–Young: the error is the norm of the discarded singular values
        assert abs(error.item() - singular_values[4:].norm().item()) < 1e-5

    def test_shared_layer_stays_shared(self):
        shared = nn.Linear(4, 4)
        model = nn.Sequential(shared, nn.ReLU(), shared)
        enn = to_enn(model)
        assert enn[0] is enn[2]

    def test_keeps_training_mode_and_device(self):
        model = _mixed_model().eval()
        enn = to_enn(model)
        assert not enn[0].training and enn[0].Q.device == torch.device("cpu")

    def test_keeps_requires_grad_of_weight_and_bias(self):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1), nn.Linear(4, 2))
        model[0].requires_grad_(False)  # a frozen layer
        model[1].bias.requires_grad_(False)  # a frozen bias under a trained weight
        model[2].weight.requires_grad_(False)  # a frozen weight under a trained bias
        enn = to_enn(model)
        flags = {name: p.requires_grad for name, p in enn.named_parameters()}
        assert flags == {
            "0.Q": False, "0.lam": False, "0.P": False, "0.bias": False,
            "1.Q": True, "1.lam": True, "1.P": True, "1.bias": False,
            "2.Q": False, "2.lam": False, "2.P": False, "2.bias": True,
        }  # fmt: skip

    def test_warns_once_naming_skipped_subclasses(self):
        class ScaledLinear(nn.Linear):
            def forward(self, x):
                return 2 * super().forward(x)

        model = nn.Sequential(
            nn.Linear(8, 8), ScaledLinear(8, 8), nn.MultiheadAttention(8, 2), nn.Conv1d(1, 1, 1)
        )
        with pytest.warns(UserWarning) as record:
            enn = to_enn(model)
        assert len(record) == 1
        message = str(record[0].message)
        assert "to_enn left 2 layer(s) unconverted: 1 (ScaledLinear), " in message
        assert "2.out_proj (NonDynamicallyQuantizableLinear)" in message
        assert record[0].filename == __file__  # points at the caller
        assert type(enn[1]) is ScaledLinear and type(enn[2].out_proj) is type(model[2].out_proj)
        assert isinstance(enn[0], ENNLinear) and isinstance(enn[3], ENNLayer)

    def test_does_not_warn_when_every_layer_is_converted(self):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            to_enn(_mixed_model())


class TestToPlain:
    def test_round_trip_preserves_outputs(self):
        model = _mixed_model()
        x = torch.randn(4, 3, 16)
        fused = to_plain(to_enn(model))
        assert not any(isinstance(m, ENNLayer) for m in fused.modules())
        assert relative_error(fused(x), model(x)) < 1e-5

    def test_weight_requires_grad_if_any_factor_does(self):
        model = nn.Sequential(ENNLinear(4, 4), ENNLinear(4, 4), ENNLinear(4, 2))
        model[0].requires_grad_(False)
        model[1].lam.requires_grad_(False)  # Q and P still train
        model[2].bias.requires_grad_(False)
        fused = to_plain(model)
        flags = {name: p.requires_grad for name, p in fused.named_parameters()}
        assert flags == {
            "0.weight": False, "0.bias": False,
            "1.weight": True, "1.bias": True,
            "2.weight": True, "2.bias": False,
        }  # fmt: skip

    def test_keeps_layer_arguments(self):
        enn = ENNConv2d(4, 8, 3, stride=2, padding=1, dilation=1, groups=2, padding_mode="circular")
        plain = to_plain(enn)
        assert isinstance(plain, nn.Conv2d)
        assert (plain.stride, plain.padding, plain.groups, plain.padding_mode) == (
            (2, 2),
            (1, 1),
            2,
            "circular",
        )
        x = torch.randn(1, 4, 9, 9)
        assert relative_error(plain(x), enn(x)) < 1e-5

    @pytest.mark.parametrize("spatial_dims", [2, 3])
    def test_fused_state_dict_loads_into_plain_architecture(self, spatial_dims):
        kwargs = {"spatial_dims": spatial_dims, "in_channels": 1, "num_classes": 3, "base_width": 4}
        enn = create_model("resnet18", layer="enn", **kwargs).eval()
        plain = create_model("resnet18", layer="plain", **kwargs).eval()
        plain.load_state_dict(to_plain(enn).state_dict(), strict=True)
        x = torch.randn(2, 1, *[32] * spatial_dims)
        assert relative_error(plain(x), enn(x)) < 1e-5

    def test_fused_model_exports_with_torch_export(self):
        enn = create_model("resnet18", spatial_dims=3, in_channels=1, num_classes=2, base_width=4)
        fused = to_plain(enn).eval()
        x = torch.randn(1, 1, 32, 32, 32)
        program = torch.export.export(fused, (x,))
        assert relative_error(program.module()(x), fused(x)) < 1e-5

    def test_fused_model_exports_to_onnx(self, tmp_path):
        onnx = pytest.importorskip("onnx")
        pytest.importorskip("onnxscript")
        from onnx.reference import ReferenceEvaluator

        enn = create_model("resnet18", spatial_dims=2, in_channels=1, num_classes=2, base_width=4)
        fused = to_plain(enn).eval()
        x = torch.randn(1, 1, 32, 32)
        path = tmp_path / "model.onnx"
        torch.onnx.export(fused, (x,), str(path), dynamo=True)
        model_proto = onnx.load(str(path))
        onnx.checker.check_model(model_proto)
        (output,) = ReferenceEvaluator(model_proto).run(
            None, {model_proto.graph.input[0].name: x.numpy()}
        )
        assert relative_error(torch.from_numpy(output), fused(x).detach()) < 1e-4
