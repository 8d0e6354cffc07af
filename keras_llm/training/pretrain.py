"""Pretraining: data -> tokenizer -> objective (model, loss, tf.data) -> fit -> model artifact.

The steps are the same for every model family; what differs (model, batches, loss, metrics)
comes from the objective named by `config.task` (see `keras_llm.training.objectives`).
"""
import logging
import math
import dataclasses
import os
import shutil
import time

import keras
import tensorflow as tf

from keras_llm import artifacts
from keras_llm.data import load_tokenizer, open_source, split_documents, train_tokenizer
from keras_llm.errors import ArtifactError, ConfigError
from keras_llm.training import distribute, loop
from keras_llm.training.checkpoint import CheckpointManager
from keras_llm.training.objectives import get_objective

logger = logging.getLogger(__name__)

ARTIFACT_TYPE = "keras_llm.PretrainedModel"


class PerplexityLogger(keras.callbacks.Callback):
    """Adds `perplexity = exp(loss)` (and the validation twin) to the epoch logs."""

    def on_epoch_end(self, epoch, logs=None):
        for key in ("loss", "val_loss"):
            if logs is not None and key in logs:
                logs[key.replace("loss", "perplexity")] = math.exp(min(logs[key], 50.0))


def check_output_dir(output_dir, overwrite, restart=False):
    """A finished artifact is refused (unless `overwrite`); an unfinished one with checkpoints
    is resumed by `loop.train`, unless `restart` (or `overwrite`) clears them first."""
    if artifacts.is_complete(output_dir) and not overwrite:
        raise ArtifactError(
            f"{output_dir} already holds a finished model; pass --overwrite to replace it or "
            f"choose another --output-dir")
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"{output_dir}: cannot create the output directory ({e.strerror})")
    if not os.access(output_dir, os.W_OK):
        raise ArtifactError(f"{output_dir}: output directory is not writable")
    checkpoints = os.path.join(output_dir, "checkpoints")
    if os.path.isdir(checkpoints):
        if restart or overwrite:
            shutil.rmtree(checkpoints)
        else:
            logger.info("%s has checkpoints: resuming (pass --restart to start over)",
                        output_dir)


def prepare_data(config, tokenizer_path=None):
    """Opens the source, splits it, and trains (or loads) the tokenizer on the train split."""
    source = open_source(config.data.source, text_field=config.data.text_field)
    train_documents, validation_documents = split_documents(
        source.dataset(), config.data.validation_fraction, seed=config.train.seed)
    tokenizer_path = tokenizer_path or config.data.tokenizer_path
    if tokenizer_path:
        tokenizer = load_tokenizer(tokenizer_path)
    else:
        started = time.time()
        texts = [t.decode("utf-8") for t in train_documents.as_numpy_iterator()]
        tokenizer = train_tokenizer(config.data.tokenizer, texts, config.model.vocab_size,
                                    lowercase=config.data.lowercase)
        logger.info("trained a %s tokenizer with %d tokens in %.1fs", config.data.tokenizer,
                    tokenizer.vocabulary_size(), time.time() - started)
    return source, train_documents, validation_documents, tokenizer


def count_batches(dataset):
    return int(dataset.reduce(0, lambda count, _: count + 1))


def steps_and_intervals(config, steps_per_data_epoch):
    """Total optimizer steps and the evaluation interval (Keras "epochs" are intervals)."""
    steps = config.train.steps
    if config.train.epochs is not None:
        steps = config.train.epochs * steps_per_data_epoch
    interval = min(config.train.eval_every, steps)
    return steps, interval


