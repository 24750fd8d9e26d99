"""Peak training memory of local mode (ENN-ℓ) vs backpropagation, for the 3D ENN ResNet-18.

In local mode the blocks are trained one after another, each on the previous block's output
detached, so only one block's autograd graph is alive at a time; the claim to check is that
this cuts the peak memory of a training step well below that of bp. The variants, each
trained with AdamW (lr 1e-3, weight decay 1e-4 on all but Q and P), gradient clipping at
1.0 and the orthogonality penalty (weight 2e-4), as the project's defaults:

- ``bp``: one optimizer over the model, loss = cross-entropy + penalty.
- ``checkpoint``: bp with activation checkpointing (``torch.utils.checkpoint``,
  ``use_reentrant=False``) around each segment of the cut (the blocks' bodies: one per
  residual stage for ``--cut stage``, the stem joined to the first; one per unit for
  ``--cut unit``), the usual way to trade compute for memory.
- ``local``: the loop of ``Learner.local_block_step`` (``enn_neuro/training/learner.py``),
  rewritten here without a ``Config``: per block, forward on the detached input, its head's
  loss plus its own penalty, backward, clip, step, and its gradients set to ``None`` right
  after the step, as the learner does, so no gradient outlives its block's step.
- ``local_keep_grads``: the same, but a block's gradients live until its next ``zero_grad``,
  i.e. through the other blocks' steps (what the learner did before; kept to show the cost).
- ``blocks``: each block trained alone (its input computed beforehand, under ``no_grad``),
  with its own baseline; the largest of these peaks is the lower bound of any sequential
  local schedule with this cut (reported as ``largest_block``).

Measurement. Each repetition of a variant runs in a fresh subprocess (this script with the
hidden ``--variant``), repetitions interleaved across variants in rotating order; the figures
are medians over repetitions. A child builds the model and optimizer (seed 0), runs one
warm-up step (optimizer state allocated, code paths loaded), sets every gradient to ``None``,
collects garbage and trims the heap; what is resident then (parameters, optimizer state,
input, runtime) is the baseline. The peak is the highest memory during the measured steps
minus that baseline: gradients, activations, the penalty's Gram matrices and rebuilt
weights, and workspace.

- CPU: anonymous resident memory (``resident − shared`` of ``/proc/self/statm``, which
  leaves out file-backed pages such as shared libraries) sampled every ~1 ms by a thread
  (the interpreter's switch interval lowered to 1 ms so it is not starved). Children run
  with ``MALLOC_MMAP_THRESHOLD_=65536`` (a fixed threshold: every block of 64 KiB or more is
  mmapped, and unmapped when freed, so resident memory follows live tensors; glibc's dynamic
  threshold would otherwise serve large tensors from the heap and keep them after ``free``),
  ``MALLOC_TRIM_THRESHOLD_=0`` (return the top of the heap at once), ``MALLOC_ARENA_MAX=2``,
  and one thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``): fewer per-thread
  buffers, less interference on a shared machine. Times are logged but not meant as figures.
- CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at the baseline,
  reset per block for the per-block peaks; exact, and the caching allocator's reserve is
  left out. fp32 on both devices (the learner's autocast on CUDA is not used here).

Usage:
    python benchmarks/memory_local_vs_bp.py --out benchmarks/results/memory_local_vs_bp.json
    python benchmarks/memory_local_vs_bp.py --side 64 --repeats 1   # a quick run
    python benchmarks/memory_local_vs_bp.py --cut unit --device cuda
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _report import emit  # benchmarks/_report.py, beside this script
from torch import nn
from torch.utils.checkpoint import checkpoint

from enn_neuro.enn import DEFAULT_ORTHO_WEIGHT, orthogonality_penalty, weight_decay_groups
from enn_neuro.models import create_model, cut_points, split_model

logger = logging.getLogger("memory_local_vs_bp")

VARIANTS = ("bp", "checkpoint", "local", "local_keep_grads", "blocks")
MODEL = "resnet18"
CLASSES = 2
GRAD_CLIP = 1.0
MIB = 2**20
# glibc settings for the children; see the module docstring
CHILD_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_TRIM_THRESHOLD_": "0",
    "MALLOC_ARENA_MAX": "2",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--cut",
        default="stage",
        help="block cut: 'stage', 'unit', or unit indices where blocks start, e.g. 0,1,3,5,7",
    )
    parser.add_argument("--side", type=int, default=96, help="input side (voxels)")
    parser.add_argument("--batch", type=int, default=2, help="batch size")
    parser.add_argument("--base-width", type=int, default=64, help="channels of stage 1")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per variant")
    parser.add_argument("--steps", type=int, default=2, help="measured steps per process")
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda", "auto"],
        default="auto",
        help="auto: the CPU, and CUDA as well when present (its figures under the key 'cuda')",
    )
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device is 'cuda' but CUDA is not available")
    if args.steps < 2:
        # the second step is the first to see the gradients a local block keeps across steps
        raise ValueError(f"--steps must be at least 2, got {args.steps}")

    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    # the CPU figures are the top level; a GPU's, when measured too, sit under "cuda"
    if args.device == "auto":
        args.device = "cpu"
        report = run_all(args)
        if torch.cuda.is_available():
            report["cuda"] = run_all(argparse.Namespace(**{**vars(args), "device": "cuda"}))
    else:
        report = run_all(args)
    emit(report, args.out)


def run_all(args: argparse.Namespace) -> dict:
    """Runs every variant ``repeats`` times, each in a fresh process, and summarises."""
    start = time.perf_counter()
    runs = {variant: [] for variant in VARIANTS}

    # repetitions interleaved across variants, the order rotating
    for index in range(args.repeats):
        shift = index % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            result = _spawn(variant, args)
            runs[variant].append(result)
            logger.info(
                "repeat %d %-16s peak %8.1f MiB  (baseline %.1f MiB, %.1f s/step)",
                index + 1,
                variant,
                result["peak_mib"],
                result["baseline_mib"],
                result["step_s"],
            )

    # medians; the largest block is the one whose median peak alone is highest
    peaks = {v: statistics.median(r["peak_mib"] for r in runs[v]) for v in VARIANTS}
    first = runs["blocks"][0]
    num_blocks = len(first["blocks"])
    alone = [
        statistics.median(r["blocks"][k]["peak_mib"] for r in runs["blocks"])
        for k in range(num_blocks)
    ]
    in_local = {
        variant: [
            statistics.median(r["phase_peak_mib"][str(k)] for r in runs[variant])
            for k in range(num_blocks)
        ]
        for variant in ("local", "local_keep_grads")
    }
    largest = max(range(num_blocks), key=alone.__getitem__)
    peaks["largest_block"] = alone[largest]
    del peaks["blocks"]
    state_mib = {v: runs[v][0]["state_mib"] for v in ("bp", "local")}
    return {
        "local_over_bp_peak_memory": peaks["local"] / peaks["bp"],
        "checkpointing_over_bp_peak_memory": peaks["checkpoint"] / peaks["bp"],
        "largest_block_over_bp_peak_memory": peaks["largest_block"] / peaks["bp"],
        "local_keep_grads_over_bp_peak_memory": peaks["local_keep_grads"] / peaks["bp"],
        # with what stays resident between steps (parameters and AdamW's two moments)
        "local_over_bp_with_state": (peaks["local"] + state_mib["local"])
        / (peaks["bp"] + state_mib["bp"]),
        "peak_mib": peaks,
        "peak_mib_runs": {v: [round(r["peak_mib"], 1) for r in runs[v]] for v in VARIANTS},
        "baseline_mib": {
            v: statistics.median(r["baseline_mib"] for r in runs[v]) for v in VARIANTS
        },
        "state_mib": state_mib,
        "largest_block": {"index": largest, "units": first["blocks"][largest]["units"]},
        "blocks": [
            {
                "index": k,
                "units": first["blocks"][k]["units"],
                "parameters": first["blocks"][k]["parameters"],
                "input_shape": first["blocks"][k]["input_shape"],
                "alone_peak_mib": alone[k],
                "in_local_peak_mib": in_local["local"][k],
                "in_local_keep_grads_peak_mib": in_local["local_keep_grads"][k],
            }
            for k in range(num_blocks)
        ],
        "step_s_median": {v: statistics.median(r["step_s"] for r in runs[v]) for v in VARIANTS},
        "model": MODEL,
        "layer": "enn",
        "cut": args.cut,
        "input_shape": [args.batch, 1, args.side, args.side, args.side],
        "batch": args.batch,
        "base_width": args.base_width,
        "classes": CLASSES,
        "optimizer": "AdamW(lr=1e-3, weight_decay=1e-4, none on Q and P)",
        "grad_clip": GRAD_CLIP,
        "ortho_weight": DEFAULT_ORTHO_WEIGHT,
        "device": args.device,
        "dtype": "float32",
        "measured_steps": args.steps,
        "repeats": args.repeats,
        "method": (
            "peak during measured steps minus baseline after warm-up with gradients freed; "
            + (
                "CPU: anonymous RSS sampled every ~1 ms, fresh process per run"
                if args.device == "cpu"
                else "CUDA: max_memory_allocated"
            )
        ),
        "child_env": CHILD_ENV,
        "torch": torch.__version__,
        "threads": first["threads"],
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "wall_s": time.perf_counter() - start,
    }


def run_variant(args: argparse.Namespace) -> dict:
    """In a child process: builds the model, trains one variant and measures its peak."""
    torch.set_num_threads(1)
    sys.setswitchinterval(1e-3)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(
        MODEL,
        spatial_dims=3,
        in_channels=1,
        num_classes=CLASSES,
        layer="enn",
        base_width=args.base_width,
    ).to(device)
    model.train()
    shape = (args.batch, 1, args.side, args.side, args.side)
    images = torch.randn(shape, device=device)  # (B, 1, D, H, W)
    targets = torch.arange(args.batch, device=device) % CLASSES  # (B,)
    meter = _CudaMeter() if device.type == "cuda" else _RssMeter()

    # the blocks, each trained alone from its precomputed input, each with its own baseline
    if args.variant == "blocks":
        blocks = split_model(model, _parse_cut(args.cut)).to(device)
        optimizers = [_optimizer(block) for block in blocks]
        features, results = images, []
        for block, optimizer in zip(blocks, optimizers, strict=True):
            block_input = features
            step = _local_step([block], [optimizer], block_input, targets, free_grads=False)
            result = _measure(step, [block], [optimizer], meter, args.steps)
            with torch.no_grad():
                features, _ = block(block_input)
            result["units"] = block.unit_names
            result["parameters"] = sum(p.numel() for p in block.parameters())
            result["input_shape"] = list(block_input.shape)
            results.append(result)
        return {
            "peak_mib": max(r["peak_mib"] for r in results),
            "baseline_mib": results[0]["baseline_mib"],
            "step_s": sum(r["step_s"] for r in results),
            "blocks": results,
            "threads": torch.get_num_threads(),
        }

    # one step of the variant
    if args.variant in ("local", "local_keep_grads"):
        modules = list(split_model(model, _parse_cut(args.cut)).to(device))
        optimizers = [_optimizer(block) for block in modules]
        step = _local_step(modules, optimizers, images, targets, args.variant == "local")
    else:
        modules, optimizers = [model], [_optimizer(model)]
        segments = _segments(model, _parse_cut(args.cut)) if args.variant == "checkpoint" else None
        step = _bp_step(model, optimizers[0], images, targets, segments)

    result = _measure(step, modules, optimizers, meter, args.steps)
    result["threads"] = torch.get_num_threads()
    return result


def _measure(step, modules, optimizers, meter, steps: int) -> dict:
    """Warm-up, baseline with gradients freed, then the peak over ``steps`` measured steps."""
    # warm-up: optimizer state, code paths, oneDNN primitives
    step(meter)
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    state_bytes = _state_bytes(modules, optimizers)

    # baseline, then the measured steps
    baseline = meter.baseline()
    start = time.perf_counter()
    meter.start()
    for _ in range(steps):
        step(meter)
    phase_peaks = meter.stop()
    step_s = (time.perf_counter() - start) / steps
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    return {
        "peak_mib": (max(phase_peaks.values()) - baseline) / MIB,
        "phase_peak_mib": {k: (v - baseline) / MIB for k, v in phase_peaks.items()},
        "baseline_mib": baseline / MIB,
        "state_mib": state_bytes / MIB,
        "step_s": step_s,
    }


def _bp_step(model, optimizer, images, targets, segments) -> Callable:
    """One bp step; with ``segments``, each segment's activations are recomputed in backward."""

    def step(meter) -> None:
        meter.phase("0")
        optimizer.zero_grad(set_to_none=True)

        # forward, checkpointed segment by segment if asked
        if segments is None:
            logits = model(images)  # (B, classes)
        else:
            features = images
            for segment in segments:
                features = checkpoint(segment, features, use_reentrant=False)
            logits = model.classifier(features)  # (B, classes)

        # loss, backward, step
        loss = F.cross_entropy(logits, targets)
        loss = loss + DEFAULT_ORTHO_WEIGHT * orthogonality_penalty(model)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()

    return step


