"""Data-parallel studies in real processes (torchrun, gloo, two ranks on the CPU), and the
samplers that share the data among the ranks."""

from __future__ import annotations

import datetime
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mlflow import MlflowClient
from torch.utils.data import BatchSampler

from enn_neuro.training.distributed import (
    DistributedContext,
    EpochSampler,
    ShardSampler,
    check_global_batch,
)
from enn_neuro.training.loop import Predictions, _merge_shards
from tests.training.conftest import tiny_config

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


def run_ranks(body: Callable, world_size: int, *args) -> list:
    """``body(context, *args)`` in ``world_size`` fresh processes joined by gloo on the CPU.

    ``body`` must be a module-level function (the processes are spawned and import it) and
    return something picklable.

    Returns:
        Each rank's return value, in rank order.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank_main, args=(world_size, port, folder, body, args), nprocs=world_size)
        return [pickle.loads((Path(folder) / f"{r}.pkl").read_bytes()) for r in range(world_size)]


def _rank_main(rank, world_size, port, folder, body, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        result = body(DistributedContext(rank, world_size, rank), *args)
        (Path(folder) / f"{rank}.pkl").write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()


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


def _batches(sampler: EpochSampler) -> list[list[int]]:
    """The batches a DataLoader over ``sampler`` draws on its rank."""
    per_rank = sampler.global_batch // sampler.context.world_size
    return [list(batch) for batch in BatchSampler(sampler, per_rank, drop_last=False)]


def _samplers(size, global_batch, world_size, drop_last=True, seed=7):
    samplers = [
        EpochSampler(size, global_batch, DistributedContext(rank, world_size), drop_last)
        for rank in range(world_size)
    ]
    for sampler in samplers:
        sampler.set_seed(seed)
    return samplers


class TestEpochSampler:
    @pytest.mark.parametrize(
        ("size", "global_batch", "world_size", "drop_last"),
        [
            (3, 4, 2, True),  # the whole set is one partial batch, odd
            (4, 4, 2, True),
            (6, 8, 4, True),
            (10, 4, 2, True),  # the partial last batch is dropped
            (10, 4, 2, False),
            (11, 4, 2, False),
            (11, 6, 3, False),
        ],
    )
    def test_the_ranks_batches_together_are_the_single_process_batches(
        self, size, global_batch, world_size, drop_last
    ):
        (single,) = _samplers(size, global_batch, 1, drop_last)
        expected = _batches(single)
        per_rank = [_batches(s) for s in _samplers(size, global_batch, world_size, drop_last)]

        assert {len(batches) for batches in per_rank} == {len(expected)}  # no rank waits
        for k, batch in enumerate(expected):
            union = [index for batches in per_rank for index in batches[k]]
            assert sorted(union) == sorted(batch), k

    def test_a_global_batch_that_does_not_divide_among_the_ranks_is_refused(self):
        with pytest.raises(ValueError, match=r"batch_size \(4\) must be a multiple of .* \(3\)"):
            check_global_batch(4, DistributedContext(rank=0, world_size=3))
        check_global_batch(6, DistributedContext(rank=0, world_size=3))

    def test_an_uneven_last_batch_warns_about_its_weights(self, caplog):
        with caplog.at_level(logging.WARNING):
            samplers = _samplers(3, 4, 2)
        assert [len(s) for s in samplers] == [2, 1]
        assert "does not divide among 2 processes: shares [2, 1]" in caplog.text
        assert len(caplog.records) == 1  # rank 0 only

    def test_a_last_batch_smaller_than_the_world_is_left_out_with_a_warning(self, caplog):
        with caplog.at_level(logging.WARNING):
            samplers = _samplers(9, 4, 4, drop_last=False)
        assert [len(s) for s in samplers] == [2, 2, 2, 2]
        covered = {index for s in samplers for index in s}
        assert len(covered) == 8
        assert "(1 of 9 samples) has fewer samples than there are processes (4)" in caplog.text

    def test_fewer_samples_than_processes_is_refused(self):
        with pytest.raises(ValueError, match=r"training set \(1 samples\) must have at least one"):
            EpochSampler(1, 2, DistributedContext(0, 2))

    def test_each_epoch_seed_draws_its_own_permutation(self):
        (sampler,) = _samplers(12, 4, 1)
        first = list(sampler)
        sampler.set_seed(8)
        assert sorted(first) == sorted(sampler) and first != list(sampler)


class TestShardSampler:
    @pytest.mark.parametrize("world_size", [1, 2, 3, 4])
    @pytest.mark.parametrize("size", [1, 2, 5, 7])
    def test_every_item_is_predicted_once_and_merged_back_in_order(self, size, world_size):
        shards = [
            list(ShardSampler(size, DistributedContext(r, world_size))) for r in range(world_size)
        ]
        assert sorted(i for shard in shards for i in shard) == list(range(size))
        assert [len(shard) for shard in shards] == [
            len(range(r, size, world_size)) for r in range(world_size)
        ]

        # what each rank predicts for its shard, gathered as predict_loader does
        predictions = [
            Predictions(
                subject_ids=[f"s{i}" for i in shard],
                session_ids=[""] * len(shard),
                images=[f"i{i}" for i in shard],
                targets=np.array(shard, dtype=float),
                outputs=[np.array([[float(i)] for i in shard]).reshape(len(shard), 1)],
            )
            for shard in shards
        ]
        merged = _merge_shards(predictions)
        assert merged.subject_ids == [f"s{i}" for i in range(size)]
        assert merged.targets.tolist() == list(range(size))
        assert merged.outputs[0][:, 0].tolist() == list(range(size))


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGSTOP], ids=["rank_dies", "rank_hangs"])
def test_a_rank_that_dies_or_hangs_fails_the_job_instead_of_hanging(
    tmp_path, demo_cohort, cache_dir, stop
):
    # a dead rank ends the job through torchrun; a hung one (stopped, its sockets open)
    # only through the collectives' timeout, training.dist_timeout_s, on the ranks waiting
    timeout_s = 20
    training = {**SECTIONS["training"], "epochs": 50, "dist_timeout_s": timeout_s}
    sections = {**SECTIONS, "training": training}
    config = tiny_config(tmp_path, demo_cohort, cache_dir, name="ddp", **sections)
    process = subprocess.Popen(
        _torchrun(2, config), env=_environment(), start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        first_epoch = tmp_path / "runs" / "ddp" / "fold-0" / "last.pt"
        deadline = time.monotonic() + 600
        while not first_epoch.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first_epoch.exists(), "training never started"

        # stop rank 1 only; torchrun starts each worker in a session of its own: find them
        # as its children
        workers = subprocess.run(
            ["pgrep", "-P", str(process.pid)], capture_output=True, text=True
        ).stdout.split()
        ranks = [int(pid) for pid in workers if _environ_of(int(pid)).get("RANK") == "1"]
        assert len(ranks) == 1, workers
        os.kill(ranks[0], stop)

        started = time.monotonic()
        try:
            output, _ = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            pytest.fail("the job hung after a rank stopped")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0
    if stop == signal.SIGKILL:
        assert "SIGKILL" in output or "Signal 9" in output or "exitcode" in output, output[-2000:]
        assert time.monotonic() - started < 180
    else:
        # rank 0 gave up waiting: one line naming the timeout, then torchrun ended the job
        assert time.monotonic() - started > timeout_s * 0.9
        assert "error:" in output and "imed out" in output, output[-3000:]


# what each rank of the test below runs: a session that builds an optimizer (importing
# torch._dynamo, as torch.optim does on its first optimizer) and a DDP model inside a
# reference cycle, runs collectives, then lists the gloo threads still alive once it has ended
_SESSION_SCRIPT = """
import json, os, sys
import torch
from enn_neuro.training.distributed import distributed_session

