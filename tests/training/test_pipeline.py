"""Stage-parallel local mode: block groups on separate processes, activations sent forward."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import warnings

import pytest
import torch
import torch.distributed as dist

from enn_neuro.config import validate_config
from enn_neuro.training import pipeline as pipeline_module
from enn_neuro.training.distributed import DistributedContext
from enn_neuro.training.inference import load_trained_model
from enn_neuro.training.learner import Learner
from enn_neuro.training.pipeline import StagePipeline, _on_cpu, balanced_groups
from enn_neuro.training.study import check_stage_parallel
from tests.training.conftest import tiny_config
from tests.training.test_distributed import (
    _environment,
    _fold_metrics,
    _single,
    _torchrun,
    _val_losses,
    run_ranks,
)


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


class TestOnCpu:
    def test_every_tensor_of_a_nested_state_is_copied_to_the_cpu(self):
        state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}}}
        state["param_groups"] = [{"params": [0], "lr": 0.1, "betas": (0.9, 0.99)}]
        moved = _on_cpu(state)
        assert moved["param_groups"] == state["param_groups"]
        assert moved["state"][0]["step"].item() == 3.0
        torch.testing.assert_close(moved["state"][0]["exp_avg"], torch.ones(2))

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
    def test_a_gpu_optimizer_state_travels_on_the_cpu_and_loads_back_on_the_gpu(self):
        weight = torch.nn.Parameter(torch.randn(3, device="cuda"))
        optimizer = torch.optim.AdamW([weight])
        weight.sum().backward()
        optimizer.step()
        moved = _on_cpu(optimizer.state_dict())
        assert all(t.device.type == "cpu" for t in moved["state"][0].values())

        receiver = torch.nn.Parameter(torch.randn(3, device="cuda"))
        loaded = torch.optim.AdamW([receiver])
        loaded.load_state_dict(moved)
        assert loaded.state[receiver]["exp_avg"].device == receiver.device
        torch.testing.assert_close(
            loaded.state[receiver]["exp_avg"].cpu(), moved["state"][0]["exp_avg"]
        )


@pytest.mark.parametrize(("cut", "blocks"), [("stage", 4), ([0, 4], 2)])
def test_more_processes_than_blocks_is_refused_before_the_study_starts(cut, blocks):
    config = _stage_config().model_copy(deep=True)
    config.training.stage_parallel = True
    config.training.local.cut = cut
    check_stage_parallel(config, DistributedContext(rank=0, world_size=blocks))  # fits
    with pytest.raises(
        ValueError,
        match=rf"with {blocks + 1} processes needs at least as many local blocks, but "
        rf"training.local.cut .* gives {blocks}",
    ):
        check_stage_parallel(config, DistributedContext(rank=0, world_size=blocks + 1))


def _stage_config():
    return validate_config(
        {
            "study": {"name": "stages"},
            "data": {"cohort": "unused", "target": "diagnosis", "classes": ["a", "b"]},
            "model": {"name": "resnet18", "base_width": 4},
            "training": {"mode": "local", "batch_size": 2},
        }
    )


def _two_stage_epoch(context, steps: int, delay_s: float) -> dict:
    """One stage-parallel epoch on ``steps`` random batches, the last stage slowed down.

    Runs in a rank of :func:`run_ranks`; records when rank 0 starts each send and rank 1
    each receive, what :meth:`Learner.prepare` was given, and what rank 1 gathered to rank 0.
    """
    torch.manual_seed(0)
    learner = Learner(_stage_config(), num_outputs=2, device=torch.device("cpu"))
    pipeline = StagePipeline(learner, context, (2, 1, 16, 16, 16))
    record = {"sends": [], "receives": [], "prepared": [], "payload_devices": set()}

    # spies: this process is a throwaway rank, so the modules are patched in place
    send, receive, prepare = pipeline_module._send, pipeline_module._receive, learner.prepare
    step = learner.local_block_step
    gather = dist.gather_object

    def timed_send(*args):
        record["sends"].append(time.time())
        return send(*args)

    def timed_receive(*args):
        record["receives"].append(time.time())
        return receive(*args)

    def counted_prepare(images):
        record["prepared"].append(tuple(images.shape))
        return prepare(images)

    def slow_step(*args, **kwargs):
        time.sleep(delay_s)
        return step(*args, **kwargs)

    def spied_gather(payload, *args, **kwargs):
        record["payload_devices"] |= {t.device.type for t in _tensors(payload)}
        record["payload_optimizers"] = payload["optimizers"]
        return gather(payload, *args, **kwargs)

    pipeline_module._send, pipeline_module._receive = timed_send, timed_receive
    learner.prepare = counted_prepare
    dist.gather_object = spied_gather
    if context.rank == context.world_size - 1:
        learner.local_block_step = slow_step

    # one unreadable image replaced, in the first batch (ImageFolderDataset's "skipped")
    batches = [
        {
            "image": torch.randn(2, 1, 16, 16, 16),
            "label": torch.tensor([0, 1]),
            "skipped": torch.tensor([0, int(step == 0)]),
        }
        for step in range(steps)
    ]
    stats, global_step = pipeline.train_epoch(batches, fold=0, epoch=0, global_step=0)
    record["merged"] = pipeline.collect(stats)
    record["global_step"] = global_step
    record["mine"] = pipeline.mine
    record["optimizers"] = [_on_cpu(o.state_dict()) for o in learner.optimizers]

    # the epoch's end: every schedule advances, also those of the other stage's blocks
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipeline.end_epoch()
    record["end_epoch_warnings"] = [str(w.message) for w in caught]
    record["learning_rates"] = [o.param_groups[0]["lr"] for o in learner.optimizers]
    return record


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


@pytest.mark.slow
def test_a_stage_runs_at_most_two_batches_ahead_and_gathers_cpu_state():
    steps, delay_s = 6, 0.15
    first, last = run_ranks(_two_stage_epoch, 2, steps, delay_s)
    sends, receives = first["sends"], last["receives"]
    assert len(sends) == len(receives) == steps
    assert first["global_step"] == last["global_step"] == steps

    # bounded: batch t leaves only once batch t - 3 was taken (2 in flight, Note [sends in
    # flight]), so a fast stage holds at most two batches the next has not received
    for t in range(3, steps):
        assert sends[t] >= receives[t - 3], t
    # ...yet it still runs ahead: batch t is on its way before the next stage asks for t - 1
    for t in range(2, steps):
        assert sends[t] < receives[t - 1], t

    # rank 0, which reads the batches, counts the unreadable images they replaced
    assert first["merged"]["train/skipped_images"] == 1

    # every batch and every received activation went through Learner.prepare
    assert first["prepared"] == [(2, 1, 16, 16, 16)] * steps
    assert len(last["prepared"]) == steps and len(set(last["prepared"])) == 1
    assert last["prepared"][0][0] == 2

    # every rank advanced every block's schedule as sequential local mode does, without
    # torch's warning about the optimizers that another rank steps
    sequential = Learner(_stage_config(), num_outputs=2, device=torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it took no step
        sequential.end_epoch()
    expected = [o.param_groups[0]["lr"] for o in sequential.optimizers]
    assert expected[0] < _stage_config().optim.lr  # the cosine schedule moved
    for rank in (first, last):
        assert rank["end_epoch_warnings"] == []
        assert rank["learning_rates"] == pytest.approx(expected, rel=1e-12)

    # the gathered optimizer states travel on the CPU and arrive in rank 0's optimizers
    assert last["payload_devices"] == {"cpu"}
    for index in last["mine"]:
        sent = last["payload_optimizers"][index]
        received = first["optimizers"][index]
        assert sent["state"], index  # the block took steps
        for key, moments in sent["state"].items():
            for name, value in moments.items():
                torch.testing.assert_close(received["state"][key][name], value)


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
        assert "lr_scheduler.step()" not in finished.stderr  # every schedule, no warning
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
def test_a_killed_stage_parallel_study_resumes_to_the_same_metrics(
    tmp_path, demo_cohort, cache_dir
):
    sections = {
        "training": {
            "epochs": 3,
            "batch_size": 2,
            "mode": "local",
            "local": {"cut": "unit"},
        },
        "augmentation": {"enabled": False},
    }
    studies = {}
    for label, stage_parallel in (("reference", False), ("killed", True)):
        folder = tmp_path / label
        folder.mkdir()
        training = {**sections["training"], "stage_parallel": stage_parallel}
        studies[label] = tiny_config(
            folder, demo_cohort, cache_dir, name="pipe", **{**sections, "training": training}
        )
    # the uninterrupted reference: sequential local mode, which stage-parallel mode equals
    # (test_stage_parallel_equals_sequential_local_mode) and which costs one process
    subprocess.run(
        _single(studies["reference"]),
        env=_environment(),
        timeout=900,
        check=True,
        capture_output=True,
    )

    # the same study, killed (launcher and both stages) once fold 0's first epoch is saved
    process = subprocess.Popen(
        _torchrun(2, studies["killed"]), env=_environment(), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    study_dir = tmp_path / "killed" / "runs" / "pipe"
    last = study_dir / "fold-0" / "last.pt"
    deadline = time.monotonic() + 900
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the study finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert json.loads((study_dir / "study.json").read_text())["folds"]["0"]["status"] == "running"

    finished = subprocess.run(
        _torchrun(2, studies["killed"], "--resume"),
        env=_environment(),
        timeout=900,
        capture_output=True,
        text=True,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    for fold in (0, 1):
        expected = _fold_metrics(tmp_path / "reference" / "runs" / "pipe", fold)
        actual = _fold_metrics(study_dir, fold)
        assert actual.keys() == expected.keys()
        for key in expected:
            assert actual[key] == pytest.approx(expected[key], abs=1e-4, nan_ok=True), key

    # resumed, not restarted: every epoch in MLflow once, with the reference's values
    uri = lambda label: f"sqlite:///{tmp_path / label / 'mlflow.db'}"  # noqa: E731
    expected = _val_losses(uri("reference"), tmp_path / "reference" / "runs" / "pipe")
    actual = _val_losses(uri("killed"), study_dir)
    for fold in (0, 1):
        assert actual[fold] == pytest.approx(expected[fold], abs=1e-4), fold


@pytest.mark.slow
def test_stage_parallel_without_torchrun_fails_before_training(tmp_path, demo_cohort, cache_dir):
    sections = {"training": {"mode": "local", "stage_parallel": True}}
    config = tiny_config(tmp_path, demo_cohort, cache_dir, name="pipe", **sections)
    finished = subprocess.run(_single(config), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 2
    assert "training.stage_parallel needs one process per stage" in finished.stderr
    assert not (tmp_path / "runs" / "pipe").exists()