def _local_step(blocks, optimizers, images, targets, free_grads: bool) -> Callable:
    """One local step over ``blocks`` in order, as ``Learner._local_step`` does it."""

    def step(meter) -> None:
        features = images
        for index, (block, optimizer) in enumerate(zip(blocks, optimizers, strict=True)):
            meter.phase(str(index))
            # the previous block's graph was freed by its own backward pass
            block_input = features.detach()
            optimizer.zero_grad(set_to_none=True)
            features, logits = block(block_input)  # (B, C_k, *S_k), (B, classes)
            loss = F.cross_entropy(logits, targets)
            loss = loss + DEFAULT_ORTHO_WEIGHT * orthogonality_penalty(block)
            loss.backward()
            nn.utils.clip_grad_norm_(block.parameters(), GRAD_CLIP)
            optimizer.step()
            if free_grads:
                optimizer.zero_grad(set_to_none=True)

    return step


def _parse_cut(text: str) -> str | list[int]:
    """``"stage"``, ``"unit"``, or ``"0,1,3"`` → ``[0, 1, 3]`` (unit indices starting blocks)."""
    return text if text in ("stage", "unit") else [int(part) for part in text.split(",")]


def _segments(model: nn.Module, cut: str | list[int]) -> list[nn.Sequential]:
    """The bodies of the local blocks of ``cut``: the checkpointed segments of bp."""
    units = model.units()
    starts = cut_points(model, cut)
    ends = [*starts[1:], len(units) - 1]  # the classifier stays outside
    return [
        nn.Sequential(*[u.module for u in units[s:e]]) for s, e in zip(starts, ends, strict=True)
    ]


