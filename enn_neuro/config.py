"""One validated schema for every pipeline, loaded from YAML with command-line overrides.

A study is described by one YAML file (see ``configs/``). Loading checks every key and value
before any work starts: an unknown key or a bad value fails naming the key and the value.
``--set optim.lr=3e-4`` overrides a value (parsed as YAML, so ``3e-4`` is a number and
``[site]`` a list). The resolved configuration is saved with every run.

Example:
    >>> config = load_config("configs/demo.yaml", overrides=["training.epochs=2"])
    >>> config.training.epochs
    2
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from enn_neuro.data.transforms import AugmentationConfig, PreprocessingConfig
from enn_neuro.enn.penalty import DEFAULT_ORTHO_EVERY, DEFAULT_ORTHO_WEIGHT
from enn_neuro.files import write_text_atomic

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ImageConfig",
    "ImageDataConfig",
    "LocalConfig",
    "ModelConfig",
    "OptimConfig",
    "StudyConfig",
    "TrackingConfig",
    "TrainingConfig",
    "apply_overrides",
    "flatten",
    "load_config",
    "validate_config",
    "save_config",
]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names every bad key and value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StudyConfig(_Section):
    """What the study is called, where it writes, and its seed."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, ge=0)
    output_dir: Path = Path("runs")


class DataConfig(_Section):
    """The cohort, the target, and how subjects are split."""

    cohort: Path
    target: str = Field(min_length=1)
    task: Literal["classification", "regression"] = "classification"
    classes: list[str] | None = None
    image_column: str = "image"
    split_table: Path | None = None
    n_folds: int = Field(5, ge=2)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    stratify_by: list[Literal["site", "sex"]] = []
    cache_dir: Path | None = Path(".enn-cache")
    num_workers: int = Field(0, ge=0)


class ModelConfig(_Section):
    """The network, by registry name."""

    name: str = "resnet18"
    layer: Literal["enn", "plain"] = "enn"
    norm: Literal["batch", "group", "instance"] = "batch"
    base_width: int = Field(32, ge=1)
    zero_init_residual: bool = False

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        from enn_neuro.models import list_models

        if name not in list_models():
            raise ValueError(f"unknown model {name!r}; available: {list_models()}")
        return name


class OptimConfig(_Section):
    """Optimizer, learning-rate schedule and gradient clipping (one per local block too)."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    scheduler: Literal["cosine", "constant", "step"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    step_size: int = Field(10, ge=1)
    gamma: float = Field(0.1, gt=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0)


class LocalConfig(_Section):
    """How local mode (ENN-ℓ) cuts the network and scores each block."""

    cut: Literal["stage", "unit"] | list[int] = "stage"
    head: Literal["pool_linear", "conv_pool_linear"] = "pool_linear"


class TrainingConfig(_Section):
    """The loop: mode, length, batch, penalty, early stopping, device."""

    mode: Literal["bp", "local"] = "bp"
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(4, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    ortho_weight: float = Field(DEFAULT_ORTHO_WEIGHT, ge=0)
    # the penalty on one step in k with weight × k (Note [lazy penalty], enn/penalty.py)
    ortho_every: int = Field(DEFAULT_ORTHO_EVERY, ge=1)
    retract: bool = False
    patience: int | None = Field(10, ge=1)
    selection_metric: str | None = None
    amp: bool = True
    device: str = "auto"
    local: LocalConfig = LocalConfig()
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    stage_parallel: bool = False
    dist_timeout_s: float = Field(600.0, gt=0)
    log_every: int = Field(10, ge=1)

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if device not in ("auto", "cpu") and not device.startswith("cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
        return device


class TrackingConfig(_Section):
    """Where MLflow records the study (the local SQLite store ``mlflow.db`` by default)."""

    tracking_uri: str | None = None
    experiment: str = "enn-neuro"
    log_model: bool = True


class _StudyBase(_Section):
    """What every pipeline's study has: names, model, optimizer, loop, tracking."""

    study: StudyConfig
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    training: TrainingConfig = TrainingConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _consistent(self):
        from enn_neuro.training.metrics import (
            CLASSIFICATION_METRICS,
            REGRESSION_METRICS,
            selection_direction,
        )

        metric = self.training.selection_metric
        if metric is not None:
            selection_direction(metric)
            allowed = (
                REGRESSION_METRICS if self.data.task == "regression" else CLASSIFICATION_METRICS
            )
            if metric not in allowed:
                raise ValueError(
                    f"training.selection_metric {metric!r} does not apply to a "
                    f"{self.data.task} task; choose one of {sorted(allowed)}"
                )
        if self.training.stage_parallel and self.training.mode != "local":
            raise ValueError(
                f"training.stage_parallel needs training.mode 'local', got {self.training.mode!r}"
            )
        if self.training.mode == "local" and not isinstance(self.training.local.cut, str):
            _check_cut(self.model.name, self.training.local.cut)
        return self

    def resolved(self) -> dict[str, Any]:
        """The configuration as plain YAML-able data, every default filled in."""
        return json.loads(self.model_dump_json())

    def fingerprint(self) -> str:
        """A short hash of the resolved configuration, to recognise a study on resume."""
        text = json.dumps(self.resolved(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class Config(_StudyBase):
    """A 3D cohort study: NIfTI volumes, subject-level cross-validation."""

    pipeline: Literal["cohort3d"] = "cohort3d"
    data: DataConfig
    preprocessing: PreprocessingConfig = PreprocessingConfig()
    augmentation: AugmentationConfig = AugmentationConfig()

    spatial_dims: ClassVar[int] = 3
    in_channels: ClassVar[int] = 1

    @field_validator("preprocessing", "augmentation", mode="before")
    @classmethod
    def _dataclass_section(cls, value: Any, info) -> Any:
        target = {"preprocessing": PreprocessingConfig, "augmentation": AugmentationConfig}[
            info.field_name
        ]
        if isinstance(value, target):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"must be a mapping, got {value!r}")
        known = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}; known keys: {sorted(known)}")
        converted = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
        return target(**converted)


