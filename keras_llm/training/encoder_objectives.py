"""Encoder and encoder-decoder pretraining objectives: MLM, MLM + NSP, ELECTRA, denoising.

Each turns documents into batches with `keras_llm.data.{masking,nsp,denoising}`, builds the
model of its family and compiles it with the paper's loss and metrics. Metrics carry the
objective's prefix (`mlm_accuracy`, `mlm_perplexity`, `nsp_accuracy`, `rtd_accuracy`,
`token_accuracy`, `token_perplexity`), so console, TensorBoard and `metrics.json` read alike.

Validation data is always masked statically (content-seeded), so every evaluation scores
the same inputs; training data follows `data.masking`.
"""
import math
import warnings

import keras
import keras_hub
import tensorflow as tf

from keras_llm.data.pipeline import (document_lengths, pack_tokens, to_chunks,
                                     tokenized_documents)
from keras_llm.data.denoising import denoising_dataset
from keras_llm.data.masking import continuation_id_table, masked_lm_dataset, wrap_blocks
from keras_llm.data.nsp import next_sentence_dataset, pair_count
from keras_llm.errors import ConfigError
from keras_llm.training.losses import TokenCrossEntropy
from keras_llm.training.objectives import Objective

AUTOTUNE = tf.data.AUTOTUNE


def expect_unused_pooler():
    """Silences Keras' "Gradients do not exist" warning when the only variables it names are
    poolers: objectives without next-sentence prediction never use the `[CLS]` pooler (it
    is trained by fine-tuning), so its missing gradients are expected, every step. A warning
    naming any other variable still shows."""
    warnings.filterwarnings(
        "ignore", category=UserWarning,
        message=r"Gradients do not exist for variables \['[^']*pooler/(kernel|bias)'"
                r"(, '[^']*pooler/(kernel|bias)')*\]")


def masked_lm_loss():
    """Cross-entropy averaged over the real predictions (weights), not over padded slots."""
    return TokenCrossEntropy(reduction="mean_with_sample_weight")


def masked_lm_metrics(prefix):
    return [keras.metrics.SparseCategoricalAccuracy(name=f"{prefix}accuracy"),
            keras_hub.metrics.Perplexity(from_logits=True, name=f"{prefix}perplexity")]


