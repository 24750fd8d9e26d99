"""The runnable scripts in pipelines/, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.training.conftest import tiny_config

PIPELINES = Path(__file__).parents[1] / "pipelines"

pytestmark = pytest.mark.slow


def _run(script: str, *args: str) -> dict:
    finished = subprocess.run(
        [sys.executable, str(PIPELINES / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    return json.loads(finished.stdout)


def test_cohort_cv_script_runs_a_study(tmp_path, demo_cohort, cache_dir):
    config = tiny_config(tmp_path, demo_cohort, cache_dir, training={"epochs": 1})
    summary = _run("cohort_cv.py", str(config))
    assert 0 <= summary["test/balanced_accuracy"] <= 1


def test_imagenet_script_runs_an_image_study_and_refuses_a_cohort_config(
    tmp_path, demo_cohort, cache_dir
):
    from enn_neuro.data.images2d import write_digits_folder

    root = write_digits_folder(tmp_path / "digits", seed=0)
    config = {
        "pipeline": "images2d",
        "study": {"name": "script", "output_dir": str(tmp_path / "runs")},
        "data": {"root": str(root), "image_size": 32, "resize_size": 32, "num_workers": 0},
        "model": {"name": "resnet18", "base_width": 4},
        "training": {"epochs": 1, "batch_size": 64},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    path = tmp_path / "images.yaml"
    path.write_text(yaml.safe_dump(config))
    metrics = _run("imagenet.py", str(path))
    assert 0 <= metrics["test/accuracy"] <= 1 and "test/top5_accuracy" in metrics

    cohort_config = tiny_config(tmp_path, demo_cohort, cache_dir, name="cohort")
    finished = subprocess.run(
        [sys.executable, str(PIPELINES / "imagenet.py"), str(cohort_config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        finished.returncode == 2
        and "pipeline must be 'images2d', got 'cohort3d'" in finished.stderr
    )
