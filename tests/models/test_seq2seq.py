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
TARGET_VOCABULARY = 23
SPECIALS = dict(pad=0, unk=1, cls=2, sep=3, mask=4, eos=5)


def make_lm(seed=0, **overrides):
    keras.utils.set_random_seed(seed)
    arguments = dict(vocabulary_size=VOCABULARY, num_layers=2, num_decoder_layers=1,
                     num_heads=2, hidden_size=16, intermediate_size=32, max_length=8,
                     dropout=0.0)
    arguments.update(overrides)
    model = Seq2SeqLM(Seq2SeqBackbone(**arguments))
    model.build({key: (None, None) for key in inputs()})
    return model


def inputs(seed=1, target_vocabulary=VOCABULARY):
    rng = np.random.default_rng(seed)
    return {
        "encoder_token_ids": rng.integers(6, VOCABULARY, (BATCH, SOURCE)).astype("int32"),
        "encoder_padding_mask": np.array([[True] * SOURCE, [True] * 4 + [False] * 3]),
        "decoder_token_ids": rng.integers(6, target_vocabulary, (BATCH, TARGET)).astype(
            "int32"),
        "decoder_padding_mask": np.ones((BATCH, TARGET), bool),
    }


def assert_close(actual, expected, tolerance=1e-5):
    np.testing.assert_allclose(ops.convert_to_numpy(actual), ops.convert_to_numpy(expected),
                               atol=tolerance, rtol=0)


@pytest.mark.parametrize("overrides", [
    {}, {"norm_first": True, "position": "sinusoidal", "activation": "relu"},
    {"position": "rotary"}])
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


def assert_greedy_matches_full_passes(model, x, start_id):
    """Greedy generate_step writes target ids, each the argmax of a full forward pass;
    returns the generated ids."""
    prompt = np.zeros((BATCH, TARGET), "int32")
    prompt[:, 0] = start_id
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
    return generated


def test_greedy_generate_step_matches_repeated_full_passes():
    assert_greedy_matches_full_passes(make_lm(), inputs(), start_id=2)


def test_logits_are_tied_to_the_shared_embedding():
    model = make_lm()
    x = inputs()
    hidden = ops.convert_to_numpy(model.backbone(x))
    embeddings = ops.convert_to_numpy(model.backbone.token_embedding.embeddings)
    assert_close(model(x), hidden @ embeddings.T, 1e-4)


def test_untied_logits_use_their_own_kernel():
    model = make_lm(tie_embeddings=False)
    x = inputs()
    hidden = ops.convert_to_numpy(model.backbone(x))
    kernel = ops.convert_to_numpy(model.backbone.token_embedding.reverse_embeddings)
    assert_close(model(x), hidden @ kernel, 1e-4)
    assert model.count_params() == make_lm().count_params() + 16 * VOCABULARY


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


class FakeTokenizer:
    def __init__(self, size, specials=SPECIALS):
        self.size, self.specials = size, specials

    def vocabulary_size(self):
        return self.size

    def special_token_ids(self):
        return dict(self.specials)


def make_separate_lm(seed=0, **overrides):
    return make_lm(seed, target_vocabulary_size=TARGET_VOCABULARY,
                   special_token_ids=SPECIALS, target_special_token_ids=SPECIALS, **overrides)


def test_separate_vocabularies_shapes_and_output_tied_to_the_target_embedding():
    model = make_separate_lm()
    backbone = model.backbone
    x = inputs(target_vocabulary=TARGET_VOCABULARY)
    logits = model(x)
    assert tuple(logits.shape) == (BATCH, TARGET, TARGET_VOCABULARY)
    assert not backbone.shared_vocabulary
    assert tuple(backbone.token_embedding.embeddings.shape) == (VOCABULARY, 16)
    assert tuple(backbone.target_token_embedding.embeddings.shape) == (TARGET_VOCABULARY, 16)
    hidden = ops.convert_to_numpy(backbone(x))
    target = ops.convert_to_numpy(backbone.target_token_embedding.embeddings)
    assert_close(logits, hidden @ target.T, 1e-4)
    # The encoder reads source ids with the source embedding: changing the target table
    # leaves the encoder output alone, changing the source table moves it.
    encoded = ops.convert_to_numpy(backbone.encode(x["encoder_token_ids"],
                                                   x["encoder_padding_mask"]))
    backbone.target_token_embedding.embeddings.assign(target + 1.0)
    assert_close(backbone.encode(x["encoder_token_ids"], x["encoder_padding_mask"]), encoded)
    source = ops.convert_to_numpy(backbone.token_embedding.embeddings)
    backbone.token_embedding.embeddings.assign(source + 1.0)
    assert np.abs(ops.convert_to_numpy(backbone.encode(
        x["encoder_token_ids"], x["encoder_padding_mask"])) - encoded).max() > 1e-3


