from __future__ import annotations

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


class TestToPlain:
    def test_round_trip_preserves_outputs(self):
        model = _mixed_model()
        x = torch.randn(4, 3, 16)
        fused = to_plain(to_enn(model))
        assert not any(isinstance(m, ENNLayer) for m in fused.modules())
        assert relative_error(fused(x), model(x)) < 1e-5

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
