"""GPT backbone and causal LM: cached decoding, greedy generation, config, saving, errors."""
import dataclasses
import doctest

import keras
import keras_hub
import numpy as np
import pytest
from keras import ops

from keras_llm.config import ModelConfig
from keras_llm.models import GPTBackbone, GPTCausalLM
from keras_llm.models import gpt as gpt_module

VOCABULARY, BATCH, LENGTH = 50, 2, 8


def make_lm(seed=0, **overrides):
    keras.utils.set_random_seed(seed)
    arguments = dict(vocabulary_size=VOCABULARY, num_layers=2, num_heads=2, hidden_size=16,
                     intermediate_size=32, max_length=LENGTH)
    arguments.update(overrides)
    model = GPTCausalLM(GPTBackbone(**arguments))
    model.build((None, None))
    return model


def token_ids(seed=1, shape=(BATCH, LENGTH)):
    return np.random.default_rng(seed).integers(0, VOCABULARY, size=shape).astype("int32")


def assert_close(actual, expected, tolerance=1e-5):
    np.testing.assert_allclose(
        ops.convert_to_numpy(actual), ops.convert_to_numpy(expected), atol=tolerance, rtol=0)


@pytest.mark.parametrize("overrides", [
    {},
    {"norm_first": False, "position": "sinusoidal", "activation": "relu"},
    {"use_bias": False},
    {"position": "rotary"},
])
def test_call_with_cache_equals_full_forward_pass(overrides):
    model = make_lm(**overrides)
    ids = token_ids()
    logits = model(ids)
    hidden = model.backbone(ids)
    cache = model.backbone.empty_cache(BATCH, LENGTH)
    # One (keys, values) pair per block, (batch, heads, length, head_dim) each.
    assert len(cache) == 2 and all(ops.shape(part) == (BATCH, 2, LENGTH, 8)
                                   for pair in cache for part in pair)
    # Prefill three tokens at once, then decode one token per step.
    step_logits, step_hidden, cache = model.call_with_cache(ids[:, :3], cache, 0)
    assert_close(step_logits, logits[:, :3])
    assert_close(step_hidden, hidden[:, :3])
    for index in range(3, LENGTH):
        step_logits, step_hidden, cache = model.call_with_cache(
            ids[:, index:index + 1], cache, index)
        assert_close(step_logits[:, 0], logits[:, index])
        assert_close(step_hidden[:, 0], hidden[:, index])


@pytest.mark.parametrize("overrides", [{}, {"position": "rotary"}, {"num_layers": 1},
                                       {"norm_first": False}])
def test_output_positions_are_the_full_hidden_states_there(overrides):
    backbone = make_lm(**overrides).backbone
    ids = token_ids()
    mask = np.arange(LENGTH)[None] < np.array([[LENGTH], [5]])
    positions = np.array([[7, 2], [4, 4]], "int32")
    expected = np.take_along_axis(ops.convert_to_numpy(backbone(ids, mask)),
                                  positions[..., None], axis=1)
    assert_close(backbone(ids, mask, output_positions=positions), expected)


def test_logits_are_tied_to_the_token_embedding():
    model = make_lm()
    ids = token_ids()
    embeddings = ops.convert_to_numpy(model.backbone.token_embedding.embeddings)
    expected = ops.convert_to_numpy(model.backbone(ids)) @ embeddings.T
    assert_close(model(ids), expected, tolerance=1e-4)
    assert ops.shape(model(ids)) == (BATCH, LENGTH, VOCABULARY)


def test_untied_output_projection_has_its_own_kernel():
    config = ModelConfig(vocab_size=VOCABULARY, max_length=LENGTH, hidden_size=16, num_layers=1,
                         num_heads=2, intermediate_size=32, tie_embeddings=False)
    untied = GPTCausalLM(GPTBackbone.from_model_config(config))
    ids = token_ids()
    logits = untied(ids)
    embedding = untied.backbone.token_embedding
    kernel = ops.convert_to_numpy(embedding.reverse_embeddings)  # (hidden, vocabulary)
    assert kernel.shape == (16, VOCABULARY)
    assert_close(logits, ops.convert_to_numpy(untied.backbone(ids)) @ kernel, tolerance=1e-4)
    tied = GPTCausalLM(GPTBackbone.from_model_config(
        dataclasses.replace(config, tie_embeddings=True)))
    tied(ids)
    assert untied.count_params() == tied.count_params() + 16 * VOCABULARY
    restored = GPTBackbone.from_config(untied.backbone.get_config())
    assert restored.tie_embeddings is False


def test_greedy_generate_step_equals_repeated_full_passes():
    model = make_lm()
    prompts = [[3, 14, 15], [9, 2]]
    ids = np.zeros((BATCH, 6), "int32")
    mask = np.zeros((BATCH, 6), bool)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = prompt
        mask[row, :len(prompt)] = True
    generated = ops.convert_to_numpy(
        model.generate_step(ids, mask, keras_hub.samplers.GreedySampler()))
    for row, prompt in enumerate(prompts):
        expected = list(prompt)
        while len(expected) < 6:
            logits = ops.convert_to_numpy(model(np.array([expected], "int32")))
            expected.append(int(np.argmax(logits[0, -1])))
        assert generated[row].tolist() == expected


def test_padding_does_not_change_earlier_positions():
    model = make_lm()
    ids = token_ids()
    padded = ids.copy()
    padded[:, 5:] = 0
    mask = np.arange(LENGTH)[None, :] < 5
    assert_close(model(padded, padding_mask=np.repeat(mask, BATCH, 0))[:, :5],
                 model(ids[:, :5]))


