"""Multi-head attention with padding and causal masks, cross-attention and a KV cache."""
import math

import keras
from keras import ops
from keras_hub.layers import RotaryEmbedding

from keras_llm.layers.activations import upstream_gradient
from keras_llm.layers.linear import linear
from keras_llm.layers.validation import check_positive, check_rate, check_shape


def causal_mask(query_length, key_length, start_index=0):
    """Boolean `(query_length, key_length)` mask: query `i` sees keys `<= start_index + i`.

    `start_index` is the position of the first query in the sequence, so the same mask serves
    a full forward pass (`start_index=0`) and a cached decoding step (`start_index=cache_index`).

    Example:

    >>> keras.ops.convert_to_numpy(causal_mask(2, 3, start_index=1)).tolist()
    [[True, True, False], [True, True, True]]
    """
    query_positions = ops.arange(query_length)[:, None] + start_index
    key_positions = ops.arange(key_length)[None, :]
    return ops.greater_equal(query_positions, key_positions)


def full_query_mask(mask, query_length):
    """A `(batch, 1, queries or 1, keys)` mask broadcast to `(batch, 1, queries, keys)`.

    JAX's cuDNN flash attention (behind `keras.ops.dot_product_attention` on GPU) takes a mask
    only with the full query axis; given a padding mask's `(batch, 1, 1, keys)` it falls back
    to XLA's unfused attention, which writes the `(batch, heads, T, S)` scores in float32.
    Our BERT at the BERT-base size, length 1024, batch 16, on an H200: 292k tokens/s (MFU
    19.5%) unfused, 489k (32.6%) with the mask broadcast.

    Example:

    >>> mask = keras.ops.convert_to_tensor([[[[True, False]]]])
    >>> keras.ops.shape(full_query_mask(mask, 3))
    (1, 1, 3, 2)
    """
    batch, heads, _, keys = ops.shape(mask)
    return ops.broadcast_to(mask, (batch, heads, query_length, keys))


def leading_shape(x):
    """`(batch, length)` of `x` for a reshape target: static sizes where known, and -1 for
    an unknown batch. In a shape-polymorphic graph (an exported signature's decoding loop,
    where the length is a static 1) the target is then a constant; `shape(x)[0]` would cost
    a few small ops per reshape, per layer, per decoding step."""
    batch = -1 if x.shape[0] is None else x.shape[0]
    return batch, ops.shape(x)[1] if x.shape[1] is None else x.shape[1]


def gather_positions(sequence, positions):
    """`sequence[b, positions[b, p]]`: the `(batch, predictions, width)` rows of a
    `(batch, length, width)` sequence at `positions` `(batch, predictions)`, each in
    `[0, length)`.

    One gather from the flattened sequence. `keras.ops.take_along_axis` broadcasts the
    positions to the full width and moves the length axis last: two transposes of the whole
    sequence output forward and two more backward (8.3 -> 3.6 ms forward + backward at the
    small BERT shape, 8 x 256 x 512 with 38 positions, on 2 CPU cores).

    Example:

    >>> x = keras.ops.reshape(keras.ops.arange(12.0), (2, 3, 2))
    >>> keras.ops.convert_to_numpy(gather_positions(x, keras.ops.array([[2], [0]]))).tolist()
    [[[4.0, 5.0]], [[6.0, 7.0]]]
    """
    positions = ops.cast(positions, "int32")
    batch, length, width = ops.shape(sequence)
    rows = positions + ops.arange(batch, dtype="int32")[:, None] * length
    picked = ops.take(ops.reshape(sequence, (-1, width)), ops.reshape(rows, (-1,)), axis=0)
    return ops.reshape(picked, (batch, -1, width))


def split_cache(cache):
    """`(keys, values)` of a cache given as a pair or as one stacked `(batch, 2, ...)`
    tensor."""
    if isinstance(cache, (tuple, list)):
        return cache[0], cache[1]
    return cache[:, 0], cache[:, 1]


def cache_length(cache):
    """The static key length (`max_length`) of a pair or stacked cache (None if unknown)."""
    return cache[0].shape[2] if isinstance(cache, (tuple, list)) else cache.shape[3]


