"""LayerNormalization with a written-out gradient equals Keras' layer, forward and backward."""
import numpy as np
import pytest
import tensorflow as tf

import keras

from keras_llm.layers import LayerNormalization


@pytest.mark.parametrize("center, scale", [(True, True), (False, True), (True, False)])
def test_values_and_gradients_equal_keras(center, scale):
    rng = np.random.default_rng(0)
    x = tf.constant(3 * rng.normal(size=(4, 7, 16)) + 1, tf.float32)
    upstream = tf.constant(rng.normal(size=(4, 7, 16)), tf.float32)
    results = []
    for layer_class in (LayerNormalization, keras.layers.LayerNormalization):
        layer = layer_class(epsilon=1e-5, center=center, scale=scale)
        layer.build(x.shape)
        if scale:
            layer.gamma.assign(rng.normal(size=16) if not results else results[0][3])
        gamma = layer.gamma.numpy() if scale else None
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        gradients = tape.gradient(y, [x, *layer.trainable_weights], output_gradients=upstream)
        results.append((y.numpy(), [g.numpy() for g in gradients], layer, gamma))
    (y, gradients, ours, _), (expected_y, expected_gradients, keras_layer, _) = results
    np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=1e-5)
    assert [w.path.split("/")[-1] for w in ours.weights] == [
        w.path.split("/")[-1] for w in keras_layer.weights]
    for value, expected in zip(gradients, expected_gradients):
        np.testing.assert_allclose(value, expected, rtol=1e-4, atol=1e-4)


def test_other_axes_and_half_precision_fall_back_or_upcast():
    x = tf.constant(np.random.default_rng(1).normal(size=(2, 3, 4)), tf.float32)
    ours, reference = LayerNormalization(axis=1), keras.layers.LayerNormalization(axis=1)
    np.testing.assert_allclose(ours(x), reference(x), rtol=1e-6, atol=1e-6)
    half = LayerNormalization(dtype="mixed_bfloat16")
    y = half(tf.cast(x, tf.bfloat16))
    assert y.dtype == tf.bfloat16
    np.testing.assert_allclose(tf.cast(y, tf.float32),
                               keras.layers.LayerNormalization()(x), atol=3e-2)


def test_config_round_trip_keeps_the_class(tmp_path):
    model = keras.Sequential([keras.Input((5,)), LayerNormalization(epsilon=1e-3)])
    path = tmp_path / "norm.keras"
    model.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(restored.layers[0], LayerNormalization)
    assert restored.layers[0].epsilon == 1e-3
