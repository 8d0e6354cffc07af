"""The XLA-compiled decoding loops (`jit_compile=True`, `keras-llm generate --xla`) produce
what the plain `tf.function` loops produce, for GPT and seq2seq models."""
import keras
import numpy as np
import pytest

from keras_llm.data.tokenizers import train_tokenizer
from keras_llm.generation import Seq2SeqGenerator, TextGenerator
from keras_llm.models import GPTBackbone, GPTCausalLM, Seq2SeqBackbone, Seq2SeqLM

WORDS = "the quick brown fox jumps over lazy dog def return value list string number file"
PROMPTS = ["the quick", "def return value list string number", ""]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer("sentencepiece", [WORDS, "Open a file."] * 20, 60)


def gpt(tokenizer):
    keras.utils.set_random_seed(3)
    model = GPTCausalLM(GPTBackbone(
        vocabulary_size=tokenizer.vocabulary_size(), num_layers=2, num_heads=2, hidden_size=16,
        intermediate_size=32, max_length=24))
    model(np.ones((1, 4), "int32"))
    return model


def test_xla_gpt_generation_matches_the_plain_loop(tokenizer):
    model = gpt(tokenizer)
    plain, xla = TextGenerator(model, tokenizer), TextGenerator(model, tokenizer, True)
    assert xla.step_function(name="greedy")._jit_compile  # XLA, not the plain loop again
    assert not plain.step_function(name="greedy")._jit_compile
    expected = plain.generate(PROMPTS, max_new_tokens=7, sampler="greedy")
    assert xla.generate(PROMPTS, max_new_tokens=7, sampler="greedy") == expected
    assert any(expected)  # something was generated, not an immediate end token
    # Beam search and seeded sampling compile too.
    assert (xla.generate(PROMPTS[:1], max_new_tokens=5, sampler="beam", num_beams=3) ==
            plain.generate(PROMPTS[:1], max_new_tokens=5, sampler="beam", num_beams=3))
    sampled = xla.generate(PROMPTS, max_new_tokens=5, sampler="top_k", top_k=5, seed=1)
    assert len(sampled) == len(PROMPTS) and all(isinstance(text, str) for text in sampled)


def test_xla_seq2seq_generation_matches_the_plain_loop(tokenizer):
    keras.utils.set_random_seed(5)
    backbone = Seq2SeqBackbone(
        vocabulary_size=tokenizer.vocabulary_size(), num_layers=1, num_heads=2,
        hidden_size=16, intermediate_size=32, max_length=16,
        special_token_ids=tokenizer.special_token_ids())
    model = Seq2SeqLM(backbone)
    ones = np.ones((1, 4), "int32")
    model({"encoder_token_ids": ones, "encoder_padding_mask": ones > 0,
           "decoder_token_ids": ones, "decoder_padding_mask": ones > 0})
    sources = ["the quick brown fox " * 3, "lazy dog"]
    plain = Seq2SeqGenerator(model, tokenizer).generate_ids(sources, max_new_tokens=6)
    xla = Seq2SeqGenerator(model, tokenizer, jit_compile=True).generate_ids(
        sources, max_new_tokens=6)
    assert xla == plain
    assert any(plain)
