import pytest
import yaml

from keras_llm.config import Config, builtin_config_names, load_config
from keras_llm.errors import ConfigError


def write(tmp_path, values):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_builtin_configs_load_and_validate():
    names = builtin_config_names()
    assert {"gpt-tiny", "gpt-small"} <= set(names)
    for name in names:
        config = load_config(name)
        assert config.name == name
    small = load_config("gpt-small")
    assert (small.model.num_layers, small.model.hidden_size, small.model.num_heads) == (12, 768, 12)


def test_defaults_file_and_overrides_layer_in_order(tmp_path):
    path = write(tmp_path, {"train": {"steps": 7, "learning_rate": "3e-4"}})
    config = load_config(path, overrides={"train.batch_size": 4, "train.steps": None})
    assert config.train.steps == 7  # None override leaves the file's value
    assert config.train.learning_rate == pytest.approx(3e-4)
    assert config.train.batch_size == 4
    assert config.model.hidden_size == Config().model.hidden_size


def test_round_trip_through_dict():
    config = load_config("gpt-tiny", overrides={"train.seed": 3})
    assert Config.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("values, message", [
    ({"model": {"hiden_size": 8}}, "unknown key 'model.hiden_size' (did you mean 'model.hidden_size'?)"),
    ({"trian": {}}, "unknown key 'trian'"),
    ({"model": {"hidden_size": 130, "num_heads": 4}}, "model.hidden_size (130) must be divisible by model.num_heads (4)"),
    ({"model": {"num_layers": "four"}}, "model.num_layers must be an integer, got 'four'"),
    ({"model": {"dropout": 1.5}}, "model.dropout must be in [0, 1)"),
    ({"model": {"family": "lstm"}}, "model.family must be one of"),
    ({"data": {"tokenizer": "chars"}}, "data.tokenizer must be one of"),
    ({"data": {"seq_len": 512}, "model": {"max_length": 128}}, "data.seq_len (512) exceeds model.max_length (128)"),
    ({"train": {"batch_size": 0}}, "train.batch_size must be > 0"),
    ({"model": {"norm_first": "yes"}}, "model.norm_first must be true or false"),
])
def test_bad_values_name_the_key(tmp_path, values, message):
    path = write(tmp_path, values)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)
    assert str(info.value).startswith(path)
    assert "\n" not in str(info.value)


def test_unknown_config_name_lists_builtins():
    with pytest.raises(ConfigError, match="gpt-tiny"):
        load_config("no-such-config")


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hidden_size: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ is not valid YAML"):
        load_config(str(path))
