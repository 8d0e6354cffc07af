"""TokenCrossEntropy equals Keras' sparse cross-entropy: values, gradients, training."""
import numpy as np
import pytest
import tensorflow as tf

import keras

from keras_llm.training.losses import TokenCrossEntropy


def _logits_labels_weights(shape=(3, 5, 11), seed=0):
    rng = np.random.default_rng(seed)
    logits = tf.constant(3 * rng.normal(size=shape).astype("float32"))
    labels = rng.integers(0, shape[-1], shape[:-1])
    weights = (rng.random(shape[:-1]) * (rng.random(shape[:-1]) > 0.3)).astype("float32")
    return logits, labels, weights


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "mean_with_sample_weight",
                                       "sum", None])
@pytest.mark.parametrize("weighted", [False, True])
def test_values_and_gradients_equal_keras(reduction, weighted):
    logits, labels, weights = _logits_labels_weights()
    sample_weight = weights if weighted else None
    ours = TokenCrossEntropy(reduction=reduction)
    reference = keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                           reduction=reduction)
    # A non-uniform upstream gradient, so the backward pass's scaling is checked too.
    scale = tf.constant(np.linspace(0.5, 2.0, 15).reshape(3, 5), tf.float32)
    results = []
    for loss in (ours, reference):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            value = loss(labels, logits, sample_weight=sample_weight)
            total = tf.reduce_sum(value * (scale if reduction is None else 1.0))
        results.append((value.numpy(), tape.gradient(total, logits).numpy()))
    (value, gradient), (expected_value, expected_gradient) = results
    np.testing.assert_allclose(value, expected_value, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-5, atol=1e-7)


def test_two_dimensional_logits_and_low_precision_gradients_keep_their_dtype():
    logits, labels, _ = _logits_labels_weights(shape=(6, 9))
    expected = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    np.testing.assert_allclose(TokenCrossEntropy(reduction=None)(labels, logits), expected,
                               rtol=1e-6)
    from keras_llm.training.losses import token_cross_entropy

    half = tf.cast(logits, tf.bfloat16)
    with tf.GradientTape() as tape:
        tape.watch(half)
        value = tf.reduce_sum(token_cross_entropy(labels, half))
    assert tape.gradient(value, half).dtype == tf.bfloat16
    np.testing.assert_allclose(float(value), float(tf.reduce_sum(expected)), rtol=2e-2)


def _fit_losses(loss, jit_compile):
    from keras_llm.models import GPTBackbone, GPTCausalLM

    keras.utils.set_random_seed(3)
    model = GPTCausalLM(GPTBackbone(vocabulary_size=40, num_layers=1, num_heads=2,
                                    hidden_size=16, intermediate_size=32, max_length=8,
                                    dropout=0.0))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss, jit_compile=jit_compile)
    ids = np.random.default_rng(1).integers(0, 40, (16, 9))
    history = model.fit(ids[:, :-1], ids[:, 1:], batch_size=8, epochs=3, verbose=0,
                        shuffle=False)
    return history.history["loss"]


@pytest.mark.parametrize("jit_compile", [False, True])
def test_training_follows_the_keras_loss_step_for_step(jit_compile):
    ours = _fit_losses(TokenCrossEntropy(), jit_compile)
    reference = _fit_losses(
        keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile)
    assert ours[-1] < ours[0]
    np.testing.assert_allclose(ours, reference, rtol=1e-4)


def test_serializes_with_its_reduction():
    loss = TokenCrossEntropy(reduction="mean_with_sample_weight")
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(restored, TokenCrossEntropy)
    assert restored.reduction == "mean_with_sample_weight"


def test_product_objectives_train_with_it():
    from keras_llm.config import load_config
    from keras_llm.training.objectives import get_objective

    model = keras.Sequential([keras.layers.Dense(4)])
    get_objective(load_config("gpt-tiny")).compile(model, "adam")
    assert isinstance(model.loss, TokenCrossEntropy)
