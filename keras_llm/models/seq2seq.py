"""The encoder-decoder Transformer (Vaswani et al., 2017), pretrained by denoising (BART).

`Seq2SeqBackbone`: by default one token embedding shared by the encoder, the decoder and the
output projection (as in the paper and in BART; one vocabulary for source and target); with
`target_vocabulary_size` the decoder gets its own target vocabulary and embedding, tied to the
output projection (the paper's separate-vocabulary en-fr setup). Position embeddings per
side, N encoder blocks, M decoder blocks with cross-attention.
`Seq2SeqLM` adds the tied output projection, the KV-cached decoding step and
`generate_step` (greedy, top-k, top-p... through a keras-hub sampler, like `GPTCausalLM`).
`with_target_vocabulary` gives a trained model a new target vocabulary for fine-tuning.
"""
import keras
from keras import ops
from keras_hub.layers import ReversibleEmbedding

from keras_llm.errors import ArtifactError
from keras_llm.layers import TransformerDecoderBlock, TransformerEncoderBlock
from keras_llm.layers.attention import empty_kv_cache
from keras_llm.layers.linear import embedding_logits
from keras_llm.layers.normalization import LayerNormalization
from keras_llm.layers.position import add_positions, position_layer, rotary_max_wavelength
from keras_llm.models.vocabulary import check_tokenizer_matches

INITIALIZER_STDDEV = 0.02
INPUT_KEYS = ("encoder_token_ids", "encoder_padding_mask", "decoder_token_ids",
              "decoder_padding_mask")


