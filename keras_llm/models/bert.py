"""BERT and RoBERTa: bidirectional Transformer encoders (Devlin et al., 2019; Liu et al., 2019).

`BertBackbone` maps token ids (plus segment ids and a padding mask) to hidden states and a
pooled `[CLS]` vector: token + segment + position embeddings, a layer norm, N encoder blocks.
RoBERTa is the same backbone with `num_segments=0` (no segment embedding, no NSP), trained
with dynamic masking on full-length packed sequences; the configs pick it with
`model.family: roberta`. `BertMaskedLM` adds the masked-LM head, tied to the token embedding,
and optionally the next-sentence-prediction head on the pooled output.
"""
import keras
from keras import ops
from keras_hub.layers import ReversibleEmbedding

from keras_llm.layers import TransformerEncoderBlock
from keras_llm.layers.attention import gather_positions
from keras_llm.layers.linear import embedding_logits
from keras_llm.layers.normalization import LayerNormalization
from keras_llm.layers.position import add_positions, position_layer, rotary_max_wavelength
from keras_llm.layers.transformer import get_activation
from keras_llm.models.vocabulary import check_tokenizer_matches

# BERT initializes every kernel from a truncated N(0, 0.02).
INITIALIZER_STDDEV = 0.02


def initializer():
    return keras.initializers.TruncatedNormal(stddev=INITIALIZER_STDDEV)


