"""The orthogonality penalty's schedule: every step, every k steps, or none, on the demo study.

Each variant is the full demo study (``enn-neuro demo``: the synthetic 100-subject cohort, a
3D ENN ResNet-18 trained with AdamW, 5-fold subject-level cross-validation) run through the
library with one training value changed: ``ortho_every`` (1, 16, 64) or ``ortho_weight``
(0, the unpenalised control). For each seed the cohort, splits and everything else are
shared, so the variants differ in the penalty's schedule alone. Reported per variant: the
test metrics over every fold of every seed (mean, standard deviation; the study seed sets
the splits and the training draws), the largest factor drift ``‖QᵀQ − I‖_F`` or
``‖PᵀP − I‖_F`` over the layers at the end of each epoch (MLflow's ``ortho/drift_max``,
averaged over the folds and seeds), its peak and final value, and the wall time per study.

This is the evidence behind the default ``training.ortho_every`` (``Note [lazy penalty]``
in ``enn_neuro/enn/penalty.py``): a lazy schedule is acceptable where its drift and metrics
stay those of the every-step penalty.

Usage:
    python benchmarks/penalty_schedule.py --out benchmarks/results/penalty_schedule.json
    python benchmarks/penalty_schedule.py --seeds 0 --folds 0 --variants every_1 every_16
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import torch
from _report import emit  # benchmarks/_report.py, beside this script

from enn_neuro.config import load_config
from enn_neuro.data.demo import write_demo_cohort
from enn_neuro.training.study import run_study

logger = logging.getLogger("penalty_schedule")

# name → training overrides
VARIANTS = {
    "every_1": ["training.ortho_every=1"],
    "every_16": ["training.ortho_every=16"],
    "every_64": ["training.ortho_every=64"],
    "no_penalty": ["training.ortho_weight=0.0"],
}
METRICS = ("balanced_accuracy", "roc_auc", "loss")
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="study seeds (splits and runs)"
    )
    parser.add_argument("--folds", type=int, nargs="+", help="only these folds (default: all)")
    parser.add_argument("--subjects", type=int, default=100)
    parser.add_argument("--effect-size", type=float, default=2.5, help="as `enn-neuro demo`")
    parser.add_argument("--workdir", type=Path, help="keep cohort, runs and mlflow.db here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("enn_neuro", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    with tempfile.TemporaryDirectory() as folder:
        workdir = args.workdir or Path(folder)
        cohort = workdir / "cohort"
        if not (cohort / "participants.tsv").exists():
            write_demo_cohort(
                cohort, n_subjects=args.subjects, seed=0, effect_size=args.effect_size
            )
        tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
        # seeds outermost, variants inside: a change of machine load hits every variant alike
        runs: dict[str, list[dict]] = {name: [] for name in args.variants}
        for seed in args.seeds:
            for name in args.variants:
                run = _run_study(name, seed, workdir, tracking_uri, args.folds)
                logger.info("%s, seed %d: %s", name, seed, run["test"])
                runs[name].append(run)

    emit(
        {
            "study": "the packaged demo.yaml on the synthetic demo cohort",
            "subjects": args.subjects,
            "effect_size": args.effect_size,
            "seeds": args.seeds,
            "folds": args.folds or "all",
            "variants": {name: _summarise(name, variant) for name, variant in runs.items()},
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.platform(),
        },
        args.out,
    )


def _run_study(
    name: str, seed: int, workdir: Path, tracking_uri: str, folds: list[int] | None
) -> dict:
    """Runs the demo study as variant ``name`` with ``seed``: its metrics, drift and time."""
    config = load_config(
        DEMO_CONFIG,
        [
            f"data.cohort={workdir / 'cohort'}",
            f"data.cache_dir={workdir / 'cache'}",
            f"study.output_dir={workdir / 'runs'}",
            f"study.name=schedule-{name}-seed{seed}",
            f"study.seed={seed}",
            f"tracking.tracking_uri={tracking_uri}",
            *VARIANTS[name],
        ],
    )
    start = time.perf_counter()
    result = run_study(config, folds=folds)
    seconds = time.perf_counter() - start

    # the drift at the end of each epoch, per fold, from the study's child runs
    client = mlflow.tracking.MlflowClient(tracking_uri)
    children = client.search_runs(
        [client.get_run(result.parent_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'",
    )
    curves = []
    for child in children:
        history = client.get_metric_history(child.info.run_id, "ortho/drift_max")
        curves.append([m.value for m in sorted(history, key=lambda m: m.step)])
    return {
        "seed": seed,
        "test": {
            metric: round(result.summary[f"test/{metric}"]["mean"], 4)
            for metric in METRICS
            if f"test/{metric}" in result.summary
        },
        "fold_test": [
            {metric: metrics.get(f"test/{metric}") for metric in METRICS}
            for metrics in result.fold_metrics.values()
        ],
        "drift_curves": curves,
        "wall_s": round(seconds, 1),
    }


def _summarise(name: str, runs: list[dict]) -> dict:
    """Test metrics over every fold of every seed, and the drift curve averaged over them."""
    curves = [curve for run in runs for curve in run["drift_curves"] if curve]
    epochs = max(len(curve) for curve in curves)
    mean_curve = [
        statistics.mean(curve[epoch] for curve in curves if len(curve) > epoch)
        for epoch in range(epochs)
    ]
    test = {}
    for metric in METRICS:
        values = [
            fold[metric] for run in runs for fold in run["fold_test"] if fold[metric] is not None
        ]
        if values:
            test[metric] = {
                "mean": round(statistics.mean(values), 4),
                "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
                "n": len(values),
            }
    return {
        "overrides": VARIANTS[name],
        "test_over_folds_and_seeds": test,
        "test_per_seed": {run["seed"]: run["test"] for run in runs},
        "drift_max_per_epoch": [round(value, 3) for value in mean_curve],
        "drift_max_peak": round(max(mean_curve), 3),
        "drift_max_final": round(statistics.mean(curve[-1] for curve in curves), 3),
        "wall_s_per_study": round(statistics.mean(run["wall_s"] for run in runs), 1),
    }


if __name__ == "__main__":
    main()
