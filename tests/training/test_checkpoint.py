"""Checkpoint manager: round trip, keep-last-K, atomic writes, fallbacks and refusals."""
import errno
import logging
import os
import random

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_llm.errors import ArtifactError, ConfigError, DataError
from keras_llm.training import checkpoint
from keras_llm.training.checkpoint import CheckpointManager

CONFIG = {"model": {"hidden_size": 16}, "train": {"batch_size": 8, "steps": 10}}


def small_model():
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dropout(0.5),
                              keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.AdamW(1e-2), loss="mse")
    return model


def dataset():
    x = np.arange(64 * 4, dtype="float32").reshape(64, 4) / 100.0
    return (tf.data.Dataset.from_tensor_slices((x, x.sum(axis=1, keepdims=True)))
            .shuffle(16, seed=1).repeat().batch(4).prefetch(2))


def trained_manager(directory, steps=3, **kwargs):
    model = small_model()
    iterator = iter(dataset())
    model.fit(dataset(), steps_per_epoch=1, epochs=1, verbose=0)  # builds the optimizer
    for _ in range(steps):
        model.train_on_batch(*next(iterator))
    return CheckpointManager(str(directory), model, iterator, config=CONFIG, **kwargs)


def test_round_trip_restores_weights_optimizer_iterator_and_random_state(tmp_path):
    manager = trained_manager(tmp_path)
    model = manager.model
    random.seed(11)
    np.random.seed(12)
    manager.save(step=3)
    expected_python, expected_numpy = random.random(), np.random.rand()
    weights = [w.copy() for w in model.get_weights()]
    iterations = int(model.optimizer.iterations)
    next_batch = next(manager.checkpoint.iterator)[0].numpy()
    model.train_on_batch(*next(manager.checkpoint.iterator))  # move everything on

    assert manager.restore() == 3
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)
    assert int(model.optimizer.iterations) == iterations
    np.testing.assert_array_equal(next(manager.checkpoint.iterator)[0].numpy(), next_batch)
    assert random.random() == expected_python and np.random.rand() == expected_numpy
    names = sorted(os.listdir(manager.path(3)))
    assert names[0] == "meta.json" and names[1].startswith("state")


def test_keeps_the_last_k_and_ignores_temporary_directories(tmp_path):
    manager = trained_manager(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        manager.save(step)
    assert manager.steps() == [3, 4]
    # A write that died half-way leaves only a temporary directory: never a checkpoint.
    os.makedirs(os.path.join(manager.directory, ".tmp-ckpt-000000005-999"))
    assert manager.steps() == [3, 4]
    assert manager.restore() == 4
    assert sorted(os.listdir(manager.directory)) == ["ckpt-000000003", "ckpt-000000004"]


def _corrupt(manager, step):
    data = [n for n in os.listdir(manager.path(step)) if n.startswith("state.data")][0]
    path = os.path.join(manager.path(step), data)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\xff\x00\xff\x00")


def test_corrupted_or_incomplete_latest_falls_back_with_a_warning(tmp_path, caplog):
    manager = trained_manager(tmp_path)
    for step in (2, 4, 6):
        manager.save(step)
    _corrupt(manager, 6)
    os.remove(os.path.join(manager.path(4), checkpoint.META_FILE))
    with caplog.at_level(logging.WARNING, logger="keras_llm.training.checkpoint"):
        assert manager.restore() == 2
    messages = [r.getMessage() for r in caplog.records]
    assert any("ckpt-000000006 is damaged" in m and "does not match" in m for m in messages)
    assert any("ckpt-000000004 is damaged" in m for m in messages)


def test_nothing_to_restore_returns_none(tmp_path):
    assert trained_manager(tmp_path).restore() is None


def test_resuming_with_a_different_config_is_refused_naming_the_keys(tmp_path):
    manager = trained_manager(tmp_path)
    manager.save(3)
    changed = {"model": {"hidden_size": 32}, "train": {"batch_size": 16, "steps": 99}}
    other = CheckpointManager(str(tmp_path), manager.model, config=changed)
    with pytest.raises(ConfigError) as error:
        other.restore()
    message = str(error.value)
    assert "model.hidden_size: 16 -> 32" in message and "train.batch_size: 8 -> 16" in message
    assert "train.steps" not in message and "--restart" in message
    # Only keys that may change (here train.steps): resumes.
    longer = {"model": {"hidden_size": 16}, "train": {"batch_size": 8, "steps": 99}}
    assert CheckpointManager(str(tmp_path), manager.model, config=longer).restore() == 3


def test_config_differences_flattens_and_ignores_resumable_keys():
    assert checkpoint.config_differences(
        {"a": {"b": 1, "c": 2}, "train": {"steps": 1}},
        {"a": {"b": 1, "c": 3, "d": 0}, "train": {"steps": 2}}) == ["a.c", "a.d"]


def test_disk_full_is_one_clean_error_and_keeps_existing_checkpoints(tmp_path, monkeypatch):
    manager = trained_manager(tmp_path)
    manager.save(2)

    def full(prefix):
        with open(prefix + ".partial", "wb") as f:
            f.write(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(manager, "_write_state", full)
    with pytest.raises(ArtifactError, match="cannot write checkpoint to .*: no space left on "
                                            "device$"):
        manager.save(4)
    assert sorted(os.listdir(manager.directory)) == ["ckpt-000000002"]
    monkeypatch.undo()
    assert manager.restore() == 2


def test_unwritable_output_directory_is_one_clean_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    manager = trained_manager(blocker / "out")
    with pytest.raises(ArtifactError, match="cannot write checkpoint to") as error:
        manager.save(1)
    assert "\n" not in str(error.value)


def test_generator_pipelines_are_refused_before_training(tmp_path):
    def numbers():
        yield from range(10)

    generated = checkpoint.checkpointable_dataset(tf.data.Dataset.from_generator(
        numbers, output_signature=tf.TensorSpec((), tf.int64)).repeat())
    iterator = iter(generated)
    next(iterator)
    with pytest.raises(DataError, match="cannot be checkpointed .*GeneratorDataset"):
        CheckpointManager(str(tmp_path), small_model(), iterator)
