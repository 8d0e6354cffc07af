"""Pretraining objectives: how one task turns documents into batches, builds and scores a model.

`pretrain()` is objective-agnostic: it opens the data, trains or loads the tokenizer, then asks
the objective named by `config.task` for the model, the loss and metrics, and the datasets.
New objectives register in `OBJECTIVES` as "module:Class" so importing this file stays cheap.
"""
import importlib

import keras

from keras_llm.errors import ConfigError
from keras_llm.training.losses import TokenCrossEntropy

OBJECTIVES = {
    "causal_lm": "keras_llm.training.objectives:CausalLMObjective",
    "mlm": "keras_llm.training.encoder_objectives:MaskedLMObjective",
    "mlm_nsp": "keras_llm.training.encoder_objectives:MaskedLMNextSentenceObjective",
    "electra": "keras_llm.training.encoder_objectives:ElectraObjective",
    "seq2seq_denoising": "keras_llm.training.encoder_objectives:DenoisingObjective",
}


class Objective:
    """Base class. Subclasses set `tokenizer_kinds` and implement the methods below.

    Args:
        config: the resolved `keras_llm.config.Config`.
    """

    name = None
    tokenizer_kinds = ("bpe", "wordpiece", "sentencepiece")
    loss_is_token_cross_entropy = False

    def __init__(self, config):
        self.config = config

    def check_tokenizer(self, tokenizer):
        """Raises `ConfigError` when `tokenizer` cannot serve this objective's model."""
        if tokenizer.kind not in self.tokenizer_kinds:
            raise ConfigError(
                f"task {self.name} expects a {' or '.join(self.tokenizer_kinds)} tokenizer, "
                f"got {tokenizer.kind}")
        if tokenizer.vocabulary_size() > self.config.model.vocab_size:
            raise ConfigError(
                f"tokenizer has {tokenizer.vocabulary_size()} tokens but model.vocab_size is "
                f"{self.config.model.vocab_size}")

    def build_model(self, tokenizer):
        """A built, uncompiled Keras model."""
        raise NotImplementedError

    def compile(self, model, optimizer):
        raise NotImplementedError

    def dataset(self, documents, tokenizer, training):
        """Batches from a dataset of document strings: shuffled and repeated when training."""
        raise NotImplementedError

    def steps_per_pass(self, documents, tokenizer):
        """Training batches in one pass over `documents` (for --epochs and the log)."""
        dataset = self.dataset(documents, tokenizer, False)
        return int(dataset.reduce(0, lambda count, _: count + 1))

    def final_metrics(self, eval_logs, train_documents, validation_documents, tokenizer):
        """Extra entries for `metrics.json` from the final validation logs."""
        return {}


class CausalLMObjective(Objective):
    """Next-token prediction on packed blocks (GPT)."""

    name = "causal_lm"
    loss_is_token_cross_entropy = True

    def build_model(self, tokenizer):
        from keras_llm.models import GPTBackbone, GPTCausalLM

        model = GPTCausalLM(GPTBackbone.from_model_config(
            self.config.model, tokenizer.vocabulary_size()))
        model.build((None, self.config.data.seq_len))
        return model

    def compile(self, model, optimizer):
        model.compile(
            optimizer=optimizer,
            loss=TokenCrossEntropy(),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        )

    def dataset(self, documents, tokenizer, training):
        from keras_llm.data import causal_lm_dataset

        return causal_lm_dataset(
            documents, tokenizer, seq_len=self.config.data.seq_len,
            batch_size=self.config.train.batch_size, seed=self.config.train.seed,
            shuffle_buffer=self.config.data.shuffle_buffer, shuffle=training, repeat=training)

    def steps_per_pass(self, documents, tokenizer):
        # Counting tokens (kept for the unigram baseline) is one tokenization of the corpus;
        # counting batches would be another.
        from keras_llm.data.pipeline import token_counts

        self._train_counts = token_counts(documents, tokenizer, tokenizer.vocabulary_size())
        blocks = int(self._train_counts.sum()) // (self.config.data.seq_len + 1)
        return blocks // self.config.train.batch_size

    def final_metrics(self, eval_logs, train_documents, validation_documents, tokenizer):
        import math

        from keras_llm.data import unigram_baseline

        baseline = unigram_baseline(train_documents, validation_documents, tokenizer,
                                    train_counts=getattr(self, "_train_counts", None))
        return {
            "val_perplexity": math.exp(min(eval_logs["loss"], 50.0)),
            "val_accuracy": float(eval_logs["accuracy"]),
            "unigram_val_perplexity": baseline["perplexity"],
        }


def get_objective(config):
    """The objective instance for `config.task`."""
    if config.task not in OBJECTIVES:
        raise ConfigError(f"task must be one of {', '.join(sorted(OBJECTIVES))}; "
                          f"got {config.task!r}")
    module_name, class_name = OBJECTIVES[config.task].split(":")
    return getattr(importlib.import_module(module_name), class_name)(config)
