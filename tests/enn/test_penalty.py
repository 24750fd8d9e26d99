from __future__ import annotations

import pytest
import torch
from torch import nn

from enn_neuro.enn import (
    ENNConv2d,
    ENNConv3d,
    ENNLinear,
    gram_deviation,
    orthogonality_drift,
    orthogonality_penalty,
    retract_,
    scheduled_penalty,
    weight_decay_groups,
)
from tests.conftest import relative_error


def _model() -> nn.Module:
    return nn.Sequential(ENNConv3d(2, 16, 3), nn.ReLU(), ENNConv2d(4, 8, 3), ENNLinear(20, 10))


def _reference_penalty(model) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for module in model.modules():
        if hasattr(module, "lam"):
            for factor in (module.Q.double(), module.P.double()):
                eye = torch.eye(factor.shape[1], dtype=torch.float64)
                total = total + (factor.T @ factor - eye).square().sum()
    return total


class TestPenalty:
    def test_is_near_zero_at_initialisation(self):
        assert orthogonality_penalty(_model()).item() < 1e-10

    def test_grows_when_q_or_p_is_perturbed(self):
        model = _model()
        with torch.no_grad():
            model[0].Q.mul_(1.1)
        after_q = orthogonality_penalty(model).item()
        with torch.no_grad():
            model[3].P.add_(0.05 * torch.randn_like(model[3].P))
        after_p = orthogonality_penalty(model).item()
        # scaling 16 orthonormal columns by 1.1: 16 · (1.21 − 1)² on the diagonal
        assert abs(after_q - 16 * 0.21**2) < 1e-4
        assert after_p > after_q + 1e-3

    def test_equals_the_definition_on_arbitrary_factors(self):
        model = _model()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
        assert relative_error(orthogonality_penalty(model), _reference_penalty(model)) < 1e-5

    def test_hand_written_backward_matches_autograd(self):
        factor = torch.randn(30, 7, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(gram_deviation, (factor,))

    def test_gradient_reaches_q_and_p_but_not_lambda(self):
        model = _model()
        with torch.no_grad():
            model[0].P.mul_(1.2)
        orthogonality_penalty(model).backward()
        assert model[0].P.grad.abs().sum() > 0
        assert model[0].lam.grad is None

    def test_model_without_enn_layers_has_zero_penalty(self):
        assert orthogonality_penalty(nn.Linear(3, 3)).item() == 0.0


class TestDrift:
    def test_reports_frobenius_distance_per_layer(self):
        model = _model()
        with torch.no_grad():
            model[3].Q.mul_(2.0)
        drift = orthogonality_drift(model)
        assert list(drift) == ["0", "2", "3"]
        # 10 orthonormal columns scaled by 2: diagonal of QᵀQ − I is 3, norm 3·√10
        assert abs(drift["3"].q - 3 * 10**0.5) < 1e-4
        assert drift["0"].q < 1e-5 and drift["0"].p < 1e-5


class TestRetraction:
    def test_brings_drift_below_1e5_and_keeps_the_weight_close(self):
        model = _model()
        with torch.no_grad():
            for module in (model[0], model[2], model[3]):
                module.Q.add_(0.01 * torch.randn_like(module.Q))
                module.P.add_(0.01 * torch.randn_like(module.P))
        weights_before = [m.weight.detach().clone() for m in (model[0], model[2], model[3])]
        assert max(max(d) for d in orthogonality_drift(model).values()) > 1e-2

        retract_(model)

        assert max(max(d) for d in orthogonality_drift(model).values()) < 1e-5
        for module, before in zip((model[0], model[2], model[3]), weights_before, strict=True):
            assert relative_error(module.weight, before) < 0.05

    def test_keeps_an_orthonormal_layer_exactly(self):
        layer = ENNConv3d(4, 8, 3)
        before = layer.weight.detach().clone()
        retract_(layer)
        assert relative_error(layer.weight, before) < 1e-6

    def test_lambda_is_the_best_diagonal_for_the_new_factors(self):
        layer = ENNLinear(12, 6)
        with torch.no_grad():
            layer.Q.add_(0.05 * torch.randn_like(layer.Q))
        target = layer.weight.detach().double()
        retract_(layer)
        # least squares over diagonals: λ_i = q_iᵀ W p_i for orthonormal q_i, p_i
        expected = torch.einsum("oi,of,fi->i", layer.Q.double(), target, layer.P.double())
        assert relative_error(layer.lam, expected) < 1e-5

    def test_keeps_column_order(self):
        layer = ENNLinear(10, 10)
        with torch.no_grad():
            layer.Q.add_(0.01 * torch.randn_like(layer.Q))
        before = layer.Q.detach().clone()
        retract_(layer)
        # each column stays the nearest: the diagonal of before·after dominates
        similarity = (before.T @ layer.Q).abs()
        assert torch.equal(similarity.argmax(dim=1), torch.arange(10))


class TestScheduledPenalty:
    def test_every_k_steps_gives_the_same_total_gradient(self):
        model = _model()
        with torch.no_grad():
            model[0].P.mul_(1.1)
        for every in (1, 4):
            model.zero_grad()
            for step in range(8):
                term = scheduled_penalty(model, step, weight=0.5, every=every)
                if term is not None:
                    term.backward()
            if every == 1:
                reference = model[0].P.grad.clone()
        assert relative_error(model[0].P.grad, reference) < 1e-6

    def test_skipped_steps_and_zero_weight_return_none(self):
        model = _model()
        assert scheduled_penalty(model, step=3, every=4) is None
        assert scheduled_penalty(model, step=0, weight=0.0) is None
        assert scheduled_penalty(model, step=8, every=4) is not None

    def test_bad_schedule_is_named(self):
        with pytest.raises(
            ValueError, match="penalty interval 'every' must be a positive integer, got 0"
        ):
            scheduled_penalty(_model(), step=0, every=0)
        with pytest.raises(ValueError, match="penalty weight must be ≥ 0, got -1"):
            scheduled_penalty(_model(), step=0, weight=-1)


class TestWeightDecayGroups:
    def test_decays_lambda_and_plain_parameters_not_the_factors(self):
        model = nn.Sequential(_model(), nn.Linear(10, 3))
        decayed, factors = weight_decay_groups(model, 1e-4)
        assert decayed["weight_decay"] == 1e-4 and factors["weight_decay"] == 0.0
        names = {id(p): name for name, p in model.named_parameters()}
        assert {names[id(p)].rsplit(".", 1)[-1] for p in factors["params"]} == {"Q", "P"}
        assert len(factors["params"]) == 6  # Q and P of three ENN layers
        decayed_names = {names[id(p)] for p in decayed["params"]}
        assert {"0.0.lam", "0.0.bias", "1.weight", "1.bias"} <= decayed_names
        assert len(decayed["params"]) + len(factors["params"]) == len(list(model.parameters()))

    def test_a_plain_model_gets_one_group(self):
        groups = weight_decay_groups(nn.Linear(4, 2), 0.1)
        assert len(groups) == 1 and len(groups[0]["params"]) == 2

    def test_decoupled_decay_shrinks_the_weight_as_for_a_plain_layer(self):
        enn, plain = ENNConv2d(3, 8, 3), nn.Conv2d(3, 8, 3)
        plain.weight.data.copy_(enn.weight.detach())
        weight, Q, P = enn.weight.detach().clone(), enn.Q.detach().clone(), enn.P.detach().clone()
        steps, lr, decay = 3, 0.1, 0.5
        for module in (enn, plain):
            optimizer = torch.optim.AdamW(weight_decay_groups(module, decay), lr=lr)
            for _ in range(steps):
                for parameter in module.parameters():
                    parameter.grad = torch.zeros_like(parameter)  # decay alone moves them
                optimizer.step()
        expected = (1 - lr * decay) ** steps * weight
        assert relative_error(enn.weight, expected) < 1e-6
        assert relative_error(plain.weight, expected) < 1e-6
        assert torch.equal(enn.Q, Q) and torch.equal(enn.P, P)

    def test_negative_decay_is_named(self):
        with pytest.raises(ValueError, match="weight_decay must be ≥ 0, got -0.1"):
            weight_decay_groups(_model(), -0.1)
