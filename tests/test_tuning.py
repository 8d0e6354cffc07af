"""Hyperparameter search (`keras-llm tune`): search spaces, conditions, the tuning artifact,
resume, summary, flat memory across trials, and a chief with two workers."""
import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml
from click.testing import CliRunner

from keras_llm import tuning
from keras_llm.cli import main
from keras_llm.config import load_config
from keras_llm.errors import ConfigError

DOCUMENTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "A tokenizer turns text into integer ids that a model can embed.",
    "Attention lets every position look at every earlier position.",
    "Packing joins documents with an end-of-document token between them.",
] * 30

# Every trial trains this tiny GPT for a few steps: seconds per trial on 2 cores.
TINY = {
    "model.vocab_size": 300, "model.num_layers": 1, "model.hidden_size": 32,
    "model.num_heads": 2, "model.intermediate_size": 64, "model.max_length": 32,
    "data.seq_len": 32, "train.batch_size": 4, "train.steps": 3, "train.warmup_steps": 1,
    "train.eval_every": 3, "train.eval_steps": 1,
}
LEARNING_RATE = {"min": 1.0e-3, "max": 1.0e-2, "scale": "log"}


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": f"{i}: {d}"}) + "\n"
                            for i, d in enumerate(DOCUMENTS)))
    return str(path)


def write_space(directory, corpus, parameters, name="tune-test", **extra):
    path = os.path.join(str(directory), f"{name}.yaml")
    space = {"name": name, "base": "gpt-tiny", "target": "pretrain",
             "overrides": {**TINY, "data.source": corpus}, "parameters": parameters, **extra}
    with open(path, "w") as f:
        yaml.safe_dump(space, f)
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args):
    """The tune command line as a subprocess (its own TensorFlow, its own memory)."""
    return [sys.executable, "-c", "from keras_llm.cli import main; main()", "tune", *args]


def as_if_killed_before_the_oracle_ended(output_dir, trial_id):
    """Puts KerasTuner's saved state back to where it is while `trial_id` still runs."""
    search = os.path.join(output_dir, tuning.SEARCH_DIR)
    trial_file = os.path.join(search, f"trial_{trial_id}", "trial.json")
    with open(trial_file) as f:
        trial = json.load(f)
    assert trial["status"] == "COMPLETED"
    trial.update(status="RUNNING", score=None)
    with open(trial_file, "w") as f:
        json.dump(trial, f)
    oracle_file = os.path.join(search, "oracle.json")
    with open(oracle_file) as f:
        oracle = json.load(f)
    oracle["ongoing_trials"] = {"tuner0": trial_id}
    oracle["end_order"].remove(trial_id)
    oracle["run_times"].pop(trial_id)
    with open(oracle_file, "w") as f:
        json.dump(oracle, f)


def trial_records(output_dir):
    search = os.path.join(output_dir, tuning.SEARCH_DIR)
    records = {}
    for name in sorted(os.listdir(search)):
        path = os.path.join(search, name, tuning.RUN_FILE)
        if name.startswith("trial_") and os.path.exists(path):
            with open(path) as f:
                records[name[len("trial_"):]] = json.load(f)
    return records


# ----------------------------------------------------------------------------- search spaces

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


# ----------------------------------------------------------------------------- searches

