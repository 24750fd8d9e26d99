from __future__ import annotations

from pathlib import Path

import pytest

from enn_neuro.config import ConfigError, apply_overrides, flatten, load_config, save_config

CONFIGS = sorted((Path(__file__).parents[1] / "enn_neuro" / "configs").glob("*.yaml"))


def test_configs_folder_is_the_packaged_one():
    assert (Path(__file__).parents[1] / "configs" / "demo.yaml").is_file()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    config = load_config(path)
    assert config.study.name
    assert config.data.target if config.pipeline == "cohort3d" else config.data.root


def test_the_pairs_differ_only_where_they_should():
    demo = load_config(CONFIGS[0].with_name("demo.yaml")).resolved()
    local = load_config(CONFIGS[0].with_name("demo_local.yaml")).resolved()
    plain = load_config(CONFIGS[0].with_name("demo_plain.yaml")).resolved()
    changed_local = {k for k, v in flatten(local).items() if flatten(demo)[k] != v}
    changed_plain = {k for k, v in flatten(plain).items() if flatten(demo)[k] != v}
    assert changed_local == {"study.name", "training.mode"}
    assert changed_plain == {"study.name", "model.layer"}


def test_the_imagenet_trio_differs_only_where_it_should():
    enn = flatten(load_config(CONFIGS[0].with_name("imagenet_resnet152_enn.yaml")).resolved())
    for name, expected in (
        ("imagenet_resnet152_plain.yaml", {"study.name", "model.layer"}),
        ("imagenet_resnet152_local.yaml", {"study.name", "training.mode", "training.local.head"}),
    ):
        twin = flatten(load_config(CONFIGS[0].with_name(name)).resolved())
        assert {k for k, v in twin.items() if enn[k] != v} == expected, name
    config = load_config(CONFIGS[0].with_name("imagenet_resnet152_enn.yaml"))
    assert (config.pipeline, config.spatial_dims, config.in_channels) == ("images2d", 2, 3)
    assert config.model.name == "resnet152" and config.training.label_smoothing == 0.1


def _write(tmp_path, text):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


BASE = "study: {name: s}\ndata: {cohort: c.csv, target: dx}\n"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("optim: {lr: 0.001, learning_rate: 1}\n", r"unknown key 'optim.learning_rate'"),
        ("optim: {lr: -1}\n", r"optim.lr: Input should be greater than 0, got -1"),
        (
            "training: {mode: global}\n",
            r"training.mode: Input should be 'bp' or 'local', got 'global'",
        ),
        ("model: {name: resnet20}\n", r"model.name: unknown model 'resnet20'"),
        (
            "preprocessing: {shape: [8, 8]}\n",
            r"preprocessing: .*shape must be three positive integers, got \(8, 8\)",
        ),
        ("preprocessing: {spacing: [1, 1, 1]}\n", r"preprocessing: unknown key\(s\) \['spacing'\]"),
        ("training: {selection_metric: auc}\n", r"selection metric must be one of .*got 'auc'"),
        (
            "training: {device: tpu}\n",
            r"training.device: device must be 'auto', 'cpu' or 'cuda\[:N\]', got 'tpu'",
        ),
    ],
)
def test_bad_config_names_key_and_value(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, BASE + extra))


def test_missing_section_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"data: required"):
        load_config(_write(tmp_path, "study: {name: s}\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "study: {name: [s\n"))


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    path = _write(tmp_path, BASE)
    config = load_config(path, ["optim.lr=3e-4", "data.stratify_by=[site]", "training.mode=local"])
    assert config.optim.lr == 3e-4 and config.data.stratify_by == ["site"]
    assert config.training.mode == "local"
    with pytest.raises(ConfigError, match="unknown key 'optim.lrr'"):
        load_config(path, ["optim.lrr=1"])
    with pytest.raises(
        ConfigError, match="override must look like section.key=value, got 'optim.lr'"
    ):
        apply_overrides({}, ["optim.lr"])


def test_resolved_config_round_trips(tmp_path):
    config = load_config(_write(tmp_path, BASE), ["optim.lr=0.01"])
    saved = save_config(config, tmp_path / "resolved.yaml")
    again = load_config(saved)
    assert again.resolved() == config.resolved()
    assert again.fingerprint() == config.fingerprint()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            "data: {cohort: c.csv, target: age, task: regression}\n"
            "training: {selection_metric: balanced_accuracy}\n",
            r"selection_metric 'balanced_accuracy' does not apply to a regression task",
        ),
        (
            "data: {cohort: c.csv, target: dx}\ntraining: {selection_metric: mae}\n",
            r"selection_metric 'mae' does not apply to a classification task",
        ),
    ],
)
def test_selection_metric_must_fit_the_task(tmp_path, extra, message):
    path = _write(tmp_path, "study: {name: s}\n" + extra)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path)
    # one line naming the key and its value, not the whole configuration
    assert str(caught.value).startswith(f"{path}: training.selection_metric ")
    assert "\n" not in str(caught.value) and "{'" not in str(caught.value)


def test_an_explicit_local_cut_is_checked_against_the_model_on_load(tmp_path):
    base = "study: {name: s}\ndata: {cohort: c.csv, target: dx}\n"
    good = load_config(
        _write(tmp_path, base + "training: {mode: local, local: {cut: [0, 3, 5]}}\n")
    )
    assert good.training.local.cut == [0, 3, 5]
    path = _write(tmp_path, base + "training: {mode: local, local: {cut: [0, 99]}}\n")
    with pytest.raises(
        ConfigError, match=r"training.local.cut for resnet18: .*\[0, 8\].*got \[0, 99\]"
    ):
        load_config(path)