@keras.saving.register_keras_serializable(package="keras_llm")
class BertBackbone(keras.Model):
    """`{"token_ids", "padding_mask"[, "segment_ids"]}` -> sequence and pooled outputs.

    Returns a dict: `sequence_output` `(batch, length, hidden_size)` and `pooled_output`
    `(batch, hidden_size)`, a tanh dense layer on the first (`[CLS]`) position.

    Args:
        vocabulary_size: number of token ids.
        num_layers: number of encoder blocks.
        num_heads: attention heads per block.
        hidden_size: width of the residual stream.
        intermediate_size: width of the feed-forward layers.
        max_length: the longest sequence (size of the learned position table).
        num_segments: segment (token type) vocabulary; 2 for BERT, 0 for RoBERTa (none).
        embedding_size: width of the embeddings, projected to `hidden_size` when different
            (ELECTRA-small); defaults to `hidden_size`.
        dropout: dropout rate in embeddings and blocks.
        activation: feed-forward activation ("gelu" in BERT).
        norm_first: pre-layer-norm blocks and a final norm when True; BERT is post-norm.
        layer_norm_epsilon: epsilon of the layer norms.
        special_token_ids: the tokenizer's special ids, kept to refuse a mismatched tokenizer.
        position: "learned" (BERT), "sinusoidal" or "rotary" (RoPE in every attention
            layer; no position table) position encoding.
        tie_embeddings: whether the masked-LM output projection is the token embedding's
            transpose (BERT) or a separate kernel.

    Example:

    >>> backbone = BertBackbone(vocabulary_size=100, num_layers=2, num_heads=2,
    ...                         hidden_size=16, intermediate_size=32, max_length=8)
    >>> outputs = backbone({"token_ids": keras.ops.ones((2, 8), "int32"),
    ...                     "segment_ids": keras.ops.zeros((2, 8), "int32"),
    ...                     "padding_mask": keras.ops.ones((2, 8), "bool")})
    >>> keras.ops.shape(outputs["sequence_output"]), keras.ops.shape(outputs["pooled_output"])
    ((2, 8, 16), (2, 16))

    References:
        - [Devlin et al., 2019](https://arxiv.org/abs/1810.04805)
        - [Liu et al., 2019](https://arxiv.org/abs/1907.11692) (RoBERTa)
    """

    def __init__(self, vocabulary_size, num_layers, num_heads, hidden_size, intermediate_size,
                 max_length, num_segments=2, embedding_size=None, dropout=0.1,
                 activation="gelu", norm_first=False, layer_norm_epsilon=1e-12,
                 special_token_ids=None, position="learned", tie_embeddings=True, **kwargs):
        super().__init__(**kwargs)
        embedding_size = embedding_size or hidden_size
        self.token_embedding = ReversibleEmbedding(
            vocabulary_size, embedding_size, tie_weights=tie_embeddings,
            embeddings_initializer=initializer(), dtype=self.dtype_policy,
            name="token_embedding")
        self.position_embedding = position_layer(position, max_length, initializer(),
                                                 dtype=self.dtype_policy)
        self.segment_embedding = keras.layers.Embedding(
            num_segments, embedding_size, embeddings_initializer=initializer(),
            dtype=self.dtype_policy, name="segment_embedding") if num_segments else None
        self.embedding_norm = LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name="embedding_norm")
        self.embedding_dropout = keras.layers.Dropout(dropout, dtype=self.dtype_policy)
        self.embedding_projection = keras.layers.Dense(
            hidden_size, kernel_initializer=initializer(), dtype=self.dtype_policy,
            name="embedding_projection") if embedding_size != hidden_size else None
        self.blocks = [
            TransformerEncoderBlock(
                num_heads, intermediate_size, dropout=dropout, activation=activation,
                norm_first=norm_first, layer_norm_epsilon=layer_norm_epsilon,
                kernel_initializer=initializer(),
                rotary_max_wavelength=rotary_max_wavelength(position), dtype=self.dtype_policy,
                name=f"block_{i}")
            for i in range(num_layers)
        ]
        self.final_norm = LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=self.dtype_policy,
            name="final_norm") if norm_first else None
        self.pooler = keras.layers.Dense(
            hidden_size, activation="tanh", kernel_initializer=initializer(),
            dtype=self.dtype_policy, name="pooler")
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.max_length = max_length
        self.num_segments = num_segments
        self.embedding_size = embedding_size
        self.dropout = dropout
        self.activation = activation
        self.norm_first = norm_first
        self.layer_norm_epsilon = layer_norm_epsilon
        self.special_token_ids = dict(special_token_ids) if special_token_ids else None
        self.position = position
        self.tie_embeddings = tie_embeddings

    def build(self, input_shape):
        token_shape = tuple(input_shape["token_ids"]) if isinstance(input_shape, dict) \
            else tuple(input_shape)
        embedding_shape = (*token_shape, self.embedding_size)
        hidden_shape = (*token_shape, self.hidden_size)
        self.token_embedding.build(token_shape)
        if self.position_embedding is not None:
            self.position_embedding.build(embedding_shape)
        if self.segment_embedding is not None:
            self.segment_embedding.build(token_shape)
        self.embedding_norm.build(embedding_shape)
        if self.embedding_projection is not None:
            self.embedding_projection.build(embedding_shape)
        for block in self.blocks:
            block.build(hidden_shape)
        if self.final_norm is not None:
            self.final_norm.build(hidden_shape)
        self.pooler.build((token_shape[0], self.hidden_size))

    def embed(self, inputs, training=None):
        """Summed, normalized (and projected) embeddings `(batch, length, hidden_size)`."""
        token_ids = inputs["token_ids"]
        x = add_positions(self.token_embedding(token_ids), self.position_embedding)
        if self.segment_embedding is not None:
            segment_ids = inputs.get("segment_ids")
            if segment_ids is None:
                segment_ids = ops.zeros_like(token_ids)
            x = x + self.segment_embedding(segment_ids)
        x = self.embedding_dropout(self.embedding_norm(x), training=training)
        if self.embedding_projection is not None:
            x = self.embedding_projection(x)
        return x

    def call(self, inputs, training=None, output_positions=None):
        """The outputs of `inputs`; with `output_positions` `(batch, P)`, `sequence_output`
        holds only the states at those positions, `(batch, P, hidden_size)`.

        A masked-LM step reads the last block's outputs at the predicted positions alone
        (and the pooler at `[CLS]`), so given them the last block computes no others: its
        keys and values still cover every position, its queries, attention output and
        feed-forward layer cover P + 1 rows. The values and gradients are the full model's.
        """
        x = self.embed(inputs, training=training)
        padding_mask = inputs.get("padding_mask")
        positions = None
        if output_positions is not None:  # [CLS] first, for the pooler
            output_positions = ops.cast(output_positions, "int32")
            positions = ops.concatenate(
                [ops.zeros((ops.shape(output_positions)[0], 1), "int32"), output_positions],
                axis=1)
        for i, block in enumerate(self.blocks):
            x = block(x, padding_mask=padding_mask, training=training,
                      output_positions=positions if i == len(self.blocks) - 1 else None)
        if positions is not None and not self.blocks:
            x = gather_positions(x, positions)
        if self.final_norm is not None:
            x = self.final_norm(x)
        sequence = x if positions is None else x[:, 1:]
        return {"sequence_output": sequence, "pooled_output": self.pooler(x[:, 0, :])}

    def check_tokenizer(self, tokenizer):
        """Raises `ArtifactError` unless `tokenizer` yields the ids this model was trained on."""
        check_tokenizer_matches(self.name, self.vocabulary_size, self.special_token_ids,
                                tokenizer)

    def get_config(self):
        return {
            **super().get_config(),
            "vocabulary_size": self.vocabulary_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "max_length": self.max_length,
            "num_segments": self.num_segments,
            "embedding_size": self.embedding_size,
            "dropout": self.dropout,
            "activation": self.activation,
            "norm_first": self.norm_first,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "special_token_ids": self.special_token_ids,
            "position": self.position,
            "tie_embeddings": self.tie_embeddings,
        }

    @classmethod
    def from_model_config(cls, model_config, vocabulary_size=None, special_token_ids=None,
                          **overrides):
        """Builds from a `keras_llm.config.ModelConfig`; `model.family: roberta` drops segments.

        `overrides` replace single arguments (the ELECTRA generator's smaller sizes).
        """
        arguments = dict(
            vocabulary_size=vocabulary_size or model_config.vocab_size,
            num_layers=model_config.num_layers, num_heads=model_config.num_heads,
            hidden_size=model_config.hidden_size,
            intermediate_size=model_config.intermediate_size,
            max_length=model_config.max_length,
            num_segments=0 if model_config.family == "roberta" else 2,
            embedding_size=model_config.embedding_size, dropout=model_config.dropout,
            activation=model_config.activation, norm_first=model_config.norm_first,
            layer_norm_epsilon=model_config.layer_norm_epsilon, position=model_config.position,
            tie_embeddings=model_config.tie_embeddings, special_token_ids=special_token_ids,
            name=f"{model_config.family}_backbone")
        arguments.update(overrides)
        return cls(**arguments)