def empty_kv_cache(batch_size, length, num_layers, num_heads, head_dim, dtype="float32"):
    """A zero decoding cache of a stack of attention layers: a tuple with one
    `(keys, values)` pair of `(batch_size, num_heads, length, head_dim)` tensors per layer.

    Example:

    >>> cache = empty_kv_cache(2, 8, num_layers=3, num_heads=4, head_dim=16)
    >>> len(cache), keras.ops.shape(cache[0][1])
    (3, (2, 4, 8, 16))
    """
    shape = (batch_size, num_heads, length, head_dim)
    return tuple((ops.zeros(shape, dtype=dtype), ops.zeros(shape, dtype=dtype))
                 for _ in range(num_layers))


def merge_masks(padding_mask=None, attention_mask=None):
    """Combines a `(batch, keys)` padding mask and a `(batch, queries, keys)` attention mask.

    Returns a boolean `(batch, queries, keys)` mask, or `None` when neither is given.

    Example:

    >>> mask = merge_masks(padding_mask=keras.ops.array([[1, 1, 0]]))
    >>> keras.ops.convert_to_numpy(mask).tolist()
    [[[True, True, False]]]
    """
    mask = None
    if padding_mask is not None:
        mask = ops.cast(padding_mask, "bool")[:, None, :]
    if attention_mask is not None:
        attention_mask = ops.cast(attention_mask, "bool")
        mask = attention_mask if mask is None else ops.logical_and(mask, attention_mask)
    return mask


def _softmax_scores(q, k, mask):
    """Float32 attention probabilities `softmax(where(mask, q k^T, -1e9))` of scaled queries."""
    scores = ops.cast(ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))), "float32")
    if mask is not None:
        scores = ops.where(mask, scores, -1e9)
    return ops.softmax(scores, axis=-1)


# Causal self-attention over at least this many positions runs in query blocks (see
# `block_causal_core`); below it the blocks' extra ops cost what the skipped scores save.
BLOCK_CAUSAL_MIN_LENGTH = 256
BLOCK_CAUSAL_BLOCKS = 4


def _core_forward(scaled, k, v, mask):
    """Float32 probabilities, the same in the values' dtype, and the output `probs v`."""
    probs = _softmax_scores(scaled, k, mask)
    compute_probs = ops.cast(probs, v.dtype)
    return probs, compute_probs, ops.matmul(compute_probs, v)


def _core_gradient(d_output, output, scaled, k, v, probs, compute_probs, scale, live=None):
    """`(d_q, d_k, d_v)` of `_core_forward` (the queries' gradient is for the unscaled q).

    The softmax gradient `p (dp - sum_j p_j dp_j)` takes its row sum as `do . o`, a sum over
    the head dimension (FlashAttention's identity), and needs no mask: a masked
    probability is exactly 0, so its gradient already is. Queries where `live` is False (no
    visible key) get no gradient through their scores.
    """
    d_scores_output = d_output if live is None else ops.where(live, d_output,
                                                              ops.zeros_like(d_output))
    d_probs = ops.cast(ops.matmul(d_scores_output, ops.transpose(v, (0, 1, 3, 2))), "float32")
    row_sum = ops.sum(ops.cast(d_scores_output, "float32") * ops.cast(output, "float32"),
                      axis=-1, keepdims=True)
    d_scores = ops.cast(probs * (d_probs - row_sum), scaled.dtype)
    return (ops.matmul(d_scores, k) * scale,
            ops.matmul(ops.transpose(d_scores, (0, 1, 3, 2)), scaled),
            ops.matmul(ops.transpose(compute_probs, (0, 1, 3, 2)), d_output))


