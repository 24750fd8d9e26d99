from __future__ import annotations

import numpy as np
import pytest
import torch

from enn_neuro.config import validate_config
from enn_neuro.enn import ENNLayer, orthogonality_penalty
from enn_neuro.training.learner import Learner, NonFiniteLossError
from enn_neuro.training.loop import Predictions


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


@pytest.mark.parametrize("mode", ["bp", "local"])
@pytest.mark.parametrize("grad_clip", [1.0, None])
def test_an_overflowing_gradient_stops_before_the_weights_change(mode, grad_clip):
    config = _config(mode, "adamw")
    config.optim.grad_clip = grad_clip
    learner = Learner(config, num_outputs=2, device=torch.device("cpu"))
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    stem_conv = learner.model.stem.conv
    stem_conv.lam.register_hook(lambda grad: grad * float("inf"))  # finite loss, inf gradient

    images, targets = torch.randn(2, 1, 16, 16, 16), torch.tensor([0, 1])
    where = "fold 0, epoch 1, step 1"
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient norm \((inf|nan)\) at"):
        learner.train_step(images, targets, where, step=0)
    after = learner.model.state_dict()
    changed = [k for k, v in before.items() if v.is_floating_point() and "running" not in k]
    assert all(torch.equal(before[k], after[k]) for k in changed)


def test_predictions_of_many_classes_keep_the_five_most_probable():
    classes = [f"c{i}" for i in range(150)]
    logits = np.full((2, 150), -5.0)
    logits[0, [7, 3, 9, 1, 0, 2]] = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    logits[1, 149] = 9.0
    predictions = Predictions(
        subject_ids=["a", "b"],
        session_ids=["", ""],
        images=["a.png", "b.png"],
        targets=np.array([7, 0]),
        outputs=[logits],
    )
    table = predictions.table("classification", classes)
    assert not any(c.startswith("prob_") for c in table.columns)
    assert list(table.loc[0, [f"top{k}_class" for k in range(1, 6)]]) == [
        "c7", "c3", "c9", "c1", "c0",
    ]  # fmt: skip
    assert table.loc[1, "top1_class"] == "c149" and table.loc[1, "prediction"] == "c149"
    probabilities = np.exp(logits[0]) / np.exp(logits[0]).sum()
    assert table.loc[0, "top2_prob"] == pytest.approx(probabilities[3])


@pytest.mark.parametrize("mode", ["bp", "local"])
def test_the_penalty_follows_the_configured_schedule(mode):
    # every 3 steps with weight × 3: on the last step of each group, in bp and local mode
    config = _config(mode, "sgd")
    config.training.ortho_every = 3
    learner = Learner(config, num_outputs=2, device=torch.device("cpu"))
    images, targets = torch.randn(2, 1, 16, 16, 16), torch.tensor([0, 1])
    trained = [learner.model] if mode == "bp" else list(learner.blocks)  # blocks hold heads
    penalties, expected = [], []
    for step in range(6):
        # the term is taken before the step's update, summed over the blocks in local mode
        expected.append(3 * 2e-4 * sum(orthogonality_penalty(m).item() for m in trained))
        penalties.append(learner.train_step(images, targets, "fold 0, epoch 1", step).penalty)
    assert [p > 0 for p in penalties] == [False, False, True, False, False, True]
    for step in (2, 5):
        assert penalties[step] == pytest.approx(expected[step], rel=1e-4)
