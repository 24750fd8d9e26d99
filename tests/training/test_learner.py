from __future__ import annotations

import pytest
import torch

from enn_neuro.config import validate_config
from enn_neuro.enn import ENNLayer
from enn_neuro.training.learner import Learner


def _config(mode: str, optimizer: str):
    return validate_config(
        {
            "study": {"name": "unit"},
            "data": {"cohort": "unused", "target": "diagnosis", "classes": ["a", "b"]},
            "model": {"name": "resnet18", "base_width": 4},
            "optim": {"name": optimizer, "weight_decay": 0.01},
            "training": {"mode": mode},
        }
    )


@pytest.mark.parametrize("mode", ["bp", "local"])
@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_every_optimizer_decays_all_but_the_enn_factors(mode, optimizer):
    learner = Learner(_config(mode, optimizer), num_outputs=2, device=torch.device("cpu"))
    trained = [learner.model] if mode == "bp" else list(learner.blocks)  # blocks hold heads
    factors = {
        id(p)
        for module in trained
        for m in module.modules()
        if isinstance(m, ENNLayer)
        for p in (m.Q, m.P)
    }
    covered = 0
    for opt in learner.optimizers:
        for group in opt.param_groups:
            is_factor = {id(p) in factors for p in group["params"]}
            assert len(is_factor) == 1, "a group mixes factors and other parameters"
            assert group["weight_decay"] == (0.0 if is_factor == {True} else 0.01)
            covered += len(group["params"])
    assert covered == sum(len(list(m.parameters())) for m in trained)
    assert learner.learning_rate == pytest.approx(learner.config.optim.lr)