@keras.saving.register_keras_serializable(package="keras_llm")
class Seq2SeqBackbone(keras.Model):
    """Source and target ids -> decoder hidden states `(batch, target_length, hidden_size)`.

    Inputs: a dict with `encoder_token_ids`, `encoder_padding_mask`, `decoder_token_ids`
    and `decoder_padding_mask`, each `(batch, length)`.

    Args:
        vocabulary_size: number of source token ids (and target ids when shared).
        num_layers: encoder blocks.
        num_decoder_layers: decoder blocks; defaults to `num_layers`.
        num_heads: attention heads per block.
        hidden_size: width of the residual stream.
        intermediate_size: width of the feed-forward layers.
        max_length: the longest source or target sequence.
        dropout: dropout rate in embeddings and blocks.
        activation: feed-forward activation ("relu" in the paper, "gelu" in BART).
        norm_first: pre-layer-norm blocks plus final norms when True; the paper is post-norm.
        position: "learned" (BART), "sinusoidal" (the paper) or "rotary" (RoPE in the
            self-attention layers; cross-attention has none) position encoding.
        layer_norm_epsilon: epsilon of the layer norms.
        special_token_ids: the tokenizer's special ids, kept to refuse a mismatched tokenizer.
        target_vocabulary_size: `None` shares the source vocabulary and embedding with the
            decoder; a number gives the decoder its own embedding of that many target ids,
            tied to the output projection.
        target_special_token_ids: the target tokenizer's special ids (separate vocabularies).
        tie_embeddings: whether the output projection is the decoder embedding's transpose
            (BART, T5 v1.0) or a separate kernel.

    Example:

    >>> backbone = Seq2SeqBackbone(vocabulary_size=100, num_layers=1, num_heads=2,
    ...                            hidden_size=16, intermediate_size=32, max_length=8)
    >>> hidden = backbone({"encoder_token_ids": keras.ops.ones((2, 6), "int32"),
    ...                    "encoder_padding_mask": keras.ops.ones((2, 6), "bool"),
    ...                    "decoder_token_ids": keras.ops.ones((2, 5), "int32"),
    ...                    "decoder_padding_mask": keras.ops.ones((2, 5), "bool")})
    >>> keras.ops.shape(hidden)
    (2, 5, 16)
    >>> separate = Seq2SeqBackbone(vocabulary_size=100, target_vocabulary_size=50,
    ...                            num_layers=1, num_heads=2, hidden_size=16,
    ...                            intermediate_size=32, max_length=8)
    >>> separate.shared_vocabulary
    False

    References:
        - [Vaswani et al., 2017](https://arxiv.org/abs/1706.03762)
        - [Lewis et al., 2020](https://arxiv.org/abs/1910.13461) (BART)
    """

    def __init__(self, vocabulary_size, num_layers, num_heads, hidden_size, intermediate_size,
                 max_length, num_decoder_layers=None, dropout=0.1, activation="gelu",
                 norm_first=False, position="learned", layer_norm_epsilon=1e-5,
                 special_token_ids=None, target_vocabulary_size=None,
                 target_special_token_ids=None, tie_embeddings=True, **kwargs):
        super().__init__(**kwargs)
        initializer = keras.initializers.TruncatedNormal(stddev=INITIALIZER_STDDEV)
        num_decoder_layers = num_decoder_layers or num_layers
        self.token_embedding = ReversibleEmbedding(
            vocabulary_size, hidden_size, tie_weights=tie_embeddings,
            embeddings_initializer=initializer, dtype=self.dtype_policy, name="token_embedding")
        # Named apart so a shared-vocabulary model keeps its weight paths (old artifacts load).
        self.target_token_embedding = None if target_vocabulary_size is None else (
            ReversibleEmbedding(target_vocabulary_size, hidden_size, tie_weights=tie_embeddings,
                                embeddings_initializer=initializer, dtype=self.dtype_policy,
                                name="target_token_embedding"))
        self.encoder_position = self._position(position, max_length, "encoder_position")
        self.decoder_position = self._position(position, max_length, "decoder_position")
        self.embedding_dropout = keras.layers.Dropout(dropout, dtype=self.dtype_policy)
        block_options = dict(dropout=dropout, activation=activation, norm_first=norm_first,
                             layer_norm_epsilon=layer_norm_epsilon,
                             kernel_initializer=initializer,
                             rotary_max_wavelength=rotary_max_wavelength(position),
                             dtype=self.dtype_policy)
        self.encoder_blocks = [
            TransformerEncoderBlock(num_heads, intermediate_size, name=f"encoder_block_{i}",
                                    **block_options) for i in range(num_layers)]
        self.decoder_blocks = [
            TransformerDecoderBlock(num_heads, intermediate_size, cross_attention=True,
                                    name=f"decoder_block_{i}", **block_options)
            for i in range(num_decoder_layers)]
        self.encoder_norm, self.decoder_norm = [
            LayerNormalization(epsilon=layer_norm_epsilon, dtype=self.dtype_policy,
                               name=name) if norm_first else None
            for name in ("encoder_final_norm", "decoder_final_norm")]
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_decoder_layers = num_decoder_layers
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.max_length = max_length
        self.dropout = dropout
        self.activation = activation
        self.norm_first = norm_first
        self.position = position
        self.tie_embeddings = tie_embeddings
        self.layer_norm_epsilon = layer_norm_epsilon
        self.special_token_ids = dict(special_token_ids) if special_token_ids else None
        self.target_vocabulary_size = target_vocabulary_size
        self.target_special_token_ids = (dict(target_special_token_ids)
                                         if target_special_token_ids else None)

    @property
    def shared_vocabulary(self):
        """Whether source and target share one vocabulary (and one embedding)."""
        return self.target_token_embedding is None

    @property
    def decoder_embedding(self):
        """The embedding of target ids, whose transpose is the output projection."""
        return self.token_embedding if self.shared_vocabulary else self.target_token_embedding

    def _position(self, position, max_length, name):
        return position_layer(
            position, max_length, keras.initializers.TruncatedNormal(stddev=INITIALIZER_STDDEV),
            dtype=self.dtype_policy, name=name)

    def build(self, input_shape):
        batch = input_shape["encoder_token_ids"][0]
        hidden_shape = (batch, None, self.hidden_size)
        self.token_embedding.build((batch, None))
        if not self.shared_vocabulary:
            self.target_token_embedding.build((batch, None))
        for layer in (self.encoder_position, self.decoder_position, self.encoder_norm,
                      self.decoder_norm, *self.encoder_blocks, *self.decoder_blocks):
            if layer is not None:
                layer.build(hidden_shape)

    def _embed(self, token_ids, embedding, position, start_index=0, training=None):
        x = add_positions(embedding(token_ids), position, start_index)
        return self.embedding_dropout(x, training=training)

    def encode(self, token_ids, padding_mask=None, training=None):
        """Encoder outputs `(batch, source_length, hidden_size)`."""
        x = self._embed(token_ids, self.token_embedding, self.encoder_position,
                        training=training)
        for block in self.encoder_blocks:
            x = block(x, padding_mask=padding_mask, training=training)
        return x if self.encoder_norm is None else self.encoder_norm(x)

    def decode(self, token_ids, encoder_outputs, encoder_padding_mask=None, padding_mask=None,
               training=None):
        """Decoder hidden states (teacher forcing: every target position at once)."""
        x = self._embed(token_ids, self.decoder_embedding, self.decoder_position,
                        training=training)
        for block in self.decoder_blocks:
            x = block(x, encoder_outputs=encoder_outputs, padding_mask=padding_mask,
                      encoder_padding_mask=encoder_padding_mask, training=training)
        return x if self.decoder_norm is None else self.decoder_norm(x)

    def call(self, inputs, training=None):
        encoder_padding_mask = inputs.get("encoder_padding_mask")
        encoded = self.encode(inputs["encoder_token_ids"], encoder_padding_mask, training)
        return self.decode(inputs["decoder_token_ids"], encoded, encoder_padding_mask,
                           inputs.get("decoder_padding_mask"), training)

    def cross_attention_cache(self, encoder_outputs):
        """Encoder keys and values of every decoder block: one `(keys, values)` pair of
        `(batch, heads, S, head_dim)` tensors per block."""
        return tuple(block.compute_cross_attention_cache(encoder_outputs)
                     for block in self.decoder_blocks)

    def empty_cache(self, batch_size, length):
        """A zero self-attention cache: one `(keys, values)` pair of `(batch, heads, length,
        head_dim)` tensors per decoder block (updated in place by a compiled loop)."""
        return empty_kv_cache(batch_size, length, self.num_decoder_layers, self.num_heads,
                              self.hidden_size // self.num_heads, self.compute_dtype)

    def decode_with_cache(self, token_ids, cache, cache_index, cross_cache,
                          encoder_padding_mask=None):
        """One decoding step: `(hidden, cache)` for `token_ids` placed at `cache_index`."""
        x = self._embed(token_ids, self.decoder_embedding, self.decoder_position,
                        start_index=cache_index)
        updated = []
        for block, layer_cache, layer_cross_cache in zip(self.decoder_blocks, cache,
                                                         cross_cache):
            x, layer_cache = block(
                x, self_attention_cache=layer_cache, cache_index=cache_index,
                cross_attention_cache=layer_cross_cache,
                encoder_padding_mask=encoder_padding_mask)
            updated.append(layer_cache)
        x = x if self.decoder_norm is None else self.decoder_norm(x)
        return x, tuple(updated)

    def logits(self, hidden):
        """Output projection tied to the target (or shared) token embedding, in the compute
        dtype (see `embedding_logits`)."""
        return embedding_logits(self.decoder_embedding, hidden)

    def check_tokenizer(self, tokenizer, target_tokenizer=None):
        """Raises `ArtifactError` unless the tokenizers yield the ids this model was trained
        on: `tokenizer` on the source side, `target_tokenizer` (required with separate
        vocabularies; with a shared one it must match the source side) on the target side."""
        check_tokenizer_matches(self.name, self.vocabulary_size, self.special_token_ids,
                                tokenizer)
        if self.shared_vocabulary:
            if target_tokenizer is not None and target_tokenizer is not tokenizer:
                check_tokenizer_matches(f"{self.name} (shared vocabulary)",
                                        self.vocabulary_size, self.special_token_ids,
                                        target_tokenizer)
            return
        if target_tokenizer is None or target_tokenizer is tokenizer:
            raise ArtifactError(
                f"{self.name} has a separate target vocabulary of "
                f"{self.target_vocabulary_size} tokens; pass its target tokenizer too")
        check_tokenizer_matches(f"{self.name} (target side)", self.target_vocabulary_size,
                                self.target_special_token_ids, target_tokenizer)

    def get_config(self):
        return {
            **super().get_config(),
            "vocabulary_size": self.vocabulary_size,
            "num_layers": self.num_layers,
            "num_decoder_layers": self.num_decoder_layers,
            "num_heads": self.num_heads,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "max_length": self.max_length,
            "dropout": self.dropout,
            "activation": self.activation,
            "norm_first": self.norm_first,
            "position": self.position,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "special_token_ids": self.special_token_ids,
            "target_vocabulary_size": self.target_vocabulary_size,
            "target_special_token_ids": self.target_special_token_ids,
            "tie_embeddings": self.tie_embeddings,
        }

    @classmethod
    def from_model_config(cls, model_config, vocabulary_size=None, special_token_ids=None,
                          target_vocabulary_size=None, target_special_token_ids=None):
        """Builds from a `keras_llm.config.ModelConfig` (`target_vocab_size` set, or
        `target_vocabulary_size` given: separate source and target vocabularies)."""
        return cls(
            vocabulary_size=vocabulary_size or model_config.vocab_size,
            target_vocabulary_size=target_vocabulary_size or model_config.target_vocab_size,
            target_special_token_ids=target_special_token_ids,
            num_layers=model_config.num_layers,
            num_decoder_layers=model_config.num_decoder_layers,
            num_heads=model_config.num_heads, hidden_size=model_config.hidden_size,
            intermediate_size=model_config.intermediate_size,
            max_length=model_config.max_length, dropout=model_config.dropout,
            activation=model_config.activation, norm_first=model_config.norm_first,
            position=model_config.position, layer_norm_epsilon=model_config.layer_norm_epsilon,
            tie_embeddings=model_config.tie_embeddings, special_token_ids=special_token_ids,
            name="seq2seq_backbone")


@keras.saving.register_keras_serializable(package="keras_llm")
class Seq2SeqLM(keras.Model):
    """Target-token prediction on a `Seq2SeqBackbone`: logits `(batch, target_length, vocab)`.

    Train on `(inputs, target_ids, target_weights)` from
    `keras_llm.data.denoising.denoising_dataset` (decoder inputs are the targets shifted
    right behind a start token).

    Args:
        backbone: a `Seq2SeqBackbone`.

    Example:

    >>> backbone = Seq2SeqBackbone(vocabulary_size=100, num_layers=1, num_heads=2,
    ...                            hidden_size=16, intermediate_size=32, max_length=8)
    >>> logits = Seq2SeqLM(backbone)({
    ...     "encoder_token_ids": keras.ops.ones((2, 6), "int32"),
    ...     "encoder_padding_mask": keras.ops.ones((2, 6), "bool"),
    ...     "decoder_token_ids": keras.ops.ones((2, 5), "int32"),
    ...     "decoder_padding_mask": keras.ops.ones((2, 5), "bool")})
    >>> keras.ops.shape(logits)
    (2, 5, 100)
    """

    def __init__(self, backbone, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone

    def build(self, input_shape):
        if not self.backbone.built:  # a deserialized backbone arrives built
            self.backbone.build(input_shape)

    def call(self, inputs, training=None):
        return self.backbone.logits(self.backbone(inputs, training=training))

    def call_with_cache(self, token_ids, cache, cache_index, cross_cache,
                        encoder_padding_mask=None):
        """`(logits, hidden, cache)` for decoder `token_ids` placed at `cache_index`."""
        hidden, cache = self.backbone.decode_with_cache(token_ids, cache, cache_index,
                                                        cross_cache, encoder_padding_mask)
        return self.backbone.logits(hidden), hidden, cache

    def generate_step(self, inputs, sampler, stop_token_ids=None):
        """Fills `decoder_token_ids` after each decoder prompt, given the encoder inputs.

        Args:
            inputs: dict with `encoder_token_ids`, `encoder_padding_mask`,
                `decoder_token_ids` (prompts left-aligned, at least the start token) and
                `decoder_padding_mask` (True on prompt tokens, kept as is).
            sampler: a `keras_hub.samplers.Sampler` (greedy, top-k, top-p...).
            stop_token_ids: ids that end a sequence; the loop stops once every row has one.
        """
        encoder_padding_mask = inputs["encoder_padding_mask"]
        token_ids, padding_mask = inputs["decoder_token_ids"], inputs["decoder_padding_mask"]
        encoded = self.backbone.encode(inputs["encoder_token_ids"], encoder_padding_mask)
        cross_cache = self.backbone.cross_attention_cache(encoded)
        batch_size, length = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        # Prefill the self-attention cache with the whole padded block (as GPTCausalLM does).
        cache = self.backbone.empty_cache(batch_size, length)
        _, _, cache = self.call_with_cache(token_ids, cache, 0, cross_cache, encoder_padding_mask)
        index = ops.min(ops.sum(ops.cast(padding_mask, "int32"), axis=-1))

        def next(prompt, cache, index):
            previous = ops.slice(prompt, (0, index - 1), (batch_size, 1))
            logits, hidden, cache = self.call_with_cache(previous, cache, index - 1,
                                                         cross_cache, encoder_padding_mask)
            return ops.squeeze(logits, axis=1), ops.squeeze(hidden, axis=1), cache

        return sampler(next=next, prompt=token_ids, cache=cache, index=index, mask=padding_mask,
                       stop_token_ids=stop_token_ids, model=self)

    def check_tokenizer(self, tokenizer, target_tokenizer=None):
        self.backbone.check_tokenizer(tokenizer, target_tokenizer)

    def get_config(self):
        return {**super().get_config(), "backbone": keras.saving.serialize_keras_object(
            self.backbone)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)


def with_target_vocabulary(model, target_vocabulary_size, target_special_token_ids=None):
    """A copy of a built `Seq2SeqLM` whose decoder reads and writes a new target vocabulary.

    Every weight is copied except the target embedding, which starts from the usual random
    initialization: the encoder keeps the source vocabulary and what pretraining taught it,
    the decoder learns the new target tokens in fine-tuning (e.g. a denoising-pretrained
    English model fine-tuned to translate into German with a German vocabulary).

    Example:

    >>> model = Seq2SeqLM(Seq2SeqBackbone(vocabulary_size=100, num_layers=1, num_heads=2,
    ...                                   hidden_size=16, intermediate_size=32, max_length=8))
    >>> model.build({key: (None, None) for key in INPUT_KEYS})
    >>> with_target_vocabulary(model, 40).backbone.decoder_embedding.input_dim
    40
    """
    backbone = model.backbone
    config = dict(backbone.get_config(), target_vocabulary_size=target_vocabulary_size,
                  target_special_token_ids=target_special_token_ids)
    copy = Seq2SeqLM(Seq2SeqBackbone.from_config(config), name=model.name)
    copy.build({key: (None, None) for key in INPUT_KEYS})

    def kept(lm):
        target = lm.backbone.target_token_embedding
        dropped = {id(v) for v in target.weights} if target is not None else set()
        return [v for v in lm.weights if id(v) not in dropped]

    for new, old in zip(kept(copy), kept(model), strict=True):
        if tuple(new.shape) != tuple(old.shape):
            raise ValueError(f"weight {new.path} has shape {tuple(new.shape)} but the model's "
                             f"{old.path} has {tuple(old.shape)}")
        new.assign(old)
    return copy
