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

    @pytest.mark.parametrize("columns", [128, 129, 200])
    @pytest.mark.parametrize("transposed", [False, True])
    def test_split_gram_of_wide_factors_matches_the_definition(self, columns, transposed):
        # from 128 columns the Gram matrix is built from two block products (even and odd
        # widths), in either memory layout of the factor
        torch.manual_seed(columns)
        factor = torch.randn(columns, 300, dtype=torch.float64) if transposed else None
        factor = factor.T if transposed else torch.randn(300, columns, dtype=torch.float64)
        factor = (factor / 300**0.5).requires_grad_()
        reference = factor.detach().clone().requires_grad_()
        eye = torch.eye(columns, dtype=torch.float64)
        expected = (reference.T @ reference - eye).square().sum()
        value = gram_deviation(factor)
        value.backward()
        expected.backward()
        assert relative_error(value, expected) < 1e-12
        assert relative_error(factor.grad, reference.grad) < 1e-12
        assert factor.grad.stride() == factor.stride()

    def test_gradient_reaches_q_and_p_but_not_lambda(self):
        model = _model()
        with torch.no_grad():
            model[0].P.mul_(1.2)
            model[3].Q.mul_(0.9)
        orthogonality_penalty(model).backward()
        assert model[0].P.grad.abs().sum() > 0
        assert model[3].Q.grad.abs().sum() > 0
        # Q scaled by 0.9: ∇ = 4 Q (QᵀQ − I) = 4 · 0.9 · (0.81 − 1) · Q₀
        expected = 4 * 0.9 * (0.81 - 1) * (model[3].Q.detach() / 0.9)
        assert relative_error(model[3].Q.grad, expected) < 1e-5
        assert model[0].lam.grad is None and model[3].lam.grad is None

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


def _perturb_(layer, scale: float) -> None:
    with torch.no_grad():
        layer.Q.add_(scale * torch.randn_like(layer.Q))
        layer.P.add_(scale * torch.randn_like(layer.P))


def _max_drift(model) -> float:
    return max(max(d) for d in orthogonality_drift(model).values())


class TestRetraction:
    """The default retraction: nearest orthonormal factors, λ refitted (Note [retraction])."""

    def test_brings_drift_below_1e5_and_moves_the_weight_by_about_the_drift(self):
        model = _model()
        layers = (model[0], model[2], model[3])
        for layer in layers:
            _perturb_(layer, 0.01)
        weights_before = [m.weight.detach().clone() for m in layers]
        assert _max_drift(model) > 1e-2

        retract_(model)

        assert _max_drift(model) < 1e-5
        for layer, before in zip(layers, weights_before, strict=True):
            assert relative_error(layer.weight, before) < 0.05

    def test_keeps_an_orthonormal_layer_exactly(self):
        layer = ENNConv3d(4, 8, 3)
        before = {name: getattr(layer, name).detach().clone() for name in ("Q", "lam", "P")}
        retract_(layer)
        for name, value in before.items():
            assert relative_error(getattr(layer, name), value) < 1e-6, name

    def test_lambda_is_the_best_diagonal_for_the_new_factors(self):
        layer = ENNLinear(12, 6)
        _perturb_(layer, 0.05)
        target = layer.weight.detach().double()
        retract_(layer)
        # least squares over diagonals: λ_i = q_iᵀ W p_i for orthonormal q_i, p_i
        expected = torch.einsum("oi,of,fi->i", layer.Q.double(), target, layer.P.double())
        assert relative_error(layer.lam, expected) < 1e-5

    def test_columns_stay_close_after_an_adam_step_where_the_exact_form_turns_them(self):
        # a Kaiming initialisation has nearly equal singular values: W's singular vectors
        # after one step lie far from the old columns, the projected ones do not
        torch.manual_seed(0)
        layers = [ENNConv2d(32, 64, 3) for _ in range(2)]
        layers[1].load_state_dict(layers[0].state_dict())
        inputs = torch.randn(4, 32, 8, 8)
        for layer in layers:
            optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3)
            layer(inputs).square().mean().backward()
            optimizer.step()
        Q_before = layers[0].Q.detach().clone()
        retract_(layers[0])
        retract_(layers[1], keep_weight=True)
        projected = relative_error(layers[0].Q, Q_before)
        exact = relative_error(layers[1].Q, Q_before)
        assert projected < 0.02 and exact > 5 * projected, (projected, exact)

    def test_non_finite_factors_are_named(self):
        model = _model()
        with torch.no_grad():
            model[2].Q[0, 0] = float("inf")
        with pytest.raises(ValueError, match="cannot retract layer '2': Q, λ or P is not finite"):
            retract_(model)