@keras.saving.register_keras_serializable(package="keras_llm")
class MaskedLMHead(keras.layers.Layer):
    """Logits at the masked positions: gather -> dense + activation -> norm -> tied output.

    The output projection is the transposed token embedding (plus a bias), as in BERT.

    Args:
        token_embedding: the backbone's `ReversibleEmbedding` (set by the task model, not
            serialized).
        activation: activation of the transform layer ("gelu" in BERT).
        layer_norm_epsilon: epsilon of the layer norm.

    Example:

    >>> embedding = ReversibleEmbedding(50, 8)
    >>> head = MaskedLMHead(token_embedding=embedding)
    >>> _ = embedding(keras.ops.zeros((1, 1), "int32"))
    >>> keras.ops.shape(head(keras.ops.ones((2, 6, 8)), keras.ops.zeros((2, 3), "int32")))
    (2, 3, 50)
    """

    def __init__(self, token_embedding=None, activation="gelu", layer_norm_epsilon=1e-12,
                 **kwargs):
        super().__init__(**kwargs)
        self.token_embedding = token_embedding
        self.activation = activation
        self.layer_norm_epsilon = layer_norm_epsilon
        self._activation_fn = get_activation(activation)

    def build(self, sequence_output_shape, mask_positions_shape=None):
        embedding_size = self.token_embedding.output_dim
        self.transform = keras.layers.Dense(
            embedding_size, kernel_initializer=initializer(), dtype=self.dtype_policy,
            name="transform")
        self.transform.build(sequence_output_shape)
        self.norm = LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name="norm")
        self.norm.build((*sequence_output_shape[:-1], embedding_size))
        self.output_bias = self.add_weight(
            name="output_bias", shape=(self.token_embedding.input_dim,), initializer="zeros")

    def call(self, sequence_output, mask_positions=None):
        """Logits `(batch, predictions, vocabulary)` at `mask_positions` of
        `sequence_output`, or at every row of it when it holds only the masked positions
        (`mask_positions` None: the backbone ran with `output_positions`)."""
        x = sequence_output if mask_positions is None else gather_positions(
            sequence_output, mask_positions)
        x = self.norm(self._activation_fn(self.transform(x)))
        # keras' matmul: at 15% of the positions the hand gradient of `linear` measured 1%
        # slower in the BERT-small step on 2 CPU cores.
        logits = embedding_logits(self.token_embedding, x, hand_gradient=False)
        return logits + ops.cast(self.output_bias, logits.dtype)

    def get_config(self):
        return {**super().get_config(), "activation": self.activation,
                "layer_norm_epsilon": self.layer_norm_epsilon}