def test_config_round_trip():
    backbone = GPTBackbone(vocabulary_size=40, num_layers=3, num_heads=4, hidden_size=8,
                           intermediate_size=24, max_length=12, dropout=0.1, activation="gelu",
                           norm_first=False, position="sinusoidal", layer_norm_epsilon=1e-6)
    config = backbone.get_config()
    restored = GPTBackbone.from_config(config)
    assert restored.get_config() == config
    assert len(restored.blocks) == 3 and restored.final_norm is None

    model = GPTCausalLM(backbone)
    restored_model = GPTCausalLM.from_config(model.get_config())
    assert isinstance(restored_model.backbone, GPTBackbone)
    assert restored_model.backbone.get_config() == config


def test_initialization_follows_gpt2():
    keras.utils.set_random_seed(0)
    backbone = GPTBackbone(vocabulary_size=512, num_layers=8, num_heads=4, hidden_size=128,
                           intermediate_size=512, max_length=64)
    backbone.build((None, None))
    block = backbone.blocks[0]
    std = lambda weight: float(np.std(ops.convert_to_numpy(weight)))
    # Residual writers: 0.02 / sqrt(2 * 8 layers) = 0.005; everything else N(0, 0.02).
    for weight in (block.self_attention.output_kernel, block.feedforward.output_dense.kernel):
        assert std(weight) == pytest.approx(0.005, rel=0.05)
    for weight in (block.self_attention.query_key_value_kernel, block.feedforward.intermediate_dense.kernel,
                   backbone.token_embedding.embeddings, backbone.position_embedding.embeddings):
        assert std(weight) == pytest.approx(0.02, rel=0.05)
    assert not np.any(ops.convert_to_numpy(block.self_attention.output_bias))


def test_without_biases():
    model = make_lm(use_bias=False)
    names = [weight.path for weight in model.weights]
    assert not [name for name in names if "bias" in name or "beta" in name]
    assert model.backbone.get_config()["use_bias"] is False
    restored = GPTBackbone.from_config(model.backbone.get_config())
    restored.build((None, None))
    assert len(restored.weights) == len(model.weights)


def test_from_model_config_uses_the_tokenizer_vocabulary():
    model_config = ModelConfig(vocab_size=999, max_length=16, hidden_size=8, num_layers=1,
                               num_heads=2, intermediate_size=16, position="sinusoidal")
    backbone = GPTBackbone.from_model_config(model_config, vocabulary_size=30)
    assert (backbone.vocabulary_size, backbone.max_length, backbone.position) == (
        30, 16, "sinusoidal")
    assert GPTBackbone.from_model_config(model_config).vocabulary_size == 999
    assert GPTBackbone.from_model_config(model_config, use_bias=False).use_bias is False


def test_save_and_load_keras_file(tmp_path):
    model = make_lm()
    ids = token_ids()
    path = tmp_path / "gpt.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded, GPTCausalLM) and isinstance(loaded.backbone, GPTBackbone)
    assert_close(loaded(ids), model(ids), tolerance=0)
    cache = loaded.backbone.empty_cache(BATCH, LENGTH)
    step_logits, _, _ = loaded.call_with_cache(ids[:, :4], cache, 0)
    assert_close(step_logits, model(ids)[:, :4])


def test_docstring_examples_run():
    results = doctest.testmod(gpt_module, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0 and results.failed == 0


@pytest.mark.parametrize("overrides, message", [
    ({"position": "alibi"}, "position"),
    ({"hidden_size": 10, "num_heads": 3}, "hidden_size must be divisible by num_heads"),
    ({"vocabulary_size": 0}, "vocabulary_size"),
    ({"num_layers": -1}, "num_layers"),
    ({"max_length": 0}, "max_length"),
    ({"intermediate_size": 0}, "intermediate_size"),
])
def test_bad_arguments_name_the_argument(overrides, message):
    arguments = dict(vocabulary_size=VOCABULARY, num_layers=1, num_heads=2, hidden_size=16,
                     intermediate_size=32, max_length=LENGTH)
    arguments.update(overrides)
    with pytest.raises(ValueError, match=message):
        GPTBackbone(**arguments)


def test_sequence_longer_than_max_length_is_rejected():
    model = make_lm()
    with pytest.raises(ValueError, match=f"max_length={LENGTH}"):
        model(token_ids(shape=(1, LENGTH + 1)))


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="compiles with tf.function")
@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_compiled_decoding_step_with_tensor_cache_index(position):
    # Generation compiles the step: shapes turn symbolic and cache_index becomes a tensor.
    import tensorflow as tf

    model = make_lm(position=position)
    ids = token_ids()
    step = tf.function(model.call_with_cache)
    cache = model.backbone.empty_cache(BATCH, LENGTH)
    _, _, cache = step(ids[:, :4], cache, tf.constant(0))
    step_logits, _, _ = step(ids[:, 4:5], cache, tf.constant(4))
    assert_close(step_logits[:, 0], model(ids)[:, 4])


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_output_projection_runs_in_the_compute_dtype(tie_embeddings):
    # Read outside the embedding layer's call the table is float32: without a cast the
    # mixed-precision LM head, a quarter of GPT-2 small's FLOPs, ran in float32.
    model = make_lm(dtype="mixed_bfloat16", tie_embeddings=tie_embeddings)
    logits = model(token_ids())
    assert keras.backend.standardize_dtype(logits.dtype) == "bfloat16"
    table = model.backbone.token_embedding
    kernel = ops.transpose(table.embeddings) if tie_embeddings else table.reverse_embeddings
    hidden = model.backbone(token_ids())
    expected = ops.matmul(ops.cast(hidden, "float32"),
                          ops.cast(ops.cast(kernel, "bfloat16"), "float32"))
    assert_close(ops.cast(logits, "float32"), expected, tolerance=0.05)
