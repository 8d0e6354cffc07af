"""Transformer encoder and decoder blocks, pre- or post-layer-norm."""
import keras
from keras import ops

from keras_llm.layers.activations import gelu, gelu_tanh, relu
from keras_llm.layers.attention import (
    MultiHeadAttention,
    cache_length,
    gather_positions,
    merge_masks,
)
from keras_llm.layers.linear import linear
from keras_llm.layers.normalization import LayerNormalization
from keras_llm.layers.validation import check_positive, check_rate, check_shape

ACTIVATIONS = {
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,  # GPT-2's
    "relu": relu,
}


def get_activation(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}; got {name!r}")
    return ACTIVATIONS[name]


@keras.saving.register_keras_serializable(package="keras_llm")
class FeedForward(keras.layers.Layer):
    """Position-wise feed-forward network: `Dense(intermediate) -> activation -> Dense(hidden)`.

    Args:
        intermediate_size: width of the hidden layer.
        activation: "gelu", "gelu_tanh" or "relu".
        kernel_initializer: initializer of both kernels.
        use_bias: whether both layers have biases.
        output_kernel_initializer: initializer of the second kernel; defaults to
            `kernel_initializer` (GPT-2 shrinks it: it writes into the residual stream).

    Example:

    >>> keras.ops.shape(FeedForward(32)(keras.ops.ones((2, 3, 8))))
    (2, 3, 8)
    """

    def __init__(self, intermediate_size, activation="gelu", kernel_initializer="glorot_uniform",
                 use_bias=True, output_kernel_initializer=None, **kwargs):
        super().__init__(**kwargs)
        check_positive("intermediate_size", intermediate_size)
        self.intermediate_size = intermediate_size
        self.activation = activation
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.use_bias = use_bias
        self.output_kernel_initializer = keras.initializers.get(
            output_kernel_initializer or kernel_initializer)
        self._activation_fn = get_activation(activation)

    def build(self, input_shape):
        self.intermediate_dense = keras.layers.Dense(
            self.intermediate_size, kernel_initializer=self.kernel_initializer,
            use_bias=self.use_bias, dtype=self.dtype_policy, name="intermediate_dense")
        self.intermediate_dense.build(input_shape)
        self.output_dense = keras.layers.Dense(
            input_shape[-1], kernel_initializer=self.output_kernel_initializer,
            use_bias=self.use_bias, dtype=self.dtype_policy, name="output_dense")
        self.output_dense.build((*input_shape[:-1], self.intermediate_size))

    def call(self, x, training=None):
        # The Dense layers hold the weights; `linear` applies them (see its docstring).
        # In training the activation's forward pass is one fused loop (exports trace with
        # training off, so a SavedModel keeps plain ops).
        hidden = self._activation_fn(linear(x, self.intermediate_dense.kernel,
                                            self.intermediate_dense.bias), training=training)
        return linear(hidden, self.output_dense.kernel, self.output_dense.bias)

    def get_config(self):
        return {**super().get_config(), "intermediate_size": self.intermediate_size,
                "activation": self.activation,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "use_bias": self.use_bias,
                "output_kernel_initializer": keras.initializers.serialize(
                    self.output_kernel_initializer)}


