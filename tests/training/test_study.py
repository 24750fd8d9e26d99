"""End-to-end studies with the real stack: MONAI data, the loop, a SQLite MLflow store."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from enn_neuro.config import load_config
from enn_neuro.training import learner as learner_module
from enn_neuro.training.learner import NonFiniteLossError
from enn_neuro.training.study import StudyError, run_study
from tests.training.conftest import tiny_config

pytestmark = pytest.mark.slow


def _runs(tracking_uri):
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def _artifacts(client, run_id):
    return {a.path for a in client.list_artifacts(run_id)}


@pytest.mark.parametrize(
    ("name", "sections"),
    [
        ("bp-enn", {}),
        (
            "local-enn",
            {"training": {"mode": "local", "local": {"cut": "stage", "head": "conv_pool_linear"}}},
        ),
        ("bp-plain", {"model": {"layer": "plain"}}),
        ("age", {"data": {"target": "age", "task": "regression", "classes": None}}),
        (
            "local-age",
            {
                "data": {"target": "age", "task": "regression", "classes": None},
                "training": {"mode": "local", "local": {"cut": "unit"}},
            },
        ),
        ("site", {"data": {"target": "site", "classes": None}}),  # three classes
    ],
)
def test_study_logs_parent_and_fold_runs_with_params_metrics_artifacts(
    tmp_path, demo_cohort, cache_dir, name, sections
):
    config = load_config(tiny_config(tmp_path, demo_cohort, cache_dir, name=name, **sections))
    result = run_study(config)
    client, parents, children = _runs(config.tracking.tracking_uri)

    # one parent, one child per fold, linked
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.run_id == result.parent_run_id and parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert parent.data.tags["mode"] == config.training.mode
    assert parent.data.tags["layer"] == config.model.layer
    assert parent.data.tags["model"] == "resnet18" and len(parent.data.tags["cohort_hash"]) == 16
    assert parent.data.params["optim.lr"] == "0.001"
    assert parent.data.params["training.mode"] == config.training.mode

    # per-epoch history on every fold, test metrics at the end
    regression = config.data.task == "regression"
    main_metric = "mae" if regression else "balanced_accuracy"
    for child in children:
        history = client.get_metric_history(child.info.run_id, "train/loss")
        assert [m.step for m in history] == [0, 1]
        for key in (
            "val/loss",
            f"val/{main_metric}",
            "lr",
            "train/samples_per_s",
            f"test/{main_metric}",
        ):
            assert key in child.data.metrics, key
        assert ("ortho/drift_max" in child.data.metrics) == (config.model.layer == "enn")
        if config.training.mode == "local":
            assert "train/block0_loss" in child.data.metrics
            assert f"val/block0_{main_metric}" in child.data.metrics
        expected = {
            "predictions.csv",
            "metrics.json",
            "learning_curves.png",
            "config.yaml",
            "model_info.json",
        }
        if not regression:
            expected |= {"confusion_matrix.png", "confusion_matrix.json", "roc_curve.png"}
        assert expected <= _artifacts(client, child.info.run_id)
        assert child.data.params["training.mode"] == config.training.mode
        assert child.data.tags["layer"] == config.model.layer

    # the fused model is logged with each fold and predicts volumes of the training shape
    import mlflow.pytorch

    mlflow.set_tracking_uri(config.tracking.tracking_uri)
    fused = mlflow.pytorch.load_model(f"runs:/{children[0].info.run_id}/model")
    outputs = 1 if regression else (3 if config.data.target == "site" else 2)
    assert fused(torch.zeros(3, 1, 24, 24, 24)).shape == (3, outputs)
    signature = mlflow.models.get_model_info(f"runs:/{children[0].info.run_id}/model").signature
    assert signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 1, 24, 24, 24)
    assert signature.outputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, outputs)
    assert not any(hasattr(m, "lam") for m in fused.modules())

    # the study summary on the parent, equal to the folds' mean
    fold_values = [m[f"test/{main_metric}"] for m in result.fold_metrics.values()]
    assert parent.data.metrics[f"study/{main_metric}_mean"] == pytest.approx(np.mean(fold_values))
    assert f"study/{main_metric}_ci_low" in parent.data.metrics
    assert {"config.yaml", "splits.tsv", "summary.json"} <= _artifacts(client, parent.info.run_id)
    if not regression:  # the folds' test subjects pooled: every subject of the cohort once
        assert "confusion_matrix.json" in _artifacts(client, parent.info.run_id)
        pooled = json.loads((result.study_dir / "confusion_matrix.json").read_text())
        assert np.sum(pooled["matrix"]) == 12 and len(pooled["classes"]) == outputs

    # artifacts live beside the SQLite store, not in the current folder
    artifacts_dir = tmp_path / "mlartifacts"
    assert parent.info.artifact_uri.startswith(artifacts_dir.as_uri())
    assert any(path.name == "summary.json" for path in artifacts_dir.rglob("*"))

    # plain files beside MLflow; the test fold was predicted once per image
    study_dir = result.study_dir
    splits = pd.read_csv(study_dir / "splits.tsv", sep="\t")
    for fold in (0, 1):
        predictions = pd.read_csv(study_dir / f"fold-{fold}" / "predictions.csv")
        tested = set(splits[(splits.fold == fold) & (splits.role == "test")].subject_id)
        assert set(predictions.subject_id) == tested
        if not regression:
            columns = [c for c in predictions.columns if c.startswith("prob_")]
            assert len(columns) == (3 if config.data.target == "site" else 2)
            assert np.allclose(predictions[columns].sum(axis=1), 1.0, atol=1e-5)
        assert torch.load(study_dir / f"fold-{fold}" / "best.pt", weights_only=True)["format"] == 1


def test_existing_study_needs_resume_and_resume_needs_a_study(tmp_path, demo_cohort, cache_dir):
    config = load_config(tiny_config(tmp_path, demo_cohort, cache_dir, training={"epochs": 1}))
    with pytest.raises(StudyError, match="nothing to resume"):
        run_study(config, resume=True)
    run_study(config)
    with pytest.raises(StudyError, match="already holds a study: pass --resume"):
        run_study(config)
    changed = load_config(tiny_config(tmp_path, demo_cohort, cache_dir, training={"epochs": 2}))
    with pytest.raises(StudyError, match="configuration differs"):
        run_study(changed, resume=True)


def test_resume_on_changed_data_is_refused(tmp_path, demo_cohort, cache_dir):
    cohort = tmp_path / "cohort"
    shutil.copytree(demo_cohort, cohort)
    config = load_config(tiny_config(tmp_path, cohort, cache_dir, training={"epochs": 1}))
    run_study(config)
    study_dir = config.study.output_dir / config.study.name
    splits_before = (study_dir / "splits.tsv").read_text()
    run_study(config, resume=True)  # the same data: the finished study is kept

    # one image re-saved with other voxel values, under the same name
    image_path = sorted(cohort.glob("sub-*/**/*_T1w.nii*"))[0]
    image = nib.load(image_path)
    changed = np.asanyarray(image.dataobj).astype(np.float32) * 1.5
    nib.save(nib.Nifti1Image(changed, image.affine), image_path)
    with pytest.raises(StudyError, match="the cohort's content differs from the one .* started"):
        run_study(config, resume=True)
    assert (study_dir / "splits.tsv").read_text() == splits_before  # nothing overwritten


def test_a_metric_the_classes_cannot_support_fails_before_the_study_exists(
    tmp_path, demo_cohort, cache_dir
):
    path = tiny_config(
        tmp_path, demo_cohort, cache_dir, training={"selection_metric": "top5_accuracy"}
    )
    config = load_config(path)
    with pytest.raises(ValueError, match="'top5_accuracy' needs more than 5 classes, got 2"):
        run_study(config)
    assert not (config.study.output_dir / config.study.name).exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_non_finite_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(
    tmp_path, demo_cohort, cache_dir, monkeypatch
):
    config = load_config(tiny_config(tmp_path, demo_cohort, cache_dir, training={"epochs": 3}))
    original = learner_module.Learner.train_step

    def diverge_in_the_second_epoch(self, images, targets, where, step):
        if "epoch 2," in where:  # epochs and steps count from 1 in messages
            images = images * float("nan")
        return original(self, images, targets, where, step)

    monkeypatch.setattr(learner_module.Learner, "train_step", diverge_in_the_second_epoch)
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite loss \(nan\) at fold 0, epoch 2, step 1"
    ):
        run_study(config)

    fold_dir = config.study.output_dir / config.study.name / "fold-0"
    last = torch.load(fold_dir / "last.pt", weights_only=True)
    assert last["loop"]["epoch"] == 1  # epoch 0 completed, epoch 1 never saved
    assert all(
        torch.isfinite(v).all() for v in last["training"]["model"].values() if v.is_floating_point()
    )
    _, parents, children = _runs(config.tracking.tracking_uri)
    assert parents[0].info.status == "FAILED" and children[0].info.status == "FAILED"


def _cv_command(config_path, *extra):
    return [sys.executable, "-m", "enn_neuro", "-q", "cv", str(config_path), *extra]


@pytest.mark.parametrize("mode", ["bp", "local"])
def test_kill_9_and_resume_finishes_with_the_same_metrics(tmp_path, demo_cohort, cache_dir, mode):
    # local mode resumes K optimizers, schedulers and heads
    sections = {"training": {"epochs": 3, "mode": mode}}
    environment = {**os.environ, "PYTHONHASHSEED": "0"}

    # an uninterrupted reference
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    reference = tiny_config(reference_dir, demo_cohort, cache_dir, name="study", **sections)
    subprocess.run(_cv_command(reference), check=True, env=environment, timeout=600)

    # the same study, killed with SIGKILL once the first epoch of fold 1 is checkpointed
    killed_dir = tmp_path / "killed"
    killed_dir.mkdir()
    killed = tiny_config(killed_dir, demo_cohort, cache_dir, name="study", **sections)
    process = subprocess.Popen(_cv_command(killed), env=environment)
    last = killed_dir / "runs" / "study" / "fold-1" / "last.pt"
    deadline = time.monotonic() + 600
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the study finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = json.loads((killed_dir / "runs" / "study" / "study.json").read_text())
    assert (
        state["folds"]["0"]["status"] == "finished" and state["folds"]["1"]["status"] == "running"
    )

    subprocess.run(_cv_command(killed, "--resume"), check=True, env=environment, timeout=600)

    for fold in (0, 1):
        expected = json.loads(
            (reference_dir / "runs" / "study" / f"fold-{fold}" / "metrics.json").read_text()
        )
        actual = json.loads(
            (killed_dir / "runs" / "study" / f"fold-{fold}" / "metrics.json").read_text()
        )
        assert actual.keys() == expected.keys()
        for key, value in expected.items():
            assert (math.isnan(value) and math.isnan(actual[key])) or actual[key] == pytest.approx(
                value, abs=1e-6
            ), key

    # the resumed study continued the same MLflow runs
    resumed_state = json.loads((killed_dir / "runs" / "study" / "study.json").read_text())
    assert resumed_state["parent_run_id"] == state["parent_run_id"]
    assert resumed_state["folds"]["1"]["run_id"] == state["folds"]["1"]["run_id"]
    client, parents, children = _runs(f"sqlite:///{killed_dir / 'mlflow.db'}")
    assert len(parents) == 1 and len(children) == 2
    assert all(r.info.status == "FINISHED" for r in parents + children)

    # every epoch of every fold in MLflow exactly once, as in the uninterrupted run
    for child in children:
        for key in ("train/loss", "val/loss"):
            steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
            assert sorted(steps) == [0, 1, 2], (key, steps)


def _kill_once_when_a_run_ends(monkeypatch, chosen) -> None:
    """A kill (KeyboardInterrupt) where the first run that ``chosen`` picks would finish."""
    from enn_neuro.tracking.mlflow_tracker import StudyTracker

    end_run = StudyTracker.end_run

    def killed(self, run_id, status="FINISHED"):
        if status == "FINISHED" and chosen(run_id):
            monkeypatch.setattr(StudyTracker, "end_run", end_run)
            raise KeyboardInterrupt
        end_run(self, run_id, status)

    monkeypatch.setattr(StudyTracker, "end_run", killed)


def test_a_kill_after_the_test_logs_the_fold_once_on_resume(
    tmp_path, demo_cohort, cache_dir, monkeypatch
):
    # the kill lands after fold 0's test metrics and model are in its run, before the fold
    # counts as finished: the resumed study tests it again and logs neither a second time
    config = load_config(tiny_config(tmp_path, demo_cohort, cache_dir, training={"epochs": 1}))
    study_dir = config.study.output_dir / config.study.name
    _kill_once_when_a_run_ends(monkeypatch, lambda run_id: True)  # the first: fold 0's
    with pytest.raises(KeyboardInterrupt):
        run_study(config)
    state = json.loads((study_dir / "study.json").read_text())
    assert state["folds"]["0"]["status"] == "running" and "1" not in state["folds"]
    killed_metrics = json.loads((study_dir / "fold-0" / "metrics.json").read_text())

    run_study(config, resume=True)
    client, parents, children = _runs(config.tracking.tracking_uri)
    assert len(parents) == 1 and len(children) == 2
    assert all(r.info.status == "FINISHED" for r in parents + children)
    fold_run = state["folds"]["0"]["run_id"]
    assert len(client.get_metric_history(fold_run, "test/loss")) == 1
    experiment = client.get_run(fold_run).info.experiment_id
    models = client.search_logged_models(
        [experiment], filter_string=f"source_run_id = '{fold_run}'"
    )
    assert len(models) == 1
    # the second test of the same model gave the same numbers as the first
    resumed_metrics = json.loads((study_dir / "fold-0" / "metrics.json").read_text())
    assert resumed_metrics == pytest.approx(killed_metrics, abs=1e-6)


def test_a_kill_before_the_parent_run_ends_logs_the_summary_once_on_resume(
    tmp_path, demo_cohort, cache_dir, monkeypatch
):
    # the kill lands after the study summary is in the parent run, before the run is closed:
    # the resumed study closes it without a second copy of the summary's metrics
    config = load_config(tiny_config(tmp_path, demo_cohort, cache_dir, training={"epochs": 1}))
    study_dir = config.study.output_dir / config.study.name

    def is_parent(run_id):
        return run_id == json.loads((study_dir / "study.json").read_text())["parent_run_id"]

    _kill_once_when_a_run_ends(monkeypatch, is_parent)
    with pytest.raises(KeyboardInterrupt):
        run_study(config)
    client, parents, _ = _runs(config.tracking.tracking_uri)
    parent = parents[0].info.run_id
    key = "study/balanced_accuracy_mean"
    assert len(client.get_metric_history(parent, key)) == 1
    killed_summary = json.loads((study_dir / "summary.json").read_text())

    resumed = run_study(config, resume=True)
    client, parents, children = _runs(config.tracking.tracking_uri)
    assert [r.info.run_id for r in parents] == [parent]
    assert all(r.info.status == "FINISHED" for r in parents + children)
    history = client.get_metric_history(parent, key)
    assert len(history) == 1
    assert history[0].value == pytest.approx(killed_summary["test/balanced_accuracy"]["mean"])
    for name, statistics in killed_summary.items():
        assert resumed.summary[name]["mean"] == pytest.approx(statistics["mean"]), name


def test_a_nan_validation_score_never_counts_as_the_best(
    tmp_path, demo_cohort, cache_dir, monkeypatch
):
    from enn_neuro.training import loop

    config = load_config(
        tiny_config(tmp_path, demo_cohort, cache_dir, training={"epochs": 3, "patience": 5})
    )
    original = loop.evaluate
    calls = {"val": 0}

    def nan_first(learner, predictions, classes, prefix=""):
        metrics = original(learner, predictions, classes, prefix)
        if prefix == "val/":
            calls["val"] += 1
            if calls["val"] in (1, 4):  # each fold's first epoch
                metrics["val/balanced_accuracy"] = float("nan")
        return metrics

    monkeypatch.setattr(loop, "evaluate", nan_first)
    result = run_study(config)
    best = torch.load(result.study_dir / "fold-0" / "best.pt", weights_only=True)
    assert best["epoch"] >= 1 and math.isfinite(best["score"])
