"""MultiHeadAttention: conformance with keras MultiHeadAttention, KV cache, saving, errors."""
import doctest

import keras
import numpy as np
import pytest
from keras import ops

from keras_llm.layers import MultiHeadAttention, causal_mask, merge_masks
from keras_llm.layers import attention as attention_module

BATCH, LENGTH, SOURCE_LENGTH, HIDDEN, HEADS, HEAD_DIM = 2, 5, 7, 8, 2, 4
TOLERANCE = 1e-5


def random_normal(shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype("float32")


def randomize(layer, seed=0):
    """Gives every weight of `layer` random values, biases and norm parameters included."""
    for i, weight in enumerate(layer.weights):
        weight.assign(random_normal(weight.shape, seed=seed + i, scale=0.3))


def fused_or_separate(layer, theirs):
    """`(our weight, reference value)` pairs for the query, key and value projections: a
    self-attention layer holds them as one [q | k | v] kernel and bias (2-D, columns)."""
    kernels = [np.reshape(ops.convert_to_numpy(t), (t.shape[0], -1)) for t in theirs["kernels"]]
    biases = [np.reshape(ops.convert_to_numpy(t), (-1,)) for t in theirs["biases"]]
    if layer.fused:
        pairs = [(layer.query_key_value_kernel, np.concatenate(kernels, axis=1))]
        if layer.use_bias:
            pairs.append((layer.query_key_value_bias, np.concatenate(biases)))
        return pairs
    pairs = list(zip((layer.query_kernel, layer.key_kernel, layer.value_kernel), kernels))
    if layer.use_bias:
        pairs += list(zip((layer.query_bias, layer.key_bias, layer.value_bias), biases))
    return pairs


def reference_projections(reference):
    """keras MHA's (or keras-hub's) query, key and value kernels and biases, 3-D as stored."""
    denses = (reference._query_dense, reference._key_dense, reference._value_dense)
    return {"kernels": [d.kernel for d in denses],
            "biases": [d.bias for d in denses if d.bias is not None]}


def copy_attention_weights(reference, layer):
    """keras MHA kernels are (in, heads, head_dim) / (heads, head_dim, out); ours are 2-D."""
    pairs = fused_or_separate(layer, reference_projections(reference))
    pairs += [(layer.output_kernel, reference._output_dense.kernel)]
    if layer.use_bias:
        pairs += [(layer.output_bias, reference._output_dense.bias)]
    for ours, theirs in pairs:
        ours.assign(np.reshape(ops.convert_to_numpy(theirs), ours.shape))


def attention_pair(value_length=None, seed=0):
    """Our layer and keras' layer, built for the same shapes, sharing random weights."""
    query_shape = (BATCH, LENGTH, HIDDEN)
    value_shape = (BATCH, value_length or LENGTH, HIDDEN)
    reference = keras.layers.MultiHeadAttention(num_heads=HEADS, key_dim=HEAD_DIM)
    reference.build(query_shape, value_shape)
    randomize(reference, seed)
    layer = MultiHeadAttention(num_heads=HEADS, key_dim=HEAD_DIM)
    layer.build(query_shape, value_shape if value_length else None)
    copy_attention_weights(reference, layer)
    return layer, reference


def padding(lengths, total):
    return np.arange(total)[None, :] < np.array(lengths)[:, None]


def assert_close(actual, expected, tolerance=TOLERANCE):
    np.testing.assert_allclose(
        ops.convert_to_numpy(actual), ops.convert_to_numpy(expected), atol=tolerance, rtol=0)


@pytest.mark.parametrize("use_causal_mask", [False, True])
@pytest.mark.parametrize("with_padding", [False, True])
def test_self_attention_matches_keras(use_causal_mask, with_padding):
    layer, reference = attention_pair()
    x = random_normal((BATCH, LENGTH, HIDDEN), seed=1)
    mask = None
    if with_padding:
        mask = np.broadcast_to(padding([5, 3], LENGTH)[:, None, :], (BATCH, LENGTH, LENGTH))
    expected = reference(x, x, attention_mask=mask, use_causal_mask=use_causal_mask)
    actual = layer(x, attention_mask=mask, use_causal_mask=use_causal_mask)
    assert_close(actual, expected)


@pytest.mark.parametrize("use_causal_mask", [False, True])
@pytest.mark.parametrize("with_padding", [False, True])
def test_cross_attention_matches_keras(use_causal_mask, with_padding):
    layer, reference = attention_pair(value_length=SOURCE_LENGTH)
    x = random_normal((BATCH, LENGTH, HIDDEN), seed=1)
    memory = random_normal((BATCH, SOURCE_LENGTH, HIDDEN), seed=2)
    mask = None
    if with_padding:
        mask = np.broadcast_to(padding([7, 4], SOURCE_LENGTH)[:, None, :],
                               (BATCH, LENGTH, SOURCE_LENGTH))
    expected = reference(x, memory, attention_mask=mask, use_causal_mask=use_causal_mask)
    actual = layer(x, memory, attention_mask=mask, use_causal_mask=use_causal_mask)
    assert_close(actual, expected)


def test_fully_masked_query_matches_keras():
    # A query that may attend to nothing (e.g. a left-padded first token) must not give NaN.
    layer, reference = attention_pair()
    x = random_normal((BATCH, LENGTH, HIDDEN), seed=1)
    mask = np.ones((BATCH, LENGTH, LENGTH), bool)
    mask[:, 0] = False
    actual = layer(x, attention_mask=mask)
    assert not np.any(np.isnan(ops.convert_to_numpy(actual)))
    assert_close(actual, reference(x, x, attention_mask=mask))


def test_padded_keys_are_ignored():
    layer, _ = attention_pair()
    x = random_normal((BATCH, LENGTH, HIDDEN), seed=1)
    mask = merge_masks(padding([3, 3], LENGTH))
    changed = x.copy()
    changed[:, 3:] = random_normal((BATCH, LENGTH - 3, HIDDEN), seed=5)
    assert_close(layer(changed, attention_mask=mask)[:, :3], layer(x, attention_mask=mask)[:, :3])


def test_full_query_mask_repeats_a_padding_mask_over_queries():
    padding = np.array([[True, True, False], [True, False, False]])[:, None, None, :]
    full = ops.convert_to_numpy(attention_module.full_query_mask(padding, 4))
    assert full.shape == (2, 1, 4, 3)
    np.testing.assert_array_equal(full, np.broadcast_to(padding, (2, 1, 4, 3)))
    per_query = np.tril(np.ones((4, 3), bool))[None, None]  # already full: unchanged
    np.testing.assert_array_equal(
        ops.convert_to_numpy(attention_module.full_query_mask(per_query, 4)), per_query)


def test_causal_mask_and_merge_masks_values():
    np.testing.assert_array_equal(
        ops.convert_to_numpy(causal_mask(2, 4, start_index=1)),
        [[True, True, False, False], [True, True, True, False]])
    merged = merge_masks(np.array([[1, 1, 0]]), np.tril(np.ones((1, 3, 3), bool)))
    np.testing.assert_array_equal(
        ops.convert_to_numpy(merged),
        [[[True, False, False], [True, True, False], [True, True, False]]])
    assert merge_masks() is None


def decode_token_by_token(layer, x, cache_length, prefill=1, pair=False):
    """Feeds `x` through the KV cache: `prefill` tokens at once, then one token per step;
    the cache is one stacked tensor, or a `(keys, values)` pair with `pair=True`."""
    cache = ops.zeros((BATCH, 2, HEADS, cache_length, HEAD_DIM))
    if pair:
        cache = (cache[:, 0], cache[:, 1])
    outputs = []
    step_starts = [0] + list(range(prefill, x.shape[1]))
    step_ends = step_starts[1:] + [x.shape[1]]
    for start, end in zip(step_starts, step_ends):
        output, cache = layer(x[:, start:end], use_causal_mask=True, cache=cache,
                              cache_index=start)
        outputs.append(output)
    return ops.concatenate(outputs, axis=1), cache


@pytest.mark.parametrize("prefill", [1, 3])
@pytest.mark.parametrize("pair", [False, True])
def test_cached_decoding_equals_causal_forward_pass(prefill, pair):
    layer, _ = attention_pair()
    x = random_normal((BATCH, LENGTH, HIDDEN), seed=1)
    full = layer(x, use_causal_mask=True)
    # The cache is longer than the sequence: its unfilled tail must stay invisible.
    decoded, cache = decode_token_by_token(layer, x, cache_length=LENGTH + 3, prefill=prefill,
                                           pair=pair)
    assert_close(decoded, full)
    # The cache comes back in the form it was given.
    assert isinstance(cache, tuple) == pair
    cache = ops.stack(cache, axis=1) if pair else cache
    assert ops.shape(cache) == (BATCH, 2, HEADS, LENGTH + 3, HEAD_DIM)
    assert not np.any(ops.convert_to_numpy(cache)[:, :, :, LENGTH:])


def test_cross_attention_cache_equals_direct_call():
    layer, _ = attention_pair(value_length=SOURCE_LENGTH)
    x = random_normal((BATCH, LENGTH, HIDDEN), seed=1)
    memory = random_normal((BATCH, SOURCE_LENGTH, HIDDEN), seed=2)
    cache = layer.compute_key_value_cache(memory)
    output, returned_cache = layer(x, cache=cache)
    assert_close(output, layer(x, memory))
    assert_close(ops.stack(returned_cache), ops.stack(cache), tolerance=0)
    # The stacked form of the same cache gives the same output.
    assert_close(layer(x, cache=ops.stack(cache, axis=1))[0], output)


def test_dropout_path_equals_fused_path_at_rate_zero_and_drops_in_training():
    # The explicit-softmax path (used in training with dropout) must compute the same
    # attention as dot_product_attention; compare it at inference on the same weights.
    layer, _ = attention_pair()
    x = random_normal((BATCH, LENGTH, HIDDEN), seed=1)
    q, k, v = (layer._heads_first(t) for t in layer._self_attention_qkv(x))
    mask = merge_masks(padding([5, 3], LENGTH))
    fused = layer._attend(q, k, v, mask, False, training=False)
    layer.dropout = 0.5  # only _attend's branch reads it; the Dropout layer has rate 0
    explicit = layer._attend(q, k, v, mask, False, training=True)
    assert_close(explicit, fused)

    keras.utils.set_random_seed(3)
    dropping = MultiHeadAttention(num_heads=HEADS, key_dim=HEAD_DIM, dropout=0.5)
    inference = dropping(x, use_causal_mask=True)
    assert_close(dropping(x, use_causal_mask=True, training=False), inference)
    assert np.max(np.abs(ops.convert_to_numpy(
        dropping(x, use_causal_mask=True, training=True) - inference))) > 1e-3


@pytest.mark.parametrize("case", ["causal", "padding", "causal_padding", "fully_masked",
                                  "cross", "no_mask"])
def test_training_gradient_equals_the_traced_one(case):
    # In training (no dropout) the layer runs `attention_core`, whose gradient is written out;
    # at inference the plain ops. Same values, and the same gradients for the input and every
    # weight, with every kind of mask, a query that sees no key included.
    import tensorflow as tf

    cross = case == "cross"
    layer, _ = attention_pair(value_length=SOURCE_LENGTH if cross else None)
    x = tf.constant(random_normal((BATCH, LENGTH, HIDDEN), seed=1))
    memory = tf.constant(random_normal((BATCH, SOURCE_LENGTH, HIDDEN), seed=2))
    keys = SOURCE_LENGTH if cross else LENGTH
    mask = np.broadcast_to(padding([keys, 3], keys)[:, None, :], (BATCH, LENGTH, keys)).copy()
    if case == "fully_masked":
        mask[:, 1] = False  # query 1 sees nothing
    kwargs = {"use_causal_mask": case.startswith("causal"),
              "attention_mask": None if case in ("causal", "no_mask") else mask}
    upstream = tf.constant(random_normal((BATCH, LENGTH, HIDDEN), seed=4))
    results = []
    for training in (False, True):
        with tf.GradientTape() as tape:
            tape.watch([x, memory])
            y = layer(x, memory, training=training, **kwargs) if cross else layer(
                x, training=training, **kwargs)
        results.append([y] + tape.gradient(y, [x, memory] + layer.trainable_variables,
                                           output_gradients=upstream))
    plain, written_out = results
    assert (written_out[2] is not None) == cross  # only cross-attention reads the memory
    for expected, actual in zip(plain, written_out):
        if expected is None:
            assert actual is None
        else:
            assert_close(actual, expected)


def core_results(function, q, k, v, upstream):
    """`[output, d_q, d_k, d_v]` of an attention core for this upstream gradient."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        y = function(q, k, v)
    return [y] + tape.gradient(y, [q, k, v], output_gradients=upstream)


@pytest.mark.parametrize("blocks", [2, 4, 8])
def test_block_causal_core_equals_the_full_causal_core(blocks):
    # Query blocks that skip the keys past their end: the same values and gradients as the
    # full causal core (whose gradient is checked against the traced one above).
    import tensorflow as tf

    rng = np.random.default_rng(blocks)
    q, k, v, upstream = (tf.constant(rng.normal(size=(2, 3, 16, 4)), tf.float32)
                         for _ in range(4))
    mask = causal_mask(16, 16)[None, None]
    full = core_results(
        lambda q, k, v: attention_module.attention_core(q, k, v, mask, 0.5), q, k, v, upstream)
    blocked = core_results(
        lambda q, k, v: attention_module.block_causal_core(q, k, v, 0.5, blocks), q, k, v,
        upstream)
    for expected, actual in zip(full, blocked):
        assert_close(actual, expected)
    with pytest.raises(ValueError, match="static length divisible by blocks=3"):
        attention_module.block_causal_core(q, k, v, 0.5, blocks=3)


def test_long_causal_self_attention_trains_in_query_blocks(monkeypatch):
    # From BLOCK_CAUSAL_MIN_LENGTH positions on, causal self-attention in training runs in
    # query blocks: the layer's output and every gradient equal its inference (traced) pass.
    import tensorflow as tf

    calls = []
    block_causal_core = attention_module.block_causal_core
    monkeypatch.setattr(attention_module, "BLOCK_CAUSAL_MIN_LENGTH", 8)
    monkeypatch.setattr(attention_module, "block_causal_core",
                        lambda *args: calls.append(args) or block_causal_core(*args))
    layer = MultiHeadAttention(num_heads=HEADS, key_dim=HEAD_DIM)
    x = tf.constant(random_normal((BATCH, 8, HIDDEN), seed=1))
    upstream = tf.constant(random_normal((BATCH, 8, HIDDEN), seed=4))
    results = []
    for training in (False, True):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, use_causal_mask=True, training=training)
        results.append([y] + tape.gradient(y, [x] + layer.trainable_variables,
                                           output_gradients=upstream))
    assert len(calls) == 1  # the training pass only
    for expected, actual in zip(*results):
        assert_close(actual, expected)
    # A shorter sequence keeps the full core.
    layer(x[:, :4], use_causal_mask=True, training=True)
    assert len(calls) == 1


def test_training_core_in_bfloat16_follows_the_traced_one():
    # Mixed precision: bfloat16 products, float32 softmax. The written-out row sum uses the
    # bfloat16 output (as FlashAttention does), so the two agree to bfloat16 rounding.
    import tensorflow as tf

    rng = np.random.default_rng(0)
    q, k, v, upstream = (tf.constant(rng.normal(size=(2, 2, 6, 4)), tf.bfloat16)
                         for _ in range(4))
    mask = tf.constant(padding([6, 4], 6)[:, None, None, :])

    def traced(q, k, v):
        probs = attention_module._softmax_scores(q * 0.5, k, mask)
        return ops.matmul(ops.cast(probs, v.dtype), v)

    results = [core_results(function, q, k, v, upstream) for function in (
        traced, lambda q, k, v: attention_module.attention_core(q, k, v, mask, 0.5))]
    for expected, actual in zip(*results):
        assert actual.dtype == tf.bfloat16
        np.testing.assert_allclose(ops.convert_to_numpy(ops.cast(actual, "float32")),
                                   ops.convert_to_numpy(ops.cast(expected, "float32")),
                                   atol=0.06, rtol=0.03)


def test_config_round_trip():
    layer = MultiHeadAttention(num_heads=3, key_dim=4, value_dim=5, output_dim=6, dropout=0.1,
                               use_bias=False, name="attention")
    config = layer.get_config()
    restored = MultiHeadAttention.from_config(config)
    assert restored.get_config() == config
    assert (restored.num_heads, restored.key_dim, restored.value_dim, restored.output_dim) == (
        3, 4, 5, 6)
    output = restored(random_normal((BATCH, LENGTH, HIDDEN)))
    assert ops.shape(output) == (BATCH, LENGTH, 6)
    assert len(restored.weights) == 2  # no biases; one fused query|key|value kernel


def test_save_and_load_keras_file(tmp_path):
    query = keras.Input((LENGTH, HIDDEN))
    memory = keras.Input((SOURCE_LENGTH, HIDDEN))
    mask = keras.Input((LENGTH, SOURCE_LENGTH), dtype="bool")
    self_attended = MultiHeadAttention(HEADS, HEAD_DIM, name="self")(query, use_causal_mask=True)
    cross_attended = MultiHeadAttention(HEADS, HEAD_DIM, name="cross")(
        self_attended, memory, attention_mask=mask)
    model = keras.Model([query, memory, mask], cross_attended)
    inputs = [random_normal((BATCH, LENGTH, HIDDEN), seed=1),
              random_normal((BATCH, SOURCE_LENGTH, HIDDEN), seed=2),
              np.broadcast_to(padding([7, 4], SOURCE_LENGTH)[:, None, :],
                              (BATCH, LENGTH, SOURCE_LENGTH))]
    path = tmp_path / "attention.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded.get_layer("cross"), MultiHeadAttention)
    assert_close(loaded(inputs), model(inputs), tolerance=0)


def test_docstring_examples_run():
    results = doctest.testmod(attention_module, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0 and results.failed == 0


@pytest.mark.parametrize("arguments, name", [
    ({"num_heads": 0, "key_dim": 4}, "num_heads"),
    ({"num_heads": 2, "key_dim": -1}, "key_dim"),
    ({"num_heads": 2, "key_dim": 4, "value_dim": 0}, "value_dim"),
    ({"num_heads": 2, "key_dim": 4, "output_dim": 2.5}, "output_dim"),
    ({"num_heads": 2, "key_dim": 4, "dropout": 1.0}, "dropout"),
])
def test_bad_constructor_arguments_name_the_argument(arguments, name):
    with pytest.raises(ValueError, match=name):
        MultiHeadAttention(**arguments)


@pytest.mark.parametrize("mask_shape", [
    (BATCH, LENGTH),  # a padding mask passed as attention_mask
    (BATCH, LENGTH, LENGTH + 1),
    (BATCH + 1, LENGTH, LENGTH),
])
def test_wrong_attention_mask_shape_names_the_argument(mask_shape):
    layer = MultiHeadAttention(num_heads=HEADS, key_dim=HEAD_DIM)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, queries, keys"):
        layer(random_normal((BATCH, LENGTH, HIDDEN)), attention_mask=np.ones(mask_shape, bool))


def test_broadcast_mask_is_accepted_and_wrong_cache_shape_is_named():
    layer = MultiHeadAttention(num_heads=HEADS, key_dim=HEAD_DIM)
    x = random_normal((BATCH, LENGTH, HIDDEN))
    assert ops.shape(layer(x, attention_mask=np.ones((BATCH, 1, LENGTH), bool))) == (
        BATCH, LENGTH, HIDDEN)
    with pytest.raises(ValueError, match="cache must have shape"):
        layer(x[:, :1], cache=ops.zeros((BATCH, 2, LENGTH, HEADS + 1, HEAD_DIM)),
              cache_index=0)


def rotary_reference(x, layer, wavelength, start=0):
    """NumPy causal self-attention with RoPE (Su et al. 2021, the GPT-NeoX half-split
    layout): each query and key pair `(x_i, x_{i + d/2})` turns by `position * wavelength **
    (-2i / d)`."""
    kernel = ops.convert_to_numpy(layer.query_key_value_kernel)
    bias = ops.convert_to_numpy(layer.query_key_value_bias)
    q, k, v = np.split(x @ kernel + bias, 3, axis=-1)
    q, k, v = (np.reshape(t, (BATCH, -1, HEADS, HEAD_DIM)) for t in (q, k, v))
    length, half = q.shape[1], HEAD_DIM // 2
    angles = (start + np.arange(length))[:, None] * wavelength ** (-np.arange(half) * 2 / HEAD_DIM)
    cos, sin = np.cos(angles)[None, :, None, :], np.sin(angles)[None, :, None, :]

    def rotate(t):
        first, second = t[..., :half], t[..., half:]
        return np.concatenate([first * cos - second * sin, second * cos + first * sin], -1)

    scores = np.einsum("btnh,bsnh->bnts", rotate(q), rotate(k)) / np.sqrt(HEAD_DIM)
    scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    heads = np.einsum("bnts,bsnh->btnh", probs, v).reshape(BATCH, length, HEADS * HEAD_DIM)
    return heads @ ops.convert_to_numpy(layer.output_kernel) + ops.convert_to_numpy(
        layer.output_bias)


def rotary_layer(wavelength=10_000, seed=0):
    layer = MultiHeadAttention(HEADS, HEAD_DIM, rotary_max_wavelength=wavelength)
    layer.build((BATCH, LENGTH, HIDDEN))
    randomize(layer, seed)
    return layer


@pytest.mark.parametrize("wavelength", [10_000, 100])
def test_rotary_self_attention_matches_reference(wavelength):
    layer = rotary_layer(wavelength)
    x = random_normal((BATCH, LENGTH, HIDDEN), seed=1)
    expected = rotary_reference(x, layer, wavelength)
    assert_close(layer(x, use_causal_mask=True), expected, tolerance=1e-4)
    # The same weights without the rotation give another result: positions matter.
    plain = MultiHeadAttention(HEADS, HEAD_DIM)
    plain.build((BATCH, LENGTH, HIDDEN))
    for ours, theirs in zip(plain.weights, layer.weights):
        ours.assign(theirs)
    assert np.abs(ops.convert_to_numpy(plain(x, use_causal_mask=True)) - expected).max() > 1e-2


@pytest.mark.parametrize("prefill", [1, 3])
def test_rotary_cached_decoding_equals_causal_forward_pass(prefill):
    # Each decoding step rotates its query and key by cache_index, not by 0.
    layer = rotary_layer()
    x = random_normal((BATCH, LENGTH, HIDDEN), seed=1)
    decoded, _ = decode_token_by_token(layer, x, cache_length=LENGTH + 2, prefill=prefill,
                                       pair=True)
    assert_close(decoded, layer(x, use_causal_mask=True), tolerance=1e-4)


def test_rotary_scores_depend_on_relative_position_only():
    # Placing the whole sequence 3 slots later in the cache (earlier slots masked out) turns
    # every query and key by the same extra angle: their dot products, and the output, stay.
    layer = rotary_layer()
    x = random_normal((BATCH, LENGTH, HIDDEN), seed=1)
    cache = (ops.zeros((BATCH, HEADS, LENGTH + 3, HEAD_DIM)),) * 2
    visible = np.broadcast_to(np.arange(LENGTH + 3) >= 3, (BATCH, LENGTH, LENGTH + 3))
    shifted, _ = layer(x, attention_mask=visible, use_causal_mask=True, cache=cache,
                       cache_index=3)
    assert_close(shifted, layer(x, use_causal_mask=True), tolerance=1e-4)


def test_rotary_config_round_trip_and_errors():
    layer = MultiHeadAttention(HEADS, HEAD_DIM, rotary_max_wavelength=500)
    restored = MultiHeadAttention.from_config(layer.get_config())
    assert restored.rotary_max_wavelength == 500
    with pytest.raises(ValueError, match="even key_dim"):
        MultiHeadAttention(HEADS, 3, rotary_max_wavelength=10_000)
    with pytest.raises(ValueError, match="rotary_max_wavelength"):
        MultiHeadAttention(HEADS, HEAD_DIM, rotary_max_wavelength=0)
    with pytest.raises(ValueError, match="self-attention"):
        layer(random_normal((BATCH, LENGTH, HIDDEN)),
              random_normal((BATCH, SOURCE_LENGTH, HIDDEN)))


POSITIONS = np.array([[0, 4, 2], [3, 3, 1]], "int32")  # any order, repeats too


def rows_at(x, positions=POSITIONS):
    return np.take_along_axis(ops.convert_to_numpy(x), positions[..., None], axis=1)


@pytest.mark.parametrize("rotary", [False, True])
@pytest.mark.parametrize("mask", ["none", "padding", "per_query"])
def test_query_positions_give_the_full_output_at_those_rows(rotary, mask):
    layer = MultiHeadAttention(num_heads=HEADS, key_dim=HEAD_DIM,
                               rotary_max_wavelength=10_000 if rotary else None)
    x = random_normal((BATCH, LENGTH, HIDDEN))
    layer.build(x.shape)
    randomize(layer)
    full_mask = positions_mask = None
    if mask == "padding":
        full_mask = positions_mask = merge_masks(padding([LENGTH, 3], LENGTH))
    elif mask == "per_query":
        full_mask = np.random.default_rng(1).random((BATCH, LENGTH, LENGTH)) < 0.6
        full_mask[:, :, 0] = True
        positions_mask = rows_at(full_mask)
    expected = rows_at(layer(x, attention_mask=full_mask))
    got = layer(x, attention_mask=positions_mask, query_positions=POSITIONS)
    assert ops.shape(got) == (BATCH, POSITIONS.shape[1], HIDDEN)
    assert_close(got, expected)


@pytest.mark.parametrize("with_padding", [False, True])
def test_query_positions_under_the_causal_mask_see_the_keys_up_to_their_own(with_padding):
    layer = MultiHeadAttention(num_heads=HEADS, key_dim=HEAD_DIM, rotary_max_wavelength=10_000)
    x = random_normal((BATCH, LENGTH, HIDDEN))
    layer.build(x.shape)
    randomize(layer)
    mask = merge_masks(padding([LENGTH, 3], LENGTH)) if with_padding else None
    expected = rows_at(layer(x, attention_mask=mask, use_causal_mask=True))
    got = layer(x, attention_mask=mask, use_causal_mask=True, query_positions=POSITIONS)
    assert_close(got, expected)


def test_query_positions_are_for_self_attention_without_a_cache_only():
    layer = MultiHeadAttention(num_heads=HEADS, key_dim=HEAD_DIM)
    x = random_normal((BATCH, LENGTH, HIDDEN))
    cache = ops.zeros((BATCH, 2, HEADS, LENGTH, HEAD_DIM))
    for arguments in ({"cache": cache, "cache_index": 0}, {"value": x}):
        with pytest.raises(ValueError, match="query_positions is for self-attention"):
            layer(x, query_positions=POSITIONS, **arguments)
    with pytest.raises(ValueError, match=r"attention_mask must have shape"):
        layer(x, attention_mask=np.ones((BATCH, LENGTH, LENGTH), bool),
              query_positions=POSITIONS)  # a full mask: one row per position, not per query


def test_gather_positions_is_take_along_axis_with_its_gradient_and_any_batch():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    sequence = tf.constant(rng.normal(size=(3, 7, 5)), "float32")
    positions = tf.constant(rng.integers(0, 7, size=(3, 4)), "int32")  # repeats too
    upstream = tf.constant(rng.normal(size=(3, 4, 5)), "float32")

    def value_and_gradient(gather):
        @tf.function(input_signature=[tf.TensorSpec((None, None, 5)),
                                      tf.TensorSpec((None, None), tf.int32)])
        def run(sequence, positions):  # batch and length unknown, as in an export
            with tf.GradientTape() as tape:
                tape.watch(sequence)
                picked = gather(sequence, positions)
                loss = tf.reduce_sum(picked * upstream)
            return picked, tf.convert_to_tensor(tape.gradient(loss, sequence))

        return [t.numpy() for t in run(sequence, positions)]

    expected = value_and_gradient(
        lambda x, p: ops.take_along_axis(x, p[..., None], axis=1))
    got = value_and_gradient(attention_module.gather_positions)
    np.testing.assert_allclose(got[0], expected[0])
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-6, atol=1e-6)