class _EncoderObjective(Objective):
    """Shared plumbing: shuffling and repetition, batching, dummy-batch model building."""

    def check_tokenizer(self, tokenizer):
        super().check_tokenizer(tokenizer)
        if self.config.data.whole_word_masking and tokenizer.kind != "wordpiece":
            raise ConfigError(f"data.whole_word_masking needs a wordpiece tokenizer (its '##' "
                              f"pieces mark words); got {tokenizer.kind}")

    def token_documents(self, documents, tokenizer, training, separator=None, shuffle=True):
        """Token ids per document (`separator` appended), tokenized once and cached.

        Shuffled every pass and repeated when training (unless `shuffle` is False).
        """
        ids = tokenized_documents(documents, tokenizer, -1 if separator is None else separator)
        if separator is None:
            ids = ids.map(lambda document: document[:-1])
        ids = ids.cache()
        if training and shuffle:
            ids = ids.shuffle(self.config.data.shuffle_buffer, seed=self.config.train.seed,
                              reshuffle_each_iteration=True).repeat()
        return ids

    def steps_per_pass(self, documents, tokenizer):
        """From the documents' token counts alone: one tokenization pass, no masking."""
        lengths = document_lengths(documents, tokenizer)
        return self.examples_per_pass(lengths) // self.config.train.batch_size

    @property
    def block_length(self):
        """Tokens of packed documents per example, before the objective's special tokens."""
        raise NotImplementedError

    def examples_per_pass(self, lengths):
        """Examples in one pass over documents of `lengths` tokens.

        Each document and its separator are packed into blocks of `block_length` tokens.
        """
        return int((lengths + 1).sum()) // self.block_length

    def finish(self, examples, training, repeat=False):
        if training:
            if repeat:
                examples = examples.repeat()
            examples = examples.shuffle(max(1, self.config.data.shuffle_buffer // 4),
                                        seed=self.config.train.seed + 1)
        return examples.batch(self.config.train.batch_size, drop_remainder=True).prefetch(
            AUTOTUNE)

    def build_on(self, model, dataset):
        """Builds `model` by calling it on one batch of inputs from `dataset`'s spec."""
        spec = dataset.element_spec[0]
        dummy = {key: tf.zeros([1, *value.shape[1:]], value.dtype) for key, value in spec.items()}
        model(dummy)
        return model


class MaskedLMObjective(_EncoderObjective):
    """Masked LM on packed `[cls] ... [sep]` blocks (BERT without NSP, RoBERTa).

    Documents are packed with `[sep]` between them into full-length blocks, as RoBERTa's
    FULL-SENTENCES input. Static masking keeps the blocks fixed (documents unshuffled) so a
    block meets the same masks every pass; dynamic masking reshuffles documents every pass.
    """

    name = "mlm"

    @property
    def static(self):
        return self.config.data.masking == "static"

    @property
    def block_length(self):
        return self.config.data.seq_len - 2  # [cls] and the last [sep] are added around it

    def sequences(self, documents, tokenizer, training):
        specials = tokenizer.special_token_ids()
        token_documents = self.token_documents(documents, tokenizer, training, specials["sep"],
                                               shuffle=not self.static)
        blocks = pack_tokens(to_chunks(token_documents), self.block_length)
        return wrap_blocks(blocks, specials, self.config.data.seq_len)

    def mask(self, sequences, tokenizer, training):
        data = self.config.data
        continuation = (continuation_id_table(tokenizer.vocabulary())
                        if data.whole_word_masking else None)
        return masked_lm_dataset(
            sequences, tokenizer.special_token_ids(), tokenizer.vocabulary_size(),
            masking=data.masking if training else "static", mask_rate=data.mask_rate,
            seed=self.config.train.seed, continuation_ids=continuation)

    def dataset(self, documents, tokenizer, training):
        examples = self.mask(self.sequences(documents, tokenizer, training), tokenizer, training)
        return self.finish(examples, training, repeat=training and self.static)

    def backbone(self, tokenizer, **overrides):
        from keras_llm.models import BertBackbone

        return BertBackbone.from_model_config(self.config.model, tokenizer.vocabulary_size(),
                                              tokenizer.special_token_ids(), **overrides)

    def build_model(self, tokenizer):
        from keras_llm.models import BertMaskedLM

        model = BertMaskedLM(self.backbone(tokenizer))
        return self.build_on(model, self._spec_dataset(tokenizer))

    def _spec_dataset(self, tokenizer):
        """A dataset with this objective's element spec (for building, never iterated)."""
        specials = tokenizer.special_token_ids()
        blocks = tf.data.Dataset.from_tensors(tf.zeros([self.block_length], tf.int32) + 6)
        examples = self.mask(wrap_blocks(blocks, specials, self.config.data.seq_len),
                             tokenizer, False)
        return examples.batch(1)

    def compile(self, model, optimizer):
        expect_unused_pooler()
        model.compile(optimizer=optimizer, loss=masked_lm_loss(),
                      weighted_metrics=masked_lm_metrics("mlm_"))

    def final_metrics(self, eval_logs, train_documents, validation_documents, tokenizer):
        return {"val_mlm_accuracy": float(eval_logs["mlm_accuracy"]),
                "val_mlm_perplexity": math.exp(min(float(eval_logs["loss"]), 50.0))}


class MaskedLMNextSentenceObjective(MaskedLMObjective):
    """BERT's pretraining: masked LM on sentence pairs plus next-sentence prediction."""

    name = "mlm_nsp"

    def sequences(self, documents, tokenizer, training):
        token_ids = self.token_documents(documents, tokenizer, training)
        return next_sentence_dataset(token_ids, tokenizer.special_token_ids(),
                                     self.config.data.seq_len, seed=self.config.train.seed,
                                     shuffle_buffer=self.config.data.shuffle_buffer,
                                     redraw_each_pass=training)

    def examples_per_pass(self, lengths):
        return pair_count(lengths, self.config.data.seq_len)

    def mask(self, sequences, tokenizer, training):
        def split_targets(features, mask_ids, mask_weights):
            features = dict(features)
            label = features.pop("next_sentence_label")
            return (features, {"mlm": mask_ids, "nsp": label},
                    {"mlm": mask_weights, "nsp": tf.ones([], tf.float32)})

        return super().mask(sequences, tokenizer, training).map(split_targets)

    def dataset(self, documents, tokenizer, training):
        examples = self.mask(self.sequences(documents, tokenizer, training), tokenizer, training)
        return self.finish(examples, training)

    def build_model(self, tokenizer):
        from keras_llm.models import BertMaskedLM

        model = BertMaskedLM(self.backbone(tokenizer), next_sentence_prediction=True)
        return self.build_on(model, self._spec_dataset(tokenizer))

    def _spec_dataset(self, tokenizer):
        pair = tf.data.Dataset.from_tensors(tf.range(6, 6 + self.config.data.seq_len))
        sequences = next_sentence_dataset(pair, tokenizer.special_token_ids(),
                                          self.config.data.seq_len)
        return self.mask(sequences, tokenizer, False).batch(1)

    def compile(self, model, optimizer):
        model.compile(
            optimizer=optimizer,
            loss={"mlm": masked_lm_loss(),
                  "nsp": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
            weighted_metrics={"mlm": masked_lm_metrics(""),
                              "nsp": [keras.metrics.SparseCategoricalAccuracy(
                                  name="accuracy")]})

    def final_metrics(self, eval_logs, train_documents, validation_documents, tokenizer):
        return {"val_mlm_accuracy": float(eval_logs["mlm_accuracy"]),
                "val_mlm_perplexity": math.exp(min(float(eval_logs["mlm_loss"]), 50.0)),
                "val_nsp_accuracy": float(eval_logs["nsp_accuracy"])}


class ElectraObjective(MaskedLMObjective):
    """ELECTRA: generator MLM + `train.rtd_weight` x replaced-token detection."""

    name = "electra"

    def build_model(self, tokenizer):
        from keras_llm.models import ElectraPretrainer
        from keras_llm.models.electra import generator_for

        discriminator = self.backbone(tokenizer)
        generator_size = (self.config.model.generator_hidden_size
                          or max(1, self.config.model.hidden_size // 4))
        model = ElectraPretrainer(discriminator, generator_for(discriminator, generator_size),
                                  rtd_weight=self.config.train.rtd_weight,
                                  seed=self.config.train.seed)
        return self.build_on(model, self._spec_dataset(tokenizer))

    def compile(self, model, optimizer):
        expect_unused_pooler()
        model.compile(optimizer=optimizer)  # the loss and metrics live in the model

    def final_metrics(self, eval_logs, train_documents, validation_documents, tokenizer):
        return {key if key.startswith("val_") else f"val_{key}": float(value)
                for key, value in eval_logs.items()
                if key in ("mlm_loss", "mlm_accuracy", "mlm_perplexity", "rtd_loss",
                           "rtd_accuracy")}


class DenoisingObjective(_EncoderObjective):
    """Encoder-decoder pretraining by BART text infilling (see `keras_llm.data.denoising`)."""

    name = "seq2seq_denoising"

    @property
    def block_length(self):
        return self.config.data.seq_len - 1  # [eos] (encoder, targets) or [cls] (decoder) added

    def dataset(self, documents, tokenizer, training):
        specials = tokenizer.special_token_ids()
        token_documents = self.token_documents(documents, tokenizer, training, specials["eos"])
        blocks = pack_tokens(to_chunks(token_documents), self.block_length)
        data = self.config.data
        # Validation noise is seeded per pass too, but the pass is cached by the trainer.
        examples = denoising_dataset(blocks, specials, data.seq_len, data.noise_density,
                                     data.mean_noise_span_length,
                                     seed=self.config.train.seed + (0 if training else 1))
        return self.finish(examples, training)

    def build_model(self, tokenizer):
        from keras_llm.models import Seq2SeqBackbone, Seq2SeqLM

        model = Seq2SeqLM(Seq2SeqBackbone.from_model_config(
            self.config.model, tokenizer.vocabulary_size(), tokenizer.special_token_ids()))
        blocks = tf.data.Dataset.from_tensors(tf.zeros([self.block_length], tf.int32) + 6)
        spec = denoising_dataset(blocks, tokenizer.special_token_ids(),
                                 self.config.data.seq_len).batch(1)
        return self.build_on(model, spec)

    def compile(self, model, optimizer):
        model.compile(optimizer=optimizer, loss=masked_lm_loss(),
                      weighted_metrics=masked_lm_metrics("token_"))

    def final_metrics(self, eval_logs, train_documents, validation_documents, tokenizer):
        return {"val_token_accuracy": float(eval_logs["token_accuracy"]),
                "val_token_perplexity": math.exp(min(float(eval_logs["loss"]), 50.0))}
