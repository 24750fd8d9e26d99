"""Contract test over every registry entry, in 2D and 3D, for both layer types."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from enn_neuro.enn import ENNLayer, orthogonality_penalty
from enn_neuro.models import ResNet, create_model, list_models, register_model
from tests.conftest import relative_error

SIDE = {2: 32, 3: 32}


def test_registry_lists_the_resnet_family():
    assert list_models() == ["resnet101", "resnet152", "resnet18", "resnet34", "resnet50"]


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("layer", ["enn", "plain"])
def test_contract_forward_shape_backward_no_nan(name, spatial_dims, layer):
    model = create_model(
        name, spatial_dims=spatial_dims, in_channels=1, num_classes=3, layer=layer, base_width=4
    )
    x = torch.randn(2, 1, *[SIDE[spatial_dims]] * spatial_dims)
    logits = model(x)
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()

    loss = logits.square().mean() + 2e-4 * orthogonality_penalty(model)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    has_enn = any(isinstance(m, ENNLayer) for m in model.modules())
    has_plain_weight = any(
        isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)) for m in model.modules()
    )
    assert has_enn == (layer == "enn") and has_plain_weight == (layer == "plain")

    # the units compose to the forward pass
    model.eval()
    features = x
    for unit in model.units():
        features = unit.module(features)
    assert torch.allclose(features, model(x), atol=1e-6)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_enn_and_plain_from_same_seed_compute_the_same_function(spatial_dims):
    kwargs = {"spatial_dims": spatial_dims, "in_channels": 3, "num_classes": 4, "base_width": 8}
    torch.manual_seed(7)
    enn = create_model("resnet34", layer="enn", **kwargs).eval()
    torch.manual_seed(7)
    plain = create_model("resnet34", layer="plain", **kwargs).eval()
    x = torch.randn(2, 3, *[32] * spatial_dims)
    assert relative_error(enn(x), plain(x)) < 1e-5


def test_parameter_count_of_full_resnet50_2d_matches_the_reference_architecture():
    model = create_model("resnet50", spatial_dims=2, in_channels=3, num_classes=1000, layer="plain")
    # the ImageNet ResNet-50 (v1.5) has 25 557 032 parameters
    assert sum(p.numel() for p in model.parameters()) == 25_557_032


def test_3d_resnet18_reaches_last_stage_at_one_thirty_second():
    model = create_model("resnet18", spatial_dims=3, in_channels=1, num_classes=2, base_width=4)
    x = torch.randn(1, 1, 64, 64, 64)
    features = x
    for unit in model.units()[:-1]:
        features = unit.module(features)
    assert features.shape == (1, 32, 2, 2, 2)


def test_norm_and_zero_init_residual_options():
    model = create_model(
        "resnet18", spatial_dims=3, norm="group", zero_init_residual=True, base_width=8
    )
    assert isinstance(model.stem.norm, nn.GroupNorm)
    assert torch.count_nonzero(model.layer1[0].norm2.weight) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "resnet19"}, r"unknown model 'resnet19'; available: \['resnet101'"),
        ({"spatial_dims": 4}, r"spatial_dims must be 1, 2 or 3, got 4"),
        ({"layer": "eigen"}, r"layer must be one of \['enn', 'plain'\], got 'eigen'"),
        ({"norm": "layer"}, r"norm must be one of .*got 'layer'"),
        ({"num_classes": 0}, r"num_classes must be a positive integer, got 0"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    arguments = {"name": "resnet18", "spatial_dims": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        create_model(**arguments)


def test_register_model_rejects_a_taken_name():
    with pytest.raises(ValueError, match="model 'resnet18' is already registered"):
        register_model("resnet18")(lambda spec, in_channels, num_classes: None)


def test_models_are_resnets_exposing_units():
    model = create_model("resnet50", spatial_dims=2, in_channels=3, num_classes=10, base_width=4)
    assert isinstance(model, ResNet)
    names = [u.name for u in model.units()]
    assert names[0] == "stem" and names[-1] == "classifier" and len(names) == 3 + 4 + 6 + 3 + 2
