"""The resumable training driver and its speed switches on a tiny GPT."""
import doctest
import importlib.util
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_llm.config import TrainConfig
from keras_llm.training import checkpoint as checkpoint_module
from keras_llm.training import distribute as distribute_module
from keras_llm.training import loop

_spec = importlib.util.spec_from_file_location(
    "train_job", os.path.join(os.path.dirname(__file__), "train_job.py"))
train_job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_job)


def weights_close(a, b, atol):
    for x, y in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(x, y, atol=atol)


def test_trains_exact_steps_evaluates_each_interval_and_writes_checkpoints(tmp_path):
    model = train_job.build_model(seed=1, dropout=0.0)
    board = keras.callbacks.TensorBoard(str(tmp_path / "logs"), write_graph=False)
    history = loop.train(model, train_job.synthetic_dataset(1, 8), steps=10, interval=4,
                         validation_data=train_job.synthetic_dataset(2, 8).take(2),
                         output_dir=str(tmp_path), checkpoint_every=3, keep_checkpoints=10,
                         callbacks=[board], verbose=0)
    assert int(model.optimizer.iterations) == 10
    assert sorted(history.history) == ["accuracy", "loss", "val_accuracy", "val_loss"]
    assert len(history.history["loss"]) == 3  # intervals of 4, 4 and 2 steps
    assert history.history["loss"][-1] < history.history["loss"][0]
    # Every 3 steps and at every interval end (4, 8, 10).
    steps = checkpoint_module.CheckpointManager(str(tmp_path), model).steps()
    assert steps == [3, 4, 6, 8, 9, 10]
    assert os.listdir(tmp_path / "logs" / "train")


def test_a_finished_run_resumes_to_nothing_to_do(tmp_path):
    model = train_job.build_model(seed=1, dropout=0.0)
    first = loop.train(model, train_job.synthetic_dataset(1, 8), steps=4, interval=4,
                       output_dir=str(tmp_path), verbose=0)
    assert first.first_step == 0
    last_loss = first.history["loss"][-1]
    again = train_job.build_model(seed=5, dropout=0.0)
    history = loop.train(again, train_job.synthetic_dataset(1, 8), steps=4, interval=4,
                         output_dir=str(tmp_path), verbose=0)
    assert history.first_step == 4
    assert history.history["loss"] == [pytest.approx(last_loss)]  # from the checkpoint
    weights_close(model, again, atol=0)


def test_gradient_accumulation_equals_an_n_times_larger_batch():
    big = train_job.build_model(seed=3, dropout=0.0)
    loop.train(big, train_job.synthetic_dataset(3, 8), steps=3, interval=3, verbose=0)
    accumulated = train_job.build_model(seed=3, dropout=0.0, grad_accum_steps=2)
    # The same rows in the same order, as 2 batches of 4 per step.
    loop.train(accumulated, train_job.synthetic_dataset(3, 8).unbatch().batch(4), steps=3,
               interval=3, verbose=0)
    assert int(accumulated.optimizer.iterations) == 3  # updates, not batches
    weights_close(big, accumulated, atol=2e-5)
    untouched = train_job.build_model(seed=3, dropout=0.0)
    with pytest.raises(AssertionError):
        weights_close(untouched, accumulated, atol=1e-3)


def test_make_training_optimizer_stretches_the_schedule_over_batches():
    config = TrainConfig(learning_rate=1e-3, warmup_steps=10)
    optimizer = loop.make_training_optimizer(config, total_steps=100, grad_accum_steps=4)
    assert optimizer.gradient_accumulation_steps == 4
    schedule = optimizer._learning_rate
    assert schedule.warmup_steps == 40
    assert float(schedule(40)) == pytest.approx(1e-3)
    assert loop.make_training_optimizer(config, 100).gradient_accumulation_steps is None


def test_xla_and_steps_per_execution_give_the_same_weights(tmp_path):
    reference = train_job.build_model(seed=4, dropout=0.0)
    loop.train(reference, train_job.synthetic_dataset(4, 8), steps=7, interval=7, verbose=0)
    fast = train_job.build_model(seed=4, dropout=0.0)
    loop.configure_speed(fast, xla=True, steps_per_execution=3)
    # Checkpoints every 2 steps cut the 3-step executions: every batch is still used once.
    loop.train(fast, train_job.synthetic_dataset(4, 8), steps=7, interval=7, verbose=0,
               output_dir=str(tmp_path), checkpoint_every=2, keep_checkpoints=10)
    assert int(fast.optimizer.iterations) == 7
    assert checkpoint_module.CheckpointManager(str(tmp_path), fast).steps() == [2, 4, 6, 7]
    weights_close(reference, fast, atol=1e-4)


@pytest.fixture
def restore_dtype_policy():
    yield
    keras.config.set_dtype_policy("float32")


def test_mixed_precision_is_bfloat16_on_cpu_and_trains(restore_dtype_policy):
    assert loop.mixed_precision_policy(False) == "float32"
    assert loop.use_mixed_precision(True) == "mixed_bfloat16"  # no GPU here
    model = train_job.build_model(seed=5, dropout=0.0)
    assert model.compute_dtype == "bfloat16" and model.variable_dtype == "float32"
    history = loop.train(model, train_job.synthetic_dataset(5, 8), steps=6, interval=3,
                         verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_docstring_examples_run():
    for module in (checkpoint_module, distribute_module):
        assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0
