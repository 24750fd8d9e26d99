"""Shared fixtures: deterministic seeds and tiny inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from enn_neuro.data.demo import write_demo_cohort


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖, in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


@pytest.fixture(scope="session")
def demo_cohort(tmp_path_factory) -> Path:
    """12 subjects, 3 sites, coarse voxels: seconds to write and to preprocess."""
    return write_demo_cohort(
        tmp_path_factory.mktemp("cohort") / "demo", n_subjects=12, seed=0, voxel_size_mm=6.0
    )


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")