@pytest.mark.parametrize("overrides", [{}, {"norm_first": True, "position": "sinusoidal"}])
def test_separate_vocabularies_cached_decoding_equals_full_forward_pass(overrides):
    model = make_separate_lm(**overrides)
    x = inputs(target_vocabulary=TARGET_VOCABULARY)
    logits = model(x)
    backbone = model.backbone
    cross = backbone.cross_attention_cache(backbone.encode(x["encoder_token_ids"],
                                                           x["encoder_padding_mask"]))
    cache = backbone.empty_cache(BATCH, TARGET)
    ids = x["decoder_token_ids"]
    step_logits, _, cache = model.call_with_cache(ids[:, :1], cache, 0, cross,
                                                  x["encoder_padding_mask"])
    assert_close(step_logits[:, 0], logits[:, 0])
    for index in range(1, TARGET):
        step_logits, _, cache = model.call_with_cache(ids[:, index:index + 1], cache, index,
                                                      cross, x["encoder_padding_mask"])
        assert_close(step_logits[:, 0], logits[:, index])
    generated = assert_greedy_matches_full_passes(model, x, start_id=SPECIALS["cls"])
    assert generated.max() < TARGET_VOCABULARY


def test_separate_vocabularies_config_and_keras_round_trip(tmp_path):
    model = make_separate_lm()
    config = model.backbone.get_config()
    assert config["target_vocabulary_size"] == TARGET_VOCABULARY
    assert config["target_special_token_ids"] == SPECIALS
    assert Seq2SeqBackbone.from_config(config).get_config() == config
    x = inputs(target_vocabulary=TARGET_VOCABULARY)
    expected = ops.convert_to_numpy(model(x))
    model.save(tmp_path / "separate.keras")
    restored = keras.saving.load_model(tmp_path / "separate.keras")
    assert restored.backbone.target_vocabulary_size == TARGET_VOCABULARY
    assert_close(restored(x), expected, 1e-6)
    shared = make_lm().backbone.get_config()
    assert shared["target_vocabulary_size"] is None and make_lm().backbone.shared_vocabulary


def test_from_model_config_with_a_target_vocabulary():
    config = ModelConfig(family="seq2seq", vocab_size=100, hidden_size=16, num_heads=2,
                         intermediate_size=32, num_layers=1, max_length=8,
                         target_vocab_size=30)
    backbone = Seq2SeqBackbone.from_model_config(config, 60, SPECIALS)
    assert (backbone.vocabulary_size, backbone.target_vocabulary_size) == (60, 30)
    backbone = Seq2SeqBackbone.from_model_config(config, 60, SPECIALS, 25, SPECIALS)
    assert backbone.target_vocabulary_size == 25


def test_tokenizer_check_covers_the_target_side():
    model = make_separate_lm()
    source, target = FakeTokenizer(VOCABULARY), FakeTokenizer(TARGET_VOCABULARY)
    model.check_tokenizer(source, target)
    with pytest.raises(ArtifactError, match="pass its target tokenizer"):
        model.check_tokenizer(source)
    with pytest.raises(ArtifactError, match="target side.*vocabulary of 23 tokens"):
        model.check_tokenizer(source, FakeTokenizer(24))
    with pytest.raises(ArtifactError, match="target side.*special tokens.*eos 5 vs 9"):
        model.check_tokenizer(source, FakeTokenizer(TARGET_VOCABULARY, dict(SPECIALS, eos=9)))
    with pytest.raises(ArtifactError, match="vocabulary of 40 tokens"):
        model.check_tokenizer(FakeTokenizer(TARGET_VOCABULARY), target)
    shared = make_lm(special_token_ids=SPECIALS)
    shared.check_tokenizer(source, source)
    with pytest.raises(ArtifactError, match="shared vocabulary"):
        shared.check_tokenizer(source, target)


def test_with_target_vocabulary_keeps_every_other_weight():
    model = make_lm()
    x = inputs(target_vocabulary=TARGET_VOCABULARY)
    copy = seq2seq_module.with_target_vocabulary(model, TARGET_VOCABULARY, SPECIALS)
    assert tuple(copy(x).shape) == (BATCH, TARGET, TARGET_VOCABULARY)
    backbone = copy.backbone
    assert_close(backbone.token_embedding.embeddings, model.backbone.token_embedding.embeddings)
    assert_close(backbone.encode(x["encoder_token_ids"], x["encoder_padding_mask"]),
                 model.backbone.encode(x["encoder_token_ids"], x["encoder_padding_mask"]))
    for new, old in zip(backbone.decoder_blocks[0].weights,
                        model.backbone.decoder_blocks[0].weights):
        assert_close(new, old, 0)
    # Again from a model that already has its own target vocabulary.
    again = seq2seq_module.with_target_vocabulary(copy, 11)
    assert again.backbone.decoder_embedding.input_dim == 11
    assert_close(again.backbone.decoder_blocks[0].weights[0],
                 model.backbone.decoder_blocks[0].weights[0], 0)


def test_docstring_examples_run():
    assert doctest.testmod(seq2seq_module).failed == 0


def test_mixed_policy_model_runs_in_the_compute_dtype():
    # With dropout layers left at the float32 policy a model-level mixed policy failed
    # (a float32 + bfloat16 residual add); the tied projection multiplied by the float32 table.
    model = make_lm(dtype="mixed_bfloat16", dropout=0.1)
    for training in (False, True):
        logits = model(inputs(), training=training)
        assert keras.backend.standardize_dtype(logits.dtype) == "bfloat16"
        assert np.all(np.isfinite(ops.convert_to_numpy(ops.cast(logits, "float32"))))
