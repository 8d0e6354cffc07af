"""The resumable training driver: `model.fit`, but the input position is checkpointed too.

`train()` runs the compiled model's own Keras train function (the same one `fit` uses, so
XLA, steps_per_execution, mixed precision and distribution behave exactly as in `fit`) on ONE
`tf.data` iterator that lives for the whole run, which is what lets a checkpoint hold the
input pipeline's position. Evaluation intervals play the role of Keras epochs for callbacks,
the progress bar and TensorBoard.

Steps count optimizer updates. With gradient accumulation over N batches, a step reads N
batches, and the learning-rate schedule (which Keras evaluates on batches, not updates) is
built over N times as many iterations by `make_training_optimizer`.

Speed switches (all off by default):
    mixed precision     `use_mixed_precision(True)` before the model is built: mixed_float16
                        with dynamic loss scaling on GPU (compile adds the LossScaleOptimizer),
                        mixed_bfloat16 on CPU and TPU
    XLA                 `configure_speed(model, xla=True)`: the train step is jit-compiled
                        (one replica only, see `configure_speed`)
    steps_per_execution several train steps per call into the runtime (single replica)
    gradient accumulation `make_training_optimizer(..., grad_accum_steps=N)`
"""
import dataclasses
import itertools
import logging
import math

import keras
import tensorflow as tf

from keras_llm.training import distribute
from keras_llm.training.checkpoint import CheckpointManager, checkpointable_dataset
from keras_llm.training.optim import make_optimizer

logger = logging.getLogger(__name__)


def mixed_precision_policy(enabled):
    """The Keras dtype policy name `--mixed-precision` means on this machine."""
    if not enabled:
        return "float32"
    return "mixed_float16" if tf.config.list_logical_devices("GPU") else "mixed_bfloat16"


def use_mixed_precision(enabled):
    """Sets the global Keras dtype policy (before building the model); returns its name."""
    policy = mixed_precision_policy(enabled)
    keras.config.set_dtype_policy(policy)
    return policy


def make_training_optimizer(train_config, total_steps, grad_accum_steps=1):
    """`make_optimizer`, with Keras gradient accumulation over `grad_accum_steps` batches.

    Keras evaluates the schedule on batches, so warmup and decay are stretched by the same
    factor: the learning rate at each update matches the unaccumulated schedule.
    """
    if grad_accum_steps <= 1:
        return make_optimizer(train_config, total_steps)
    stretched = dataclasses.replace(
        train_config, warmup_steps=train_config.warmup_steps * grad_accum_steps)
    optimizer = make_optimizer(stretched, total_steps * grad_accum_steps)
    optimizer.gradient_accumulation_steps = grad_accum_steps  # read when the optimizer builds
    return optimizer


def configure_speed(model, xla=False, steps_per_execution=1):
    """Turns XLA and steps_per_execution on a compiled model on or off.

    XLA stays off with more than one replica: Keras 3 compiles the whole distributed step
    (`strategy.run` included) as one XLA cluster, which cannot reach the other replicas'
    variables ("Trying to access resource ... located in device").
    """
    if xla and model.distribute_strategy.num_replicas_in_sync > 1:
        logger.warning("--xla is ignored with %d replicas (Keras 3 cannot jit-compile a "
                       "step that spans devices); training without XLA",
                       model.distribute_strategy.num_replicas_in_sync)
        xla = False
    model.jit_compile = bool(xla)
    model.steps_per_execution = int(steps_per_execution)
    model.train_function = model.test_function = model.predict_function = None


def accumulation_steps(model):
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    return getattr(optimizer, "gradient_accumulation_steps", None) or 1


def build_for_training(model, element_spec, strategy):
    """Creates the optimizer and metric variables up front, under the strategy (as `fit`
    does): variables created lazily inside a distributed `tf.function` are not allowed."""
    batch = tf.nest.map_structure(
        lambda spec: tf.zeros([d or 1 for d in spec.shape], spec.dtype), element_spec)
    with strategy.scope():
        model._symbolic_build(data_batch=batch)


def rank1_step_outputs(model):
    """Works around Keras 3's multi-worker reduction of step outputs.

    Under MultiWorkerMirroredStrategy Keras reduces each step's logs with
    `strategy.reduce("MEAN", value, axis=0)`, which fails on the scalar metric values that
    every train and test step returns; giving them shape [1] makes that reduction a mean
    over replicas that yields the same scalar.
    """
    for name in ("train_step", "test_step"):
        step = getattr(model, name)

        def expanded(data, step=step):
            return {key: tf.reshape(value, [1]) if tf.is_tensor(value) and value.shape.rank == 0
                    else value for key, value in step(data).items()}

        setattr(model, name, expanded)
    model.train_function = model.test_function = None


