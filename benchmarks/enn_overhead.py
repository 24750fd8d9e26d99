"""ENN overhead: a training step and fused inference of ENN vs plain, same architecture.

Both models come from the registry with the same seed and train with the same optimizer
(SGD, momentum 0.9). The ENN model trains on the penalty schedule the pipeline uses
(``scheduled_penalty``; by default the penalty on one step in k = 16 with weight × 16, see
``Note [lazy penalty]`` in ``enn_neuro/enn/penalty.py``), so its steps are of two kinds,
each timed as a variant of its own:

- ``enn_no_penalty``: a step that skips the penalty (k − 1 steps in k);
- ``enn_penalty_step``: a step that evaluates it (forward and backward of the penalty).

With ``plain`` and a control (``plain_copy``: the same plain network, elsewhere in memory;
its ratio is the noise floor) they are timed round-robin in one process, the order rotating
each repetition, so that machine noise hits them alike. Each repetition gives ratios to its
plain step; ``train_step_ratio`` is the median over repetitions of the amortised ratio
``(penalty step + (k − 1) steps without) / (k · plain step)``, the cost per step of training
as the pipeline does it. ``train_step_ratio_every_step`` is the median ratio of the penalty
step alone: the exact penalty on every step (``ortho_every: 1``).

The process keeps freed memory for reuse, as the training command does
(``enn_neuro/runtime.py``; ``ENN_NEURO_MALLOC=system`` leaves glibc's allocator as it is).
Inference compares the ENN model fused into plain layers (``to_plain``) with a copy of the
plain model, both freshly allocated, with the original plain model as a control.

Configurations: a 3D ResNet-18 on 64³ volumes with batch 2, and a 2D ResNet-50 on 224²
images with batch 32, the per-device batch of the ImageNet configs (256 over 8 GPUs).
Also reported: parameter counts, the penalty's time alone, and multiply-adds: of the weight
layers in one training step (three times the forward's), the least that the ENN layers add to
them (each on its cheaper forward path), and the penalty's (two ``fan_in · r²`` products per
factor, forward and backward), which bound the ratios from below.

Usage:
    python benchmarks/enn_overhead.py --out benchmarks/results/enn_overhead.json
    python benchmarks/enn_overhead.py --quick   # fewer repetitions, for a smoke run
    python benchmarks/enn_overhead.py --only resnet18_3d_64 --repeats 41
    python benchmarks/enn_overhead.py --only resnet50_2d_224 --batch 8
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _report import emit  # benchmarks/_report.py, beside this script

from enn_neuro.enn import (
    DEFAULT_ORTHO_EVERY,
    DEFAULT_ORTHO_WEIGHT,
    enn_layers,
    orthogonality_penalty,
    scheduled_penalty,
    to_plain,
)
from enn_neuro.models import create_model
from enn_neuro.runtime import retain_freed_memory

logger = logging.getLogger("enn_overhead")

# (label, model name, spatial dims, input channels, side, batch, classes, repetitions)
CONFIGS = [
    ("resnet18_3d_64", "resnet18", 3, 1, 64, 2, 2, 41),
    ("resnet50_2d_224", "resnet50", 2, 3, 224, 32, 1000, 21),
]
TARGETS = {"train_step_ratio": 1.05, "fused_inference_ratio": 1.01}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--repeats", type=int, help="timed repetitions per variant (default: per config)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--every", type=int, default=DEFAULT_ORTHO_EVERY, help="penalty interval")
    parser.add_argument("--quick", action="store_true", help="3 repetitions, 1 warm-up")
    parser.add_argument("--only", choices=[c[0] for c in CONFIGS], help="run one config")
    parser.add_argument("--batch", type=int, help="batch of every config run (with --only)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # as the training command does: without it a third of a step's CPU time went to page
    # faults here, and step times varied by ±10% (enn_neuro/runtime.py)
    allocator_tuned = retain_freed_memory()
    if args.quick:
        args.repeats, args.warmup = 3, 1

    results = {}
    for label, name, dims, channels, side, batch, classes, repeats in CONFIGS:
        if args.only and label != args.only:
            continue
        repeats = args.repeats or repeats
        batch = args.batch or batch
        logger.info(
            "== %s: batch %d, %d threads, %d repeats",
            label,
            batch,
            torch.get_num_threads(),
            repeats,
        )
        results[label] = measure(name, dims, channels, side, batch, classes, repeats, args)
        logger.info("%s: %s", label, {k: v for k, v in results[label].items() if "ratio" in k})

    worst = {  # the worse of the configurations, so that a target met here is met for each
        key: max(r[key] for r in results.values())
        for key in ("train_step_ratio", "train_step_ratio_every_step", "fused_inference_ratio")
    }
    report = {
        **worst,
        "targets": TARGETS,
        "ortho_every": args.every,
        "allocator_retains_freed_memory": allocator_tuned,
        "configs": results,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
    }
    emit(report, args.out)


def measure(name, dims, channels, side, batch, classes, repeats, args) -> dict:
    """Times training steps, the penalty alone, and fused inference for one configuration."""
    torch.manual_seed(0)
    inputs = torch.randn(batch, channels, *[side] * dims)  # (B, C, *S)
    targets = torch.randint(0, classes, (batch,))
    models = {}
    for layer in ("plain", "enn"):
        torch.manual_seed(0)
        models[layer] = create_model(
            name, spatial_dims=dims, in_channels=channels, num_classes=classes, layer=layer
        )
    macs = _multiply_adds(models["enn"], inputs)

    # training steps: round-robin, rotating order; the ENN model steps at the schedule's
    # two kinds of step (the step index selects the kind, as in the training loop)
    every = args.every
    steps = {
        "plain": _train_step(models["plain"], inputs, targets),
        "enn_no_penalty": _train_step(models["enn"], inputs, targets, every, step=0),
        "enn_penalty_step": _train_step(models["enn"], inputs, targets, every, step=every - 1),
        "plain_copy": _train_step(copy.deepcopy(models["plain"]), inputs, targets),
    }
    train = _interleaved(steps, repeats, args.warmup)
    ratios = train["ratios"]
    amortised = [
        (with_penalty + (every - 1) * without) / every
        for with_penalty, without in zip(
            ratios["enn_penalty_step"], ratios["enn_no_penalty"], strict=True
        )
    ]

    # the penalty alone (forward + backward), on the ENN model
    def penalty_step() -> None:
        (DEFAULT_ORTHO_WEIGHT * orthogonality_penalty(models["enn"])).backward()

    penalty_times = _repeat(penalty_step, repeats, args.warmup)

    # fused inference: the ENN model fused back into plain layers vs a copy of the plain
    # model, both freshly allocated; the plain model itself runs as a control, since where a
    # model's tensors were allocated moves its median by a few per cent (a null ratio)
    fused = to_plain(models["enn"]).eval()
    plain = copy.deepcopy(models["plain"]).eval()
    original = models["plain"].eval()

    def infer(model):
        def run() -> None:
            with torch.inference_mode():
                model(inputs)

        return run

    # an inference pass is a third of a training step: three times the repetitions
    inference = _interleaved(
        {"plain": infer(plain), "fused_enn": infer(fused), "plain_original": infer(original)},
        3 * repeats,
        args.warmup,
    )
    medians = train["median_s"]
    return {
        "model": name,
        "spatial_dims": dims,
        "input_shape": list(inputs.shape),
        "train_step_ratio": statistics.median(amortised),
        "train_step_ratio_every_step": statistics.median(ratios["enn_penalty_step"]),
        "train_step_ratio_no_penalty": statistics.median(ratios["enn_no_penalty"]),
        "train_step_null_ratio": statistics.median(ratios["plain_copy"]),
        "train_step_s": medians,
        "train_step_ratios": {k: [round(x, 4) for x in v] for k, v in ratios.items()},
        "penalty_s": statistics.median(penalty_times),
        "penalty_share_of_plain_step": statistics.median(penalty_times) / medians["plain"],
        "multiply_adds": macs,
        "fused_inference_ratio": inference["median_ratio"]["fused_enn"],
        "inference_null_ratio": inference["median_ratio"]["plain_original"],
        "inference_s": inference["median_s"],
        "inference_ratios": {k: [round(x, 4) for x in v] for k, v in inference["ratios"].items()},
        "parameters": {layer: _count(model) for layer, model in models.items()},
        "repeats": repeats,
    }


def _train_step(model, inputs, targets, every: int = 1, step: int | None = None) -> Callable:
    """One SGD step; with ``step`` set, the ENN penalty as the schedule has it at that step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def run() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs), targets)
        if step is not None:
            penalty = scheduled_penalty(model, step, DEFAULT_ORTHO_WEIGHT, every)
            if penalty is not None:
                loss = loss + penalty
        loss.backward()
        optimizer.step()

    return run