class _TransformerBlock(keras.layers.Layer):
    """Shared arguments and the residual wiring of encoder and decoder blocks."""

    def __init__(self, num_heads, intermediate_size, dropout=0.0, activation="gelu",
                 norm_first=False, layer_norm_epsilon=1e-5,
                 kernel_initializer="glorot_uniform", use_bias=True,
                 output_kernel_initializer=None, rotary_max_wavelength=None, **kwargs):
        super().__init__(**kwargs)
        check_positive("num_heads", num_heads)
        check_positive("intermediate_size", intermediate_size)
        check_rate("dropout", dropout)
        get_activation(activation)
        self.num_heads = num_heads
        self.intermediate_size = intermediate_size
        self.dropout = dropout
        self.activation = activation
        self.norm_first = norm_first
        self.layer_norm_epsilon = layer_norm_epsilon
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.use_bias = use_bias
        self.output_kernel_initializer = keras.initializers.get(
            output_kernel_initializer or kernel_initializer)
        self.rotary_max_wavelength = rotary_max_wavelength
        self._dropout_layer = keras.layers.Dropout(dropout, dtype=self.dtype_policy)

    def _attention(self, hidden, name, rotary=False):
        if hidden % self.num_heads:
            raise ValueError(
                f"hidden size {hidden} is not divisible by num_heads={self.num_heads}")
        return MultiHeadAttention(
            self.num_heads, hidden // self.num_heads, dropout=self.dropout,
            use_bias=self.use_bias, kernel_initializer=self.kernel_initializer,
            output_kernel_initializer=self.output_kernel_initializer,
            rotary_max_wavelength=self.rotary_max_wavelength if rotary else None,
            dtype=self.dtype_policy, name=name)

    def _norm(self, name, input_shape):
        norm = LayerNormalization(
            epsilon=self.layer_norm_epsilon, center=self.use_bias, dtype=self.dtype_policy,
            name=name)
        norm.build(input_shape)
        return norm

    def _build_feedforward(self, input_shape):
        self.feedforward = FeedForward(
            self.intermediate_size, self.activation, self.kernel_initializer,
            use_bias=self.use_bias, output_kernel_initializer=self.output_kernel_initializer,
            dtype=self.dtype_policy, name="feedforward")
        self.feedforward.build(input_shape)
        self.feedforward_norm = self._norm("feedforward_norm", input_shape)

    @staticmethod
    def _check_masks(x, key_length, padding_mask, attention_mask):
        batch, length = x.shape[0], x.shape[1]
        check_shape(padding_mask, "padding_mask", (("batch", batch), ("keys", key_length)))
        check_shape(attention_mask, "attention_mask",
                    (("batch", batch), ("queries", length), ("keys", key_length)))

    @staticmethod
    def _rows_at(x, mask, output_positions):
        """`(residual, mask, positions)` of a block computing its outputs at
        `output_positions` only (all rows when None): the residual rows there, and a mask
        with one row per query cut to those rows."""
        if output_positions is None:
            return x, mask, None
        output_positions = ops.cast(output_positions, "int32")
        if mask is not None and mask.shape[1] != 1:
            mask = gather_positions(mask, output_positions)
        return gather_positions(x, output_positions), mask, output_positions

    def _enter(self, x, norm):
        return norm(x) if self.norm_first else x

    def _leave(self, y, residual, norm, training):
        y = self._dropout_layer(y, training=training) + residual
        return y if self.norm_first else norm(y)

    def _feedforward_sublayer(self, x, training):
        y = self.feedforward(self._enter(x, self.feedforward_norm), training=training)
        return self._leave(y, x, self.feedforward_norm, training)

    def compute_output_shape(self, input_shape, *args, **kwargs):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads,
                "intermediate_size": self.intermediate_size, "dropout": self.dropout,
                "activation": self.activation, "norm_first": self.norm_first,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "use_bias": self.use_bias,
                "output_kernel_initializer": keras.initializers.serialize(
                    self.output_kernel_initializer),
                "rotary_max_wavelength": self.rotary_max_wavelength}