def attention_core(q, k, v, mask=None, scale=1.0, causal_only=False):
    """`softmax(where(mask, scale q k^T, -1e9)) v` for `(batch, heads, length, head_dim)`
    tensors, with a hand-written gradient; the softmax runs in float32.

    Differentiated op by op, the softmax and the mask cost five passes over the
    `(batch, heads, queries, keys)` scores in the backward pass (the mask's select, then
    the softmax gradient's product, row sum, difference and product). Written out it costs
    two (see `_core_gradient`). A gpt-small layer's attention core, forward and backward on
    2 CPU cores: 42.4 -> 37.0 ms.

    A query whose keys are all masked attends uniformly (every score is -1e9) and must get
    no gradient through its scores; unless `causal_only` says the mask is the causal one
    (every query sees itself), such rows are found and their score gradient zeroed. Causal
    self-attention of a static length of at least `BLOCK_CAUSAL_MIN_LENGTH` runs as
    `block_causal_core`.

    Example:

    >>> q = k = v = keras.ops.ones((1, 1, 2, 4))
    >>> keras.ops.shape(attention_core(q, k, v, causal_mask(2, 2)[None, None], 0.5))
    (1, 1, 2, 4)
    """
    length = q.shape[2]
    if (causal_only and length is not None and length == k.shape[2]
            and length >= BLOCK_CAUSAL_MIN_LENGTH and length % BLOCK_CAUSAL_BLOCKS == 0):
        return block_causal_core(q, k, v, scale, BLOCK_CAUSAL_BLOCKS)

    @ops.custom_gradient
    def core(q, k, v):
        scaled = q * scale
        probs, compute_probs, output = _core_forward(scaled, k, v, mask)

        def gradient(*args, upstream=None):
            live = None
            if mask is not None and not causal_only:
                live = ops.any(mask, axis=-1, keepdims=True)  # a query with a visible key
            return _core_gradient(upstream_gradient(args, upstream), output, scaled, k, v,
                                  probs, compute_probs, scale, live)

        return output, gradient

    return core(q, k, v)


def block_causal_core(q, k, v, scale=1.0, blocks=BLOCK_CAUSAL_BLOCKS):
    """Causal self-attention (`attention_core` with the causal mask) in `blocks` query blocks.

    Query block `i` attends to the keys up to its own end only, so the scores above the
    diagonal blocks, every one of them masked, are never computed, forward or backward
    (with 4 blocks, 10 of the 16 score blocks). The length must be static and divisible by
    `blocks`. Same values and gradients as the full causal core up to float rounding. One
    layer's core, forward and backward, on 2 CPU cores: 12.8-13.7 -> 11.2-11.9 ms at length
    256, 47.5 -> 30.5 ms at 1,024.

    Example:

    >>> q = k = v = keras.ops.ones((1, 1, 8, 4))
    >>> keras.ops.shape(block_causal_core(q, k, v, 0.5, blocks=4))
    (1, 1, 8, 4)
    """
    length = q.shape[2]
    if length is None or length % blocks:
        raise ValueError(f"block_causal_core needs a static length divisible by blocks={blocks}; "
                         f"got {length}")
    size = length // blocks
    ends = [(i + 1) * size for i in range(blocks)]
    masks = [causal_mask(size, end, start_index=end - size)[None, None] for end in ends]

    @ops.custom_gradient
    def core(q, k, v):
        scaled = ops.split(q * scale, blocks, axis=2)
        keys, values = [k[:, :, :end] for end in ends], [v[:, :, :end] for end in ends]
        forwards = [_core_forward(scaled[i], keys[i], values[i], masks[i])
                    for i in range(blocks)]
        output = ops.concatenate([forward[2] for forward in forwards], axis=2)

        def gradient(*args, upstream=None):
            d_outputs = ops.split(upstream_gradient(args, upstream), blocks, axis=2)
            d_q, d_k, d_v = [], None, None
            for i, end in enumerate(ends):
                probs, compute_probs, block_output = forwards[i]
                block_d_q, block_d_k, block_d_v = _core_gradient(
                    d_outputs[i], block_output, scaled[i], keys[i], values[i], probs,
                    compute_probs, scale)
                d_q.append(block_d_q)
                if end < length:  # keys past the block's end get nothing from it
                    padding = [(0, 0), (0, 0), (0, length - end), (0, 0)]
                    block_d_k, block_d_v = ops.pad(block_d_k, padding), ops.pad(block_d_v, padding)
                d_k = block_d_k if d_k is None else d_k + block_d_k
                d_v = block_d_v if d_v is None else d_v + block_d_v
            return ops.concatenate(d_q, axis=2), d_k, d_v

        return output, gradient

    return core(q, k, v)


