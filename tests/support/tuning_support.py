"""Shared by the tuning tests (`tests/tuning/`): a tiny pretraining search space, the tune
command line as a subprocess, and the trials' own records.

On the test path through `pythonpath` in pytest.ini (the tests are not a package)."""
import json
import os
import sys

import yaml

from keras_llm import tuning

# Every trial trains this tiny GPT for a few steps: seconds per trial on 2 cores.
TINY = {
    "model.vocab_size": 300, "model.num_layers": 1, "model.hidden_size": 32,
    "model.num_heads": 2, "model.intermediate_size": 64, "model.max_length": 32,
    "data.seq_len": 32, "train.batch_size": 4, "train.steps": 3, "train.warmup_steps": 1,
    "train.eval_every": 3, "train.eval_steps": 1,
}
LEARNING_RATE = {"min": 1.0e-3, "max": 1.0e-2, "scale": "log"}


def write_space(directory, corpus, parameters, name="tune-test", **extra):
    path = os.path.join(str(directory), f"{name}.yaml")
    space = {"name": name, "base": "gpt-tiny", "target": "pretrain",
             "overrides": {**TINY, "data.source": corpus}, "parameters": parameters, **extra}
    with open(path, "w") as f:
        yaml.safe_dump(space, f)
    return path


def cli(*args):
    """The tune command line as a subprocess (its own TensorFlow, its own memory)."""
    return [sys.executable, "-c", "from keras_llm.cli import main; main()", "tune", *args]


def trial_records(output_dir):
    search = os.path.join(output_dir, tuning.SEARCH_DIR)
    records = {}
    for name in sorted(os.listdir(search)):
        path = os.path.join(search, name, tuning.RUN_FILE)
        if name.startswith("trial_") and os.path.exists(path):
            with open(path) as f:
                records[name[len("trial_"):]] = json.load(f)
    return records