@keras.saving.register_keras_serializable(package="keras_llm")
class TransformerEncoderBlock(_TransformerBlock):
    """Self-attention and feed-forward sublayers, each with a residual connection.

    Post-layer-norm (`norm_first=False`, the original Transformer and BERT) normalizes after
    each residual sum; pre-layer-norm (`norm_first=True`, GPT-2 onwards) normalizes each
    sublayer's input, which trains more stably when deep.

    Args:
        num_heads: attention heads; must divide the input's hidden size.
        intermediate_size: width of the feed-forward layer.
        dropout: dropout on attention probabilities and sublayer outputs.
        activation: feed-forward activation ("gelu", "gelu_tanh", "relu").
        norm_first: pre-layer-norm when True, post-layer-norm when False.
        layer_norm_epsilon: epsilon of the layer norms.
        kernel_initializer: initializer of all kernels.
        use_bias: whether the projections and layer norms have biases (offsets).
        output_kernel_initializer: initializer of the attention and feed-forward output
            kernels, the ones that write into the residual stream; defaults to
            `kernel_initializer` (GPT-2 scales it by `1 / sqrt(2 * num_layers)`).
        rotary_max_wavelength: RoPE's base wavelength for the self-attention layer (see
            `MultiHeadAttention`); None (the default) for no rotation.

    Example:

    >>> block = TransformerEncoderBlock(num_heads=2, intermediate_size=32)
    >>> x = keras.random.normal((2, 5, 8))
    >>> keras.ops.shape(block(x, padding_mask=keras.ops.array([[1, 1, 1, 0, 0]] * 2)))
    (2, 5, 8)

    References:
        - [Vaswani et al., 2017](https://arxiv.org/abs/1706.03762)
        - [Xiong et al., 2020](https://arxiv.org/abs/2002.04745) (pre-layer-norm)
    """

    def build(self, input_shape):
        self.self_attention = self._attention(input_shape[-1], "self_attention", rotary=True)
        self.self_attention.build(input_shape)
        self.self_attention_norm = self._norm("self_attention_norm", input_shape)
        self._build_feedforward(input_shape)

    def call(self, x, padding_mask=None, attention_mask=None, training=None,
             output_positions=None):
        """`x` `(batch, length, hidden)` -> the same shape, or with `output_positions`
        `(batch, P)` only the outputs at those positions, `(batch, P, hidden)`: every
        position is still a key and a value, but only those P ask, and the feed-forward
        sublayer runs on them alone. A masked-LM's last block needs no more (see
        `BertBackbone`)."""
        self._check_masks(x, x.shape[1], padding_mask, attention_mask)
        residual, mask, output_positions = self._rows_at(
            x, merge_masks(padding_mask, attention_mask), output_positions)
        y = self.self_attention(self._enter(x, self.self_attention_norm),
                                attention_mask=mask, training=training,
                                query_positions=output_positions)
        x = self._leave(y, residual, self.self_attention_norm, training)
        return self._feedforward_sublayer(x, training)


