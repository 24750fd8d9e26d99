"""Data-parallel studies in real processes: torchrun, gloo, two ranks on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.training.conftest import tiny_config

pytestmark = pytest.mark.slow

# same global batch (4) and seed; GroupNorm, since BatchNorm statistics are per process on CPU;
# no augmentation, whose random draws depend on which rank reads a sample
SECTIONS = {
    "model": {"norm": "group"},
    "augmentation": {"enabled": False},
    "training": {"epochs": 2, "batch_size": 4},
}
TOLERANCE = 1e-4


def _torchrun(nproc: int, config: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "enn_neuro", "-q", "cv", str(config), *extra,
    ]  # fmt: skip


def _single(config: Path) -> list[str]:
    return [sys.executable, "-m", "enn_neuro", "-q", "cv", str(config)]


def _environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _val_losses(tracking_uri: str, study_dir: Path) -> dict[int, list[float]]:
    client = MlflowClient(tracking_uri=tracking_uri)
    state = json.loads((study_dir / "study.json").read_text())
    return {
        int(fold): [m.value for m in client.get_metric_history(entry["run_id"], "val/loss")]
        for fold, entry in state["folds"].items()
    }


def _fold_metrics(study_dir: Path, fold: int) -> dict[str, float]:
    return json.loads((study_dir / f"fold-{fold}" / "metrics.json").read_text())


def _assert_same_results(study_a: Path, uri_a: str, study_b: Path, uri_b: str) -> None:
    for fold in (0, 1):
        expected, actual = _fold_metrics(study_a, fold), _fold_metrics(study_b, fold)
        assert expected["test/loss"] == pytest.approx(actual["test/loss"], abs=TOLERANCE)
        assert expected["best_epoch"] == actual["best_epoch"]
    losses_a, losses_b = _val_losses(uri_a, study_a), _val_losses(uri_b, study_b)
    for fold in (0, 1):
        assert losses_b[fold] == pytest.approx(losses_a[fold], abs=TOLERANCE)


@pytest.mark.parametrize("mode", ["bp", "local"])
def test_two_processes_train_the_same_model_as_one(tmp_path, demo_cohort, cache_dir, mode):
    sections = {**SECTIONS, "training": {**SECTIONS["training"], "mode": mode}}
    runs = {}
    for label, nproc in (("one", 1), ("two", 2)):
        folder = tmp_path / label
        folder.mkdir()
        config = tiny_config(folder, demo_cohort, cache_dir, name="ddp", **sections)
        command = _single(config) if nproc == 1 else _torchrun(nproc, config)
        finished = subprocess.run(
            command, env=_environment(), timeout=900, capture_output=True, text=True
        )
        assert finished.returncode == 0, finished.stderr[-3000:]
        runs[label] = (folder / "runs" / "ddp", f"sqlite:///{folder / 'mlflow.db'}")

    _assert_same_results(*runs["one"], *runs["two"])

    # only rank 0 tracked: one parent and one child per fold
    client = MlflowClient(tracking_uri=runs["two"][1])
    experiment = client.get_experiment_by_name("tests")
    assert len(client.search_runs([experiment.experiment_id])) == 3


def test_killed_ddp_study_resumes_to_the_same_metrics(tmp_path, demo_cohort, cache_dir):
    sections = {**SECTIONS, "training": {**SECTIONS["training"], "epochs": 3}}
    reference = tmp_path / "reference"
    reference.mkdir()
    config = tiny_config(reference, demo_cohort, cache_dir, name="ddp", **sections)
    subprocess.run(
        _torchrun(2, config), env=_environment(), timeout=900, check=True, capture_output=True
    )

    killed = tmp_path / "killed"
    killed.mkdir()
    config = tiny_config(killed, demo_cohort, cache_dir, name="ddp", **sections)
    process = subprocess.Popen(
        _torchrun(2, config), env=_environment(), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    last = killed / "runs" / "ddp" / "fold-1" / "last.pt"
    deadline = time.monotonic() + 900
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the study finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and both ranks at once
    process.wait()

    finished = subprocess.run(
        _torchrun(2, config, "--resume"),
        env=_environment(),
        timeout=900,
        capture_output=True,
        text=True,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    uri = lambda folder: f"sqlite:///{folder / 'mlflow.db'}"  # noqa: E731
    for fold in (0, 1):
        expected = _fold_metrics(reference / "runs" / "ddp", fold)
        actual = _fold_metrics(killed / "runs" / "ddp", fold)
        assert actual["test/loss"] == pytest.approx(expected["test/loss"], abs=TOLERANCE)
    client = MlflowClient(tracking_uri=uri(killed))
    experiment = client.get_experiment_by_name("tests")
    assert len(client.search_runs([experiment.experiment_id])) == 3


def test_a_rank_that_dies_fails_the_job_instead_of_hanging(tmp_path, demo_cohort, cache_dir):
    sections = {**SECTIONS, "training": {**SECTIONS["training"], "epochs": 50}}
    config = tiny_config(tmp_path, demo_cohort, cache_dir, name="ddp", **sections)
    process = subprocess.Popen(
        _torchrun(2, config), env=_environment(), start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    first_epoch = tmp_path / "runs" / "ddp" / "fold-0" / "last.pt"
    deadline = time.monotonic() + 600
    while not first_epoch.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first_epoch.exists(), "training never started"

    # kill rank 1 only
    # torchrun starts each worker in a session of its own: find them as its children
    workers = subprocess.run(
        ["pgrep", "-P", str(process.pid)], capture_output=True, text=True
    ).stdout.split()
    ranks = [int(pid) for pid in workers if _environ_of(int(pid)).get("RANK") == "1"]
    assert len(ranks) == 1, workers
    os.kill(ranks[0], signal.SIGKILL)

    started = time.monotonic()
    try:
        output, _ = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("the job hung after a rank died")
    assert process.returncode != 0
    assert time.monotonic() - started < 180
    assert "SIGKILL" in output or "Signal 9" in output or "exitcode" in output, output[-2000:]


def _environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key.decode(): value.decode(errors="replace") for key, value in pairs}
