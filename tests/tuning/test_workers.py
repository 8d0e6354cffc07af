"""A distributed search: a chief (the oracle) and two workers that run the trials."""
import json
import os
import socket
import subprocess
import time

import pytest
from tuning_support import LEARNING_RATE, cli, trial_records, write_space

from keras_llm import tuning


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