def gloo_threads():
    tasks = os.listdir("/proc/self/task")
    names = (open(f"/proc/self/task/{task}/comm").read().strip() for task in tasks)
    return sorted(name for name in names if "gloo" in name)

with distributed_session("cpu") as (context, device):
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
    model.cycle = [model]
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    context.barrier()
    inside = gloo_threads()
    del model, optimizer
result = {"inside": inside, "after": gloo_threads()}
with open(os.path.join(sys.argv[1], f"{context.rank}.json"), "w") as out:
    json.dump(result, out)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads in /proc")
def test_a_finished_session_leaves_no_gloo_worker_to_abort_the_exit(tmp_path):
    # a gloo worker alive at interpreter shutdown can abort the process after its work
    # (Note [leaving the group]); ending the session must join every one of them
    script = tmp_path / "session.py"
    script.write_text(_SESSION_SCRIPT)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        str(script), str(tmp_path),
    ]  # fmt: skip
    finished = subprocess.run(
        command, env=_environment(), timeout=300, capture_output=True, text=True
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    for rank in (0, 1):
        threads = json.loads((tmp_path / f"{rank}.json").read_text())
        assert "pt_gloo_runloop" in threads["inside"], threads  # the probe sees them
        assert threads["after"] == [], (rank, threads)


def _environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key.decode(): value.decode(errors="replace") for key, value in pairs}
