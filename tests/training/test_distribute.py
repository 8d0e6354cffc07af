"""Strategies, batch/learning-rate rules, and MirroredStrategy over 2 logical CPUs (subprocess)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from keras_llm.errors import ConfigError
from keras_llm.training import distribute

JOB = os.path.join(os.path.dirname(__file__), "train_job.py")


def test_default_strategy_and_batch_rules():
    strategy = distribute.make_strategy("default")
    assert strategy.num_replicas_in_sync == 1
    assert distribute.describe_strategy(strategy) == {
        "strategy": type(strategy).__name__, "replicas": 1, "workers": 1, "worker_index": 0}
    assert distribute.per_replica_batch_size(32, strategy) == 32
    assert distribute.batch_and_learning_rate(32, 1e-3, strategy) == (32, 32, 1e-3)
    assert distribute.worker_seed(5, strategy) == 5


def test_auto_without_cluster_or_gpus_is_default(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert distribute.make_strategy("auto") is tf.distribute.get_strategy()


def test_bad_strategy_names_and_missing_hardware_are_one_line_errors(monkeypatch):
    with pytest.raises(ConfigError, match="--strategy must be one of"):
        distribute.make_strategy("horovod")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="multi-worker needs TF_CONFIG"):
        distribute.make_strategy("multi-worker")
    monkeypatch.setenv("TF_CONFIG", "not json")
    with pytest.raises(ConfigError, match="TF_CONFIG is not a JSON object"):
        distribute.make_strategy("auto")
    monkeypatch.delenv("TF_CONFIG")
    monkeypatch.delenv("TPU_NAME", raising=False)
    with pytest.raises(ConfigError, match="no TPU found") as error:
        distribute.make_strategy("tpu")
    assert "\n" not in str(error.value)


def test_tf_config_cluster(monkeypatch):
    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster,
                                                "task": {"type": "worker", "index": 1}}))
    assert distribute.tf_config_cluster() == cluster


class FakeStrategy:
    num_replicas_in_sync = 4


def test_batch_must_divide_and_scale_lr_reads_per_replica_batch():
    with pytest.raises(ConfigError, match=r"batch_size \(30\) must be divisible .* \(4\)"):
        distribute.per_replica_batch_size(30, FakeStrategy())
    # Default rule: the global batch is kept and the learning rate untouched.
    assert distribute.batch_and_learning_rate(32, 1e-3, FakeStrategy()) == (32, 8, 1e-3)
    # --scale-lr: batch_size per replica, learning rate times replicas (linear scaling).
    assert distribute.batch_and_learning_rate(32, 1e-3, FakeStrategy(), scale_lr=True) == (
        128, 32, 4e-3)


def test_data_sharding_option_and_single_replica_passthrough():
    dataset = distribute.with_data_sharding(tf.data.Dataset.range(4).batch(2))
    policy = dataset.options().experimental_distribute.auto_shard_policy
    assert policy == tf.data.experimental.AutoShardPolicy.DATA
    batches = list(distribute.replica_batches(iter(dataset), tf.distribute.get_strategy()))
    assert [b.numpy().tolist() for b in batches] == [[0, 1], [2, 3]]


def _run_job(out, *args, timeout=240, env=None):
    result = subprocess.run([sys.executable, JOB, "--out", str(out), *args], timeout=timeout,
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_mirrored_two_logical_cpus_matches_one_device(tmp_path):
    # Dropout off: each replica draws its own masks, so only the dropout-free run is exact.
    _run_job(tmp_path, "--logical-devices", "2", "--strategy", "default,mirrored",
             "--dropout", "0", "--no-checkpoints", "--steps", "8", "--interval", "4")
    one = json.loads((tmp_path / "default-0.json").read_text())
    two = json.loads((tmp_path / "mirrored-0.json").read_text())
    assert one["iterations"] == two["iterations"] == 8
    np.testing.assert_allclose(one["losses"], two["losses"], atol=1e-5)
    assert one["losses"][-1] < one["losses"][0]
    a, b = np.load(tmp_path / "default-0.npz"), np.load(tmp_path / "mirrored-0.npz")
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-4)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_multi_worker_run_ends_with_identical_weights(tmp_path):
    workers = [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]
    processes = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})}
        processes.append(subprocess.Popen(
            [sys.executable, JOB, "--out", str(tmp_path), "--strategy", "auto", "--dropout",
             "0", "--steps", "6", "--interval", "3", "--checkpoint-every", "2"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        for process in processes:
            _, stderr = process.communicate(timeout=240)
            assert process.returncode == 0, stderr[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    logs = [json.loads((tmp_path / f"auto-{i}.json").read_text()) for i in range(2)]
    assert logs[0]["iterations"] == logs[1]["iterations"] == 6
    a, b = np.load(tmp_path / "auto-0.npz"), np.load(tmp_path / "auto-1.npz")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    # Each worker keeps its own checkpoints (its own input position).
    assert (tmp_path / "run" / "checkpoints" / "ckpt-000000006").is_dir()
    assert (tmp_path / "run" / "checkpoints" / "worker-1" / "ckpt-000000006").is_dir()


def test_train_config_scale_fields_are_validated():
    from keras_llm.config import load_config

    config = load_config("gpt-tiny", overrides={"train.strategy": "mirrored",
                                                "train.grad_accum_steps": 4})
    assert (config.train.strategy, config.train.grad_accum_steps) == ("mirrored", 4)
    assert (config.train.xla, config.train.mixed_precision, config.train.keep_checkpoints,
            config.train.checkpoint_every, config.train.steps_per_execution) == (
        False, False, 3, None, 1)
    with pytest.raises(ConfigError, match="train.strategy must be one of"):
        load_config("gpt-tiny", overrides={"train.strategy": "horovod"})
    with pytest.raises(ConfigError, match="train.grad_accum_steps must be > 0"):
        load_config("gpt-tiny", overrides={"train.grad_accum_steps": 0})
