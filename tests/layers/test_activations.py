"""GELU with hand-written gradients equals Keras' GELU in value and in gradient."""
import numpy as np
import pytest
import tensorflow as tf

import keras

from keras_llm.layers.activations import gelu, gelu_tanh


@pytest.mark.parametrize("training", [False, True])  # True: the forward pass fused as well
@pytest.mark.parametrize("ours, approximate", [(gelu_tanh, True), (gelu, False)])
def test_values_and_gradients_equal_keras(ours, approximate, training):
    # float32 only: Keras' GELU rounds its constants to float32 even for float64 inputs.
    tolerance = 2e-6
    x = tf.constant(np.linspace(-9.0, 9.0, 1203).reshape(3, 401), "float32")
    upstream = tf.constant(np.random.default_rng(0).normal(size=(3, 401)), "float32")
    results = []
    for function in (lambda v: ours(v, training=training),
                     lambda v: keras.activations.gelu(v, approximate=approximate)):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = function(x)
        results.append((y.numpy(), tape.gradient(y, x, output_gradients=upstream).numpy()))
    (y, gradient), (expected_y, expected_gradient) = results
    np.testing.assert_allclose(y, expected_y, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(gradient, expected_gradient, rtol=4 * tolerance,
                               atol=4 * tolerance)


def test_second_call_inside_a_compiled_function_and_half_precision():
    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(gelu_tanh(x) + gelu(x, training=True))
        return y, tape.gradient(y, x)

    x = tf.constant([[-1.0, 0.0, 2.0]], tf.bfloat16)
    y, gradient = step(x)
    assert gradient.dtype == tf.bfloat16
    # d/dx at 0 is 0.5 for both GELUs.
    assert float(gradient[0, 1]) == pytest.approx(1.0)
