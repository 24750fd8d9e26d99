from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from enn_neuro.enn import ENNLayer, orthogonality_penalty
from enn_neuro.models import LocalHead, create_model, cut_points, split_model
from enn_neuro.models.layers import LayerSpec


@pytest.fixture
def model():
    return create_model(
        "resnet18", spatial_dims=3, in_channels=1, num_classes=3, base_width=4
    ).eval()


class TestCutPoints:
    def test_stage_cut_joins_stem_to_first_stage(self, model):
        # units: stem, layer1.0, layer1.1, layer2.0, ..., layer4.1, classifier
        assert cut_points(model, "stage") == [0, 3, 5, 7]

    def test_unit_cut_gives_one_block_per_residual_block(self, model):
        assert cut_points(model, "unit") == [0, 2, 3, 4, 5, 6, 7, 8]

    @pytest.mark.parametrize("cut", [[1, 3], [0, 9], []])
    def test_bad_explicit_cut_is_named(self, model, cut):
        with pytest.raises(ValueError, match=r"cut indices must start at 0 and lie in \[0, 8\]"):
            cut_points(model, cut)

    def test_unknown_cut_name(self, model):
        with pytest.raises(ValueError, match="got 'layer'"):
            cut_points(model, "layer")


class TestSplitModel:
    @pytest.mark.parametrize("cut", ["stage", "unit", [0, 5]])
    def test_blocks_compose_to_the_model_and_heads_score_each_block(self, model, cut):
        blocks = split_model(model, cut)
        x = torch.randn(2, 1, 32, 32, 32)
        features = x
        for block in blocks:
            features, logits = block(features.detach())
            assert logits.shape == (2, 3)
        assert torch.allclose(logits, model(x), atol=1e-6)
        assert blocks[-1].head is model.classifier

    def test_blocks_share_parameters_with_the_model(self, model):
        blocks = split_model(model, "stage")
        model_parameters = {id(p) for p in model.parameters()}
        body_parameters = {id(p) for b in blocks for p in b.body.parameters()}
        assert body_parameters <= model_parameters

    def test_a_block_s_loss_trains_that_block_and_nothing_before_it(self, model):
        # the blocks chained as a local step runs them, the features passed on as they are:
        # the boundary is the block's own business
        blocks = split_model(model.train(), [0, 3, 5])
        images = torch.randn(2, 1, 32, 32, 32, requires_grad=True)
        targets = torch.tensor([0, 2])
        features, losses = images, []
        for block in blocks:
            features, logits = block(features)
            losses.append(F.cross_entropy(logits, targets) + orthogonality_penalty(block))

        # the middle block's loss: gradients in every one of its parameters, head included
        losses[1].backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks[1].parameters())
        assert all(p.grad is None for p in blocks[0].parameters())
        assert images.grad is None
        # the last block's units come later in the network: untouched as well
        assert all(p.grad is None for p in blocks[2].parameters())

        # the first block's loss then reaches its own parameters and leaves block 1's alone
        middle_grads = [p.grad.clone() for p in blocks[1].parameters()]
        losses[0].backward()
        assert all(p.grad is not None for p in blocks[0].parameters())
        for parameter, before in zip(blocks[1].parameters(), middle_grads, strict=True):
            assert torch.equal(parameter.grad, before)

    def test_heads_take_the_device_and_dtype_of_the_model(self, model):
        # float64 stands in for a GPU: a head left at the defaults would be float32
        blocks = split_model(model.double(), "stage", head="conv_pool_linear")
        for block in blocks:
            assert {p.dtype for p in block.parameters()} == {torch.float64}
            assert {b.dtype for b in block.buffers() if b.is_floating_point()} <= {torch.float64}
        assert orthogonality_penalty(blocks[0].head).item() < 1e-20  # initialised in float64
        features, logits = blocks[0](torch.randn(2, 1, 32, 32, 32, dtype=torch.float64))
        assert logits.dtype == torch.float64
        # and a device other than the CPU's
        meta_blocks = split_model(model.to("meta"), "stage")
        assert {p.device.type for p in meta_blocks.parameters()} == {"meta"}

    def test_inner_heads_are_enn_and_count_in_the_penalty(self, model):
        blocks = split_model(model, "stage", head="conv_pool_linear")
        assert any(isinstance(m, ENNLayer) for m in blocks[0].head.modules())
        assert orthogonality_penalty(blocks[0]).item() < 1e-8


class TestLocalHead:
    @pytest.mark.parametrize(
        ("kind", "expected_parameters"),
        [
            # ENN linear 16 → 2: Q 2×2, λ 2, P 16×2, bias 2
            ("pool_linear", 4 + 2 + 32 + 2),
            # plus a 1-wide ENN conv 16 → 16 (Q, λ, P) and its batch norm
            ("conv_pool_linear", 256 + 16 + 256 + 32 + 40),
        ],
    )
    def test_head_cost_does_not_grow_with_the_feature_map(self, kind, expected_parameters):
        spec = LayerSpec(spatial_dims=3)
        head = LocalHead(16, 2, spec, kind=kind)
        # pooled before the dense layer: the size does not depend on the feature map
        assert sum(p.numel() for p in head.parameters()) == expected_parameters
        for side in (4, 16):
            assert head(torch.randn(2, 16, side, side, side)).shape == (2, 2)

    def test_unknown_head_kind(self):
        with pytest.raises(ValueError, match="head kind must be one of .*got 'mlp'"):
            LocalHead(8, 2, LayerSpec(spatial_dims=2), kind="mlp")
