"""Position encodings: the paper's sinusoid formula, learned tables with offsets, saving."""
import doctest

import keras
import numpy as np
import pytest
from keras import ops

from keras_llm.layers import LearnedPositionEmbedding, SinusoidalPositionEncoding
from keras_llm.layers import position as position_module


def paper_encoding(positions, hidden, max_wavelength=10000):
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""
    table = np.zeros((len(positions), hidden))
    for row, pos in enumerate(positions):
        for i in range(0, hidden, 2):
            angle = pos / max_wavelength ** (i / hidden)
            table[row, i] = np.sin(angle)
            if i + 1 < hidden:
                table[row, i + 1] = np.cos(angle)
    return table


@pytest.mark.parametrize("hidden, max_wavelength", [(16, 10000), (6, 100)])
def test_sinusoidal_matches_attention_is_all_you_need(hidden, max_wavelength):
    encoding = SinusoidalPositionEncoding(max_wavelength=max_wavelength)
    table = encoding(ops.zeros((2, 12, hidden)))
    np.testing.assert_allclose(ops.convert_to_numpy(table),
                               paper_encoding(range(12), hidden, max_wavelength), atol=1e-5)


def test_sinusoidal_start_index_continues_the_table():
    encoding = SinusoidalPositionEncoding()
    table = encoding(ops.zeros((1, 3, 8)), start_index=5)
    np.testing.assert_allclose(ops.convert_to_numpy(table), paper_encoding(range(5, 8), 8),
                               atol=1e-5)
    assert not encoding.weights


def test_learned_rows_follow_start_index():
    embedding = LearnedPositionEmbedding(max_length=10)
    embedding.build((None, None, 4))
    table = np.arange(40, dtype="float32").reshape(10, 4)
    embedding.embeddings.assign(table)
    x = ops.zeros((2, 3, 4))
    np.testing.assert_array_equal(ops.convert_to_numpy(embedding(x)), table[:3])
    np.testing.assert_array_equal(ops.convert_to_numpy(embedding(x, start_index=7)), table[7:])
    assert ops.shape(embedding(ops.zeros((2, 1, 4)), start_index=4)) == (1, 4)


@pytest.mark.parametrize("layer", [
    SinusoidalPositionEncoding(max_wavelength=500, name="sinusoid"),
    LearnedPositionEmbedding(max_length=9, initializer="ones", name="learned"),
])
def test_config_round_trip(layer):
    config = layer.get_config()
    restored = layer.__class__.from_config(config)
    assert restored.get_config() == config


@pytest.mark.parametrize("make_layer", [
    lambda: SinusoidalPositionEncoding(max_wavelength=500, name="position"),
    lambda: LearnedPositionEmbedding(max_length=9, name="position"),
])
def test_save_and_load_keras_file(tmp_path, make_layer):
    inputs = keras.Input((6, 4))
    model = keras.Model(inputs, inputs + make_layer()(inputs))
    x = np.random.default_rng(0).normal(size=(2, 6, 4)).astype("float32")
    path = tmp_path / "position.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded.get_layer("position")) is type(model.get_layer("position"))
    np.testing.assert_array_equal(ops.convert_to_numpy(loaded(x)),
                                  ops.convert_to_numpy(model(x)))


def test_docstring_examples_run():
    results = doctest.testmod(position_module, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0 and results.failed == 0


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="max_length"):
        LearnedPositionEmbedding(max_length=0)
    with pytest.raises(ValueError, match="max_wavelength"):
        SinusoidalPositionEncoding(max_wavelength=0)
    embedding = LearnedPositionEmbedding(max_length=4)
    with pytest.raises(ValueError, match="max_length=4"):
        embedding(ops.zeros((1, 5, 2)))
    with pytest.raises(ValueError, match="max_length=4"):
        embedding(ops.zeros((1, 2, 2)), start_index=3)