def _interleaved(runs: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict:
    """Times ``runs`` round-robin; the first entry is the baseline of the ratios."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    times = {name: [] for name in names}
    for index in range(repeats):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    baseline = names[0]
    ratios = {
        name: [t / b for t, b in zip(times[name], times[baseline], strict=True)]
        for name in names[1:]
    }
    return {
        "median_ratio": {name: statistics.median(r) for name, r in ratios.items()},
        "median_s": {name: statistics.median(t) for name, t in times.items()},
        "ratios": ratios,
    }


def _repeat(run, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def _multiply_adds(model, inputs) -> dict:
    """Multiply-adds of a step's weight layers, the least ENN adds to them, and the penalty's.

    Counted from the output sizes of one forward pass. A layer's forward costs
    ``out · fan_in`` per output position and its backward twice that. The ENN layer adds, on
    its cheaper path (``Note [forward paths]`` in ``enn_neuro/enn/layers.py``), the rebuilding
    of W and the two products of its backward (``3 · out · fan_in · r``) or, factored,
    ``3 · (r · fan_in + out · r − out · fan_in)`` per position. The penalty costs
    ``2 · fan_in · r²`` for P and ``2 · out · r²`` for Q.
    """
    layers = dict(enn_layers(model))
    positions = {}
    hooks = [
        layer.register_forward_hook(
            lambda module, args, output, name=name: positions.__setitem__(
                name, output.numel() // output.shape[1]
            )
        )
        for name, layer in layers.items()
    ]
    with torch.no_grad():
        model(inputs)
    for hook in hooks:
        hook.remove()
    train = layers_extra = 0
    for name, count in positions.items():
        out, fan_in, r = layers[name].out_channels, layers[name].fan_in, layers[name].rank
        train += 3 * out * fan_in * count
        dense = 3 * out * fan_in * r
        factored = 3 * count * (r * fan_in + out * r - out * fan_in)
        layers_extra += dense if layers[name].groups != 1 else min(dense, factored)
    penalty = sum(
        2 * (layer.fan_in + layer.out_channels) * layer.rank**2 for layer in layers.values()
    )
    return {
        "train_step": train,
        "enn_layers_least_extra": layers_extra,
        "enn_layers_least_extra_over_train_step": layers_extra / train,
        "penalty": penalty,
        "penalty_over_train_step": penalty / train,
    }


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    main()