def test_search_writes_results_best_config_and_model(tmp_path, corpus):
    path = write_space(tmp_path, corpus, {"train.learning_rate": LEARNING_RATE,
                                          "model.num_heads": {"choice": [2, 3]}})
    out = str(tmp_path / "search")
    # In this process (the other searches here run each trial in a child process).
    results = tuning.tune(path, out, tuner="random", max_trials=3, steps_per_trial=2,
                          objective="val_loss", command=["test"], in_process=True)
    trials = {t["trial_id"]: t for t in results["trials"]}
    assert len(trials) == 3
    failed = [t for t in trials.values() if t["status"] == "FAILED"]
    done = [t for t in trials.values() if t["status"] == "COMPLETED"]
    assert failed and done  # seed 1337 draws both head counts
    for t in failed:  # 32 % 3 != 0: skipped with the reason, before any training
        assert t["values"]["model.num_heads"] == 3
        assert "model.hidden_size (32) must be divisible by model.num_heads (3)" in t["reason"]
    for t in done:
        assert t["values"]["model.num_heads"] == 2 and t["steps"] == 2
        assert math.isfinite(t["metrics"]["val_loss"]) and t["reason"] is None
        assert t["metrics"]["val_loss"] == t["score"]
    best = min(done, key=lambda t: t["score"])
    assert results["best_trial"] == best["trial_id"]

    # best_config.yaml: the best values on the base, with the base's own step count.
    config = load_config(os.path.join(out, tuning.BEST_CONFIG_FILE))
    assert config.train.learning_rate == pytest.approx(best["values"]["train.learning_rate"])
    assert config.model.num_heads == 2 and config.train.steps == 3
    assert config.name == "gpt-tiny-tuned" and config.data.source == corpus
    # `keras-llm pretrain --config best_config.yaml` runs it as it is.
    rerun = str(tmp_path / "rerun")
    result = CliRunner().invoke(main, ["pretrain", "--config", os.path.join(
        out, tuning.BEST_CONFIG_FILE), "--steps", "2", "--output-dir", rerun])
    assert result.exit_code == 0, result.output
    rerun_config = load_config(os.path.join(rerun, "config.yaml"))
    assert rerun_config.train.learning_rate == config.train.learning_rate
    assert rerun_config.name == "gpt-tiny-tuned" and rerun_config.train.steps == 2
    model_dir = os.path.join(out, tuning.BEST_MODEL_LINK)
    assert os.path.isfile(os.path.join(model_dir, "model.keras"))
    with open(os.path.join(model_dir, "metrics.json")) as f:
        assert json.load(f)["val_loss"] == pytest.approx(best["score"])
    assert not os.path.exists(os.path.join(model_dir, "checkpoints"))

    with open(os.path.join(out, tuning.RESULTS_CSV)) as f:
        rows = f.read().splitlines()
    assert rows[0].split(",")[:5] == ["trial_id", "status", "val_loss", "model.num_heads",
                                      "train.learning_rate"]  # the file's order
    assert len(rows) == 4
    with open(os.path.join(out, "metadata.json")) as f:
        metadata = json.load(f)
    assert metadata["artifact_type"] == tuning.ARTIFACT_TYPE
    assert metadata["best_trial"] == best["trial_id"] and metadata["command"] == ["test"]

    result = CliRunner().invoke(main, ["tune", "--summary", "--output-dir", out])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["trial", "status", "val_loss"]
    assert any(line.startswith(best["trial_id"] + "*") and f"{best['score']:.4f}" in line
               for line in lines)
    assert "3 trials (" in result.output and "must be divisible" in result.output

    # Rerun: the finished search is resumed, nothing runs again; a different search is
    # refused; --restart starts over.
    before = {i: r["pid"] for i, r in trial_records(out).items()}
    tuning.tune(path, out, tuner="random", max_trials=3, steps_per_trial=2, in_process=True)
    assert {i: r["pid"] for i, r in trial_records(out).items()} == before
    # Killed after a trial's record said COMPLETED but before KerasTuner's oracle saved the
    # trial as ended: the resumed search gets that trial again and reports it as it was,
    # without training it again or rewriting its record.
    record_path = os.path.join(out, tuning.SEARCH_DIR, f"trial_{best['trial_id']}",
                               tuning.RUN_FILE)
    with open(record_path) as f:
        record = f.read()
    as_if_killed_before_the_oracle_ended(out, best["trial_id"])
    resumed = tuning.tune(path, out, tuner="random", max_trials=3, steps_per_trial=2,
                          in_process=True)
    with open(record_path) as f:
        assert f.read() == record
    assert resumed["best_trial"] == best["trial_id"]
    assert {t["trial_id"]: (t["status"], t["score"]) for t in resumed["trials"]} == {
        t["trial_id"]: (t["status"], t["score"]) for t in results["trials"]}
    with pytest.raises(ConfigError, match="holds a different search .*steps_per_trial.* "
                                          "pass --restart"):
        tuning.tune(path, out, tuner="random", max_trials=3, steps_per_trial=3,
                    in_process=True)
    results = tuning.tune(path, out, tuner="random", max_trials=1, steps_per_trial=3,
                          restart=True, seed=7, in_process=True)
    assert len(results["trials"]) == 1


def test_pretrain_trial_stops_early_when_the_objective_stalls(tmp_path, corpus):
    # A learning rate of 1e-30 leaves every weight as it was: the validation loss of the
    # second evaluation equals the first, and patience 1 ends the trial there.
    path = write_space(tmp_path, corpus, {"train.learning_rate": {"fixed": 1.0e-30}})
    results = tuning.tune(path, str(tmp_path / "search"), max_trials=1, steps_per_trial=12,
                          patience=1, in_process=True)
    (trial,) = results["trials"]
    assert trial["status"] == "COMPLETED" and trial["steps"] == 12  # the budget
    assert trial["metrics"]["steps"] == 6  # evaluations at steps 3 and 6, then it stopped
    no_patience = tuning.tune(path, str(tmp_path / "full"), max_trials=1, steps_per_trial=12,
                              patience=None, in_process=True)
    assert no_patience["trials"][0]["metrics"]["steps"] == 12


