"""The 2D pipeline end to end on real images: scikit-learn's handwritten digits as a folder."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from enn_neuro.config import load_config
from enn_neuro.data.cohort import CohortError
from enn_neuro.training import images
from enn_neuro.training.study import run_study
from tests.training.test_distributed import run_ranks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    from enn_neuro.data.images2d import write_digits_folder

    return write_digits_folder(tmp_path_factory.mktemp("digits") / "digits", seed=0)


def _config(tmp_path, root, name, **training):
    config = {
        "pipeline": "images2d",
        "study": {"name": name, "seed": 0, "output_dir": str(tmp_path / "runs")},
        "data": {
            "root": str(root),
            "image_size": 32,
            "resize_size": 32,
            "crop_scale": [0.6, 1.0],
            "hflip_p": 0.0,
            "val_fraction": 0.1,
            "num_workers": 0,
        },
        "model": {"name": "resnet18", "base_width": 8},
        "optim": {"lr": 3e-3},
        "training": {"epochs": 3, "batch_size": 64, "label_smoothing": 0.1, **training},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "images"},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_config(path)


@pytest.mark.parametrize("mode", ["bp", "local"])
def test_digits_study_learns_well_above_chance(tmp_path, digits_root, mode):
    config = _config(tmp_path, digits_root, f"digits-{mode}", mode=mode)
    result = run_study(config)
    metrics = result.fold_metrics[0]

    # 10 classes: chance is 0.1; three epochs of a width-8 network reach well above it
    assert metrics["test/accuracy"] > 0.3, metrics
    assert metrics["test/top5_accuracy"] >= metrics["test/accuracy"]
    if mode == "local":
        assert "test/block0_accuracy" in metrics

    # the test set is the val/ folder, predicted once; selection used held-out train images
    splits = (result.study_dir / "splits.tsv").read_text().splitlines()
    roles = {line.split("\t")[0].split("/")[0]: line.split("\t")[2] for line in splits[1:]}
    assert roles.get("val") == "test" and roles.get("train") in ("train", "val")
    client = MlflowClient(tracking_uri=config.tracking.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["pipeline"] == "images2d" and parent.data.tags["mode"] == mode
    assert "study/accuracy_mean" in parent.data.metrics
    state = json.loads((result.study_dir / "study.json").read_text())
    child = client.get_run(state["folds"]["0"]["run_id"])
    assert [m.step for m in client.get_metric_history(child.info.run_id, "val/accuracy")] == [
        0,
        1,
        2,
    ]


def test_corrupt_images_are_reported_before_training_or_skipped(tmp_path, digits_root, caplog):
    root = tmp_path / "broken"
    shutil.copytree(digits_root, root)
    bad = root / "train" / "3" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"cut short")
    bad_test = root / "val" / "5" / "broken.png"  # val/ is the test set
    bad_test.write_bytes(b"not an image at all")

    # report: every bad file named, before any training (no study folder)
    config = _config(tmp_path, root, "report", epochs=1)
    with pytest.raises(CohortError, match="broken.png"):
        run_study(config)
    assert not (tmp_path / "runs" / "report").exists()

    # skip: training runs; the bad file is skipped with a warning naming it, never a crash
    config = _config(tmp_path, root, "skip", epochs=1)
    config.data.on_corrupt = "skip"
    with caplog.at_level(logging.WARNING, logger="enn_neuro"):
        result = run_study(config)
    assert 0 <= result.fold_metrics[0]["test/accuracy"] <= 1
    assert f"skipping unreadable image {bad}" in caplog.text

    # and counted: the epoch's metric in MLflow, and a warning with the count
    client = MlflowClient(tracking_uri=config.tracking.tracking_uri)
    experiment = client.get_experiment_by_name("images")
    (fold_run,) = [
        r
        for r in client.search_runs([experiment.experiment_id])
        if r.data.tags.get("mlflow.runName", "").startswith("skip-fold")
    ]
    assert fold_run.data.metrics["train/skipped_images"] == 1
    assert "epoch 1: 1 unreadable image(s) skipped" in caplog.text

    # the unreadable test image is left out and counted, not replaced by a neighbour that
    # would then be scored twice
    assert result.fold_metrics[0]["test/skipped_images"] == 1
    predictions = pd.read_csv(result.study_dir / "fold-0" / "predictions.csv")
    readable = [p for p in (root / "val").rglob("*") if p.is_file() and p != bad_test]
    assert sorted(predictions["image"]) == sorted(map(str, readable))


def _report_on_ranks(context, config_path: str) -> dict:
    """Runs the pre-flight check of ``image_plan`` in a rank; records the files it read."""
    checked = []
    check = images.check_images

    def recording_check(paths, *args, **kwargs):
        checked.extend(str(path) for path in paths)
        return check(paths, *args, **kwargs)

    images.check_images = recording_check  # a throwaway process: patched in place
    try:
        images.image_plan(load_config(config_path), context)
    except CohortError as err:
        return {"checked": checked, "error": str(err)}
    return {"checked": checked, "error": None}


def test_the_corrupt_image_check_is_split_over_the_ranks(tmp_path, digits_root):
    root = tmp_path / "broken"
    shutil.copytree(digits_root, root)
    bad = [root / "train" / "3" / "broken.png", root / "val" / "7" / "broken.png"]
    for path in bad:
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"cut short")
    _config(tmp_path, root, "split", epochs=1)

    first, second = run_ranks(_report_on_ranks, 2, str(tmp_path / "split.yaml"))

    # each file read by exactly one rank
    everything = {str(path) for path in root.rglob("*.png")}
    assert not set(first["checked"]) & set(second["checked"])
    assert set(first["checked"]) | set(second["checked"]) == everything
    assert abs(len(first["checked"]) - len(second["checked"])) <= 1

    # ...and every rank stops with the same list, in the folder's order
    assert first["error"] == second["error"]
    assert "has 2 problems" in first["error"]
    assert first["error"].index(str(bad[0])) < first["error"].index(str(bad[1]))


def test_an_interrupted_image_study_resumes_to_the_same_result(tmp_path, digits_root, monkeypatch):
    from enn_neuro.training import loop

    reference = run_study(_config(tmp_path / "a", digits_root, "resume", epochs=2))

    # the same study, interrupted after its first epoch's checkpoint, then resumed
    config = _config(tmp_path / "b", digits_root, "resume", epochs=2)
    original = loop.save_checkpoint

    def interrupt_after_epoch_zero(state, path):
        original(state, path)
        if path.name == "last.pt" and state["loop"]["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", interrupt_after_epoch_zero)
    with pytest.raises(KeyboardInterrupt):
        run_study(config)
    monkeypatch.undo()
    resumed = run_study(config, resume=True)
    for key, value in reference.fold_metrics[0].items():
        assert resumed.fold_metrics[0][key] == pytest.approx(value, abs=1e-6), key


def test_too_small_a_holdout_is_a_clear_error(tmp_path, digits_root):
    config = _config(tmp_path, digits_root, "tiny", epochs=1)
    config.data.max_train_per_class = 1
    with pytest.raises(ValueError, match=r"needs 2 images of every class .*smallest class has 1"):
        run_study(config)


def test_predict_and_evaluate_serve_a_2d_model(tmp_path, digits_root):
    config = _config(tmp_path, digits_root, "serve", epochs=1)
    config.model.base_width = 4
    result = run_study(config)
    fold_dir = result.study_dir / "fold-0"
    expected = pd.read_csv(fold_dir / "predictions.csv")
    expected["image"] = [str(Path(p).resolve()) for p in expected["image"]]
    expected = expected.set_index("image")
    run_id = json.loads((result.study_dir / "study.json").read_text())["folds"]["0"]["run_id"]
    sources = {
        "checkpoint": ["--checkpoint", str(fold_dir / "best.pt")],
        "run": ["--run-id", run_id, "--tracking-uri", config.tracking.tracking_uri],
    }

    # the test folder's images, from the checkpoint and from the MLflow run: the study's
    # own test predictions, image by image
    columns = [
        f"prob_{c}" for c in json.loads((fold_dir / "model_info.json").read_text())["classes"]
    ]
    for name, source in sources.items():
        out = tmp_path / f"{name}.csv"
        finished = _cli("predict", *source, str(digits_root / "val"), "--out", str(out))
        assert finished.returncode == 0, finished.stderr
        predicted = pd.read_csv(out)
        assert len(predicted) == len(expected)
        predicted["image"] = [str(Path(p).resolve()) for p in predicted["image"]]
        predicted = predicted.set_index("image").loc[expected.index]
        assert list(predicted["prediction"].astype(str)) == list(expected["prediction"].astype(str))
        assert np.allclose(predicted[columns], expected[columns], atol=1e-5), name

    # evaluate scores the labelled folder as the study scored its test set
    finished = _cli("evaluate", *sources["checkpoint"], str(digits_root / "val"))
    assert finished.returncode == 0, finished.stderr
    metrics = json.loads(finished.stdout)
    assert metrics["accuracy"] == pytest.approx(result.fold_metrics[0]["test/accuracy"], abs=1e-9)
    assert metrics["top5_accuracy"] == pytest.approx(
        result.fold_metrics[0]["test/top5_accuracy"], abs=1e-9
    )

    # a folder of classes the model does not know: one clear line
    strange = tmp_path / "strange" / "zebra"
    strange.mkdir(parents=True)
    shutil.copy(next((digits_root / "val" / "3").iterdir()), strange / "a.png")
    finished = _cli("evaluate", *sources["checkpoint"], str(tmp_path / "strange"))
    assert finished.returncode == 2
    assert "class folders ['zebra'] are not classes of the model" in finished.stderr


@pytest.mark.slow
def test_predict_and_evaluate_write_the_top_five_of_many_classes(tmp_path):
    # beyond 100 classes the CSVs hold the five most probable classes, as the study's
    # predictions.csv does; --all-probabilities keeps one column per class
    from PIL import Image

    rng = np.random.default_rng(0)
    classes = [f"k{i:03d}" for i in range(101)]
    root = tmp_path / "many"
    for split, count in (("train", 3), ("val", 1)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    config = _config(tmp_path, root, "many", epochs=1, batch_size=128)
    config.data.image_size = config.data.resize_size = 16
    config.model.base_width = 4
    config.data.val_fraction = 0.34  # one of each class's three training images
    checkpoint = run_study(config).study_dir / "fold-0" / "best.pt"

    tops = [f"top{k}_{what}" for k in range(1, 6) for what in ("class", "prob")]
    written = {}
    for command in ("predict", "evaluate"):
        for every in (False, True):
            out = tmp_path / f"{command}-{every}.csv"
            extra = ["--all-probabilities"] if every else []
            finished = _cli(command, "--checkpoint", str(checkpoint), str(root / "val"),
                            "--out", str(out), *extra)  # fmt: skip
            assert finished.returncode == 0, finished.stderr
            written[command, every] = pd.read_csv(out)

    for command in ("predict", "evaluate"):
        top, every = written[command, False], written[command, True]
        assert len(top) == len(every) == 101
        assert set(tops) <= set(top.columns)
        assert not any(c.startswith("prob_") for c in top.columns)
        probabilities = every[[f"prob_{c}" for c in classes]].to_numpy()  # (101, 101)
        assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        # the top classes are those of the full table, most probable first
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :5]
        for k in range(5):
            assert list(top[f"top{k + 1}_class"]) == [classes[i] for i in order[:, k]]
            expected = probabilities[np.arange(101), order[:, k]]
            assert np.allclose(top[f"top{k + 1}_prob"], expected, atol=1e-6)
        assert list(top["prediction"]) == list(top["top1_class"])


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "enn_neuro", *args], capture_output=True, text=True, timeout=600
    )
