"""ELECTRA: replaced-token detection with a small masked-LM generator (Clark et al., 2020).

A small generator (a `BertBackbone` with a masked-LM head) fills the masked positions with
tokens sampled from its own predictions; a discriminator (a full-size `BertBackbone`) reads
the result and tells, for every token, whether it is the original or a replacement. Both
share the token embedding. The loss is `MLM + rtd_weight * RTD` (rtd_weight 50 in the paper).
After pretraining, `pretrainer.discriminator` is the model to fine-tune.
"""
import keras
import keras_hub
from keras import ops

from keras_llm.layers.transformer import get_activation
from keras_llm.models.bert import BertBackbone, MaskedLMHead, initializer


def generator_for(discriminator, hidden_size):
    """A generator backbone matching `discriminator`, `hidden_size` wide.

    As in ELECTRA, the generator keeps the depth, uses one head per 64 units and a 4x
    feed-forward, and its embeddings have the discriminator's width (they are shared).
    """
    return BertBackbone(
        vocabulary_size=discriminator.vocabulary_size, num_layers=discriminator.num_layers,
        num_heads=max(1, hidden_size // 64), hidden_size=hidden_size,
        intermediate_size=4 * hidden_size, max_length=discriminator.max_length,
        num_segments=discriminator.num_segments, embedding_size=discriminator.embedding_size,
        dropout=discriminator.dropout, activation=discriminator.activation,
        norm_first=discriminator.norm_first, layer_norm_epsilon=discriminator.layer_norm_epsilon,
        special_token_ids=discriminator.special_token_ids, name="generator")


def replace_at_positions(token_ids, positions, values, valid):
    """`token_ids` with `values` written at `positions` where `valid` (no scatter needed)."""
    length = ops.shape(token_ids)[1]
    hits = ops.one_hot(positions, length) * ops.cast(valid, "float32")[..., None]  # (b, p, l)
    # max, not sum: a position listed twice still gets one id (ids are >= 0).
    written = ops.max(hits * ops.cast(values, "float32")[..., None], axis=1)
    return ops.where(ops.max(hits, axis=1) > 0, ops.cast(written, token_ids.dtype), token_ids)


@keras.saving.register_keras_serializable(package="keras_llm")
class ElectraPretrainer(keras.Model):
    """Generator + discriminator trained jointly on masked-LM inputs.

    Inputs: a `BertBackbone` input dict plus `mask_positions`; targets: the original ids at
    those positions (`mask_ids`), sample weights: `mask_weights` (the output of
    `keras_llm.data.masking.masked_lm_dataset`). Prediction slots at position 0 are padding:
    position 0 holds `[cls]`, which is never masked.

    `call` samples the generator's tokens into the masked positions and returns a dict:
    `generator_logits` `(batch, predictions, vocabulary)`, `replaced_token_ids` and
    `discriminator_logits` `(batch, length)`. `compute_loss` builds the replaced-token labels
    in the train step (a sampled token equal to the original counts as original) and logs
    `mlm_loss`, `mlm_accuracy`, `mlm_perplexity`, `rtd_loss` and `rtd_accuracy`. Compile
    with an optimizer only.

    Args:
        discriminator: a `BertBackbone`.
        generator: a smaller `BertBackbone` with the same vocabulary and embedding size
            (see `generator_for`); its token embedding is replaced by the discriminator's.
        rtd_weight: lambda, the weight of the replaced-token-detection loss.
        seed: seed of the generator's sampling.

    Example:

    >>> discriminator = BertBackbone(vocabulary_size=50, num_layers=1, num_heads=2,
    ...                              hidden_size=16, intermediate_size=32, max_length=8)
    >>> model = ElectraPretrainer(discriminator, generator_for(discriminator, 8))
    >>> outputs = model({"token_ids": keras.ops.ones((2, 8), "int32"),
    ...                  "padding_mask": keras.ops.ones((2, 8), "bool"),
    ...                  "mask_positions": keras.ops.array([[1, 2], [3, 0]], "int32")})
    >>> keras.ops.shape(outputs["discriminator_logits"])
    (2, 8)

    References:
        - [Clark et al., 2020](https://arxiv.org/abs/2003.10555)
    """

    def __init__(self, discriminator, generator, rtd_weight=50.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if generator.embedding_size != discriminator.embedding_size or \
                generator.vocabulary_size != discriminator.vocabulary_size:
            raise ValueError(
                "generator and discriminator must share vocabulary_size and embedding_size; "
                f"got {generator.vocabulary_size}x{generator.embedding_size} and "
                f"{discriminator.vocabulary_size}x{discriminator.embedding_size}")
        self.discriminator = discriminator
        self.generator = generator
        # One token embedding serves both networks (and both output projections).
        self.generator.token_embedding = discriminator.token_embedding
        self.rtd_weight = rtd_weight
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.generator_head = MaskedLMHead(
            token_embedding=discriminator.token_embedding, activation=generator.activation,
            layer_norm_epsilon=generator.layer_norm_epsilon, dtype=discriminator.dtype_policy,
            name="generator_head")
        self.discriminator_transform = keras.layers.Dense(
            discriminator.hidden_size, kernel_initializer=initializer(),
            dtype=discriminator.dtype_policy, name="discriminator_transform")
        self.discriminator_output = keras.layers.Dense(
            1, kernel_initializer=initializer(), dtype=discriminator.dtype_policy,
            name="discriminator_output")
        self._activation_fn = get_activation(discriminator.activation)
        self.mlm_loss_tracker = keras.metrics.Mean(name="mlm_loss")
        self.rtd_loss_tracker = keras.metrics.Mean(name="rtd_loss")
        self.mlm_accuracy = keras.metrics.SparseCategoricalAccuracy(name="mlm_accuracy")
        self.mlm_perplexity = keras_hub.metrics.Perplexity(from_logits=True,
                                                           name="mlm_perplexity")
        self.rtd_accuracy = keras.metrics.BinaryAccuracy(threshold=0.0, name="rtd_accuracy")

    def build(self, input_shape):
        if not self.discriminator.built:
            self.discriminator.build(input_shape)
        if not self.generator.built:
            self.generator.build(input_shape)
        token_shape = tuple(input_shape["token_ids"])
        self.generator_head.build((*token_shape, self.generator.hidden_size),
                                  tuple(input_shape["mask_positions"]))
        hidden_shape = (*token_shape, self.discriminator.hidden_size)
        self.discriminator_transform.build(hidden_shape)
        self.discriminator_output.build(hidden_shape)

    def call(self, inputs, training=None):
        positions = ops.cast(inputs["mask_positions"], "int32")
        # The generator's last block computes the masked positions only.
        generated = self.generator(inputs, training=training,
                                   output_positions=positions)["sequence_output"]
        generator_logits = self.generator_head(generated)
        batch, predictions = ops.shape(positions)[0], ops.shape(positions)[1]
        flat_logits = ops.reshape(ops.cast(generator_logits, "float32"),
                                  (batch * predictions, -1))
        sampled = keras.random.categorical(flat_logits, 1, seed=self.seed_generator)
        sampled = ops.stop_gradient(ops.reshape(sampled, (batch, predictions)))
        replaced = replace_at_positions(inputs["token_ids"], positions, sampled,
                                        ops.greater(positions, 0))
        discriminated = self.discriminator({**inputs, "token_ids": replaced},
                                           training=training)["sequence_output"]
        hidden = self._activation_fn(self.discriminator_transform(discriminated))
        return {
            "generator_logits": generator_logits,
            "replaced_token_ids": replaced,
            "discriminator_logits": ops.squeeze(self.discriminator_output(hidden), axis=-1),
        }

    def replaced_token_labels(self, x, y, y_pred, sample_weight=None):
        """1.0 where the discriminator's input differs from the original text, else 0.0."""
        positions = ops.cast(x["mask_positions"], "int32")
        valid = ops.greater(positions, 0) if sample_weight is None else sample_weight > 0
        original = replace_at_positions(x["token_ids"], positions, y, valid)
        return ops.cast(ops.not_equal(y_pred["replaced_token_ids"], original), "float32")

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        weights = ops.cast(ops.greater(x["mask_positions"], 0), "float32") \
            if sample_weight is None else ops.cast(sample_weight, "float32")
        logits = ops.cast(y_pred["generator_logits"], "float32")
        token_losses = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        mlm_loss = ops.sum(token_losses * weights) / ops.maximum(ops.sum(weights), 1.0)

        labels = self.replaced_token_labels(x, y, y_pred, sample_weight)
        real = ops.cast(x.get("padding_mask", ops.ones_like(labels)), "float32")
        rtd_logits = ops.cast(y_pred["discriminator_logits"], "float32")
        rtd_losses = keras.losses.binary_crossentropy(labels[..., None], rtd_logits[..., None],
                                                      from_logits=True)
        rtd_loss = ops.sum(rtd_losses * real) / ops.maximum(ops.sum(real), 1.0)

        self.mlm_loss_tracker.update_state(mlm_loss)
        self.rtd_loss_tracker.update_state(rtd_loss)
        self.mlm_accuracy.update_state(y, logits, sample_weight=weights)
        self.mlm_perplexity.update_state(y, logits, sample_weight=weights)
        self.rtd_accuracy.update_state(labels, rtd_logits, sample_weight=real)
        return mlm_loss + self.rtd_weight * rtd_loss

    def check_tokenizer(self, tokenizer):
        self.discriminator.check_tokenizer(tokenizer)

    def get_config(self):
        return {
            **super().get_config(),
            "discriminator": keras.saving.serialize_keras_object(self.discriminator),
            "generator": keras.saving.serialize_keras_object(self.generator),
            "rtd_weight": self.rtd_weight,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["discriminator"] = keras.saving.deserialize_keras_object(config["discriminator"])
        # Rebuilt unbuilt, so that __init__ can still swap in the shared token embedding.
        generator = {k: v for k, v in config["generator"].items() if k != "build_config"}
        config["generator"] = keras.saving.deserialize_keras_object(generator)
        return cls(**config)