def pretrain(config, output_dir, tokenizer_path=None, overwrite=False, command=None,
             verbose=1, restart=False, callbacks=None):
    """Trains `config`'s model on `config.data.source`; writes a model artifact to `output_dir`.

    A rerun in the same `output_dir` resumes from its checkpoints; `restart=True` starts over.
    `callbacks` are more Keras callbacks, run after the built-in ones at every evaluation
    (e.g. `EarlyStopping(monitor="val_loss")`: training ends when it sets
    `model.stop_training`). Returns the metrics dict written to `metrics.json`.
    """
    check_output_dir(output_dir, overwrite, restart)
    keras.utils.set_random_seed(config.train.seed)
    strategy = distribute.make_strategy(config.train.strategy)
    global_batch, _, learning_rate = distribute.batch_and_learning_rate(
        config.train.batch_size, config.train.learning_rate, strategy, config.train.scale_lr)
    config = dataclasses.replace(config, train=dataclasses.replace(
        config.train, batch_size=global_batch, learning_rate=learning_rate))
    loop.use_mixed_precision(config.train.mixed_precision)
    objective = get_objective(config)
    source, train_documents, validation_documents, tokenizer = prepare_data(
        config, tokenizer_path)
    objective.check_tokenizer(tokenizer)
    steps_per_data_epoch = objective.steps_per_pass(train_documents, tokenizer)
    validation_ds = objective.dataset(validation_documents, tokenizer, False).cache()
    validation_batches = count_batches(validation_ds)
    if steps_per_data_epoch == 0 or validation_batches == 0:
        raise ConfigError(
            f"corpus too small for train.batch_size={config.train.batch_size} x "
            f"data.seq_len={config.data.seq_len}: {steps_per_data_epoch} training and "
            f"{validation_batches} validation batches; lower --batch-size/--seq-len or add data")
    # A known cardinality keeps Keras from treating the end of validation data as a fault.
    validation_ds = validation_ds.apply(tf.data.experimental.assert_cardinality(
        validation_batches))
    train_ds = objective.dataset(train_documents, tokenizer, True)
    steps, interval = steps_and_intervals(config, steps_per_data_epoch)

    with strategy.scope():
        model = objective.build_model(tokenizer)
        objective.compile(model, loop.make_training_optimizer(
            config.train, total_steps=steps, grad_accum_steps=config.train.grad_accum_steps))
    loop.configure_speed(model, config.train.xla, config.train.steps_per_execution)
    logger.info("%s: %s parameters; %d steps of %d sequences of %d tokens (%.1f passes over "
                "the training data)", config.name, f"{model.count_params():,}", steps,
                config.train.batch_size, config.data.seq_len, steps / steps_per_data_epoch)
    chief = distribute.is_chief(strategy)
    # exp(loss) is a perplexity only when the loss is one token-level cross-entropy.
    callbacks = ([PerplexityLogger()] if objective.loss_is_token_cross_entropy else []) + (
        [keras.callbacks.TensorBoard(os.path.join(output_dir, artifacts.LOGS_DIR))] if chief
        else []) + list(callbacks or [])
    started = time.time()
    history = loop.train(
        model, train_ds, steps, interval,
        validation_data=validation_ds.take(min(config.train.eval_steps, validation_batches)),
        output_dir=output_dir, callbacks=callbacks,
        checkpoint_every=config.train.checkpoint_every,
        keep_checkpoints=config.train.keep_checkpoints, config=config, strategy=strategy,
        verbose=verbose)
    train_seconds = max(time.time() - started, 1e-9)

    final = model.evaluate(validation_ds, verbose=0, return_dict=True)
    trained_steps = int(model.optimizer.iterations.numpy())
    metrics = {
        "steps": trained_steps,
        "train_loss": float(history.history["loss"][-1]),
        "val_loss": float(final["loss"]),
        **objective.final_metrics(final, train_documents, validation_documents, tokenizer),
        "train_seconds": round(train_seconds, 1),
        "train_tokens_per_second": round(
            (trained_steps - history.first_step) * config.train.grad_accum_steps
            * config.train.batch_size * config.data.seq_len / train_seconds, 1),
        "parameters": int(model.count_params()),
        "vocabulary_size": tokenizer.vocabulary_size(),
    }
    data_record = {**source.describe(), "fingerprint": source.fingerprint()}
    metadata = artifacts.make_metadata(
        ARTIFACT_TYPE, config, data=data_record, command=command,
        extra={"family": config.model.family, "task": config.task})
    if chief:  # the other workers of a multi-worker run hold the same weights
        artifacts.save_model_artifact(output_dir, model, tokenizer, config, metrics, metadata)
    return metrics