class ImageDataConfig(_Section):
    """An ImageNet-layout folder: ``root/train/<class>/*`` and ``root/val/<class>/*``.

    The ``val/`` folder is the test set, predicted once with the selected model; model
    selection uses ``val_fraction`` of the training images, held out per class.
    """

    root: Path
    task: Literal["classification"] = "classification"
    image_size: int = Field(224, ge=8)
    resize_size: int | None = Field(None, ge=8)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    hflip_p: float = Field(0.5, ge=0, le=1)
    val_fraction: float = Field(0.05, gt=0, lt=1)
    max_train_per_class: int | None = Field(None, ge=1)
    on_corrupt: Literal["report", "skip"] = "report"
    num_workers: int = Field(4, ge=0)

    @field_validator("crop_scale", "crop_ratio")
    @classmethod
    def _interval(cls, value: tuple[float, float], info) -> tuple[float, float]:
        low, high = value
        # crop_scale is a share of the image's area: above 1 no crop box can ever fit
        is_scale = info.field_name == "crop_scale"
        if not (0 < low <= high < float("inf") and (high <= 1 or not is_scale)):
            bound = " <= 1" if is_scale else ", both finite"
            raise ValueError(f"must be (low, high) with 0 < low <= high{bound}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _resize_covers_crop(self):
        # checked here, not when the transforms are built: by then the study folder exists
        if self.resize_size is not None and self.resize_size < self.image_size:
            raise ValueError(
                f"resize_size must be at least image_size ({self.image_size}), "
                f"got {self.resize_size}"
            )
        return self


class ImageConfig(_StudyBase):
    """A 2D image-classification study on an ImageNet-layout folder."""

    pipeline: Literal["images2d"]
    data: ImageDataConfig

    spatial_dims: ClassVar[int] = 2
    in_channels: ClassVar[int] = 3


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config | ImageConfig:
    """Reads, overrides and validates a YAML configuration.

    Relative paths under ``data`` (cohort, split table) are taken relative to the current
    folder, as a user typing a command expects.

    Args:
        path: The YAML file.
        overrides: ``"section.key=value"`` strings, values parsed as YAML.

    Returns:
        The validated configuration.

    Raises:
        FileNotFoundError: If the file does not exist.
        ConfigError: For a YAML error, an unknown key or a bad value, naming each.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: must be a mapping of sections, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides)
    return validate_config(raw, source=str(path))


def validate_config(raw: dict[str, Any], source: str = "config") -> Config | ImageConfig:
    """Validates a configuration given as nested dicts (``pipeline: images2d`` for 2D).

    Raises:
        ConfigError: Naming every bad key (dotted) and value.
    """
    schema = ImageConfig if raw.get("pipeline") == "images2d" else Config
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        lines = [_describe(error) for error in err.errors()]
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Returns a copy of ``raw`` with ``"a.b.c=value"`` overrides applied.

    Raises:
        ConfigError: For an override without ``=`` or one that descends into a non-mapping.
    """
    raw = json.loads(json.dumps(raw, default=str))
    for override in overrides:
        key, separator, text = override.partition("=")
        if not separator or not key.strip():
            raise ConfigError(f"override must look like section.key=value, got {override!r}")
        value = yaml.safe_load(text) if text.strip() else None
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def save_config(config: Config, path: str | Path) -> Path:
    """Writes the resolved configuration as YAML, atomically."""
    return write_text_atomic(path, yaml.safe_dump(config.resolved(), sort_keys=False))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-3}}`` → ``{"optim.lr": 1e-3}``: MLflow parameters."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def _check_cut(model_name: str, cut: list[int]) -> None:
    """Checks explicit local-mode cut indices against the model's units, at load time."""
    from enn_neuro.models import cut_points, structure_twin

    try:
        cut_points(structure_twin(model_name), cut)
    except ValueError as err:
        raise ValueError(f"training.local.cut for {model_name}: {err}") from None


def _describe(error: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"unknown key {location!r}"
    if error["type"] == "missing":
        return f"{location}: required"
    if not location:  # a check across sections names its keys and values itself
        return message
    if "got " in message:  # our own validators already name the value
        return f"{location}: {message}"
    return f"{location}: {message}, got {error['input']!r}"