@keras.saving.register_keras_serializable(package="keras_llm")
class BertMaskedLM(keras.Model):
    """Masked-LM (and optionally next-sentence-prediction) pretraining head on a backbone.

    Inputs: the backbone's dict plus `mask_positions` `(batch, predictions)`. Output: the
    masked-LM logits `(batch, predictions, vocabulary)`, or with `next_sentence_prediction`
    a dict `{"mlm": those logits, "nsp": (batch, 2) logits}` (0 = is-next, 1 = not-next).
    Train on `(inputs, mask_ids, mask_weights)` as produced by
    `keras_llm.data.masking.masked_lm_dataset`.

    Args:
        backbone: a `BertBackbone`.
        next_sentence_prediction: whether to add the NSP classifier on the pooled output.

    Example:

    >>> backbone = BertBackbone(vocabulary_size=100, num_layers=1, num_heads=2,
    ...                         hidden_size=16, intermediate_size=32, max_length=8)
    >>> model = BertMaskedLM(backbone)
    >>> logits = model({"token_ids": keras.ops.ones((2, 8), "int32"),
    ...                 "padding_mask": keras.ops.ones((2, 8), "bool"),
    ...                 "mask_positions": keras.ops.zeros((2, 3), "int32")})
    >>> keras.ops.shape(logits)
    (2, 3, 100)
    """

    def __init__(self, backbone, next_sentence_prediction=False, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.next_sentence_prediction = next_sentence_prediction
        self.masked_lm_head = MaskedLMHead(
            token_embedding=backbone.token_embedding, activation=backbone.activation,
            layer_norm_epsilon=backbone.layer_norm_epsilon, dtype=backbone.dtype_policy,
            name="masked_lm_head")
        self.next_sentence_head = keras.layers.Dense(
            2, kernel_initializer=initializer(), dtype=backbone.dtype_policy,
            name="next_sentence_head") if next_sentence_prediction else None

    def build(self, input_shape):
        if not self.backbone.built:  # a deserialized backbone arrives built
            self.backbone.build(input_shape)
        token_shape = tuple(input_shape["token_ids"])
        self.masked_lm_head.build((*token_shape, self.backbone.hidden_size),
                                  tuple(input_shape["mask_positions"]))
        if self.next_sentence_head is not None:
            self.next_sentence_head.build((token_shape[0], self.backbone.hidden_size))

    def call(self, inputs, training=None):
        # The backbone's last block computes the masked positions (and [CLS]) only.
        outputs = self.backbone(inputs, training=training,
                                output_positions=inputs["mask_positions"])
        logits = self.masked_lm_head(outputs["sequence_output"])
        if self.next_sentence_head is None:
            return logits
        return {"mlm": logits, "nsp": self.next_sentence_head(outputs["pooled_output"])}

    def check_tokenizer(self, tokenizer):
        self.backbone.check_tokenizer(tokenizer)

    def get_config(self):
        return {**super().get_config(), "next_sentence_prediction": self.next_sentence_prediction,
                "backbone": keras.saving.serialize_keras_object(self.backbone)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)
