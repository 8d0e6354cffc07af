"""`linear`: the same product as keras' matmul, without shape arithmetic in dynamic graphs."""
import doctest

import keras
import numpy as np
import pytest

from keras_llm.layers import linear as linear_module
from keras_llm.layers.linear import linear


def values(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4), (2, 1, 4)])
def test_linear_equals_matmul_plus_bias(shape):
    x, kernel, bias = values(shape, 0), values((4, 6), 1), values((6,), 2)
    expected = x @ kernel + bias
    np.testing.assert_allclose(keras.ops.convert_to_numpy(linear(x, kernel, bias)), expected,
                               atol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(linear(x, kernel)), x @ kernel,
                               atol=1e-5)


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="TensorFlow graphs")
@pytest.mark.parametrize("length", [1, None])
def test_dynamic_shapes_take_a_constant_shape_path(length):
    import tensorflow as tf

    kernel, bias = values((4, 6), 1), values((6,), 2)
    function = tf.function(lambda x: linear(x, kernel, bias),
                           input_signature=[tf.TensorSpec([None, length, 4], tf.float32)])
    graph = function.get_concrete_function().graph
    operations = {op.type for op in graph.get_operations()}
    # keras' matmul of a 3-D tensor is tf.tensordot, which computes its reshapes at run time.
    assert not {"Prod", "GatherV2"} & operations
    if length == 1:
        assert "Shape" not in operations  # every reshape target is a constant
    x = values((3, 2 if length is None else 1, 4), 0)
    np.testing.assert_allclose(function(x).numpy(), x @ kernel + bias, atol=1e-5)


@pytest.mark.parametrize("kernel_shape", [(8, 3), (3, 8), (5, 5)])  # tall, wide, square
def test_hand_gradient_equals_the_traced_one(kernel_shape):
    x, kernel = values((7, kernel_shape[0]), 0), values(kernel_shape, 1)
    upstream = values((7, kernel_shape[1]), 2)

    def gradients(product):
        function = lambda x, kernel: keras.ops.sum(product(x, kernel) * upstream)
        if keras.config.backend() == "tensorflow":
            import tensorflow as tf

            x_, kernel_ = tf.constant(x), tf.constant(kernel)
            with tf.GradientTape() as tape:
                tape.watch([x_, kernel_])
                value = function(x_, kernel_)
            return [g.numpy() for g in tape.gradient(value, [x_, kernel_])]
        import jax

        return [np.asarray(g) for g in jax.grad(function, argnums=(0, 1))(x, kernel)]

    ours = gradients(linear_module.kernel_gradient_product)
    np.testing.assert_allclose(ours[0], upstream @ kernel.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours[1], x.T @ upstream, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="TensorFlow graphs")
