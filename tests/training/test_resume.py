"""Exact resume: a run killed (SIGKILL, or mid-checkpoint-write) and rerun ends where an
uninterrupted run with the same seed ends."""
import json
import os
import shutil
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


def tiny_config(**train):
    from keras_llm.config import load_config

    overrides = {"model.vocab_size": 300, "model.hidden_size": 16, "model.num_layers": 1,
                 "model.num_heads": 2, "model.intermediate_size": 32, "model.max_length": 16,
                 "data.seq_len": 16, "data.validation_fraction": 0.2, "data.shuffle_buffer": 32,
                 "train.batch_size": 4, "train.steps": 4, "train.eval_every": 2,
                 "train.eval_steps": 1, "train.warmup_steps": 1, "train.checkpoint_every": 1}
    overrides.update({f"train.{k}": v for k, v in train.items()})
    return load_config("gpt-tiny", overrides=overrides)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": f"document {i}: the quick brown fox jumps over the lazy dog "
                                 f"{i % 7} times"}) for i in range(80)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.slow
def test_pretrain_resumes_an_unfinished_artifact_and_refuses_other_configs(tmp_path, corpus):
    from keras_llm import artifacts
    from keras_llm.errors import ConfigError
    from keras_llm.training.pretrain import pretrain

    out = str(tmp_path / "model")
    config = tiny_config()
    config.data.source = corpus
    first = pretrain(config, out, verbose=0)
    assert first["steps"] == 4
    # An interrupted run: the artifact was never finished and only checkpoints 2, 3 remain.
    os.remove(os.path.join(out, artifacts.METADATA_FILE))
    shutil.rmtree(os.path.join(out, "checkpoints", "ckpt-000000004"))
    other = tiny_config(batch_size=8)
    other.data.source = corpus
    with pytest.raises(ConfigError, match=r"train.batch_size: 4 -> 8.*--restart"):
        pretrain(other, out, verbose=0)
    resumed = pretrain(config, out, verbose=0)
    assert artifacts.is_complete(out)
    assert resumed["steps"] == 4
    assert resumed["val_loss"] == pytest.approx(first["val_loss"], abs=1e-5)


def test_restart_and_overwrite_clear_checkpoints_finished_models_are_refused(tmp_path):
    from keras_llm import artifacts
    from keras_llm.errors import ArtifactError
    from keras_llm.training.pretrain import check_output_dir

    checkpoints = tmp_path / "checkpoints" / "ckpt-000000002"
    checkpoints.mkdir(parents=True)
    check_output_dir(str(tmp_path), overwrite=False)  # resumes: checkpoints kept
    assert checkpoints.is_dir()
    check_output_dir(str(tmp_path), overwrite=False, restart=True)
    assert not (tmp_path / "checkpoints").exists()
    (tmp_path / artifacts.METADATA_FILE).write_text("{}")
    with pytest.raises(ArtifactError, match="already holds a finished model"):
        check_output_dir(str(tmp_path), overwrite=False)
    checkpoints.mkdir(parents=True)
    check_output_dir(str(tmp_path), overwrite=True)
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(ArtifactError, match="cannot create the output directory"):
        check_output_dir(str(tmp_path / artifacts.METADATA_FILE / "sub"), overwrite=False)
