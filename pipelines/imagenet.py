"""The 2D pipeline as a script: an ENN ResNet on an ImageNet-layout folder.

Usage:
    torchrun --nproc-per-node 8 pipelines/imagenet.py configs/imagenet_resnet152_enn.yaml
    python pipelines/imagenet.py configs/small_images.yaml --set data.root=digits

The config's ``pipeline: images2d`` makes :func:`enn_neuro.training.study.run_study` train on
``train/`` (selecting on a held-out share of it) and test once on ``val/``.
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
    parser.add_argument("config", help="study config (YAML) with pipeline: images2d")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    config = load_config(args.config, args.set)
    if config.pipeline != "images2d":
        parser.error(f"{args.config}: pipeline must be 'images2d', got {config.pipeline!r}")
    result = run_study(config, resume=args.resume)
    print(json.dumps(result.fold_metrics[0], indent=2))


if __name__ == "__main__":
    main()