def train(model, train_dataset, steps, interval, validation_data=None, validation_steps=None,
          output_dir=None, callbacks=None, checkpoint_every=None, keep_checkpoints=3,
          config=None, strategy=None, verbose=1):
    """Trains `model` for `steps` optimizer steps, resuming from `output_dir`'s checkpoints.

    Args:
        model: a compiled Keras model, created and compiled under `strategy.scope()`.
        train_dataset: a repeated `tf.data.Dataset` of global batches.
        steps: total optimizer steps of the run (not of this process).
        interval: steps between evaluations (a Keras "epoch" for callbacks and logs).
        validation_data: a finite dataset evaluated at the end of each interval.
        validation_steps: batches of `validation_data` per evaluation (None: all).
        output_dir: where `checkpoints/` lives; None trains without checkpoints.
        callbacks: Keras callbacks (TensorBoard, ...).
        checkpoint_every: steps between checkpoints (None: at interval ends only);
            a checkpoint is also written at the end of every interval.
        keep_checkpoints: how many checkpoints to keep.
        config: resolved config dict or `Config`, compared on resume.
        strategy: the `tf.distribute.Strategy` the model was built under.
        verbose: 0 silent, 1 progress bar, 2 one line per interval.

    Returns:
        The Keras `History` of the intervals run by this call (of the last interval when the
        run had already finished), with `first_step`: the step this call started from.
    """
    strategy = strategy or tf.distribute.get_strategy()
    accum = accumulation_steps(model)
    total, per_interval = steps * accum, interval * accum  # counted in batches from here on
    every = (checkpoint_every or interval) * accum
    train_dataset = distribute.with_data_sharding(checkpointable_dataset(train_dataset))
    iterator = iter(train_dataset)
    build_for_training(model, train_dataset.element_spec, strategy)
    workers, worker_index = distribute.worker_count_and_index(strategy)
    if workers > 1 and not getattr(model, "_rank1_step_outputs", False):
        rank1_step_outputs(model)
        model._rank1_step_outputs = True
    manager = None
    step = 0
    if output_dir is not None:
        manager = CheckpointManager(output_dir, model, iterator, config=config,
                                    keep=keep_checkpoints, worker_index=worker_index)
        step = manager.restore() or 0
    first_step = step
    model.make_train_function()
    batches = distribute.replica_batches(iterator, strategy)
    in_graph_loop = strategy.num_replicas_in_sync == 1
    intervals = math.ceil(total / per_interval)
    callbacks = keras.callbacks.CallbackList(
        callbacks, add_history=True, add_progbar=verbose != 0, verbose=verbose,
        epochs=intervals, steps=per_interval, model=model)
    model.stop_training = False
    callbacks.on_train_begin()
    epoch_logs = {}
    for epoch in range(step // per_interval, intervals):
        start, end = epoch * per_interval, min((epoch + 1) * per_interval, total)
        if step == start:  # mid-interval, the metric accumulators came from the checkpoint
            model.reset_metrics()
        callbacks.on_epoch_begin(epoch)
        logs = {}
        while step < end:
            chunk = min(model.steps_per_execution, end - step, every - step % every)
            callbacks.on_train_batch_begin(step - start)
            if in_graph_loop and chunk == model.steps_per_execution:
                logs = model.train_function(iterator)
            else:  # exactly `chunk` batches, one call each
                logs = model.train_function(itertools.islice(batches, chunk))
            step += chunk
            callbacks.on_train_batch_end(step - start - 1, logs)
            if manager is not None and step % every == 0 and step < end:
                manager.save(step)
            if model.stop_training:
                break
        epoch_logs = {name: float(value) for name, value in logs.items()}
        if validation_data is not None:
            val_logs = model.evaluate(validation_data, steps=validation_steps, verbose=0,
                                      return_dict=True)
            epoch_logs.update({f"val_{name}": float(v) for name, v in val_logs.items()})
        callbacks.on_epoch_end(epoch, epoch_logs)
        if manager is not None:
            manager.save(step, logs=epoch_logs)
        if model.stop_training:
            break
    callbacks.on_train_end(epoch_logs)
    history = model.history
    if not history.history and manager is not None and manager.restored_logs:
        # Resumed a run whose training had finished: report its last interval.
        history.history = {name: [value] for name, value in manager.restored_logs.items()}
    history.first_step = first_step // accum  # where this call started (0 unless resumed)
    return history
