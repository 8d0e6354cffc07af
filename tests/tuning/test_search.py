"""Searches in this process: results, the best config and model, summary, resume of a
finished search, early stopping, and a fine-tuning search on a pretrained artifact."""
import json
import math
import os

import pytest
import yaml
from click.testing import CliRunner
from tuning_support import LEARNING_RATE, TINY, trial_records, write_space

from keras_llm import tuning
from keras_llm.cli import main
from keras_llm.config import load_config
from keras_llm.errors import ConfigError


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
