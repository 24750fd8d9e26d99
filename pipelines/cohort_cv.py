"""The 3D pipeline as a script: a cohort's cross-validated study from a config.

Usage:
    python pipelines/cohort_cv.py configs/demo.yaml --set training.epochs=5
    torchrun --nproc-per-node 2 pipelines/cohort_cv.py configs/classification.yaml

Everything happens in the library (:func:`enn_neuro.training.study.run_study`): config and
cohort checks, subject-level folds, training with model selection on validation subjects,
test metrics with confidence intervals, MLflow runs. ``enn-neuro cv`` is the same study
with the command's error handling.
"""

from __future__ import annotations

import argparse
import json
import logging

from enn_neuro.config import load_config
from enn_neuro.training.study import run_study


def main() -> None:
    """Parses the command line and runs the study."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="study config (YAML)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    result = run_study(load_config(args.config, args.set), resume=args.resume)
    print(json.dumps({k: v["mean"] for k, v in result.summary.items()}, indent=2))


if __name__ == "__main__":
    main()
