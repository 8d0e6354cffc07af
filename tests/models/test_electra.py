"""ELECTRA pretrainer: shared embeddings, replaced-token labels, joint loss, saving."""
import doctest

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from keras_llm.models import electra as electra_module
from keras_llm.models.bert import BertBackbone
from keras_llm.models.electra import ElectraPretrainer, generator_for, replace_at_positions

VOCABULARY, BATCH, LENGTH = 40, 4, 8


def make_pretrainer(seed=0, rtd_weight=50.0):
    keras.utils.set_random_seed(seed)
    discriminator = BertBackbone(vocabulary_size=VOCABULARY, num_layers=1, num_heads=2,
                                 hidden_size=16, intermediate_size=32, max_length=LENGTH,
                                 embedding_size=8, dropout=0.0)
    return ElectraPretrainer(discriminator, generator_for(discriminator, 8),
                             rtd_weight=rtd_weight, seed=seed)


def batch(seed=1):
    rng = np.random.default_rng(seed)
    original = rng.integers(6, VOCABULARY, (BATCH, LENGTH)).astype("int32")
    original[:, 0] = 2
    positions = np.array([[1, 3, 0]] * BATCH, "int32")
    masked = original.copy()
    masked[:, [1, 3]] = 4
    x = {"token_ids": masked, "segment_ids": np.zeros_like(masked),
         "padding_mask": np.ones_like(masked, bool), "mask_positions": positions}
    y = original[:, [1, 3, 0]]
    w = np.array([[1, 1, 0]] * BATCH, "float32")
    return x, y, w, original


def test_generator_is_smaller_and_shares_the_token_embedding():
    model = make_pretrainer()
    outputs = model(batch()[0])
    assert model.generator.token_embedding is model.discriminator.token_embedding
    assert model.generator.hidden_size == 8 and model.generator.num_heads == 1
    assert ops.shape(outputs["generator_logits"]) == (BATCH, 3, VOCABULARY)
    assert ops.shape(outputs["discriminator_logits"]) == (BATCH, LENGTH)
    embedding_weights = [w for w in model.weights if w.path.endswith("token_embedding/embeddings")]
    assert len(embedding_weights) == 1


def test_replaced_ids_change_only_masked_positions():
    model = make_pretrainer()
    x, _, _, _ = batch()
    replaced = ops.convert_to_numpy(model(x)["replaced_token_ids"])
    unmasked = np.ones((BATCH, LENGTH), bool)
    unmasked[:, [1, 3]] = False
    np.testing.assert_array_equal(replaced[unmasked], x["token_ids"][unmasked])


def test_replace_at_positions_ignores_invalid_slots():
    ids = np.array([[10, 11, 12, 13]], "int32")
    out = replace_at_positions(ids, np.array([[2, 0]]), np.array([[99, 77]]),
                               np.array([[True, False]]))
    assert ops.convert_to_numpy(out).tolist() == [[10, 11, 99, 13]]


def test_a_sample_equal_to_the_original_counts_as_original():
    model = make_pretrainer()
    x, y, w, original = batch()
    replaced = original.copy()
    replaced[:, 1] = original[:, 1]            # sampled the original token back
    replaced[:, 3] = (original[:, 3] + 1 - 6) % (VOCABULARY - 6) + 6   # a real replacement
    labels = ops.convert_to_numpy(model.replaced_token_labels(
        x, y, {"replaced_token_ids": replaced}, w))
    expected = np.zeros((BATCH, LENGTH), "float32")
    expected[:, 3] = 1.0
    np.testing.assert_array_equal(labels, expected)


def test_loss_is_mlm_plus_weighted_rtd():
    model = make_pretrainer(rtd_weight=50.0)
    x, y, w, _ = batch()
    y_pred = model(x)
    total = float(model.compute_loss(x, y, y_pred, w))
    mlm, rtd = float(model.mlm_loss_tracker.result()), float(model.rtd_loss_tracker.result())
    assert total == pytest.approx(mlm + 50.0 * rtd, rel=1e-5)
    logits = ops.convert_to_numpy(y_pred["generator_logits"])[:, :2]
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected_mlm = -np.take_along_axis(log_probs, y[:, :2, None], -1).mean()
    assert mlm == pytest.approx(float(expected_mlm), rel=1e-4)


def test_training_lowers_both_losses_and_logs_metrics():
    model = make_pretrainer()
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    x, y, w, _ = batch()
    data = tf.data.Dataset.from_tensors((x, y, w)).repeat(25)
    history = model.fit(data, epochs=2, verbose=0).history
    for key in ("loss", "mlm_loss", "rtd_loss", "mlm_accuracy", "rtd_accuracy",
                "mlm_perplexity"):
        assert key in history
    assert history["loss"][-1] < history["loss"][0]
    assert history["mlm_perplexity"][-1] == pytest.approx(np.exp(history["mlm_loss"][-1]),
                                                          rel=0.2)


def test_keras_round_trip_keeps_sharing_and_weights(tmp_path):
    model = make_pretrainer()
    x = batch()[0]
    expected = ops.convert_to_numpy(model(x)["generator_logits"])
    model.save(tmp_path / "electra.keras")
    restored = keras.saving.load_model(tmp_path / "electra.keras")
    assert restored.generator.token_embedding is restored.discriminator.token_embedding
    np.testing.assert_allclose(ops.convert_to_numpy(restored(x)["generator_logits"]), expected,
                               atol=1e-6)
    assert restored.rtd_weight == 50.0


def test_mismatched_generator_is_refused():
    discriminator = BertBackbone(vocabulary_size=VOCABULARY, num_layers=1, num_heads=2,
                                 hidden_size=16, intermediate_size=32, max_length=LENGTH)
    generator = BertBackbone(vocabulary_size=VOCABULARY, num_layers=1, num_heads=1,
                             hidden_size=8, intermediate_size=32, max_length=LENGTH)
    with pytest.raises(ValueError, match="must share vocabulary_size and embedding_size"):
        ElectraPretrainer(discriminator, generator)


def test_docstring_examples_run():
    assert doctest.testmod(electra_module).failed == 0