@keras.saving.register_keras_serializable(package="keras_llm")
class TransformerDecoderBlock(_TransformerBlock):
    """Causal self-attention, optional cross-attention, and feed-forward sublayers.

    With `cross_attention=True` the block attends to `encoder_outputs` (the encoder-decoder
    Transformer); without it, it is a GPT block. For incremental decoding pass
    `self_attention_cache` and `cache_index`: the block returns `(outputs, updated_cache)`
    (a cache is a `(keys, values)` pair or one stacked tensor; see `MultiHeadAttention`).
    A precomputed `cross_attention_cache` (from `compute_cross_attention_cache`) replaces
    `encoder_outputs` while decoding.

    Args:
        num_heads: attention heads; must divide the input's hidden size.
        intermediate_size: width of the feed-forward layer.
        cross_attention: whether the block has a cross-attention sublayer.
        dropout: dropout on attention probabilities and sublayer outputs.
        activation: feed-forward activation ("gelu", "gelu_tanh", "relu").
        norm_first: pre-layer-norm when True, post-layer-norm when False.
        layer_norm_epsilon: epsilon of the layer norms.
        kernel_initializer: initializer of all kernels.
        use_bias: whether the projections and layer norms have biases (offsets).
        output_kernel_initializer: initializer of the attention and feed-forward output
            kernels, the ones that write into the residual stream; defaults to
            `kernel_initializer` (GPT-2 scales it by `1 / sqrt(2 * num_layers)`).
        rotary_max_wavelength: RoPE's base wavelength for the self-attention layer (see
            `MultiHeadAttention`); None (the default) for no rotation.

    Example:

    >>> block = TransformerDecoderBlock(num_heads=2, intermediate_size=32, cross_attention=True)
    >>> x, memory = keras.random.normal((2, 5, 8)), keras.random.normal((2, 7, 8))
    >>> keras.ops.shape(block(x, encoder_outputs=memory))
    (2, 5, 8)

    References:
        - [Vaswani et al., 2017](https://arxiv.org/abs/1706.03762)
        - [Radford et al., 2019](https://openai.com/research/better-language-models) (GPT-2)
    """

    def __init__(self, num_heads, intermediate_size, cross_attention=False, **kwargs):
        super().__init__(num_heads, intermediate_size, **kwargs)
        self.cross_attention = cross_attention

    def build(self, input_shape):
        hidden = input_shape[-1]
        self.self_attention = self._attention(hidden, "self_attention", rotary=True)
        self.self_attention.build(input_shape)
        self.self_attention_norm = self._norm("self_attention_norm", input_shape)
        if self.cross_attention:
            self.cross_attention_layer = self._attention(hidden, "cross_attention")
            self.cross_attention_layer.build(input_shape, input_shape)
            self.cross_attention_norm = self._norm("cross_attention_norm", input_shape)
        self._build_feedforward(input_shape)

    def compute_cross_attention_cache(self, encoder_outputs):
        """Encoder keys and values for decoding, computed once per source sequence."""
        return self.cross_attention_layer.compute_key_value_cache(encoder_outputs)

    def call(self, x, encoder_outputs=None, padding_mask=None, attention_mask=None,
             encoder_padding_mask=None, self_attention_cache=None, cache_index=None,
             cross_attention_cache=None, use_causal_mask=True, training=None,
             output_positions=None):
        """`x` `(batch, length, hidden)` -> the same shape (and the updated cache when
        decoding), or with `output_positions` `(batch, P)` (no cache) only the outputs at
        those positions, `(batch, P, hidden)`, as in `TransformerEncoderBlock`: a
        classifier reading one position needs no more of the last block."""
        key_length = (x.shape[1] if self_attention_cache is None
                      else cache_length(self_attention_cache))
        self._check_masks(x, key_length, padding_mask, attention_mask)
        if not self.cross_attention and (
                encoder_outputs is not None or cross_attention_cache is not None):
            raise ValueError(
                "encoder_outputs and cross_attention_cache need a block built with "
                "cross_attention=True")
        residual, mask, output_positions = self._rows_at(
            x, merge_masks(padding_mask, attention_mask), output_positions)
        attended = self.self_attention(
            self._enter(x, self.self_attention_norm), attention_mask=mask,
            use_causal_mask=use_causal_mask, cache=self_attention_cache,
            cache_index=cache_index, training=training, query_positions=output_positions)
        if self_attention_cache is not None:
            attended, self_attention_cache = attended
        x = self._leave(attended, residual, self.self_attention_norm, training)

        if self.cross_attention:
            if encoder_outputs is None and cross_attention_cache is None:
                raise ValueError(
                    "this block has cross-attention: pass encoder_outputs or "
                    "cross_attention_cache")
            encoder_length = (encoder_outputs.shape[1] if cross_attention_cache is None
                              else cache_length(cross_attention_cache))
            check_shape(encoder_padding_mask, "encoder_padding_mask",
                        (("batch", x.shape[0]), ("encoder_length", encoder_length)))
            attended = self.cross_attention_layer(
                self._enter(x, self.cross_attention_norm), encoder_outputs,
                attention_mask=merge_masks(encoder_padding_mask),
                cache=cross_attention_cache, training=training)
            if cross_attention_cache is not None:
                attended = attended[0]
            x = self._leave(attended, x, self.cross_attention_norm, training)

        x = self._feedforward_sublayer(x, training)
        return x if self_attention_cache is None else (x, self_attention_cache)

    def get_config(self):
        return {**super().get_config(), "cross_attention": self.cross_attention}
