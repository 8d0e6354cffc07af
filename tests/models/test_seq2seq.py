"""Encoder-decoder Transformer: cached decoding, greedy generation, padding, saving."""
import doctest

import keras
import keras_hub
import numpy as np
import pytest
from keras import ops

from keras_llm.config import ModelConfig
from keras_llm.errors import ArtifactError
from keras_llm.models import seq2seq as seq2seq_module
from keras_llm.models.seq2seq import Seq2SeqBackbone, Seq2SeqLM

VOCABULARY, BATCH, SOURCE, TARGET = 40, 2, 7, 6


def make_lm(seed=0, **overrides):
    keras.utils.set_random_seed(seed)
    arguments = dict(vocabulary_size=VOCABULARY, num_layers=2, num_decoder_layers=1,
                     num_heads=2, hidden_size=16, intermediate_size=32, max_length=8,
                     dropout=0.0)
    arguments.update(overrides)
    model = Seq2SeqLM(Seq2SeqBackbone(**arguments))
    model.build({key: (None, None) for key in inputs()})
    return model


def inputs(seed=1):
    rng = np.random.default_rng(seed)
    return {
        "encoder_token_ids": rng.integers(6, VOCABULARY, (BATCH, SOURCE)).astype("int32"),
        "encoder_padding_mask": np.array([[True] * SOURCE, [True] * 4 + [False] * 3]),
        "decoder_token_ids": rng.integers(6, VOCABULARY, (BATCH, TARGET)).astype("int32"),
        "decoder_padding_mask": np.ones((BATCH, TARGET), bool),
    }


def assert_close(actual, expected, tolerance=1e-5):
    np.testing.assert_allclose(ops.convert_to_numpy(actual), ops.convert_to_numpy(expected),
                               atol=tolerance, rtol=0)


@pytest.mark.parametrize("overrides", [
    {}, {"norm_first": True, "position": "sinusoidal", "activation": "relu"}])
def test_call_with_cache_equals_full_forward_pass(overrides):
    model = make_lm(**overrides)
    x = inputs()
    logits = model(x)
    backbone = model.backbone
    encoded = backbone.encode(x["encoder_token_ids"], x["encoder_padding_mask"])
    cross = backbone.cross_attention_cache(encoded)
    cache = backbone.empty_cache(BATCH, TARGET)
    ids = x["decoder_token_ids"]
    step_logits, _, cache = model.call_with_cache(ids[:, :2], cache, 0, cross,
                                                  x["encoder_padding_mask"])
    assert_close(step_logits, logits[:, :2])
    for index in range(2, TARGET):
        step_logits, _, cache = model.call_with_cache(ids[:, index:index + 1], cache, index,
                                                      cross, x["encoder_padding_mask"])
        assert_close(step_logits[:, 0], logits[:, index])


def test_encoder_padding_is_ignored():
    model = make_lm()
    x = inputs()
    changed = dict(x, encoder_token_ids=x["encoder_token_ids"].copy())
    changed["encoder_token_ids"][1, 4:] = 9
    assert_close(model(changed)[1], model(x)[1])


def test_decoder_is_causal():
    model = make_lm()
    x = inputs()
    changed = dict(x, decoder_token_ids=x["decoder_token_ids"].copy())
    changed["decoder_token_ids"][:, 4:] = 9
    assert_close(model(changed)[:, :4], model(x)[:, :4])


def test_greedy_generate_step_matches_repeated_full_passes():
    model = make_lm()
    x = inputs()
    prompt = np.zeros((BATCH, TARGET), "int32")
    prompt[:, 0] = 2
    mask = np.zeros((BATCH, TARGET), bool)
    mask[:, 0] = True
    generated = ops.convert_to_numpy(model.generate_step(
        dict(x, decoder_token_ids=prompt, decoder_padding_mask=mask),
        keras_hub.samplers.GreedySampler()))
    expected = prompt.copy()
    for index in range(1, TARGET):
        logits = ops.convert_to_numpy(model(dict(x, decoder_token_ids=expected)))
        expected[:, index] = logits[:, index - 1].argmax(-1)
    np.testing.assert_array_equal(generated, expected)


def test_logits_are_tied_to_the_shared_embedding():
    model = make_lm()
    x = inputs()
    hidden = ops.convert_to_numpy(model.backbone(x))
    embeddings = ops.convert_to_numpy(model.backbone.token_embedding.embeddings)
    assert_close(model(x), hidden @ embeddings.T, 1e-4)


def test_keras_round_trip(tmp_path):
    model = make_lm()
    x = inputs()
    expected = ops.convert_to_numpy(model(x))
    model.save(tmp_path / "seq2seq.keras")
    restored = keras.saving.load_model(tmp_path / "seq2seq.keras")
    assert_close(restored(x), expected, 1e-6)
    assert restored.backbone.num_decoder_layers == 1


def test_from_model_config_and_tokenizer_check():
    config = ModelConfig(family="seq2seq", vocab_size=100, hidden_size=16, num_heads=2,
                         intermediate_size=32, num_layers=2, num_decoder_layers=1, max_length=8)
    specials = dict(pad=0, unk=1, cls=2, sep=3, mask=4, eos=5)
    model = Seq2SeqLM(Seq2SeqBackbone.from_model_config(config, 60, specials))
    assert model.backbone.num_decoder_layers == 1 and model.backbone.vocabulary_size == 60

    class Tokenizer:
        def vocabulary_size(self):
            return 61

        def special_token_ids(self):
            return specials

    with pytest.raises(ArtifactError, match="vocabulary of 60 tokens"):
        model.check_tokenizer(Tokenizer())


def test_docstring_examples_run():
    assert doctest.testmod(seq2seq_module).failed == 0
