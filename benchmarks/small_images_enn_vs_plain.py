"""ENN vs plain ResNet-18 on a real small image set, in bp and local mode, over several seeds.

Every run is a full 2D study through the library (``run_study``): the same folder, recipe,
epoch budget and seed for the four variants (ENN or plain layers × bp or local mode), so
they differ in nothing else. The data is Fashion-MNIST from Debian's
``dataset-fashion-mnist`` package when installed (a per-class subsample of the official
training set; the official test set, subsampled the same way, is the test set), else
scikit-learn's handwritten digits. Reported: test accuracy (top-1) per run, and mean ± std
over seeds per variant.

Usage:
    python benchmarks/small_images_enn_vs_plain.py \
        --out benchmarks/results/small_images_enn_vs_plain.json
    python benchmarks/small_images_enn_vs_plain.py --seeds 0 1 2 --epochs 6 --per-class 500
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml
from _report import emit  # benchmarks/_report.py, beside this script

from enn_neuro.config import load_config
from enn_neuro.enn import DEFAULT_ORTHO_EVERY
from enn_neuro.training.study import run_study

logger = logging.getLogger("small_images_enn_vs_plain")

VARIANTS = [("enn", "bp"), ("plain", "bp"), ("enn", "local"), ("plain", "local")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--per-class", type=int, default=500, help="training images per class")
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--base-width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--data", choices=["auto", "fashion_mnist", "digits"], default="auto")
    parser.add_argument(
        "--ortho-every",
        type=int,
        default=DEFAULT_ORTHO_EVERY,
        help="training.ortho_every of the ENN runs (the penalty on one step in k)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=[f"{layer}_{mode}" for layer, mode in VARIANTS],
        default=[f"{layer}_{mode}" for layer, mode in VARIANTS],
        help="which of the four to run (default all)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("enn_neuro", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        dataset = _write_data(workdir / "data", args)
        variants = [(layer, mode) for layer, mode in VARIANTS if f"{layer}_{mode}" in args.variants]
        accuracies: dict[str, list[float]] = {f"{layer}_{mode}": [] for layer, mode in variants}
        seconds: dict[str, list[float]] = {key: [] for key in accuracies}

        # seeds outermost, variants interleaved: machine noise hits every variant alike
        for seed in args.seeds:
            for layer, mode in variants:
                key = f"{layer}_{mode}"
                config = _config(workdir, dataset, layer, mode, seed, args)
                start = time.perf_counter()
                result = run_study(config)
                seconds[key].append(time.perf_counter() - start)
                accuracy = result.fold_metrics[0]["test/accuracy"]
                accuracies[key].append(accuracy)
                logger.info("seed %d %-12s test accuracy %.4f", seed, key, accuracy)

    report = {f"{key}_acc": statistics.mean(values) for key, values in accuracies.items()}
    report.update(
        {
            "std": {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in accuracies.items()},
            "runs": accuracies,
            "seconds_per_run": {k: statistics.median(v) for k, v in seconds.items()},
            "data": dataset["name"],
            "train_images": dataset["train"],
            "test_images": dataset["test"],
            "recipe": {
                "model": "resnet18",
                "base_width": args.base_width,
                "image_size": 32,
                "epochs": args.epochs,
                "batch": args.batch,
                "optimizer": "adamw lr 2e-3, cosine, 1 warm-up epoch",
                "label_smoothing": 0.1,
                "selection": "held-out 10% of the training images, top-1 accuracy",
                "ortho_every": args.ortho_every,
                "seeds": args.seeds,
            },
            "torch": torch.__version__,
            "machine": platform.platform(),
        }
    )
    emit(report, args.out)


def _write_data(root: Path, args) -> dict:
    from enn_neuro.data import fashion_mnist, images2d

    use_fashion = args.data == "fashion_mnist" or (
        args.data == "auto" and fashion_mnist.fashion_mnist_available()
    )
    if use_fashion:
        fashion_mnist.write_fashion_mnist_folder(
            root, n_train_per_class=args.per_class, n_val_per_class=args.test_per_class, seed=0
        )
        name = "fashion_mnist"
    else:
        images2d.write_digits_folder(root, seed=0)
        name = "digits"
    count = {
        part: sum(1 for p in (root / part).rglob("*") if p.is_file()) for part in ("train", "val")
    }
    logger.info("%s: %d training and %d test images", name, count["train"], count["val"])
    return {"name": name, "root": root, "train": count["train"], "test": count["val"]}


def _config(workdir: Path, dataset: dict, layer: str, mode: str, seed: int, args):
    config = {
        "pipeline": "images2d",
        "study": {
            "name": f"{layer}-{mode}-seed{seed}",
            "seed": seed,
            "output_dir": str(workdir / "runs"),
        },
        "data": {
            "root": str(dataset["root"]),
            "image_size": 32,
            "resize_size": 32,
            "crop_scale": [0.6, 1.0],
            "hflip_p": 0.5 if dataset["name"] == "fashion_mnist" else 0.0,
            "val_fraction": 0.1,
            "num_workers": 0,
        },
        "model": {"name": "resnet18", "layer": layer, "base_width": args.base_width},
        "optim": {"name": "adamw", "lr": 2e-3, "scheduler": "cosine", "warmup_epochs": 1},
        "training": {
            "mode": mode,
            "epochs": args.epochs,
            "batch_size": args.batch,
            "label_smoothing": 0.1,
            "ortho_every": args.ortho_every,
            "patience": None,
            "selection_metric": "accuracy",
        },
        "tracking": {
            "tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}",
            "experiment": "small-images",
            "log_model": False,
        },
    }
    path = workdir / f"{layer}-{mode}-{seed}.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_config(path)


if __name__ == "__main__":
    main()