@keras.saving.register_keras_serializable(package="keras_llm")
class MultiHeadAttention(keras.layers.Layer):
    """Multi-head scaled dot-product attention (Vaswani et al., 2017).

    Self-attention when `value` is omitted, cross-attention otherwise. Built without a value
    shape (self-attention), the layer keeps one fused `query_key_value_kernel` (and bias),
    columns `[query | key | value]`; built with one, separate query, key and value kernels.
    Masks are explicit: `attention_mask` is a boolean `(batch, queries, keys)` tensor (True
    = may attend), `use_causal_mask=True` adds the causal constraint. For incremental
    decoding pass `cache` and `cache_index` (where the new tokens go); the layer then
    returns `(output, updated_cache)`. A cache is either a `(key_cache, value_cache)` pair
    of `(batch, num_heads, max_length, head_dim)` tensors, the form the models keep (each
    step is then two in-place updates inside a compiled decoding loop, with no stacking), or
    one stacked `(batch, 2, num_heads, max_length, head_dim)` tensor, keys then values; the
    updated cache comes back in the form it was given. Heads come before positions (not
    keras-hub's `(..., max_length, num_heads, head_dim)`) so that attention reads the cache
    with batched matmuls and no per-step transpose of it. For cross-attention, a `cache`
    without `cache_index` holds the encoder's precomputed keys and values and is used as is
    (see `compute_key_value_cache`).

    Args:
        num_heads: number of attention heads.
        key_dim: size of each head for queries and keys.
        value_dim: size of each head for values; defaults to `key_dim`.
        output_dim: size of the output; defaults to the query's last dimension.
        dropout: dropout rate on the attention probabilities.
        use_bias: whether the projections have biases.
        kernel_initializer: initializer of the projection kernels.
        bias_initializer: initializer of the projection biases.
        output_kernel_initializer: initializer of the output projection's kernel; defaults
            to `kernel_initializer` (GPT-2 shrinks it: it writes into the residual stream).
        rotary_max_wavelength: when set, rotary position embedding (RoPE, Su et al., 2021)
            with this base wavelength (10,000 in the paper) rotates queries and keys by
            their positions (`cache_index` onwards when decoding), so scores depend on
            relative position; keras-hub's `RotaryEmbedding` does the rotation.
            Self-attention only.

    Example:

    >>> layer = MultiHeadAttention(num_heads=2, key_dim=4)
    >>> x = keras.random.normal((3, 5, 8))
    >>> keras.ops.shape(layer(x, use_causal_mask=True))
    (3, 5, 8)

    References:
        - [Vaswani et al., 2017](https://arxiv.org/abs/1706.03762)
    """

    def __init__(self, num_heads, key_dim, value_dim=None, output_dim=None, dropout=0.0,
                 use_bias=True, kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 output_kernel_initializer=None, rotary_max_wavelength=None, **kwargs):
        super().__init__(**kwargs)
        check_positive("num_heads", num_heads)
        check_positive("key_dim", key_dim)
        for name, value in (("value_dim", value_dim), ("output_dim", output_dim)):
            if value is not None:
                check_positive(name, value)
        check_rate("dropout", dropout)
        if rotary_max_wavelength is not None:
            check_positive("rotary_max_wavelength", rotary_max_wavelength)
            if key_dim % 2:
                raise ValueError(f"rotary position embedding needs an even key_dim; got {key_dim}")
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.value_dim = value_dim or key_dim
        self.output_dim = output_dim
        self.dropout = dropout
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.output_kernel_initializer = keras.initializers.get(
            output_kernel_initializer or kernel_initializer)
        self._dropout_layer = keras.layers.Dropout(dropout, dtype=self.dtype_policy)
        self.rotary_max_wavelength = rotary_max_wavelength
        self._rotary = None if rotary_max_wavelength is None else RotaryEmbedding(
            max_wavelength=rotary_max_wavelength, dtype=self.dtype_policy, name="rotary")

    def build(self, query_shape, value_shape=None):
        query_size = query_shape[-1]
        value_size = (value_shape or query_shape)[-1]
        heads_key = self.num_heads * self.key_dim
        heads_value = self.num_heads * self.value_dim
        output_size = self.output_dim or query_size
        # Built for self-attention (no value shape): one (hidden, q|k|v) kernel, so the three
        # projections are one matmul with no per-step concatenation (and one optimizer slot).
        self.fused = value_shape is None
        if self._rotary is not None and not self.fused:
            raise ValueError("rotary position embedding is for self-attention; this layer was "
                             "built with a separate value input (cross-attention)")
        if self.fused:
            self.query_key_value_kernel = self._kernel(
                "query_key_value_kernel", (query_size, 2 * heads_key + heads_value))
        else:
            self.query_kernel = self._kernel("query_kernel", (query_size, heads_key))
            self.key_kernel = self._kernel("key_kernel", (value_size, heads_key))
            self.value_kernel = self._kernel("value_kernel", (value_size, heads_value))
        self.output_kernel = self._kernel("output_kernel", (heads_value, output_size),
                                          self.output_kernel_initializer)
        if self.use_bias and self.fused:
            self.query_key_value_bias = self._bias(
                "query_key_value_bias", 2 * heads_key + heads_value)
        elif self.use_bias:
            self.query_bias = self._bias("query_bias", heads_key)
            self.key_bias = self._bias("key_bias", heads_key)
            self.value_bias = self._bias("value_bias", heads_value)
        if self.use_bias:
            self.output_bias = self._bias("output_bias", output_size)

    def _kernel(self, name, shape, initializer=None):
        return self.add_weight(name=name, shape=shape,
                               initializer=initializer or self.kernel_initializer)

    def _bias(self, name, size):
        return self.add_weight(name=name, shape=(size,), initializer=self.bias_initializer)

    def _projection_weights(self, name):
        """`(kernel, bias)` of the "query", "key" or "value" projection (bias None without)."""
        if not self.fused:
            return (getattr(self, f"{name}_kernel"),
                    getattr(self, f"{name}_bias") if self.use_bias else None)
        heads_key = self.num_heads * self.key_dim
        start, size = {"query": (0, heads_key), "key": (heads_key, heads_key),
                       "value": (2 * heads_key, self.num_heads * self.value_dim)}[name]
        kernel = ops.convert_to_tensor(self.query_key_value_kernel)[:, start:start + size]
        bias = (ops.convert_to_tensor(self.query_key_value_bias)[start:start + size]
                if self.use_bias else None)
        return kernel, bias

    def _project(self, x, name, head_dim):
        """Projects `x` with the `name` ("query", "key" or "value") kernel into heads."""
        kernel, bias = self._projection_weights(name)
        return self._split_heads(linear(x, kernel, bias), head_dim)

    def _split_heads(self, y, head_dim):
        """`(batch, length, heads * head_dim)` -> `(batch, length, heads, head_dim)`."""
        return ops.reshape(y, (*leading_shape(y), self.num_heads, head_dim))

    @staticmethod
    def _heads_first(x):
        """`(batch, length, heads, head_dim)` <-> `(batch, heads, length, head_dim)`."""
        return ops.transpose(x, (0, 2, 1, 3))

    def _self_attention_qkv(self, x, query_positions=None):
        # One matmul for q, k and v: on CPU three small GEMMs cost noticeably more than one.
        if self.fused:
            kernel = self.query_key_value_kernel
            bias = self.query_key_value_bias if self.use_bias else None
        else:
            kernel = ops.concatenate([self.query_kernel, self.key_kernel, self.value_kernel],
                                     axis=1)
            bias = ops.concatenate([self.query_bias, self.key_bias, self.value_bias]) if (
                self.use_bias) else None
        heads_key = self.num_heads * self.key_dim
        # split, not slices: its gradient is one concat, where each slice's gradient writes a
        # full-width zero tensor (about 6% of a CPU training step).
        if query_positions is None:
            q, k, v = ops.split(linear(x, kernel, bias), [heads_key, 2 * heads_key], axis=-1)
        else:  # queries only at the positions: two products, the kernel split in two
            query_kernel, key_value_kernel = ops.split(kernel, [heads_key], axis=-1)
            query_bias, key_value_bias = ops.split(bias, [heads_key]) if self.use_bias else (
                None, None)
            q = linear(gather_positions(x, query_positions), query_kernel, query_bias)
            k, v = ops.split(linear(x, key_value_kernel, key_value_bias), [heads_key], axis=-1)
        return (self._split_heads(q, self.key_dim), self._split_heads(k, self.key_dim),
                self._split_heads(v, self.value_dim))

    def compute_key_value_cache(self, value):
        """Projects encoder outputs once into a cross-attention cache: the pair
        `(keys, values)`, each `(batch, heads, S, head_dim)`."""
        return (self._heads_first(self._project(value, "key", self.key_dim)),
                self._heads_first(self._project(value, "value", self.value_dim)))

    def call(self, query, value=None, attention_mask=None, use_causal_mask=False, cache=None,
             cache_index=None, training=None, query_positions=None):
        """Attends from `query` to `value` (to `query` itself when omitted).

        `query_positions` `(batch, P)`, self-attention without a cache only: only the rows
        of `query` at those positions ask (all rows are keys and values; with the causal
        mask, those up to each position), and the output is `(batch, P, output_dim)`. An
        `attention_mask` then has `P` rows.
        """
        self._check_call_shapes(query, value, attention_mask, cache, query_positions)
        if query_positions is not None and (value is not None or cache is not None):
            raise ValueError("query_positions is for self-attention without a cache")
        stacked = cache is not None and not isinstance(cache, (tuple, list))
        if cache is not None and cache_index is None:
            # Cross-attention against precomputed encoder keys and values.
            q = self._project(query, "query", self.key_dim)
            k, v = split_cache(cache)
        elif value is None:
            q, k, v = self._self_attention_qkv(query, query_positions)
        else:
            q = self._project(query, "query", self.key_dim)
            k = self._project(value, "key", self.key_dim)
            v = self._project(value, "value", self.value_dim)
        start = cache_index if cache is not None and cache_index is not None else 0
        if self._rotary is not None:
            q = self._rotary(q, start_index=start) if query_positions is None else (
                self._rotary(q, positions=query_positions))
            k = self._rotary(k, start_index=start)
        # From here on (batch, heads, length, head_dim), the cache's layout.
        query_length = ops.shape(q)[1]
        q = self._heads_first(q)
        if cache is None or cache_index is not None:
            k, v = self._heads_first(k), self._heads_first(v)
        if cache is not None and cache_index is not None:
            key_cache, value_cache = split_cache(cache)
            k = ops.slice_update(key_cache, (0, 0, cache_index, 0), ops.cast(k, key_cache.dtype))
            v = ops.slice_update(value_cache, (0, 0, cache_index, 0),
                                 ops.cast(v, value_cache.dtype))
            cache = ops.stack([k, v], axis=1) if stacked else (k, v)

        mask = attention_mask
        # Without a cache or another mask, the backend's own causal path is used (on GPU it
        # can pick a fused kernel); otherwise the causal constraint joins the explicit mask.
        is_causal = use_causal_mask and cache is None and mask is None and (
            query_positions is None)
        if use_causal_mask and not is_causal:
            if query_positions is None:
                causal = causal_mask(query_length, ops.shape(k)[2], start)[None]
            else:  # each query sees the keys up to its own position
                causal = ops.greater_equal(ops.cast(query_positions, "int32")[:, :, None],
                                           ops.arange(ops.shape(k)[2], dtype="int32"))
            mask = causal if mask is None else ops.logical_and(ops.cast(mask, "bool"), causal)
        output = self._attend(q, k, v, mask, is_causal, training)
        output = ops.reshape(output, (*leading_shape(output), self.num_heads * self.value_dim))
        output = linear(output, self.output_kernel, self.output_bias if self.use_bias else None)
        return output if cache is None else (output, cache)

    def _check_call_shapes(self, query, value, attention_mask, cache, query_positions):
        batch, query_length = query.shape[0], query.shape[1]
        if query_positions is not None:
            check_shape(query_positions, "query_positions",
                        (("batch", batch), ("positions", None)))
            query_length = query_positions.shape[1]
        if isinstance(cache, (tuple, list)):
            if len(cache) != 2:
                raise ValueError(f"cache must be a (key_cache, value_cache) pair or one tensor; "
                                 f"got a sequence of {len(cache)}")
            for name, part in zip(("key_cache", "value_cache"), cache):
                check_shape(part, name, (("batch", batch), ("num_heads", self.num_heads),
                                         ("max_length", None), ("head_dim", self.key_dim)))
            key_length = cache_length(cache)
        elif cache is not None:
            check_shape(cache, "cache", (
                ("batch", batch), ("2", 2), ("num_heads", self.num_heads), ("max_length", None),
                ("head_dim", self.key_dim)))
            key_length = cache_length(cache)
        else:
            key_length = (query if value is None else value).shape[1]
        check_shape(attention_mask, "attention_mask", (
            ("batch", batch), ("queries", query_length), ("keys", key_length)), broadcast=True)

    def _attend(self, q, k, v, mask, is_causal, training):
        """Attention of `(batch, heads, length, head_dim)` queries, keys and values; returns
        `(batch, queries, heads, head_dim)`."""
        if mask is not None:
            mask = ops.cast(mask, "bool")[:, None, :, :]  # broadcast over heads
        # The fused op has no dropout, and JAX's needs value_dim == key_dim. On TensorFlow,
        # keras' op is two einsums with a scaling pass over the scores and a mask built by
        # combining (batch, heads, T, S) boolean tensors, so TensorFlow always takes the
        # explicit path below. Other backends keep the fused op, which can pick a
        # flash/cuDNN kernel on GPU. (Adding a -1e9 bias instead of the select is as fast
        # in theory, but oneDNN fuses that add into the batch matmul and runs it 10x
        # slower.)
        explicit = (training and self.dropout > 0) or self.value_dim != self.key_dim or (
            keras.backend.backend() == "tensorflow")
        if not explicit:
            q, k, v = self._heads_first(q), self._heads_first(k), self._heads_first(v)
            if mask is not None and keras.backend.backend() == "jax":
                mask = full_query_mask(mask, ops.shape(q)[1])
            return ops.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
        if is_causal:
            mask = causal_mask(ops.shape(q)[2], ops.shape(k)[2])[None, None]
        # Scaled queries, as keras.layers.MultiHeadAttention: scaling the scores instead
        # costs a pass over the larger (batch, heads, T, S) tensor, which oneDNN fuses into
        # the batch matmul and runs slower. Plain batched matmuls, heads first: TensorFlow's
        # einsum (oneDNN's) costs about 0.24 ms per call on a one-token decoding step,
        # where these take a fraction of that, and in training it is no faster; the keys'
        # transpose folds into the matmul (adjoint).
        scale = 1.0 / math.sqrt(self.key_dim)
        if training and not self.dropout and keras.backend.backend() == "tensorflow":
            # Training without dropout on the probabilities: the same values with the
            # written-out gradient. Exports and decoding (training off) keep plain ops.
            return self._heads_first(
                attention_core(q, k, v, mask, scale, causal_only=is_causal))
        probs = _softmax_scores(q * scale, k, mask)  # (batch, heads, T, S)
        probs = self._dropout_layer(ops.cast(probs, v.dtype), training=training)
        return self._heads_first(ops.matmul(probs, v))

    def compute_output_shape(self, query_shape, value_shape=None):
        return (*query_shape[:-1], self.output_dim or query_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_heads": self.num_heads,
            "key_dim": self.key_dim,
            "value_dim": self.value_dim,
            "output_dim": self.output_dim,
            "dropout": self.dropout,
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "output_kernel_initializer": keras.initializers.serialize(
                self.output_kernel_initializer),
            "rotary_max_wavelength": self.rotary_max_wavelength,
        })
        return config
