"""A tiny study config for the end-to-end tests (the cohort fixtures are in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import yaml


def tiny_config(
    tmp_path: Path, cohort: Path, cache: Path, name: str = "tiny", **sections: dict
) -> Path:
    """Writes a 2-fold, 2-epoch study on 24³ volumes with a width-4 ResNet-18."""
    config = {
        "study": {"name": name, "seed": 0, "output_dir": str(tmp_path / "runs")},
        "data": {
            "cohort": str(cohort),
            "target": "diagnosis",
            "classes": ["control", "patient"],
            "n_folds": 2,
            "val_fraction": 0.25,
            "cache_dir": str(cache),
        },
        "preprocessing": {"spacing_mm": [8.0, 8.0, 8.0], "shape": [24, 24, 24]},
        "augmentation": {"enabled": True, "elastic_p": 0.0, "motion_p": 0.0, "ghosting_p": 0.0},
        "model": {"name": "resnet18", "base_width": 4},
        "optim": {"lr": 1e-3},
        "training": {"epochs": 2, "batch_size": 2, "patience": 5, "log_every": 1},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tests"},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