@pytest.mark.parametrize("rows", [linear_module.HAND_GRADIENT_MIN_ROWS, 4])
def test_training_sized_products_take_the_hand_gradient(rows):
    import tensorflow as tf

    x = tf.constant(values((2, rows // 2, 16), 0))
    kernel, bias = tf.Variable(values((16, 4), 1)), tf.Variable(values((4,), 2))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(linear(x, kernel, bias)))
        return tape.gradient(loss, [kernel, bias])

    graph = step.get_concrete_function(x).graph
    # A custom gradient leaves an IdentityN around the product in the forward graph.
    assert ("IdentityN" in {op.type for op in graph.get_operations()}) == (
        rows >= linear_module.HAND_GRADIENT_MIN_ROWS)
    flat = x.numpy().reshape(-1, 16)
    upstream = 2 * (flat @ kernel.numpy() + bias.numpy())
    d_kernel, d_bias = step(x)
    np.testing.assert_allclose(d_kernel.numpy(), flat.T @ upstream, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(d_bias.numpy(), upstream.sum(0), rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="TensorFlow gradients")
def test_hand_gradient_reads_keras_variables_eagerly():
    # Keras converts a variable to the variable itself, which a TensorFlow custom gradient
    # refuses to read; a layer called eagerly passes its kernel as a keras.Variable.
    import tensorflow as tf

    x = values((2, linear_module.HAND_GRADIENT_MIN_ROWS // 2, 16), 0)
    kernel, bias = keras.Variable(values((16, 4), 1)), keras.Variable(values((4,), 2))
    flat = x.reshape(-1, 16)
    expected = flat @ kernel.numpy() + bias.numpy()
    with tf.GradientTape() as tape:
        y = linear(x, kernel, bias)
        loss = tf.reduce_sum(tf.square(y))
    np.testing.assert_allclose(y.numpy().reshape(-1, 4), expected, rtol=1e-5, atol=1e-4)
    d_kernel, d_bias = tape.gradient(loss, [kernel.value, bias.value])
    np.testing.assert_allclose(d_kernel.numpy(), flat.T @ (2 * expected), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(d_bias.numpy(), (2 * expected).sum(0), rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="TensorFlow gradients")
def test_input_gradient_multiplies_by_the_given_kernel_transpose():
    import tensorflow as tf

    x, kernel = tf.constant(values((6, 4), 0)), tf.constant(values((4, 3), 1))
    upstream = values((6, 3), 2)
    # A stand-in that is not kernel^T shows which matrix the input gradient multiplies by.
    stand_in = values((3, 4), 3)
    for kernel_transpose, expected in ((None, upstream @ kernel.numpy().T),
                                       (stand_in, upstream @ stand_in)):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = linear_module.kernel_gradient_product(x, kernel, kernel_transpose)
        np.testing.assert_allclose(tape.gradient(y, x, output_gradients=upstream).numpy(),
                                   expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="TensorFlow graphs")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float32_input_gradient_writes_the_kernel_transpose_out(dtype):
    # TensorFlow's optimizer folds a 2-D transpose into the matmul (oneDNN's slower
    # transposed operand in float32); the written-out one goes through a 3-D view.
    import tensorflow as tf

    x = tf.constant(values((8, 4), 0), dtype)
    kernel = tf.constant(values((4, 6), 1), dtype)

    @tf.function
    def input_gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = linear_module.kernel_gradient_product(x, kernel)
        return tape.gradient(y, x)

    graph = input_gradient.get_concrete_function(x).graph
    written_out = [op for op in graph.get_operations()
                   if op.type == "Transpose" and op.outputs[0].shape.rank == 3]
    assert bool(written_out) == (dtype == "float32")
    expected = np.ones((8, 6), "float32") @ values((4, 6), 1).T
    np.testing.assert_allclose(input_gradient(x).numpy().astype("float32"), expected,
                               rtol=0.05, atol=0.05)


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="TensorFlow gradients")
@pytest.mark.parametrize("tied", [True, False])
def test_embedding_logits_hand_gradient_equals_the_traced_one(tied):
    import tensorflow as tf
    from keras_hub.layers import ReversibleEmbedding

    table = ReversibleEmbedding(11, 8, tie_weights=tied)
    table.build((None,))
    hidden = tf.constant(values((2, linear_module.HAND_GRADIENT_MIN_ROWS // 2, 8), 0))
    upstream = values((2, linear_module.HAND_GRADIENT_MIN_ROWS // 2, 11), 1)
    results = []
    for hand_gradient in (True, False):
        with tf.GradientTape() as tape:
            tape.watch(hidden)
            logits = linear_module.embedding_logits(table, hidden, hand_gradient)
        results.append([logits.numpy()] + [g.numpy() for g in tape.gradient(
            logits, [hidden, *(v.value for v in table.trainable_variables)],
            output_gradients=upstream,
            unconnected_gradients=tf.UnconnectedGradients.ZERO)])
    for ours, traced in zip(*results):
        np.testing.assert_allclose(ours, traced, rtol=1e-4, atol=1e-4)


def test_docstring_examples_run():
    results = doctest.testmod(linear_module)
    assert results.attempted > 0 and results.failed == 0
