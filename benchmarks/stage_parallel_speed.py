"""Throughput of stage-parallel local mode vs sequential local mode, and vs 2-process DDP bp.

Three ways to train the same 3D ENN ResNet-18 on the same global batch, each worker a
process with one thread (so that K workers use K cores, and the comparison is per core):

- ``sequential``: local mode in one process, the blocks updated one after another;
- ``stage_parallel``: local mode with one stage per process (K = 2 by default), the block
  groups balanced by measured per-block cost (``StagePipeline``), activations sent forward;
- ``ddp_bp``: backpropagation with DistributedDataParallel over 2 processes (gloo), each
  taking half of the global batch.

Each measurement runs in a fresh process tree; repetitions are interleaved across variants in
rotating order and the figures are medians. Throughput counts the samples of the timed steps
(after warm-up steps) over the wall time from the first rank's start to the last rank's end.
The stage-parallel run also reports the measured block costs, the groups chosen and each
stage's busy share (1 − time waiting for its input).

Usage:
    python benchmarks/stage_parallel_speed.py --out benchmarks/results/stage_parallel_speed.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _report import emit  # benchmarks/_report.py, beside this script

logger = logging.getLogger("stage_parallel_speed")

VARIANTS = ("sequential", "stage_parallel", "ddp_bp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--side", type=int, default=64, help="volume side, voxels")
    parser.add_argument("--batch", type=int, default=4, help="global batch")
    parser.add_argument("--base-width", type=int, default=32)
    parser.add_argument("--cut", default="unit", choices=["stage", "unit"])
    parser.add_argument("--stages", type=int, default=2, help="K: processes of the pipeline")
    parser.add_argument(
        "--steps",
        type=int,
        default=24,
        help="timed steps per run (an epoch: fill and drain of the pipeline weigh 1/steps)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs per variant")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.variant:
        _run_variant(args)
        return

    # interleaved repetitions, each in a fresh process tree
    runs = {variant: [] for variant in VARIANTS}
    for index in range(args.repeats):
        shift = index % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            result = _spawn(variant, args)
            logger.info("repeat %d %s: %.2f samples/s", index, variant, result["samples_per_s"])
            runs[variant].append(result)

    throughput = {v: statistics.median(r["samples_per_s"] for r in runs[v]) for v in VARIANTS}
    pipeline = runs["stage_parallel"][0]
    report = {
        "stage_parallel_speedup": throughput["stage_parallel"] / throughput["sequential"],
        "stage_parallel_over_ddp_bp": throughput["stage_parallel"] / throughput["ddp_bp"],
        "ddp_bp_speedup_over_sequential_local": throughput["ddp_bp"] / throughput["sequential"],
        "samples_per_s": throughput,
        "samples_per_s_runs": {
            v: [round(r["samples_per_s"], 3) for r in runs[v]] for v in VARIANTS
        },
        "block_costs_s": pipeline["block_costs_s"],
        "groups": pipeline["groups"],
        "group_cost_shares": pipeline["group_cost_shares"],
        "ideal_speedup_from_costs": 1 / max(pipeline["group_cost_shares"]),
        "stage_busy_share": statistics.median(
            min(r["stage_busy_share"]) for r in runs["stage_parallel"]
        ),
        "stage_busy_share_runs": [r["stage_busy_share"] for r in runs["stage_parallel"]],
        "config": {
            "model": "resnet18",
            "layer": "enn",
            "input_shape": [args.batch, 1, args.side, args.side, args.side],
            "base_width": args.base_width,
            "cut": args.cut,
            "stages": args.stages,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "threads_per_worker": 1,
        },
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
    }
    emit(report, args.out)


def _spawn(variant: str, args: argparse.Namespace) -> dict:
    """Runs one measurement in a fresh process (which starts its own workers)."""
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        command = [sys.executable, __file__, "--variant", variant, "--result", str(result)]
        for name in ("side", "batch", "base_width", "cut", "stages", "steps", "warmup"):
            command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        subprocess.run(command, check=True, env=environment, timeout=1800)
        return json.loads(result.read_text())


def _run_variant(args: argparse.Namespace) -> None:
    if args.variant == "sequential":
        result = _worker(0, 1, args, None)
    else:
        world = args.stages if args.variant == "stage_parallel" else 2
        port = _free_port()
        with tempfile.TemporaryDirectory() as folder:
            torch.multiprocessing.spawn(
                _worker, args=(world, args, (port, folder)), nprocs=world, join=True
            )
            result = json.loads((Path(folder) / "rank0.json").read_text())
    args.result.write_text(json.dumps(result))


def _worker(rank: int, world: int, args: argparse.Namespace, rendezvous) -> dict:
    """One process of a variant: builds the learner, runs warm-up and timed steps."""
    torch.set_num_threads(1)
    from enn_neuro.training.distributed import distributed_session

    # the process group (multi-process variants), left before the process exits
    if world > 1:
        port, folder = rendezvous
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
        )
    with distributed_session("cpu") as (context, device):
        result = _measure(args, context, device)
    if world > 1 and context.is_main:
        (Path(rendezvous[1]) / "rank0.json").write_text(json.dumps(result))
    return result


def _measure(args: argparse.Namespace, context, device: torch.device) -> dict:
    """Warm-up and timed steps of one variant on this rank; its figures."""
    from enn_neuro.config import validate_config
    from enn_neuro.training.distributed import DistributedContext
    from enn_neuro.training.learner import Learner
    from enn_neuro.training.loop import train_one_epoch
    from enn_neuro.training.pipeline import StagePipeline

    world = context.world_size

    # the learner: same model, optimizer and penalty in every variant
    mode = "bp" if args.variant == "ddp_bp" else "local"
    config = validate_config(
        {
            "study": {"name": "speed"},
            "data": {"cohort": ".", "target": "y"},
            "model": {"name": "resnet18", "base_width": args.base_width},
            "training": {"mode": mode, "batch_size": args.batch, "local": {"cut": args.cut}},
        }
    )
    torch.manual_seed(0)
    ddp = args.variant == "ddp_bp"
    learner = Learner(config, 2, device, context=context if ddp else DistributedContext())
    per_rank = args.batch // world if ddp else args.batch
    shape = (per_rank, 1, args.side, args.side, args.side)
    pipeline = StagePipeline(learner, context, shape) if args.variant == "stage_parallel" else None
    loader = _SyntheticLoader(shape, args.warmup + args.steps)

    # warm-up, then the timed steps (as one epoch)
    def run(steps: int) -> dict:
        loader.length = steps
        context.barrier()
        start = time.perf_counter()
        if pipeline is None:
            stats, _ = train_one_epoch(learner, loader, 0, 0, 0)
        else:
            stats, _ = pipeline.train_epoch(loader, 0, 0, 0)
        context.barrier()
        stats["wall_s"] = time.perf_counter() - start
        return stats

    run(args.warmup)
    stats = run(args.steps)
    result = {"samples_per_s": args.steps * args.batch / stats["wall_s"], "wall_s": stats["wall_s"]}
    if pipeline is not None:
        busy = context.all_gather(stats[f"train/stage{context.rank}_busy_share"])
        result.update(stage_busy_share=busy)
    if pipeline is not None and context.is_main:
        total = sum(pipeline.costs)
        result.update(
            block_costs_s=[round(c, 5) for c in pipeline.costs],
            groups=pipeline.groups,
            group_cost_shares=[sum(pipeline.costs[i] for i in g) / total for g in pipeline.groups],
        )
    return result


class _SyntheticLoader:
    """Batches of random volumes and labels, as a DataLoader would yield them."""

    def __init__(self, shape, length: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.batch = {
            "image": torch.randn(*shape, generator=generator),  # (B, 1, D, H, W)
            "label": torch.randint(0, 2, (shape[0],), generator=generator),
        }
        self.length = length

    def __iter__(self):
        return iter([self.batch] * self.length)

    def __len__(self) -> int:
        return self.length


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    main()
