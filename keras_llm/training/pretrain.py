"""Causal-LM pretraining: data -> tokenizer -> tf.data -> GPT -> fit -> model artifact."""
import logging
import math
import os
import time

import keras

from keras_llm import artifacts
from keras_llm.data import (
    causal_lm_dataset,
    load_tokenizer,
    open_source,
    split_documents,
    train_tokenizer,
    unigram_baseline,
)
from keras_llm.errors import ArtifactError, ConfigError
from keras_llm.models import GPTBackbone, GPTCausalLM
from keras_llm.training.optim import make_optimizer

logger = logging.getLogger(__name__)

ARTIFACT_TYPE = "keras_llm.PretrainedModel"


class PerplexityLogger(keras.callbacks.Callback):
    """Adds `perplexity = exp(loss)` (and the validation twin) to the epoch logs."""

    def on_epoch_end(self, epoch, logs=None):
        for key in ("loss", "val_loss"):
            if logs is not None and key in logs:
                logs[key.replace("loss", "perplexity")] = math.exp(min(logs[key], 50.0))


class StopAtStep(keras.callbacks.Callback):
    """Ends training after exactly `steps` optimizer steps, mid-epoch if need be."""

    def __init__(self, steps):
        super().__init__()
        self.steps = steps

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations) >= self.steps:
            self.model.stop_training = True


def check_output_dir(output_dir, overwrite):
    if artifacts.is_complete(output_dir) and not overwrite:
        raise ArtifactError(
            f"{output_dir} already holds a finished model; pass --overwrite to replace it or "
            f"choose another --output-dir")
    os.makedirs(output_dir, exist_ok=True)
    if not os.access(output_dir, os.W_OK):
        raise ArtifactError(f"{output_dir}: output directory is not writable")


def prepare_data(config, tokenizer_path=None):
    """Opens the source, splits it, and trains (or loads) the tokenizer on the train split."""
    source = open_source(config.data.source, text_field=config.data.text_field)
    train_docs, val_docs = split_documents(
        source.dataset(), config.data.validation_fraction, seed=config.train.seed)
    if tokenizer_path:
        tokenizer = load_tokenizer(tokenizer_path)
    else:
        started = time.time()
        texts = (t.decode("utf-8") for t in train_docs.as_numpy_iterator())
        tokenizer = train_tokenizer(config.data.tokenizer, texts, config.model.vocab_size,
                                    lowercase=config.data.lowercase)
        logger.info("trained a %s tokenizer, %d tokens, in %.1fs", config.data.tokenizer,
                    tokenizer.vocabulary_size(), time.time() - started)
    if tokenizer.vocabulary_size() > config.model.vocab_size:
        raise ConfigError(
            f"tokenizer has {tokenizer.vocabulary_size()} tokens but model.vocab_size is "
            f"{config.model.vocab_size}")
    return source, train_docs, val_docs, tokenizer


def build_model(config, vocabulary_size):
    model = GPTCausalLM(GPTBackbone.from_model_config(config.model, vocabulary_size))
    model.build((None, config.data.seq_len))
    return model


def steps_and_intervals(config, steps_per_data_epoch):
    """Total optimizer steps and the evaluation interval (Keras "epochs" are intervals)."""
    steps = config.train.steps
    if config.train.epochs is not None:
        steps = config.train.epochs * steps_per_data_epoch
    interval = min(config.train.eval_every, steps)
    return steps, interval


def pretrain(config, output_dir, tokenizer_path=None, overwrite=False, command=None,
             verbose=1):
    """Trains a GPT on `config.data.source` and writes a model artifact to `output_dir`.

    Returns the metrics dict written to `metrics.json`.
    """
    check_output_dir(output_dir, overwrite)
    keras.utils.set_random_seed(config.train.seed)
    source, train_docs, val_docs, tokenizer = prepare_data(config, tokenizer_path)
    seq_len, batch_size = config.data.seq_len, config.train.batch_size
    dataset_options = dict(tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size,
                           seed=config.train.seed, shuffle_buffer=config.data.shuffle_buffer)
    train_once = causal_lm_dataset(train_docs, shuffle=False, repeat=False, **dataset_options)
    steps_per_data_epoch = sum(1 for _ in train_once)
    val_ds = causal_lm_dataset(val_docs, shuffle=False, repeat=False, **dataset_options)
    validation_batches = sum(1 for _ in val_ds)
    if steps_per_data_epoch == 0 or validation_batches == 0:
        raise ConfigError(
            f"corpus too small for batch_size={batch_size} x seq_len={seq_len}: "
            f"{steps_per_data_epoch} training and {validation_batches} validation batches; "
            f"lower --batch-size/--seq-len or add data")
    train_ds = causal_lm_dataset(train_docs, shuffle=True, repeat=True, **dataset_options)
    steps, interval = steps_and_intervals(config, steps_per_data_epoch)

    model = build_model(config, tokenizer.vocabulary_size())
    model.compile(
        optimizer=make_optimizer(config.train, total_steps=steps),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    logger.info("model: %s parameters; %d steps of %d x %d tokens; %d train batches per pass",
                f"{model.count_params():,}", steps, batch_size, seq_len, steps_per_data_epoch)
    callbacks = [
        StopAtStep(steps),
        PerplexityLogger(),
        keras.callbacks.TensorBoard(os.path.join(output_dir, artifacts.LOGS_DIR)),
    ]
    started = time.time()
    history = model.fit(
        train_ds, epochs=math.ceil(steps / interval), steps_per_epoch=interval,
        validation_data=val_ds.take(min(config.train.eval_steps, validation_batches)),
        callbacks=callbacks, verbose=verbose)
    train_seconds = time.time() - started

    final = model.evaluate(val_ds, verbose=0, return_dict=True)
    baseline = unigram_baseline(train_docs, val_docs, tokenizer, seq_len)
    metrics = {
        "steps": int(model.optimizer.iterations),
        "train_loss": float(history.history["loss"][-1]),
        "val_loss": float(final["loss"]),
        "val_perplexity": math.exp(final["loss"]),
        "val_accuracy": float(final["accuracy"]),
        "unigram_val_perplexity": float(baseline["perplexity"]),
        "train_seconds": round(train_seconds, 1),
        "train_tokens_per_second": round(
            int(model.optimizer.iterations) * batch_size * seq_len / train_seconds, 1),
        "parameters": int(model.count_params()),
        "vocabulary_size": tokenizer.vocabulary_size(),
    }
    data_record = {**source.describe(), "fingerprint": source.fingerprint()}
    metadata = artifacts.make_metadata(ARTIFACT_TYPE, config, data=data_record,
                                       command=command, extra={"family": config.model.family})
    artifacts.save_model_artifact(output_dir, model, tokenizer, config, metrics, metadata)
    return metrics
