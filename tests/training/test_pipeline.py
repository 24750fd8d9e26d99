"""Stage-parallel local mode: block groups on separate processes, activations sent forward."""

from __future__ import annotations

import subprocess

import pytest
import torch

from enn_neuro.training.inference import load_trained_model
from enn_neuro.training.pipeline import balanced_groups
from tests.training.conftest import tiny_config
from tests.training.test_distributed import _environment, _fold_metrics, _single, _torchrun


class TestBalancedGroups:
    @pytest.mark.parametrize(
        ("costs", "parts", "expected"),
        [
            ([1, 1, 1, 1], 2, [[0, 1], [2, 3]]),
            ([6, 1, 1, 1, 1, 1, 1], 2, [[0], [1, 2, 3, 4, 5, 6]]),
            ([3, 3, 2, 1, 1], 3, [[0], [1], [2, 3, 4]]),
            ([5, 1], 2, [[0], [1]]),
        ],
    )
    def test_contiguous_groups_minimise_the_largest_cost(self, costs, parts, expected):
        assert balanced_groups(costs, parts) == expected

    def test_more_stages_than_blocks_is_refused(self):
        with pytest.raises(ValueError, match="cannot cut 2 local blocks into 3 stages"):
            balanced_groups([1, 1], 3)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 3])
def test_stage_parallel_equals_sequential_local_mode(tmp_path, demo_cohort, cache_dir, processes):
    sections = {
        "training": {"epochs": 2, "batch_size": 2, "mode": "local", "local": {"cut": "unit"}},
        "augmentation": {"enabled": False},
    }
    studies = {}
    for label, nproc in (("sequential", 1), ("stages", processes)):
        folder = tmp_path / label
        folder.mkdir()
        extra = {"training": {**sections["training"], "stage_parallel": nproc > 1}}
        config = tiny_config(folder, demo_cohort, cache_dir, name="pipe", **{**sections, **extra})
        command = _single(config) if nproc == 1 else _torchrun(nproc, config)
        finished = subprocess.run(
            command, env=_environment(), timeout=900, capture_output=True, text=True
        )
        assert finished.returncode == 0, finished.stderr[-3000:]
        studies[label] = folder / "runs" / "pipe"

    # every block sees the same inputs in the same order: the same training, to float precision
    for fold in (0, 1):
        sequential = _fold_metrics(studies["sequential"], fold)
        staged = _fold_metrics(studies["stages"], fold)
        assert staged.keys() == sequential.keys()
        for key in sequential:
            assert staged[key] == pytest.approx(sequential[key], abs=1e-4, nan_ok=True), key

    # the gathered checkpoint has the sequential format: it loads and predicts alike
    for label in studies:
        checkpoint = torch.load(studies[label] / "fold-0" / "last.pt", weights_only=True)
        assert len(checkpoint["training"]["optimizers"]) == 8  # one per local block (unit cut)
    inputs = torch.randn(2, 1, 24, 24, 24)
    outputs = {
        label: load_trained_model(folder / "fold-0" / "best.pt").model(inputs)
        for label, folder in studies.items()
    }
    assert torch.allclose(outputs["stages"], outputs["sequential"], atol=1e-4)


@pytest.mark.slow
def test_stage_parallel_without_torchrun_fails_before_training(tmp_path, demo_cohort, cache_dir):
    sections = {"training": {"mode": "local", "stage_parallel": True}}
    config = tiny_config(tmp_path, demo_cohort, cache_dir, name="pipe", **sections)
    finished = subprocess.run(_single(config), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 2
    assert "training.stage_parallel needs one process per stage" in finished.stderr
    assert not (tmp_path / "runs" / "pipe").exists()
