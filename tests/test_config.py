"""Config loading, overrides and validation."""

import pytest
import yaml

from codeling.config import RunConfig, config_to_dict, iter_fields, load_config
from codeling.errors import ConfigError


def write_yaml(tmp_path, data):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_load():
    config = load_config()
    assert isinstance(config, RunConfig)
    assert config.train.lr > 0
    assert config.model.resolved_layer_pattern() == "A" * config.model.n_layers


def test_model_preset_by_name(tmp_path):
    config = load_config(write_yaml(tmp_path, {"model": "dense-tiny"}))
    assert config.model.d_model == 256
    assert config.model.n_kv_heads == 2


def test_preset_fields_can_be_overridden(tmp_path):
    path = write_yaml(tmp_path, {"model": {"preset": "dense-tiny", "n_layers": 2}})
    config = load_config(path, ["model.d_model=128"])
    assert config.model.n_layers == 2
    assert config.model.d_model == 128


def test_set_overrides_are_typed():
    config = load_config(None, ["train.lr=0.001", "train.compile=true", "data.sources=[a, b]"])
    assert config.train.lr == pytest.approx(0.001)
    assert config.train.compile is True
    assert config.data.sources == ["a", "b"]


def test_unknown_key_names_key_and_allowed(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml(tmp_path, {"train": {"learning_rate": 0.1}}))
    message = str(info.value)
    assert "train.learning_rate" in message
    assert "unknown key" in message
    assert "lr" in message


def test_wrong_type_names_value(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml(tmp_path, {"train": {"batch_size": "sixteen"}}))
    assert "train.batch_size" in str(info.value)
    assert "'sixteen'" in str(info.value)
    assert "integer" in str(info.value)


def test_negative_lr_rejected(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml(tmp_path, {"train": {"lr": -0.01}}))
    assert "train.lr" in str(info.value)
    assert "greater than 0" in str(info.value)


def test_all_problems_reported_at_once(tmp_path):
    data = {"train": {"lr": -1, "batch_size": "x", "schedule": "linear"},
            "model": {"colour": "red"}}
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml(tmp_path, data))
    assert len(info.value.problems) == 4
    assert "4 problems" in str(info.value)
    assert "'linear' is not one of" in str(info.value)


def test_cross_field_checks():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.d_model=100", "model.n_heads=3", "train.seq_len=4096"])
    message = str(info.value)
    assert "not divisible" in message
    assert "max_seq_len" in message


def test_unknown_preset():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model=dense-huge"])
    assert "dense-huge" in str(info.value)
    assert "dense-tiny" in str(info.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_override_without_equals():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["train.lr"])


def test_round_trip_through_dict():
    config = load_config(None, ["train.lr=0.002", "model.n_layers=3"])
    again = load_config(None, [])
    assert config_to_dict(again) != config_to_dict(config)
    from codeling.config import config_from_dict

    assert config_to_dict(config_from_dict(config_to_dict(config))) == config_to_dict(config)


def test_every_field_has_help():
    for key, _annotation, _default, metadata in iter_fields():
        assert metadata.get("help"), key


@pytest.mark.parametrize("path", ["configs/runs/dense-tiny.yaml"])
def test_shipped_run_configs_validate(path):
    from codeling.config import REPO_ROOT

    load_config(REPO_ROOT / path)
