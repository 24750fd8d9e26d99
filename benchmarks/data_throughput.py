"""Data throughput: volumes/s of an uncached epoch vs an epoch over a warm preprocessing cache.

Every volume of a cohort is read through :class:`enn_neuro.data.dataset.CachedVolumeDataset`
(index by index, no augmentation) with one torch thread by default, as in a DataLoader
worker, so the figures are the data time per volume of one loader process. Each repetition
times, in this order:

- ``uncached``: a fresh dataset with no cache to read, which preprocesses every volume from
  its NIfTI file (load, reorient, resample, crop, normalise, pad);
- ``cold_cache``: the same on an empty cache directory, which also writes the cache;
- ``cached_new_run``: a fresh dataset on that now warm directory, as a new run or fold sees
  it (each file's key is hashed once per process);
- ``cached``: the second pass of that dataset, i.e. a later epoch.

``cached_speedup`` is the median over repetitions of ``cached`` vol/s ÷ ``uncached`` vol/s
(the target is ≥ 10). NIfTI files stay in the OS page cache between passes, so the uncached
figure does not include cold-disk reads: on a real file server the speedup is larger.

The cohort is the synthetic demo cohort (:func:`enn_neuro.data.demo.write_demo_cohort`),
written to a temporary directory, or every ``*.nii``/``*.nii.gz`` under ``--cohort``. If the
demo module cannot be imported, random ellipsoid volumes are written instead.

Usage:
    python benchmarks/data_throughput.py --out results/data_throughput.json
    python benchmarks/data_throughput.py --n-subjects 20 --repeats 3   # a quick run
    python benchmarks/data_throughput.py --cohort /data/bids --shape 96 --spacing 2
"""

from __future__ import annotations

import argparse
import logging
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import monai
import nibabel as nib
import numpy as np
import torch
from _report import emit  # benchmarks/_report.py, beside this script

from enn_neuro.data.dataset import make_dataset
from enn_neuro.data.transforms import PreprocessingConfig

logger = logging.getLogger("data_throughput")

PASSES = ("uncached", "cold_cache", "cached_new_run", "cached")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--cohort", type=Path, help="a directory of NIfTI files to use")
    parser.add_argument("--n-subjects", type=int, default=60, help="size of the written cohort")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions")
    parser.add_argument("--shape", type=int, default=64, help="output side, voxels")
    parser.add_argument("--spacing", type=float, default=3.0, help="output voxel size, mm")
    parser.add_argument("--intensity", choices=["zscore", "percentile"], default="zscore")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (DataLoader workers run with 1)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.repeats < 1 or args.n_subjects < 1:
        parser.error(
            f"--repeats and --n-subjects must be >= 1, got {args.repeats}, {args.n_subjects}"
        )

    torch.set_num_threads(args.threads)
    config = PreprocessingConfig(
        spacing_mm=(args.spacing,) * 3, shape=(args.shape,) * 3, intensity=args.intensity
    )
    with tempfile.TemporaryDirectory(prefix="data_throughput_") as scratch:
        scratch = Path(scratch)
        if args.cohort is not None:
            root, source = args.cohort, "path"
        else:
            root, source = _write_cohort(scratch / "cohort", args.n_subjects)
        paths = sorted(p for p in root.glob("**/*.nii*") if not p.name.startswith("."))
        if not paths:
            raise FileNotFoundError(f"no *.nii or *.nii.gz file under {root}")
        samples = [{"image": str(p), "subject_id": p.name.split(".")[0]} for p in paths]
        logger.info(
            "%d volumes (%s), sides %s, to %s at %s mm, %d threads",
            len(samples),
            source,
            _side_range(paths),
            config.shape,
            config.spacing_mm,
            torch.get_num_threads(),
        )
        results = measure(samples, config, scratch, args.repeats)

    report = {
        "cached_speedup": results["cached_speedup"],
        "cached_new_run_speedup": results["cached_new_run_speedup"],
        "uncached_vol_per_s": results["vol_per_s"]["uncached"],
        "cached_vol_per_s": results["vol_per_s"]["cached"],
        "vol_per_s": results["vol_per_s"],
        "speedups": results["speedups"],
        "cache_mib_per_volume": results["cache_mib_per_volume"],
        "n_volumes": len(samples),
        "shape": list(config.shape),
        "spacing_mm": list(config.spacing_mm),
        "intensity": config.intensity,
        "cohort": source,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
    }
    emit(report, args.out)


