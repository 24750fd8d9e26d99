"""The 2D data section: values that would fail only once the study folder exists."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from enn_neuro.config import ConfigError, ImageDataConfig, validate_config


def _study(**data) -> dict:
    return {
        "pipeline": "images2d",
        "study": {"name": "digits"},
        "data": {"root": "digits", **data},
    }


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"image_size": 32, "resize_size": 24},
            "data: resize_size must be at least image_size (32), got 24",
        ),
        (
            {"crop_scale": [0.5, 1.5]},
            "data.crop_scale: must be (low, high) with 0 < low <= high <= 1, got (0.5, 1.5)",
        ),
        (
            {"crop_scale": [0.9, 0.2]},
            "data.crop_scale: must be (low, high) with 0 < low <= high <= 1, got (0.9, 0.2)",
        ),
        (
            {"crop_ratio": [0.75, float("inf")]},
            "data.crop_ratio: must be (low, high) with 0 < low <= high, both finite, "
            "got (0.75, inf)",
        ),
    ],
    ids=["resize_below_image", "scale_above_one", "scale_reversed", "ratio_infinite"],
)
def test_bad_crop_and_resize_values_are_rejected_naming_field_and_value(data, message):
    with pytest.raises(ConfigError) as caught:
        validate_config(_study(**data), source="digits.yaml")
    assert str(caught.value) == f"digits.yaml: {message}"


@pytest.mark.parametrize(
    "data",
    [
        {"image_size": 32, "resize_size": 32},
        {"image_size": 32, "resize_size": None},
        {"crop_scale": (1.0, 1.0)},
    ],
)
def test_limits_are_accepted(data):
    ImageDataConfig(root="digits", **data)


def test_assignment_is_checked_too():
    config = ImageDataConfig(root="digits", image_size=32, resize_size=40)
    with pytest.raises(ValidationError, match=r"resize_size must be at least image_size \(32\)"):
        config.resize_size = 16