def _optimizer(module: nn.Module) -> torch.optim.Optimizer:
    # as the learner builds it: Q and P are not decayed
    return torch.optim.AdamW(weight_decay_groups(module, 1e-4), lr=1e-3)


def _state_bytes(modules, optimizers) -> int:
    """Parameters and optimizer state: what stays resident between steps."""
    parameters = {id(p): p for m in modules for p in m.parameters()}
    total = sum(p.numel() * p.element_size() for p in parameters.values())
    for optimizer in optimizers:
        for state in optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


class _RssMeter:
    """Anonymous resident memory of this process, sampled by a thread every ~1 ms.

    ``phase(key)`` attributes the samples that follow to ``key`` (a block index), so one run
    gives the peak of every block's step.
    """

    def __init__(self) -> None:
        self._fd = os.open("/proc/self/statm", os.O_RDONLY)
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._libc = _libc()
        self._running = False
        self._thread: threading.Thread | None = None
        self.key = "0"
        self.peaks: dict[str, int] = {}

    def read(self) -> int:
        """``resident − shared`` in bytes: anonymous pages, not shared libraries."""
        fields = os.pread(self._fd, 128, 0).split()
        return (int(fields[1]) - int(fields[2])) * self._page

    def baseline(self) -> int:
        gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)
        return self.read()

    def start(self) -> None:
        self.peaks = {}
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def phase(self, key: str) -> None:
        self._record()
        self.key = key
        self._record()

    def stop(self) -> dict[str, int]:
        self._running = False
        if self._thread is not None:
            self._thread.join()
        self._record()
        return self.peaks

    def _sample(self) -> None:
        while self._running:
            self._record()
            time.sleep(1e-3)

    def _record(self) -> None:
        if not self._running:
            return
        key, value = self.key, self.read()
        if value > self.peaks.get(key, 0):
            self.peaks[key] = value