def measure(samples: list[dict], config: PreprocessingConfig, scratch: Path, repeats: int) -> dict:
    """Times the four passes of ``PASSES`` per repetition; returns medians and ratios."""
    times: dict[str, list[float]] = {name: [] for name in PASSES}
    cache_mib = 0.0
    for repeat in range(repeats):
        cache_dir = scratch / f"cache-{repeat}"

        # uncached: in-memory cache, empty at the start, so every volume is preprocessed
        times["uncached"].append(_epoch(make_dataset(samples, config)))

        # cold cache: preprocess and write
        times["cold_cache"].append(_epoch(make_dataset(samples, config, cache_dir=cache_dir)))
        cache_mib = sum(p.stat().st_size for p in cache_dir.glob("*.pt")) / len(samples) / 2**20

        # warm cache: a new run's first epoch, then its second
        warm = make_dataset(samples, config, cache_dir=cache_dir)
        times["cached_new_run"].append(_epoch(warm))
        times["cached"].append(_epoch(warm))
        shutil.rmtree(cache_dir)

        logger.info(
            "repeat %d: %s vol/s",
            repeat,
            ", ".join(f"{name} {len(samples) / t[-1]:.1f}" for name, t in times.items()),
        )

    rates = {name: [len(samples) / t for t in ts] for name, ts in times.items()}
    speedups = {
        name: [r / u for r, u in zip(rates[name], rates["uncached"], strict=True)]
        for name in PASSES[1:]
    }
    return {
        "cached_speedup": statistics.median(speedups["cached"]),
        "cached_new_run_speedup": statistics.median(speedups["cached_new_run"]),
        "vol_per_s": {name: statistics.median(r) for name, r in rates.items()},
        "speedups": {name: [round(s, 3) for s in ss] for name, ss in speedups.items()},
        "cache_mib_per_volume": cache_mib,
    }


def _epoch(dataset) -> float:
    start = time.perf_counter()
    for index in range(len(dataset)):
        dataset[index]
    return time.perf_counter() - start


def _write_cohort(root: Path, n_subjects: int) -> tuple[Path, str]:
    try:
        from enn_neuro.data.demo import write_demo_cohort
    except ImportError as err:
        logger.warning("demo cohort unavailable (%s): writing random volumes", err)
        return _write_synthetic(root, n_subjects), "synthetic"
    logger.info("writing a demo cohort of %d subjects to %s", n_subjects, root)
    start = time.perf_counter()
    write_demo_cohort(root, n_subjects=n_subjects, seed=0)
    logger.info("written in %.1f s", time.perf_counter() - start)
    return root, "demo"


def _write_synthetic(root: Path, n_subjects: int, side: int = 64) -> Path:
    """Noisy ellipsoids at 3 mm, int16, as BIDS-like paths."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.mgrid[:side, :side, :side], -1) - side / 2  # (X, Y, Z, 3)
    for index in range(1, n_subjects + 1):
        radii = rng.uniform(0.3, 0.4, 3) * side
        inside = ((grid / radii) ** 2).sum(-1) < 1
        data = np.where(inside, rng.normal(800, 100, inside.shape), rng.rayleigh(20, inside.shape))
        path = root / f"sub-{index:03d}" / "anat" / f"sub-{index:03d}_T1w.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data.astype(np.int16), np.diag([3.0, 3.0, 3.0, 1.0])), path)
    return root


def _side_range(paths: list[Path]) -> str:
    sides = [side for p in paths for side in nib.load(p).shape[:3]]
    return f"{min(sides)}–{max(sides)}"


if __name__ == "__main__":
    main()
