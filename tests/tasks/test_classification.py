"""TextClassifier: pooling by backbone, shapes, masked pooling numbers, .keras round trip."""
import keras
import numpy as np
import pytest

from keras_llm.models import BertBackbone, GPTBackbone
from keras_llm.tasks import TextClassifier
from keras_llm.tasks.classification import last_token_positions, pool_mean

SIZES = dict(vocabulary_size=40, num_layers=1, num_heads=2, hidden_size=8,
             intermediate_size=16, max_length=6)


def inputs(batch=2):
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], bool)[:batch]
    return {"token_ids": np.arange(6 * batch, dtype="int32").reshape(batch, 6) % 40,
            "segment_ids": np.zeros((batch, 6), "int32"), "padding_mask": mask}


def test_masked_pooling_by_hand():
    hidden = np.arange(2 * 3 * 2, dtype="float32").reshape(2, 3, 2)
    mask = np.array([[True, True, False], [True, True, True]])
    np.testing.assert_array_equal(last_token_positions(mask), [[1], [2]])
    np.testing.assert_allclose(pool_mean(hidden, mask), [[1, 2], [8, 9]])
    # A row without a real token reads position 0 (not the previous row's last state).
    np.testing.assert_array_equal(last_token_positions(mask & [[True], [False]]), [[1], [0]])


def test_default_pooling_follows_the_backbone():
    keras.utils.set_random_seed(0)
    assert TextClassifier(BertBackbone(**SIZES), 3).pooling == "cls"
    assert TextClassifier(GPTBackbone(**SIZES), 3).pooling == "last"
    with pytest.raises(ValueError, match="pooling 'cls' needs a BertBackbone"):
        TextClassifier(GPTBackbone(**SIZES), 3, pooling="cls")
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        TextClassifier(GPTBackbone(**SIZES), 1)


def test_cls_pooling_is_the_full_backbones_pooled_output():
    keras.utils.set_random_seed(0)
    model = TextClassifier(BertBackbone(**dict(SIZES, num_layers=2)), 3)
    # the last block computes [CLS] alone; the pooled vector is the full backbone's
    np.testing.assert_allclose(model.pooled(inputs()),
                               model.backbone(inputs())["pooled_output"], atol=1e-5)


def test_last_pooling_is_the_full_backbones_state_at_the_last_real_token():
    keras.utils.set_random_seed(0)
    model = TextClassifier(GPTBackbone(**dict(SIZES, num_layers=2)), 3)
    x = inputs()
    # the last block computes the last real token alone; its state is the full backbone's
    hidden = model.backbone(x["token_ids"], x["padding_mask"])
    np.testing.assert_allclose(model.pooled(x), np.asarray(hidden)[[0, 1], [2, 5]], atol=1e-5)


@pytest.mark.parametrize("backbone_class", [BertBackbone, GPTBackbone])
def test_one_position_pooling_traces_with_unknown_batch_and_length(backbone_class):
    """As an exported signature traces it: the last block's positions come from the
    padding mask at run time."""
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = TextClassifier(backbone_class(**dict(SIZES, num_layers=2)), 3)
    x = inputs()
    expected = model(x)
    specs = {key: tf.TensorSpec((None, None), tf.as_dtype(value.dtype))
             for key, value in x.items()}
    traced = tf.function(lambda features: model(features), input_signature=[specs])
    np.testing.assert_allclose(traced(x), expected, atol=1e-5)
    shorter = {key: value[:1, :4] for key, value in x.items()}
    np.testing.assert_allclose(traced(shorter), model(shorter), atol=1e-5)


def test_gpt_last_token_reads_only_real_tokens():
    keras.utils.set_random_seed(0)
    model = TextClassifier(GPTBackbone(**SIZES), 3, dropout=0.0)
    x = inputs()
    logits = model(x)
    assert tuple(logits.shape) == (2, 3)
    changed = {**x, "token_ids": x["token_ids"].copy()}
    changed["token_ids"][0, 3:] = 7  # padding after the last real token of row 0
    np.testing.assert_allclose(model(changed)[0], logits[0], atol=1e-6)


def test_encoder_mean_pooling_averages_the_real_tokens():
    keras.utils.set_random_seed(0)
    model = TextClassifier(BertBackbone(**SIZES), 3, pooling="mean", dropout=0.0)
    x = inputs()
    pooled = keras.ops.convert_to_numpy(model.pooled(x))
    hidden = keras.ops.convert_to_numpy(model.backbone(x)["sequence_output"])
    np.testing.assert_allclose(pooled[0], hidden[0, :3].mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(pooled[1], hidden[1].mean(axis=0), atol=1e-6)
    with pytest.raises(ValueError, match="pooling 'last' needs a GPTBackbone"):
        TextClassifier(BertBackbone(**SIZES), 3, pooling="last")


@pytest.mark.parametrize("backbone_class,pooling", [(BertBackbone, "cls"), (GPTBackbone, "mean"),
                                                    (BertBackbone, "mean")])
def test_keras_round_trip(tmp_path, backbone_class, pooling):
    keras.utils.set_random_seed(0)
    model = TextClassifier(backbone_class(**SIZES), 4, pooling=pooling)
    expected = model(inputs())
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert loaded.pooling == pooling and loaded.num_classes == 4
    np.testing.assert_allclose(loaded(inputs()), expected, atol=1e-6)