def test_summary_of_a_missing_search_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["tune", "--summary", "--output-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "no search here (search.json is missing)" in result.output
    assert result.output.count("\n") == 1


@pytest.mark.slow
def test_interrupted_search_resumes_without_redoing_trials(tmp_path, corpus):
    path = write_space(tmp_path, corpus, {"train.learning_rate": LEARNING_RATE})
    out = str(tmp_path / "search")
    command = cli("--config", path, "--max-trials", "3", "--steps-per-trial", "2",
                  "--output-dir", out)
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and first.poll() is None:
            if os.path.isdir(os.path.join(out, tuning.SEARCH_DIR)) and sum(
                    r["status"] == "COMPLETED" for r in trial_records(out).values()) >= 1:
                break
            time.sleep(0.2)
        assert first.poll() is None, "the search ended before it could be interrupted"
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    done_before = {i: r for i, r in trial_records(out).items() if r["status"] == "COMPLETED"}
    assert 1 <= len(done_before) < 3
    assert not os.path.exists(os.path.join(out, "metadata.json"))

    subprocess.run(command, check=True, timeout=240, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    records = trial_records(out)
    assert sorted(records) == ["0", "1", "2"]
    assert all(r["status"] == "COMPLETED" for r in records.values())
    for trial_id, record in done_before.items():  # not redone
        assert records[trial_id]["pid"] == first.pid
    assert sum(r["pid"] != first.pid for r in records.values()) == 3 - len(done_before)
    with open(os.path.join(out, tuning.RESULTS_JSON)) as f:
        assert len(json.load(f)["trials"]) == 3


CHILD_OF_A_SEARCH = """
import multiprocessing, os, sys, time
from keras_llm.processes import exit_with_parent

def trial(parent_pid, pid_file):
    exit_with_parent(parent_pid)
    with open(pid_file + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(pid_file + ".tmp", pid_file)
    time.sleep(300)

if __name__ == "__main__":
    process = multiprocessing.get_context("spawn").Process(
        target=trial, args=(os.getpid(), sys.argv[1]))
    process.start()
    process.join()
"""


def running(pid):
    """Whether `pid` runs (a dead, unreaped process is a zombie: state Z)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_trial_process_dies_with_its_search(tmp_path):
    """A killed search leaves no trial process behind: it would go on writing into the trial
    directory that the resumed search hands to a new trial process."""
    script, pid_file = tmp_path / "search.py", str(tmp_path / "trial.pid")
    script.write_text(CHILD_OF_A_SEARCH)
    search = subprocess.Popen([sys.executable, str(script), pid_file])
    try:
        deadline = time.time() + 120
        while not os.path.exists(pid_file):
            assert search.poll() is None and time.time() < deadline, "the trial never started"
            time.sleep(0.1)
        with open(pid_file) as f:
            trial_pid = int(f.read())
        assert running(trial_pid)
        search.send_signal(signal.SIGKILL)
        search.wait()
        deadline = time.time() + 10
        while running(trial_pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not running(trial_pid), "the trial process outlived its search"
    finally:
        search.kill()
        search.wait()
        if os.path.exists(pid_file):
            with open(pid_file) as f:
                pid = int(f.read())
            if running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_memory_stays_flat_across_trials(tmp_path, corpus):
    path = write_space(tmp_path, corpus, {"train.learning_rate": LEARNING_RATE})
    out = str(tmp_path / "search")
    subprocess.run(cli("--config", path, "--max-trials", "4", "--steps-per-trial", "2",
                       "--output-dir", out), check=True, timeout=420,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = trial_records(out)
    assert len(records) == 4 and all(r["status"] == "COMPLETED" for r in records.values())
    peak = [records[str(i)]["peak_rss_mb"] for i in range(4)]
    rss = [records[str(i)]["rss_mb"] for i in range(4)]
    trial_peak = [records[str(i)]["trial_peak_rss_mb"] for i in range(4)]
    print("search process peak RSS after each trial (MiB):", peak, "RSS:", rss,
          "each trial's own peak:", trial_peak)
    # From trial 2 to trial 4 the search process must not grow (in-process trials left
    # ~13 MiB of TensorFlow graphs each, about 26 MiB over these 2), and every trial peaks
    # alike.
    assert peak[3] - peak[1] < 10
    assert rss[3] - rss[1] < 10
    assert max(trial_peak[1:]) - min(trial_peak[1:]) < 60


@pytest.mark.slow
def test_chief_and_two_workers_complete_the_search(tmp_path, corpus):
    path = write_space(tmp_path, corpus, {"train.learning_rate": LEARNING_RATE})
    out = str(tmp_path / "search")
    port = str(free_port())
    common = ["--config", path, "--max-trials", "4", "--steps-per-trial", "2",
              "--output-dir", out, "--oracle-port", port]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERASTUNER_")}
    chief = subprocess.Popen(cli(*common, "--role", "chief"), env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(2)  # the workers retry until the chief answers, but start it first
    workers = [subprocess.Popen(cli(*common, "--role", "worker", "--tuner-id", f"worker{i}"),
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for i in range(2)]
    try:
        outputs = [w.communicate(timeout=400)[0] for w in workers]
        chief_output = chief.communicate(timeout=60)[0]
    finally:
        for process in [chief, *workers]:
            process.kill()
    assert [w.returncode for w in workers] == [0, 0], outputs
    assert chief.returncode == 0, chief_output
    records = trial_records(out)
    assert sorted(records) == ["0", "1", "2", "3"]
    assert all(r["status"] == "COMPLETED" for r in records.values())
    ran = {r["tuner_id"] for r in records.values()}
    assert ran == {"worker0", "worker1"}  # each worker ran some; the chief none
    with open(os.path.join(out, tuning.RESULTS_JSON)) as f:
        assert json.load(f)["best_trial"] in records
    assert "best config:" in chief_output


@pytest.mark.slow
def test_finetune_search_on_a_pretrained_artifact(tmp_path, corpus):
    pytest.importorskip("keras_llm.training.finetune")
    from keras_llm.training.pretrain import pretrain

    pretrained = str(tmp_path / "gpt")
    pretrain(load_config("gpt-tiny", {**TINY, "data.source": corpus}), pretrained, verbose=0)
    words = {"fruit": ["apple", "pear", "plum", "fig", "lime"],
             "vehicle": ["car", "bus", "train", "truck", "bike"]}
    topics = tmp_path / "topics.jsonl"
    topics.write_text("".join(
        json.dumps({"text": " ".join(words[label][(i + j) % 5] for j in range(6)),
                    "label": label}) + "\n" for i in range(40) for label in words))
    path = os.path.join(str(tmp_path), "space.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"name": "tune-topics", "target": "finetune", "pretrained": pretrained,
                        "objective": "val_accuracy", "overrides": {
                            "finetune.data": str(topics), "finetune.batch_size": 8,
                            "finetune.max_seq_len": 16},
                        "parameters": {
                            "finetune.learning_rate": {"min": 1e-3, "max": 1e-2,
                                                       "scale": "log"},
                            "finetune.freeze": {"choice": ["none", "embeddings"]}}}, f)
    out = str(tmp_path / "search")
    results = tuning.tune(path, out, max_trials=2, steps_per_trial=1, in_process=True)
    assert results["direction"] == "max" and results["target"] == "finetune"
    assert [t["status"] for t in results["trials"]] == ["COMPLETED", "COMPLETED"]
    best = next(t for t in results["trials"] if t["trial_id"] == results["best_trial"])
    assert best["score"] == max(t["metrics"]["val_accuracy"] for t in results["trials"])
    with open(os.path.join(out, tuning.BEST_CONFIG_FILE)) as f:
        text = f.read()
    options = yaml.safe_load(text)
    assert options["freeze"] == best["values"]["finetune.freeze"]
    assert options["learning_rate"] == pytest.approx(best["values"]["finetune.learning_rate"])
    assert f"# keras-llm finetune --model {pretrained} " in text
    from keras_llm.training.finetune import FinetuneOptions

    assert FinetuneOptions(**options).validate().data == str(topics)
    # `keras-llm finetune --config best_config.yaml` runs the best options.
    assert f"--config {os.path.join(out, tuning.BEST_CONFIG_FILE)}" in text
    rerun = str(tmp_path / "rerun")
    result = CliRunner().invoke(main, [
        "finetune", "--model", pretrained, "--config", os.path.join(out, tuning.BEST_CONFIG_FILE),
        "--epochs", "1", "--output-dir", rerun])
    assert result.exit_code == 0, result.output
    with open(os.path.join(rerun, "metadata.json")) as f:
        rerun_options = json.load(f)["finetune"]
    assert rerun_options["learning_rate"] == pytest.approx(options["learning_rate"])
    assert (rerun_options["freeze"], rerun_options["epochs"]) == (options["freeze"], 1)
    with open(os.path.join(out, tuning.BEST_MODEL_LINK, "metadata.json")) as f:
        assert json.load(f)["parent"]["path"] == os.path.abspath(pretrained)
    with open(os.path.join(out, "metadata.json")) as f:
        assert json.load(f)["parent"] == pretrained
