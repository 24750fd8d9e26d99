"""ENN overhead: a full training step and fused inference of ENN vs plain, same architecture.

Both models come from the registry with the same seed and train with the same optimizer; the
ENN step adds the orthogonality penalty (weight 2e-4) to the loss. The variants are timed
round-robin in one process (the order rotating each repetition) so that machine noise hits
them alike, and each ratio is the median of the per-repetition ratios to the plain step.

Variants: ``plain``; ``enn`` (the default: penalty every step, the figure under
``train_step_ratio``); ``enn_no_penalty`` (the layers' own overhead); and controls, a copy
of the plain model timed as one more variant (``train_step_null_ratio``,
``inference_null_ratio``: how far two identical networks differ here, about 2% from where
their tensors lie). The cost of the lazy schedule (``scheduled_penalty(every=k)``) is
derived, not timed: one step in k pays the penalty, so its amortised step is
``no_penalty + (enn − no_penalty) / k``.

Usage:
    python benchmarks/enn_overhead.py --out benchmarks/results/enn_overhead.json
    python benchmarks/enn_overhead.py --quick   # fewer repetitions, for a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _report import emit  # benchmarks/_report.py, beside this script

from enn_neuro.enn import DEFAULT_ORTHO_WEIGHT, orthogonality_penalty, to_plain
from enn_neuro.models import create_model

logger = logging.getLogger("enn_overhead")

# (label, model name, spatial dims, input channels, side, batch, classes)
CONFIGS = [
    ("resnet18_3d_64", "resnet18", 3, 1, 64, 2, 2),
    ("resnet50_2d_224", "resnet50", 2, 3, 224, 8, 1000),
]
LAZY_INTERVALS = (4, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    parser.add_argument("--quick", action="store_true", help="3 repetitions, 1 warm-up")
    parser.add_argument("--only", choices=[c[0] for c in CONFIGS], help="run one config")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        args.repeats, args.warmup = 3, 1

    results = {}
    for label, name, dims, channels, side, batch, classes in CONFIGS:
        if args.only and label != args.only:
            continue
        logger.info("== %s: batch %d, %d threads", label, batch, torch.get_num_threads())
        results[label] = measure(name, dims, channels, side, batch, classes, args)
        logger.info(json.dumps(results[label], indent=2))

    report = {
        # the worse of the configurations, so that a target met here is met for each
        "train_step_ratio": max(r["train_step_ratio"] for r in results.values()),
        "fused_inference_ratio": max(r["fused_inference_ratio"] for r in results.values()),
        "configs": results,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
    }
    emit(report, args.out)


def measure(name, dims, channels, side, batch, classes, args) -> dict:
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
    steps = {
        "plain": _train_step(models["plain"], inputs, targets, penalty=False),
        "enn": _train_step(models["enn"], inputs, targets, penalty=True),
        "enn_no_penalty": _train_step(models["enn"], inputs, targets, penalty=False),
        # a control: the same plain network, elsewhere in memory (its ratio is the noise floor)
        "plain_copy": _train_step(copy.deepcopy(models["plain"]), inputs, targets, penalty=False),
    }

    # training step: round-robin, rotating order
    train = _interleaved(steps, args.repeats, args.warmup)
    enn_s, no_penalty_s = train["median_s"]["enn"], train["median_s"]["enn_no_penalty"]
    lazy = {
        f"every_{k}": (no_penalty_s + (enn_s - no_penalty_s) / k) / train["median_s"]["plain"]
        for k in LAZY_INTERVALS
    }

    # the penalty alone (forward + backward), on the ENN model
    def penalty_step() -> None:
        (DEFAULT_ORTHO_WEIGHT * orthogonality_penalty(models["enn"])).backward()

    penalty_times = _repeat(penalty_step, args.repeats, args.warmup)

    # fused inference: the ENN model fused back into plain layers vs a copy of the plain
    # model, both freshly allocated; the plain model itself runs as a control, since where a
    # model's tensors were allocated moved its median by about 2% (a null ratio, reported)
    fused = to_plain(models["enn"]).eval()
    plain = copy.deepcopy(models["plain"]).eval()
    original = models["plain"].eval()

    def infer(model):
        def run() -> None:
            with torch.inference_mode():
                model(inputs)

        return run

    inference = _interleaved(
        {"plain": infer(plain), "fused_enn": infer(fused), "plain_original": infer(original)},
        args.repeats,
        args.warmup,
    )
    return {
        "model": name,
        "spatial_dims": dims,
        "input_shape": list(inputs.shape),
        "train_step_ratio": train["median_ratio"]["enn"],
        "train_step_ratio_no_penalty": train["median_ratio"]["enn_no_penalty"],
        "train_step_null_ratio": train["median_ratio"]["plain_copy"],
        "train_step_ratio_lazy_penalty_derived": lazy,
        "train_step_s": train["median_s"],
        "train_step_ratios": train["ratios"],
        "penalty_s": statistics.median(penalty_times),
        "penalty_share_of_enn_step": statistics.median(penalty_times) / enn_s,
        "fused_inference_ratio": inference["median_ratio"]["fused_enn"],
        "inference_null_ratio": inference["median_ratio"]["plain_original"],
        "inference_s": inference["median_s"],
        "parameters": {layer: _count(model) for layer, model in models.items()},
        "repeats": args.repeats,
    }


def _train_step(model, inputs, targets, penalty: bool) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs), targets)
        if penalty:
            loss = loss + DEFAULT_ORTHO_WEIGHT * orthogonality_penalty(model)
        loss.backward()
        optimizer.step()

    return step


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
        "ratios": {name: [round(x, 4) for x in r] for name, r in ratios.items()},
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


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    main()
