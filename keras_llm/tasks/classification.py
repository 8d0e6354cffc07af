"""Text classification: a pooled representation of the text -> class logits.

Encoder backbones (BERT, RoBERTa, the ELECTRA discriminator) are read at `[CLS]` by
default: their `pooled_output` (the tanh dense layer on the first position, as in BERT's
fine-tuning); "mean" averages their final states over the real tokens instead (what
sentence encoders do, and a better start when pretraining never trained the pooler).
A GPT backbone sees only the past, so its summary of the whole text is the state of the
last real token ("last", as in GPT-1's classification fine-tuning), or the mean of the
states of all real tokens ("mean").
"""
import keras
from keras import ops

from keras_llm.models.bert import BertBackbone
from keras_llm.models.gpt import GPTBackbone

POOLINGS = {"cls": (BertBackbone,), "last": (GPTBackbone,), "mean": (BertBackbone, GPTBackbone)}


def last_token_positions(padding_mask):
    """Each row's last True position of `padding_mask`, `(batch, 1)`; 0 in a row without
    one (its first position, not the previous row's last)."""
    return ops.maximum(ops.sum(ops.cast(padding_mask, "int32"), axis=1) - 1, 0)[:, None]


def pool_mean(hidden, padding_mask):
    """The mean state over the True positions of `padding_mask` `(batch, hidden)`."""
    weights = ops.cast(padding_mask, hidden.dtype)[..., None]
    return ops.sum(hidden * weights, axis=1) / ops.maximum(ops.sum(weights, axis=1), 1.0)


@keras.saving.register_keras_serializable(package="keras_llm")
class TextClassifier(keras.Model):
    """Backbone + pooling + dropout + dense: `{"token_ids", "padding_mask"[, "segment_ids"]}`
    -> logits `(batch, num_classes)`.

    Train with `SparseCategoricalCrossentropy(from_logits=True)` on batches from
    `keras_llm.data.labeled.classification_dataset` (layout "encoder" for a `BertBackbone`,
    "decoder" for a `GPTBackbone`).

    Args:
        backbone: a `BertBackbone` (BERT, RoBERTa, ELECTRA discriminator) or a `GPTBackbone`.
        num_classes: number of classes.
        pooling: "cls" (default) or "mean" for a `BertBackbone`; "last" (default) or "mean"
            for a `GPTBackbone`.
        dropout: dropout before the output layer.

    Example:

    >>> backbone = GPTBackbone(vocabulary_size=50, num_layers=1, num_heads=2,
    ...                        hidden_size=8, intermediate_size=16, max_length=6)
    >>> classifier = TextClassifier(backbone, num_classes=3)
    >>> logits = classifier({"token_ids": keras.ops.ones((2, 6), "int32"),
    ...                      "padding_mask": keras.ops.ones((2, 6), "bool")})
    >>> keras.ops.shape(logits)
    (2, 3)
    """

    def __init__(self, backbone, num_classes, pooling=None, dropout=0.1, **kwargs):
        super().__init__(**kwargs)
        pooling = pooling or ("cls" if isinstance(backbone, BertBackbone) else "last")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}")
        if not isinstance(backbone, POOLINGS[pooling]):
            raise ValueError(
                f"pooling {pooling!r} needs a "
                f"{' or '.join(kind.__name__ for kind in POOLINGS[pooling])}; got "
                f"{type(backbone).__name__}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2; got {num_classes}")
        self.backbone = backbone
        self.encoder = isinstance(backbone, BertBackbone)
        self.num_classes = num_classes
        self.pooling = pooling
        self.dropout = dropout
        self.head_dropout = keras.layers.Dropout(dropout, dtype=backbone.dtype_policy)
        self.output_layer = keras.layers.Dense(
            num_classes, kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02),
            dtype=backbone.dtype_policy, name="logits")

    def build(self, input_shape):
        shape = input_shape["token_ids"] if isinstance(input_shape, dict) else input_shape
        if not self.backbone.built:  # a deserialized backbone arrives built
            self.backbone.build(input_shape if self.encoder else shape)
        self.output_layer.build((shape[0], self.backbone.hidden_size))

    def pooled(self, inputs, training=None):
        """The text's vector `(batch, hidden_size)` before the output layer."""
        padding_mask = inputs.get("padding_mask")
        if padding_mask is None:
            padding_mask = ops.ones_like(inputs["token_ids"], "bool")
        if self.encoder and self.pooling == "cls":
            # Only [CLS] is read: the last block computes no other position.
            no_positions = ops.zeros_like(inputs["token_ids"][:, :0])
            return self.backbone(inputs, training=training,
                                 output_positions=no_positions)["pooled_output"]
        if self.encoder:
            return pool_mean(self.backbone(inputs, training=training)["sequence_output"],
                             padding_mask)
        if self.pooling == "last":  # the last block computes the last real token alone
            return self.backbone(inputs["token_ids"], padding_mask, training=training,
                                 output_positions=last_token_positions(padding_mask))[:, 0]
        return pool_mean(self.backbone(inputs["token_ids"], padding_mask, training=training),
                         padding_mask)

    def call(self, inputs, training=None):
        pooled = self.head_dropout(self.pooled(inputs, training), training=training)
        return self.output_layer(pooled)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "pooling": self.pooling, "dropout": self.dropout,
                "backbone": keras.saving.serialize_keras_object(self.backbone)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)
