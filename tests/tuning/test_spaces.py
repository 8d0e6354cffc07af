"""`keras-llm tune`'s search spaces: loading, typing, conditions, invalid combinations,
targets, objectives and Hyperband budgets (no search runs here)."""
import dataclasses
import os

import pytest
from click.testing import CliRunner
from tuning_support import LEARNING_RATE, write_space

from keras_llm import tuning
from keras_llm.cli import main
from keras_llm.errors import ConfigError


@pytest.mark.parametrize("parameters, message", [
    ({"model.num_layers": {"choice": []}},
     "parameters.model.num_layers.choice must be a non-empty list"),
    ({"train.learning_rate": {"min": 0.1, "max": 0.01}},
     "parameters.train.learning_rate: min (0.1) > max (0.01)"),
    ({"train.learning_rate": {"min": 0.0, "max": 0.01, "scale": "log"}},
     "parameters.train.learning_rate: scale log needs min > 0, got 0.0"),
    ({"train.learning_rat": {"min": 0.001, "max": 0.01}},
     "parameters.train.learning_rat is not a config key (did you mean "
     "'train.learning_rate'?)"),
    ({"model": {"choice": [1]}}, "parameters.model is a config section, not a key"),
    ({"train.learning_rate": {"min": 0.001, "max": 0.01, "scale": "exp"}},
     "parameters.train.learning_rate.scale must be linear or log; got 'exp'"),
    ({"model.num_layers": {"min": 1, "max": 2.5}},
     "parameters.model.num_layers.max must be an integer, got 2.5"),
    ({"model.activation": {"min": 1, "max": 2}},
     "parameters.model.activation is not a number: give a choice or a fixed value"),
    ({"model.num_layers": {"choice": [1, 2], "fixed": 1}},
     "parameters.model.num_layers must have exactly one of choice, fixed, or min/max"),
    ({"model.num_layers": {"choice": [1, 2]},
      "model.dropout": {"min": 0.0, "max": 0.2, "when": {"model.num_layer": [2]}}},
     "parameters.model.dropout.when.model.num_layer: parent 'model.num_layer' is not a "
     "searched parameter (did you mean 'model.num_layers'?)"),
    ({"model.num_layers": {"choice": [1, 2]},
      "model.dropout": {"min": 0.0, "max": 0.2, "when": {"model.num_layers": [3]}}},
     "parameters.model.dropout.when.model.num_layers: 3 is not a value of model.num_layers"),
    ({"train.learning_rate": {"min": 0.001, "max": 0.01},
      "model.dropout": {"min": 0.0, "max": 0.2, "when": {"train.learning_rate": [0.001]}}},
     "parent 'train.learning_rate' must be a choice (or fixed) parameter"),
])
def test_bad_search_space_is_one_line_naming_the_key(tmp_path, corpus, parameters, message):
    path = write_space(tmp_path, corpus, parameters)
    with pytest.raises(ConfigError) as error:
        tuning.load_search_space(path)
    assert message in str(error.value)
    assert str(error.value).startswith(path) and "\n" not in str(error.value)


def test_unknown_tuner_and_keys(tmp_path, corpus):
    with pytest.raises(ConfigError, match=r"tune-test.yaml: unknown tuner 'grid'; choose one of "
                                          r"random, bayesian, hyperband"):
        tuning.load_search_space(write_space(tmp_path, corpus, {"model.num_layers": {
            "choice": [1]}}, tuner="grid"))
    with pytest.raises(ConfigError, match=r"unknown key 'paramters' \(did you mean "
                                          r"'parameters'\?\)"):
        tuning.parse_search_space({"base": "gpt-tiny", "paramters": {}}, "space.yaml")
    with pytest.raises(ConfigError, match="overrides.model.hidden: is not a config key|"
                                          "overrides.model.hidden is not a config key"):
        tuning.parse_search_space({"base": "gpt-tiny", "overrides": {"model.hidden": 3},
                                   "parameters": {"model.num_layers": {"choice": [1]}}})
    with pytest.raises(ConfigError, match="unknown tuner 'grid'"):
        tuning.tune(write_space(tmp_path, corpus, {"model.num_layers": {"choice": [1]}}),
                    str(tmp_path / "out"), tuner="grid")
    assert not os.path.exists(tmp_path / "out")  # refused before anything ran


