"""The `enn-neuro` command, run as a user would (in a subprocess where it matters)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from enn_neuro.cli import _parser, _with_tracking_uri, main, ui_command
from enn_neuro.config import load_config, validate_config
from enn_neuro.training.study import run_study
from tests.data.conftest import write_table, write_volume
from tests.training.conftest import tiny_config

SUBCOMMANDS = ["demo", "validate", "cv", "train", "predict", "evaluate", "ui"]


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "enn_neuro", *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_of_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: enn-neuro {command}" in text and "options:" in text


def test_every_option_and_argument_is_explained():
    subcommands = next(a for a in _parser()._actions if a.dest == "command").choices
    assert sorted(subcommands) == sorted(SUBCOMMANDS)
    for name, subparser in subcommands.items():
        assert subparser.description, name
        for action in subparser._actions:
            assert action.help and "%%" not in action.help, (name, action.dest)


def test_tracking_uri_from_the_environment_stays_out_of_the_config(monkeypatch):
    config = validate_config({"study": {"name": "x"}, "data": {"cohort": "c.csv", "target": "dx"}})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:secret@mlflow:5000")
    assert _with_tracking_uri(config, None, default="sqlite:///d.db").tracking.tracking_uri is None
    assert _with_tracking_uri(config, "sqlite:///x.db").tracking.tracking_uri == "sqlite:///x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    fresh = validate_config({"study": {"name": "x"}, "data": {"cohort": "c.csv", "target": "dx"}})
    assert _with_tracking_uri(fresh, None, default="sqlite:///d.db").tracking.tracking_uri == (
        "sqlite:///d.db"
    )


def test_bad_config_is_one_line_naming_key_and_value(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("study: {name: x}\ndata: {cohort: c.csv, target: dx}\noptim: {lr: fast}\n")
    result = _run("cv", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("error: ") and "optim.lr" in lines[0] and "'fast'" in lines[0]


def test_missing_config_and_override_errors(tmp_path):
    result = _run("cv", str(tmp_path / "none.yaml"))
    assert (
        result.returncode == 2
        and result.stderr.strip() == f"error: config not found: {tmp_path / 'none.yaml'}"
    )
    path = tmp_path / "ok.yaml"
    path.write_text("study: {name: x}\ndata: {cohort: c.csv, target: dx}\n")
    result = _run("cv", str(path), "--set", "training.epochz=3")
    assert result.returncode == 2 and "unknown key 'training.epochz'" in result.stderr


def test_validate_reports_every_problem_and_sets_the_exit_code(tmp_path):
    rows = []
    for index in range(6):
        write_volume(tmp_path / f"s{index}.nii.gz", seed=index)
        rows.append({"subject_id": f"s{index}", "image": f"s{index}.nii.gz", "dx": "ab"[index % 2]})
    rows.append({"subject_id": "gone", "image": "gone.nii.gz", "dx": "a"})
    table = write_table(tmp_path / "cohort.csv", rows)
    result = _run("validate", str(table), "--target", "dx", "--folds", "3")
    assert result.returncode == 1
    assert (
        "gone" in result.stdout
        and "file not found" in result.stdout
        and "problems: 1" in result.stdout
    )
    (tmp_path / "gone.nii.gz").write_bytes((tmp_path / "s0.nii.gz").read_bytes())
    result = _run("validate", str(table), "--target", "dx", "--folds", "3")
    assert result.returncode == 1 and "the same image content under 2 subject ids" in result.stdout


def test_ui_binds_to_loopback_only():
    command = ui_command("sqlite:///study/mlflow.db", 5001)
    assert command[:3] == [sys.executable, "-m", "mlflow"]  # no PATH lookup
    assert command[3:] == [
        "ui",
        "--backend-store-uri",
        "sqlite:///study/mlflow.db",
        "--host",
        "127.0.0.1",
        "--port",
        "5001",
    ]


@pytest.mark.slow
def test_predict_and_evaluate_match_the_trained_model(tmp_path, demo_cohort, cache_dir):
    config = load_config(tiny_config(tmp_path, demo_cohort, cache_dir, name="predict"))
    result = run_study(config, folds=[0])
    fold_dir = result.study_dir / "fold-0"
    expected = pd.read_csv(fold_dir / "predictions.csv")

    # from the checkpoint, on NIfTI files
    out = tmp_path / "from_checkpoint.csv"
    images = list(expected["image"])
    command = ["predict", "--checkpoint", str(fold_dir / "best.pt"), *images, "--out", str(out)]
    finished = _run(*command, "--per-image")
    assert finished.returncode == 0, finished.stderr
    predicted = pd.read_csv(out)
    assert list(predicted["prediction"]) == list(expected["prediction"])
    assert np.allclose(predicted["prob_patient"], expected["prob_patient"], atol=1e-5)

    # from the MLflow run, on the whole cohort folder
    run_id = json.loads((result.study_dir / "study.json").read_text())["folds"]["0"]["run_id"]
    out = tmp_path / "from_run.csv"
    finished = _run(
        "predict",
        "--run-id",
        run_id,
        "--tracking-uri",
        config.tracking.tracking_uri,
        str(demo_cohort),
        "--out",
        str(out),
        "--per-image",
    )
    assert finished.returncode == 0, finished.stderr
    from_run = pd.read_csv(out).set_index("image").loc[images]
    assert np.allclose(from_run["prob_patient"], expected["prob_patient"], atol=1e-5)
    assert len(pd.read_csv(out)) == 12 and "session_id" in from_run.columns

    # by default one row per subject: the mean of its images' probabilities, as the study
    # scores it; here from an unlabelled cohort table (subject_id and image columns only)
    table = tmp_path / "new_scans.csv"
    pd.DataFrame({"subject_id": expected["subject_id"], "image": images}).to_csv(table, index=False)
    for inputs, name in [(images, "per_subject.csv"), ([str(table)], "from_table.csv")]:
        out = tmp_path / name
        finished = _run(*command[:3], *inputs, "--out", str(out))
        assert finished.returncode == 0, finished.stderr
        assert "for 6 subjects" in finished.stdout
        subjects = pd.read_csv(out).set_index("subject_id")
        by_subject = expected.groupby("subject_id")["prob_patient"].mean()
        assert set(subjects.index) == set(by_subject.index)
        assert np.allclose(subjects.loc[by_subject.index, "prob_patient"], by_subject, atol=1e-5)
        assert (subjects["n_images"] == expected.groupby("subject_id").size()).all()

    # wrong model sources: one line each, no traceback
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("not a checkpoint")
    for source, message in [
        (["--checkpoint", str(fold_dir / "last.pt")], "is a last.pt"),
        (["--checkpoint", str(not_a_checkpoint)], "not a readable checkpoint"),
        (["--run-id", "0" * 32, "--tracking-uri", config.tracking.tracking_uri], "MLflow: "),
    ]:
        finished = _run("predict", *source, images[0], "--out", str(tmp_path / "x.csv"))
        assert finished.returncode == 2, finished.stderr
        assert "Traceback" not in finished.stderr and message in finished.stderr
        assert len(finished.stderr.strip().splitlines()) == 1, finished.stderr

    # evaluate scores the labelled cohort
    finished = _run(
        "evaluate",
        "--checkpoint",
        str(fold_dir / "best.pt"),
        str(demo_cohort),
        "--target",
        "diagnosis",
    )
    assert finished.returncode == 0, finished.stderr
    metrics = json.loads(finished.stdout)
    assert (
        0 <= metrics["balanced_accuracy"] <= 1 and np.array(metrics["confusion_matrix"]).sum() == 12
    )
