"""Exact resume: a run killed (SIGKILL, or mid-checkpoint-write) and rerun ends where an
uninterrupted run with the same seed ends."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from keras_llm.training.checkpoint import FAULT_ENV

JOB = os.path.join(os.path.dirname(__file__), "train_job.py")
# Dropout on, so the random state has to be restored too; checkpoints every 2 steps.
ARGS = ["--steps", "12", "--interval", "6", "--checkpoint-every", "2", "--dropout", "0.1"]


def run_job(out, *extra, env=None):
    return subprocess.run([sys.executable, JOB, "--out", str(out), *ARGS, *extra],
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=240)


def checkpoints(out):
    return sorted(os.listdir(out / "run" / "checkpoints"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run_job(out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def assert_same_run(reference, resumed):
    a, b = np.load(reference / "default-0.npz"), np.load(resumed / "default-0.npz")
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-6)
    full = json.loads((reference / "default-0.json").read_text())
    tail = json.loads((resumed / "default-0.json").read_text())
    assert tail["iterations"] == full["iterations"] == 12
    # The running interval loss continues exactly: metric accumulators are restored too.
    np.testing.assert_allclose(tail["losses"], full["losses"][-len(tail["losses"]):],
                               atol=1e-6)


@pytest.mark.slow
def test_sigkill_mid_interval_then_rerun_matches_uninterrupted_run(uninterrupted, tmp_path):
    killed = run_job(tmp_path, "--kill-at-step", "9")
    assert killed.returncode == -signal.SIGKILL
    assert checkpoints(tmp_path) == ["ckpt-000000004", "ckpt-000000006", "ckpt-000000008"]
    resumed = run_job(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "(step 8)" in resumed.stderr
    tail = json.loads((tmp_path / "default-0.json").read_text())
    assert len(tail["losses"]) == 4  # steps 9..12 only: nothing trained twice
    assert_same_run(uninterrupted, tmp_path)


@pytest.mark.slow
def test_killed_during_a_checkpoint_write_then_rerun_matches(uninterrupted, tmp_path):
    crashed = run_job(tmp_path, env={FAULT_ENV: "exit-during-write@4"})
    assert crashed.returncode == 17
    # The half-written checkpoint never got a final name.
    names = checkpoints(tmp_path)
    assert [n for n in names if n.startswith("ckpt-")] == ["ckpt-000000002"]
    assert [n for n in names if n.startswith(".tmp-ckpt-000000004-")]
    resumed = run_job(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(step 2)" in resumed.stderr
    assert_same_run(uninterrupted, tmp_path)
    assert not [n for n in checkpoints(tmp_path) if n.startswith(".tmp")]
