"""Transformer blocks: conformance with keras-hub encoder and decoder, KV cache, saving."""
import doctest
import math

import keras
import keras_hub
import numpy as np
import pytest
from keras import ops

from keras_llm.layers import FeedForward, TransformerDecoderBlock, TransformerEncoderBlock
from keras_llm.layers import transformer as transformer_module

BATCH, LENGTH, SOURCE_LENGTH, HIDDEN, HEADS, INTERMEDIATE = 2, 5, 7, 8, 2, 16
HEAD_DIM = HIDDEN // HEADS
TOLERANCE = 1e-5


def random_normal(shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype("float32")


def padding(lengths, total):
    return np.arange(total)[None, :] < np.array(lengths)[:, None]


def assert_close(actual, expected, tolerance=TOLERANCE):
    np.testing.assert_allclose(
        ops.convert_to_numpy(actual), ops.convert_to_numpy(expected), atol=tolerance, rtol=0)


def copy_weights(pairs):
    """Assigns each reference weight to ours, reshaped: keras MHA kernels are 3-D, ours 2-D."""
    for ours, theirs in pairs:
        ours.assign(np.reshape(ops.convert_to_numpy(theirs), ours.shape))


def attention_pairs(ours, theirs):
    projections = (theirs._query_dense, theirs._key_dense, theirs._value_dense)
    if ours.fused:  # self-attention: our [q | k | v] columns from keras-hub's three kernels
        as_2d = lambda w, shape: np.reshape(ops.convert_to_numpy(w), shape)
        pairs = [(ours.query_key_value_kernel, np.concatenate(
                     [as_2d(d.kernel, (d.kernel.shape[0], -1)) for d in projections], axis=1)),
                 (ours.query_key_value_bias, np.concatenate(
                     [as_2d(d.bias, (-1,)) for d in projections]))]
    else:
        pairs = [(ours.query_kernel, theirs._query_dense.kernel),
                 (ours.query_bias, theirs._query_dense.bias),
                 (ours.key_kernel, theirs._key_dense.kernel),
                 (ours.key_bias, theirs._key_dense.bias),
                 (ours.value_kernel, theirs._value_dense.kernel),
                 (ours.value_bias, theirs._value_dense.bias)]
    return pairs + [(ours.output_kernel, theirs._output_dense.kernel),
                    (ours.output_bias, theirs._output_dense.bias)]


def layer_pairs(ours, theirs):
    """Dense or LayerNormalization: weights in the same order and shapes on both sides."""
    return list(zip(ours.weights, theirs.weights))


def block_pairs(block, reference):
    """keras-hub encoder/decoder weights -> our block's weights, sublayer by sublayer."""
    pairs = (attention_pairs(block.self_attention, reference._self_attention_layer)
             + layer_pairs(block.self_attention_norm, reference._self_attention_layer_norm)
             + layer_pairs(block.feedforward.intermediate_dense,
                           reference._feedforward_intermediate_dense)
             + layer_pairs(block.feedforward.output_dense, reference._feedforward_output_dense)
             + layer_pairs(block.feedforward_norm, reference._feedforward_layer_norm))
    if getattr(block, "cross_attention", False):
        pairs += (attention_pairs(block.cross_attention_layer, reference._cross_attention_layer)
                  + layer_pairs(block.cross_attention_norm,
                                reference._cross_attention_layer_norm))
    # Every weight of ours is mapped exactly once (a fused q|k|v kernel from three).
    assert len(pairs) == len(block.weights)
    assert {id(ours) for ours, _ in pairs} == {id(w) for w in block.weights}
    return pairs


def randomize(layer, seed=0):
    """Random values for every weight, biases and layer-norm scales and offsets included."""
    for i, weight in enumerate(layer.weights):
        weight.assign(random_normal(weight.shape, seed=seed + i, scale=0.3)
                      + (1.0 if "gamma" in weight.path else 0.0))


def encoder_pair(norm_first):
    shape = (BATCH, LENGTH, HIDDEN)
    reference = keras_hub.layers.TransformerEncoder(
        intermediate_dim=INTERMEDIATE, num_heads=HEADS, activation="gelu",
        normalize_first=norm_first)
    reference.build(shape)
    randomize(reference)
    block = TransformerEncoderBlock(HEADS, INTERMEDIATE, activation="gelu", norm_first=norm_first)
    block.build(shape)
    copy_weights(block_pairs(block, reference))
    return block, reference


def decoder_pair(norm_first, cross_attention):
    shape = (BATCH, LENGTH, HIDDEN)
    reference = keras_hub.layers.TransformerDecoder(
        intermediate_dim=INTERMEDIATE, num_heads=HEADS, activation="gelu",
        normalize_first=norm_first)
    reference.build(shape, (BATCH, SOURCE_LENGTH, HIDDEN) if cross_attention else None)
    randomize(reference)
    block = TransformerDecoderBlock(HEADS, INTERMEDIATE, cross_attention=cross_attention,
                                    activation="gelu", norm_first=norm_first)
    block.build(shape)
    copy_weights(block_pairs(block, reference))
    return block, reference


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_block_matches_keras_hub(norm_first):
    block, reference = encoder_pair(norm_first)
    x = random_normal((BATCH, LENGTH, HIDDEN), seed=1)
    mask = padding([5, 3], LENGTH)
    assert_close(block(x), reference(x))
    assert_close(block(x, padding_mask=mask), reference(x, padding_mask=mask))
    attention_mask = np.tril(np.ones((BATCH, LENGTH, LENGTH), bool))
    assert_close(block(x, padding_mask=mask, attention_mask=attention_mask),
                 reference(x, padding_mask=mask, attention_mask=attention_mask))


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_output_positions_are_the_full_outputs_there_with_their_gradients(kind, norm_first):
    import tensorflow as tf

    block, _ = encoder_pair(norm_first) if kind == "encoder" else decoder_pair(norm_first, False)
    x = tf.constant(random_normal((BATCH, LENGTH, HIDDEN), seed=1))
    masks = dict(padding_mask=padding([5, 3], LENGTH))
    if kind == "encoder":  # a decoder block adds its causal mask itself
        masks["attention_mask"] = np.tril(np.ones((BATCH, LENGTH, LENGTH), bool))
    positions = np.array([[4, 0], [2, 2]], "int32")
    upstream = random_normal((BATCH, 2, HIDDEN), seed=2)

    def outputs_and_gradients(outputs):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = outputs()
            loss = tf.reduce_sum(y * upstream)
        return y, tape.gradient(loss, [x, *block.trainable_variables])

    # training=True: the hand-written attention gradient, as in a training step
    expected, expected_gradients = outputs_and_gradients(lambda: tf.gather(
        block(x, training=True, **masks), positions, batch_dims=1))
    got, gradients = outputs_and_gradients(
        lambda: block(x, training=True, output_positions=positions, **masks))
    assert_close(got, expected)
    for actual, wanted in zip(gradients, expected_gradients, strict=True):
        assert_close(tf.convert_to_tensor(actual), tf.convert_to_tensor(wanted), 1e-4)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_only_block_matches_keras_hub(norm_first):
    block, reference = decoder_pair(norm_first, cross_attention=False)
    x = random_normal((BATCH, LENGTH, HIDDEN), seed=1)
    mask = padding([5, 3], LENGTH)
    assert_close(block(x), reference(x))
    assert_close(block(x, padding_mask=mask), reference(x, decoder_padding_mask=mask))
    assert_close(block(x, use_causal_mask=False), reference(x, use_causal_mask=False))


@pytest.mark.parametrize("norm_first", [False, True])
def test_cross_attention_decoder_block_matches_keras_hub(norm_first):
    block, reference = decoder_pair(norm_first, cross_attention=True)
    x = random_normal((BATCH, LENGTH, HIDDEN), seed=1)
    memory = random_normal((BATCH, SOURCE_LENGTH, HIDDEN), seed=2)
    mask, memory_mask = padding([5, 3], LENGTH), padding([7, 4], SOURCE_LENGTH)
    assert_close(block(x, encoder_outputs=memory), reference(x, memory))
    assert_close(
        block(x, encoder_outputs=memory, padding_mask=mask, encoder_padding_mask=memory_mask),
        reference(x, memory, decoder_padding_mask=mask, encoder_padding_mask=memory_mask))


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("cross_attention", [False, True])
def test_cached_decoding_equals_full_forward_pass(norm_first, cross_attention):
    block, _ = decoder_pair(norm_first, cross_attention)
    x = random_normal((BATCH, LENGTH, HIDDEN), seed=1)
    memory = random_normal((BATCH, SOURCE_LENGTH, HIDDEN), seed=2)
    memory_mask = padding([7, 4], SOURCE_LENGTH)
    extra = {}
    if cross_attention:
        extra = {"encoder_padding_mask": memory_mask}
        full = block(x, encoder_outputs=memory, **extra)
        extra["cross_attention_cache"] = block.compute_cross_attention_cache(memory)
    else:
        full = block(x)
    cache = ops.zeros((BATCH, 2, HEADS, LENGTH + 2, HEAD_DIM))
    steps = []
    for index in range(LENGTH):
        step, cache = block(x[:, index:index + 1], self_attention_cache=cache,
                            cache_index=index, **extra)
        steps.append(step)
    assert_close(ops.concatenate(steps, axis=1), full)


def test_feedforward_matches_numpy():
    layer = FeedForward(INTERMEDIATE, activation="gelu_tanh")
    x = random_normal((BATCH, LENGTH, HIDDEN), seed=1)
    layer.build(x.shape)
    randomize(layer)
    w1, b1, w2, b2 = (ops.convert_to_numpy(w) for w in layer.weights)
    h = x @ w1 + b1
    # GPT-2's tanh approximation of GELU.
    h = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    assert_close(layer(x), h @ w2 + b2)
    assert_close(layer(x, training=True), h @ w2 + b2)  # the fused forward pass


@pytest.mark.parametrize("layer", [
    FeedForward(12, activation="relu", kernel_initializer="he_normal", name="ff"),
    TransformerEncoderBlock(4, 12, dropout=0.1, activation="gelu_tanh", norm_first=True,
                            layer_norm_epsilon=1e-6, name="encoder"),
    TransformerDecoderBlock(2, 12, cross_attention=True, dropout=0.2, activation="relu",
                            norm_first=False, name="decoder"),
])
def test_config_round_trip(layer):
    config = layer.get_config()
    restored = layer.__class__.from_config(config)
    assert restored.get_config() == config


def test_save_and_load_encoder_decoder_keras_file(tmp_path):
    source = keras.Input((SOURCE_LENGTH, HIDDEN))
    source_mask = keras.Input((SOURCE_LENGTH,), dtype="bool")
    target = keras.Input((LENGTH, HIDDEN))
    memory = TransformerEncoderBlock(HEADS, INTERMEDIATE, name="encoder")(
        source, padding_mask=source_mask)
    outputs = TransformerDecoderBlock(
        HEADS, INTERMEDIATE, cross_attention=True, norm_first=True, name="decoder")(
        target, encoder_outputs=memory, encoder_padding_mask=source_mask)
    model = keras.Model([source, source_mask, target], outputs)
    inputs = [random_normal((BATCH, SOURCE_LENGTH, HIDDEN), seed=1),
              padding([7, 4], SOURCE_LENGTH),
              random_normal((BATCH, LENGTH, HIDDEN), seed=2)]
    path = tmp_path / "blocks.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded.get_layer("decoder"), TransformerDecoderBlock)
    assert loaded.get_layer("decoder").cross_attention
    assert_close(loaded(inputs), model(inputs), tolerance=0)


def test_docstring_examples_run():
    results = doctest.testmod(transformer_module, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0 and results.failed == 0


@pytest.mark.parametrize("make, name", [
    (lambda: TransformerEncoderBlock(0, 16), "num_heads"),
    (lambda: TransformerDecoderBlock(2, 0), "intermediate_size"),
    (lambda: TransformerEncoderBlock(2, 16, dropout=-0.1), "dropout"),
    (lambda: TransformerDecoderBlock(2, 16, activation="swish"), "activation"),
    (lambda: FeedForward(16, activation="tanh"), "activation"),
    (lambda: FeedForward(-3), "intermediate_size"),
])
def test_bad_constructor_arguments_name_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_heads_must_divide_hidden_size():
    with pytest.raises(ValueError, match="num_heads=3"):
        TransformerEncoderBlock(3, 16)(ops.zeros((1, 2, HIDDEN)))


@pytest.mark.parametrize("block", [
    TransformerEncoderBlock(HEADS, INTERMEDIATE),
    TransformerDecoderBlock(HEADS, INTERMEDIATE),
])
@pytest.mark.parametrize("argument, shape", [
    ("padding_mask", (BATCH, LENGTH, LENGTH)),
    ("padding_mask", (BATCH, LENGTH + 1)),
    ("attention_mask", (BATCH, LENGTH)),
    ("attention_mask", (BATCH, LENGTH, LENGTH - 1)),
])
def test_wrong_mask_shapes_name_the_argument(block, argument, shape):
    x = random_normal((BATCH, LENGTH, HIDDEN))
    with pytest.raises(ValueError, match=f"{argument} must have shape"):
        block(x, **{argument: np.ones(shape, bool)})


def test_cross_attention_arguments_are_checked():
    x = random_normal((BATCH, LENGTH, HIDDEN))
    memory = random_normal((BATCH, SOURCE_LENGTH, HIDDEN))
    with pytest.raises(ValueError, match="cross_attention=True"):
        TransformerDecoderBlock(HEADS, INTERMEDIATE)(x, encoder_outputs=memory)
    block = TransformerDecoderBlock(HEADS, INTERMEDIATE, cross_attention=True)
    with pytest.raises(ValueError, match="encoder_outputs"):
        block(x)
    with pytest.raises(ValueError, match="encoder_padding_mask must have shape"):
        block(x, encoder_outputs=memory, encoder_padding_mask=np.ones((BATCH, LENGTH), bool))