class TestExactRetraction:
    @pytest.mark.parametrize("scale", [0.01, 0.5])
    def test_brings_drift_below_1e5_and_keeps_the_weight(self, scale):
        model = _model()
        layers = (model[0], model[2], model[3])
        for layer in layers:
            _perturb_(layer, scale)
        weights_before = [m.weight.detach().clone() for m in layers]
        assert _max_drift(model) > scale

        retract_(model, keep_weight=True)

        assert _max_drift(model) < 1e-5
        for layer, before in zip(layers, weights_before, strict=True):
            assert relative_error(layer.weight, before) < 1e-6

    @pytest.mark.parametrize(
        "make_layer",
        [
            lambda: ENNConv2d(16, 32, 3, rank=5),  # rank below min(out, fan_in) = 32
            lambda: ENNConv3d(8, 8, 3, groups=4),  # grouped: fan_in 2 · 27
            lambda: ENNLinear(40, 10, dtype=torch.float64),
        ],
        ids=["low_rank", "grouped", "float64"],
    )
    def test_keeps_the_weight_of_every_layer_kind(self, make_layer):
        layer = make_layer()
        _perturb_(layer, 0.5)
        before = layer.weight.detach().clone()
        retract_(layer, keep_weight=True)
        tolerance = 1e-12 if layer.Q.dtype == torch.float64 else 1e-6
        assert relative_error(layer.weight, before) < tolerance
        assert _max_drift(layer) < (1e-12 if layer.Q.dtype == torch.float64 else 1e-5)
        assert layer.P.T.is_contiguous()  # Note [P layout] survives the copy

    def test_keeps_a_weight_of_lower_rank_than_its_factors(self):
        layer = ENNLinear(12, 8)
        with torch.no_grad():
            layer.lam[[1, 5]] = 0.0  # W has rank 6 < r = 8
        _perturb_(layer, 0.1)
        before = layer.weight.detach().clone()
        retract_(layer, keep_weight=True)
        assert relative_error(layer.weight, before) < 1e-6
        assert _max_drift(layer) < 1e-5

    def test_keeps_an_orthonormal_layer_exactly(self):
        layer = ENNConv3d(4, 8, 3)
        before = {name: getattr(layer, name).detach().clone() for name in ("Q", "lam", "P")}
        retract_(layer, keep_weight=True)
        for name, value in before.items():
            assert relative_error(getattr(layer, name), value) < 1e-6, name

    def test_keeps_unsorted_lambda_flipped_signs_and_negative_lambda_in_place(self):
        # an orthonormal layer whose λ is out of order, with some columns of Q and P flipped
        # and negative λ: the SVD would sort and re-sign them, the retraction must not
        layer = ENNLinear(10, 7)
        with torch.no_grad():
            layer.lam.copy_(torch.tensor([0.3, -1.2, 2.0, 0.7, -0.1, 1.5, 0.9]))
            layer.Q[:, [0, 3]] *= -1
            layer.P[:, [3, 6]] *= -1
        before = {name: getattr(layer, name).detach().clone() for name in ("Q", "lam", "P")}
        retract_(layer, keep_weight=True)
        for name, value in before.items():
            assert relative_error(getattr(layer, name), value) < 1e-6, name

    def test_keeps_column_order_and_signs_after_a_step(self):
        # distinct |λ|, shuffled, some negative: equal |λ| would leave W's singular vectors,
        # hence the new columns, free to turn within their plane
        layer = ENNLinear(16, 10)
        with torch.no_grad():
            layer.lam.copy_(torch.tensor([0.4, -2.2, 1.0, 3.0, -0.7, 1.6, 2.6, -1.3, 0.2, 1.9]))
        _perturb_(layer, 0.01)
        Q, lam, P = (getattr(layer, name).detach().clone() for name in ("Q", "lam", "P"))
        retract_(layer, keep_weight=True)
        # each new column is nearest to the old one in its place and points the same way
        for old, new in ((Q, layer.Q), (P, layer.P)):
            similarity = old.T @ new  # (r, r)
            assert torch.equal(similarity.abs().argmax(dim=0), torch.arange(10))
            assert torch.all(torch.diagonal(similarity) > 0.9)
        assert torch.equal(torch.sign(layer.lam), torch.sign(lam))

    def test_non_finite_factors_are_named(self):
        model = _model()
        with torch.no_grad():
            model[2].P[0, 0] = float("nan")
        with pytest.raises(ValueError, match="cannot retract layer '2': Q, λ or P is not finite"):
            retract_(model, keep_weight=True)

    def test_new_factors_diagonalise_the_old_weight(self):
        # Q'ᵀ W P' = diag(λ'): λ' is still the least-squares diagonal for Q', P', and the
        # factors are W's own singular vectors (up to order and sign)
        layer = ENNLinear(12, 6)
        _perturb_(layer, 0.3)
        target = layer.weight.detach().double()
        retract_(layer, keep_weight=True)
        core = layer.Q.double().T @ target @ layer.P.double()  # (r, r)
        assert relative_error(core, torch.diag(layer.lam.double())) < 1e-6


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

    def test_evaluates_on_the_last_step_of_each_group(self):
        model = _model()
        evaluated = [step for step in range(12) if scheduled_penalty(model, step, every=4)]
        assert evaluated == [3, 7, 11]
        assert all(scheduled_penalty(model, step, every=1) is not None for step in range(3))

    def test_default_is_every_16_steps_with_weight_times_16(self):
        model = _model()
        with torch.no_grad():
            model[0].Q.mul_(1.1)
        assert scheduled_penalty(model, step=0) is None
        term = scheduled_penalty(model, step=15)
        assert relative_error(term, 16 * 2e-4 * orthogonality_penalty(model)) < 1e-6

    def test_skipped_steps_and_zero_weight_return_none(self):
        model = _model()
        assert scheduled_penalty(model, step=4, every=4) is None
        assert scheduled_penalty(model, step=0, weight=0.0, every=1) is None
        assert scheduled_penalty(model, step=7, every=4) is not None

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