class _CudaMeter:
    """``torch.cuda.max_memory_allocated``, reset at every phase for per-block peaks."""

    def __init__(self) -> None:
        self.key = "0"
        self.peaks: dict[str, int] = {}
        self._running = False

    def baseline(self) -> int:
        gc.collect()
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    def start(self) -> None:
        self.peaks, self._running = {}, True
        torch.cuda.reset_peak_memory_stats()

    def phase(self, key: str) -> None:
        self._record()
        self.key = key
        torch.cuda.reset_peak_memory_stats()

    def stop(self) -> dict[str, int]:
        self._record()
        self._running = False
        return self.peaks

    def _record(self) -> None:
        if not self._running:
            return
        torch.cuda.synchronize()
        value = torch.cuda.max_memory_allocated()
        self.peaks[self.key] = max(self.peaks.get(self.key, 0), value)


def _spawn(variant: str, args: argparse.Namespace) -> dict:
    """Runs one variant in a fresh interpreter and returns its JSON result."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--variant",
        variant,
        "--cut",
        args.cut,
        "--side",
        str(args.side),
        "--batch",
        str(args.batch),
        "--base-width",
        str(args.base_width),
        "--steps",
        str(args.steps),
        "--device",
        args.device,
    ]
    env = {**os.environ, **CHILD_ENV}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(
            f"variant {variant!r} failed with exit code {completed.returncode}:\n{completed.stderr}"
        )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _libc():
    """glibc, for ``malloc_trim``; ``None`` elsewhere."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


if __name__ == "__main__":
    main()