def test_cli_reports_a_bad_space_before_any_trial(tmp_path, corpus):
    path = write_space(tmp_path, corpus, {"model.num_layers": {"choice": []}})
    result = CliRunner().invoke(main, ["tune", "--config", path, "--output-dir",
                                       str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "parameters.model.num_layers.choice must be a non-empty list" in result.output
    assert "Traceback" not in result.output
    assert not os.path.exists(tmp_path / "out")
    result = CliRunner().invoke(main, ["tune", "--tuner", "grid"])
    assert result.exit_code == 2 and "'grid' is not one of" in result.output


def test_shipped_search_spaces_load():
    import importlib.resources

    root = importlib.resources.files("keras_llm.configs")
    names = sorted(p.name[:-5] for p in root.iterdir() if p.name.startswith("tune-"))
    assert "tune-gpt-tiny" in names and "tune-finetune" in names
    try:
        import keras_llm.training.finetune  # noqa: F401
    except ImportError:  # the finetune spaces need the fine-tuning executor
        names = [n for n in names if "target: finetune" not in
                 (root / f"{n}.yaml").read_text()]
    for name in names:
        space = tuning.load_search_space(name)
        assert space.name == name and space.parameters
    space = tuning.load_search_space("tune-gpt-tiny")
    assert space.parameters["model.hidden_size"].kind == "int"
    assert space.parameters["train.learning_rate"].scale == "log"
    assert space.parameters["model.dropout"].when == {"model.num_layers": [2]}


def test_space_values_are_typed_like_the_config(tmp_path, corpus):
    space = tuning.load_search_space(write_space(tmp_path, corpus, {
        "train.weight_decay": {"choice": [0, 0.1]},          # ints in a float key: floats
        "model.num_layers": {"min": 1, "max": 3},
        "train.learning_rate": {"min": "1e-4", "max": 1.0e-2, "scale": "log"},
        "train.batch_size": {"fixed": 8},
    }))
    p = space.parameters
    assert p["train.weight_decay"].values == [0.0, 0.1]
    assert all(isinstance(v, float) for v in p["train.weight_decay"].values)
    assert (p["model.num_layers"].kind, p["model.num_layers"].min) == ("int", 1)
    assert (p["train.learning_rate"].kind, p["train.learning_rate"].min) == ("float", 1e-4)
    hp = space.hyperparameters()
    assert [h.name for h in hp.space] == list(p)
    assert hp.values["train.batch_size"] == 8


# ----------------------------------------------------------------------------- conditions

def test_conditional_parameter_is_searched_only_under_its_parent(tmp_path, corpus):
    space = tuning.load_search_space(write_space(tmp_path, corpus, {
        # The child comes first in the file: the space declares parents first.
        "model.dropout": {"min": 0.1, "max": 0.3, "step": 0.1,
                          "when": {"model.num_layers": [2]}},
        "model.num_layers": {"choice": [1, 2]},
    }))
    assert list(space.parameters) == ["model.num_layers", "model.dropout"]
    oracle = tuning.make_oracle("random", space, "val_loss", "min", max_trials=16, seed=3)
    oracle._set_project_dir(str(tmp_path), "oracle")
    seen = set()
    for _ in range(16):
        trial = oracle.create_trial("tuner0")
        if trial.status == "STOPPED":  # every combination tried
            break
        values = space.trial_values(trial.hyperparameters)
        layers = values["model.num_layers"]
        assert ("model.dropout" in values) == (layers == 2)
        config = space.resolve(values, steps=5)
        assert config.train.steps == 5 and config.model.num_layers == layers
        # Inactive: the base's dropout (0.0); active: one of 0.1, 0.2, 0.3.
        seen.add((layers, round(config.model.dropout, 6)))
        oracle.update_trial(trial.trial_id, {"val_loss": 1.0})
        trial.status = "COMPLETED"
        oracle.end_trial(trial)
    assert seen <= {(1, 0.0), (2, 0.1), (2, 0.2), (2, 0.3)}
    assert (1, 0.0) in seen and len(seen) >= 3


def test_invalid_combination_is_a_reason_not_a_crash(tmp_path, corpus):
    space = tuning.load_search_space(write_space(tmp_path, corpus, {
        "model.num_heads": {"choice": [2, 3]}}))
    with pytest.raises(ConfigError, match=r"model.hidden_size \(32\) must be divisible by "
                                          r"model.num_heads \(3\)"):
        space.resolve({"model.num_heads": 3})
    assert space.resolve({"model.num_heads": 2}).model.num_heads == 2


def test_finetune_space_searches_finetune_options(tmp_path):
    pytest.importorskip("keras_llm.training.finetune")
    space = tuning.load_search_space("tune-finetune")
    assert space.target == "finetune" and space.pretrained == "runs/gpt-tiny"
    assert space.parameters["finetune.layerwise_lr_decay"].when == {"finetune.freeze": ["none"]}
    options = space.resolve({"finetune.freeze": "blocks:1", "finetune.learning_rate": 1e-3},
                            steps=2)
    assert (options.freeze, options.learning_rate, options.epochs) == ("blocks:1", 1e-3, 2)
    assert options.max_seq_len == 64 and options.task == "classification"
    with pytest.raises(ConfigError, match="--freeze must be none, embeddings or blocks:K"):
        space.resolve({"finetune.freeze": "blocks:x"})
    with pytest.raises(ConfigError, match=r"parameters.finetune.freezing is not a config key "
                                          r"\(did you mean 'finetune.freeze'\?\)"):
        tuning.parse_search_space({"target": "finetune", "parameters": {
            "finetune.freezing": {"choice": ["none", "embeddings"]}}}, "space.yaml")
    with pytest.raises(ConfigError, match="needs a pretrained model artifact"):
        tuning.tune(tuning.parse_search_space({"target": "finetune", "parameters": {
            "finetune.freeze": {"choice": ["none"]}}}), str(tmp_path / "out"))


def test_trials_take_the_scale_options_of_their_target():
    pytest.importorskip("keras_llm.training.finetune")
    space = tuning.parse_search_space({"target": "finetune", "overrides": {
        "finetune.strategy": "mirrored", "finetune.mixed_precision": True,
        "finetune.xla": False}, "parameters": {"finetune.scale_lr": {"choice": [False, True]}}})
    options = space.resolve({"finetune.scale_lr": True})
    assert (options.strategy, options.mixed_precision, options.xla, options.scale_lr) == (
        "mirrored", True, False, True)
    flags = tuning.finetune_flags(dataclasses.asdict(options)).split()
    assert {"--strategy", "mirrored", "--mixed-precision", "--no-xla", "--scale-lr"} <= set(flags)
    with pytest.raises(ConfigError, match="--strategy must be one of"):
        space.resolve({"finetune.strategy": "horovod"})
    config = tuning.parse_search_space({"base": "gpt-tiny", "overrides": {
        "train.strategy": "mirrored", "train.xla": True}, "parameters": {
        "train.mixed_precision": {"choice": [True]}}}).resolve({"train.mixed_precision": True})
    assert (config.train.strategy, config.train.xla, config.train.mixed_precision) == (
        "mirrored", True, True)


def test_objective_direction_and_roles():
    assert tuning.objective_direction("val_loss") == "min"
    assert tuning.objective_direction("val_perplexity") == "min"
    assert tuning.objective_direction("val_accuracy") == "max"
    assert tuning.objective_direction("val_loss", "max") == "max"
    env = tuning.distributed_environment("chief", oracle_port=8000)
    assert env == {"KERASTUNER_TUNER_ID": "chief", "KERASTUNER_ORACLE_IP": "127.0.0.1",
                   "KERASTUNER_ORACLE_PORT": "8000"}
    assert tuning.distributed_environment("worker", "w1", "10.0.0.1", 9)[
        "KERASTUNER_TUNER_ID"] == "w1"
    with pytest.raises(ConfigError, match="--role worker needs --tuner-id"):
        tuning.distributed_environment("worker", oracle_port=8000)
    with pytest.raises(ConfigError, match="--role needs --oracle-port"):
        tuning.distributed_environment("chief")


def test_hyperband_trials_get_a_fraction_of_the_budget(tmp_path, corpus):
    space = tuning.load_search_space(write_space(tmp_path, corpus, {
        "train.learning_rate": LEARNING_RATE}))
    oracle = tuning.make_oracle("hyperband", space, "val_loss", "min", max_trials=5,
                                hyperband_max_epochs=3)
    tuner = tuning.SearchTuner(oracle, space, str(tmp_path / "out"), steps_per_trial=30)
    hp = space.hyperparameters()
    assert tuner.trial_steps(hp) == 30
    for epochs, steps in ((1, 10), (2, 20), (3, 30)):
        hp.values["tuner/epochs"] = epochs
        assert tuner.trial_steps(hp) == steps
    assert oracle.max_trials == 5
