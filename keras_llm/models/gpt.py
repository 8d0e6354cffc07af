"""GPT: a decoder-only Transformer language model (Radford et al., 2018, 2019).

`GPTBackbone` maps token ids to hidden states: token + position embeddings, N causal
decoder blocks, a final layer norm (pre-layer-norm models). `GPTCausalLM` adds the output
projection, tied to the token embedding, and the KV-cached step used for generation.
"""
import keras
from keras import ops
from keras_hub.layers import ReversibleEmbedding

from keras_llm.layers import TransformerDecoderBlock
from keras_llm.layers.attention import empty_kv_cache
from keras_llm.layers.linear import embedding_logits
from keras_llm.layers.normalization import LayerNormalization
from keras_llm.layers.position import add_positions, position_layer, rotary_max_wavelength
from keras_llm.layers.validation import check_positive

# GPT-2 (and nanoGPT) draw every kernel and embedding from N(0, 0.02); the kernels that
# write into the residual stream get 0.02 / sqrt(2 * num_layers), so the stream's variance
# does not grow with depth (two residual additions per block).
INITIALIZER_STDDEV = 0.02


def residual_initializer_stddev(num_layers):
    return INITIALIZER_STDDEV / (2 * num_layers) ** 0.5


@keras.saving.register_keras_serializable(package="keras_llm")
class GPTBackbone(keras.Model):
    """Token ids `(batch, length)` -> hidden states `(batch, length, hidden_size)`.

    Args:
        vocabulary_size: number of token ids.
        num_layers: number of decoder blocks.
        num_heads: attention heads per block.
        hidden_size: width of the residual stream.
        intermediate_size: width of the feed-forward layers.
        max_length: the longest sequence (size of the learned position table).
        dropout: dropout rate in embeddings and blocks.
        activation: feed-forward activation; GPT-2 uses "gelu_tanh".
        norm_first: pre-layer-norm blocks plus a final norm (GPT-2) when True.
        position: "learned" (GPT-2), "sinusoidal" or "rotary" (RoPE in every attention
            layer, as GPT-NeoX and Llama; no position table) position encoding.
        layer_norm_epsilon: epsilon of the layer norms.
        use_bias: biases in the projections and layer norms (GPT-2); nanoGPT trains without
            them by default (`bias=False`: slightly better and faster).
        tie_embeddings: whether the output projection is the token embedding's transpose
            (True: GPT-2, BERT) or a separate `(hidden, vocabulary)` kernel.

    Weights start as GPT-2's and nanoGPT's: kernels and embeddings from N(0, 0.02), the
    attention and feed-forward output kernels from N(0, 0.02 / sqrt(2 * num_layers)),
    biases at zero.

    Example:

    >>> backbone = GPTBackbone(vocabulary_size=100, num_layers=2, num_heads=2,
    ...                        hidden_size=16, intermediate_size=32, max_length=8)
    >>> keras.ops.shape(backbone(keras.ops.ones((2, 8), "int32")))
    (2, 8, 16)

    References:
        - [Radford et al., 2019](https://openai.com/research/better-language-models)
    """

    def __init__(self, vocabulary_size, num_layers, num_heads, hidden_size, intermediate_size,
                 max_length, dropout=0.0, activation="gelu_tanh", norm_first=True,
                 position="learned", layer_norm_epsilon=1e-5, use_bias=True, tie_embeddings=True,
                 **kwargs):
        super().__init__(**kwargs)
        for name, value in (("vocabulary_size", vocabulary_size), ("num_layers", num_layers),
                            ("num_heads", num_heads), ("hidden_size", hidden_size),
                            ("max_length", max_length)):
            check_positive(name, value)
        if hidden_size % num_heads:
            raise ValueError(
                f"hidden_size must be divisible by num_heads; got hidden_size={hidden_size}, "
                f"num_heads={num_heads}")
        initializer = keras.initializers.RandomNormal(stddev=INITIALIZER_STDDEV)
        residual_initializer = keras.initializers.RandomNormal(
            stddev=residual_initializer_stddev(num_layers))
        self.token_embedding = ReversibleEmbedding(
            vocabulary_size, hidden_size, tie_weights=tie_embeddings,
            embeddings_initializer=initializer, dtype=self.dtype_policy, name="token_embedding")
        self.position_embedding = position_layer(position, max_length, initializer,
                                                 dtype=self.dtype_policy)
        self.embedding_dropout = keras.layers.Dropout(dropout, dtype=self.dtype_policy)
        self.blocks = [
            TransformerDecoderBlock(
                num_heads, intermediate_size, dropout=dropout, activation=activation,
                norm_first=norm_first, layer_norm_epsilon=layer_norm_epsilon,
                kernel_initializer=initializer, use_bias=use_bias,
                output_kernel_initializer=residual_initializer,
                rotary_max_wavelength=rotary_max_wavelength(position), dtype=self.dtype_policy,
                name=f"block_{i}")
            for i in range(num_layers)
        ]
        self.final_norm = LayerNormalization(
            epsilon=layer_norm_epsilon, center=use_bias, dtype=self.dtype_policy,
            name="final_norm") if norm_first else None
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.max_length = max_length
        self.dropout = dropout
        self.activation = activation
        self.norm_first = norm_first
        self.position = position
        self.layer_norm_epsilon = layer_norm_epsilon
        self.use_bias = use_bias
        self.tie_embeddings = tie_embeddings

    def build(self, input_shape):
        hidden_shape = (*input_shape, self.hidden_size)
        self.token_embedding.build(input_shape)
        if self.position_embedding is not None:
            self.position_embedding.build(hidden_shape)
        for block in self.blocks:
            block.build(hidden_shape)
        if self.final_norm is not None:
            self.final_norm.build(hidden_shape)

    def _embed(self, token_ids, start_index=0, training=None):
        x = add_positions(self.token_embedding(token_ids), self.position_embedding, start_index)
        return self.embedding_dropout(x, training=training)

    def _finish(self, x):
        return x if self.final_norm is None else self.final_norm(x)

    def call(self, token_ids, padding_mask=None, training=None, output_positions=None):
        """Hidden states `(batch, length, hidden_size)`; with `output_positions`
        `(batch, P)` only those at the positions, `(batch, P, hidden_size)`, the last block
        computing no others (a classifier reading the last token uses it)."""
        x = self._embed(token_ids, training=training)
        for i, block in enumerate(self.blocks):
            x = block(x, padding_mask=padding_mask, training=training,
                      output_positions=output_positions if i == len(self.blocks) - 1 else None)
        return self._finish(x)

    def call_with_cache(self, token_ids, cache, cache_index):
        """One decoding step: `(hidden, cache)` for `token_ids` placed at `cache_index`.

        `cache` is `empty_cache`'s structure: one `(keys, values)` pair per block.
        """
        x = self._embed(token_ids, start_index=cache_index)
        updated = []
        for block, layer_cache in zip(self.blocks, cache):
            x, layer_cache = block(x, self_attention_cache=layer_cache, cache_index=cache_index)
            updated.append(layer_cache)
        return self._finish(x), tuple(updated)

    def empty_cache(self, batch_size, length):
        """A zero KV cache: one `(keys, values)` pair of `(batch, heads, length, head_dim)`
        tensors per block. Separate tensors, not one stacked array, so that a compiled
        decoding loop updates each in place (stacking copies the whole cache every step)."""
        return empty_kv_cache(batch_size, length, self.num_layers, self.num_heads,
                              self.hidden_size // self.num_heads, self.compute_dtype)

    def logits(self, hidden):
        """Output projection: the token embedding's transpose (or, untied, its own kernel),
        in the compute dtype (see `embedding_logits`)."""
        return embedding_logits(self.token_embedding, hidden)

    def get_config(self):
        return {
            **super().get_config(),
            "vocabulary_size": self.vocabulary_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "max_length": self.max_length,
            "dropout": self.dropout,
            "activation": self.activation,
            "norm_first": self.norm_first,
            "position": self.position,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "use_bias": self.use_bias,
            "tie_embeddings": self.tie_embeddings,
        }

    @classmethod
    def from_model_config(cls, model_config, vocabulary_size=None, **overrides):
        """Builds from a `keras_llm.config.ModelConfig`; the tokenizer may set the vocabulary,
        and `overrides` set constructor arguments the config has no key for (`use_bias`)."""
        return cls(
            vocabulary_size=vocabulary_size or model_config.vocab_size,
            num_layers=model_config.num_layers, num_heads=model_config.num_heads,
            hidden_size=model_config.hidden_size,
            intermediate_size=model_config.intermediate_size,
            max_length=model_config.max_length, dropout=model_config.dropout,
            activation=model_config.activation, norm_first=model_config.norm_first,
            position=model_config.position,
            layer_norm_epsilon=model_config.layer_norm_epsilon,
            tie_embeddings=model_config.tie_embeddings,
            **{"name": "gpt_backbone", **overrides})


@keras.saving.register_keras_serializable(package="keras_llm")
class GPTCausalLM(keras.Model):
    """Next-token prediction head on a `GPTBackbone`: token ids -> logits over the vocabulary.

    Train it with `compile(loss=SparseCategoricalCrossentropy(from_logits=True))` on
    `(token_ids, next_token_ids)` pairs. `generate_step` is the KV-cached decoding step
    that `keras_llm.generation.generate` drives with a keras-hub sampler.

    Args:
        backbone: a `GPTBackbone`.

    Example:

    >>> backbone = GPTBackbone(vocabulary_size=100, num_layers=1, num_heads=2,
    ...                        hidden_size=16, intermediate_size=32, max_length=8)
    >>> keras.ops.shape(GPTCausalLM(backbone)(keras.ops.ones((2, 8), "int32")))
    (2, 8, 100)
    """

    def __init__(self, backbone, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone

    def build(self, input_shape):
        if not self.backbone.built:  # a deserialized backbone arrives built
            self.backbone.build(input_shape)

    def call(self, token_ids, padding_mask=None, training=None):
        return self.backbone.logits(self.backbone(token_ids, padding_mask, training=training))

    def call_with_cache(self, token_ids, cache, cache_index):
        hidden, cache = self.backbone.call_with_cache(token_ids, cache, cache_index)
        return self.backbone.logits(hidden), hidden, cache

    def generate_step(self, token_ids, padding_mask, sampler, stop_token_ids=None):
        """Fills `token_ids` after each prompt with tokens chosen by a keras-hub `sampler`.

        Args:
            token_ids: `(batch, length)` int tensor, prompts left-aligned, padded to `length`.
            padding_mask: `(batch, length)` bool tensor, True on prompt tokens (kept as is).
            sampler: a `keras_hub.samplers.Sampler` (greedy, top-k, top-p, beam...).
            stop_token_ids: ids that end a sequence; the loop stops once every row has one.
        """
        batch_size, length = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        # Prefill: one pass over the whole padded block fills the cache; positions past a
        # prompt hold garbage that each decoding step overwrites before it is attended to.
        cache = self.backbone.empty_cache(batch_size, length)
        _, _, cache = self.call_with_cache(token_ids, cache, 0)
        index = ops.min(ops.sum(ops.cast(padding_mask, "int32"), axis=-1))

        def next(prompt, cache, index):
            # The token at index - 1 is the newest; its logits choose token `index`.
            previous = ops.slice(prompt, (0, index - 1), (batch_size, 1))
            logits, hidden, cache = self.call_with_cache(previous, cache, index - 1)
            return ops.squeeze(logits, axis=1), ops.squeeze(hidden, axis=1), cache

        return sampler(next=next, prompt=token_ids, cache=cache, index=index, mask=padding_mask,
                       stop_token_ids=stop_token_ids, model=self)

    def get_config(self):
        return {**super().get_config(), "backbone": keras.saving.serialize_keras_object(
            self.backbone)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)
