"""tf.data pipeline: split, packing with end-of-document tokens, causal batches, baseline."""
import math

import numpy as np
import pytest
import tensorflow as tf

from keras_llm.data.pipeline import (
    causal_lm_dataset,
    pack_documents,
    pack_tokens,
    split_documents,
    unigram_baseline,
)


class WordTokenizer:
    """A fake tokenizer: each word is its integer value; EOS is 5 as in the real ones."""

    def tokenize(self, texts):
        words = tf.strings.split(texts)
        return tf.strings.to_number(words, tf.int32)

    def special_token_ids(self):
        return {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4, "eos": 5}

    def vocabulary_size(self):
        return 100


DOCUMENTS = ["10 11 12", "20 21", "30 31 32 33", "40"]


def test_pack_tokens_carries_remainders_across_chunks():
    chunks = tf.data.Dataset.from_tensor_slices(tf.ragged.constant([[1, 2], [3, 4, 5], [6, 7]]))
    assert [b.tolist() for b in pack_tokens(chunks, 3).as_numpy_iterator()] == [
        [1, 2, 3], [4, 5, 6]]


def test_pack_documents_puts_eos_between_documents():
    blocks = list(pack_documents(DOCUMENTS, WordTokenizer(), 4).as_numpy_iterator())
    assert np.concatenate(blocks).tolist() == [10, 11, 12, 5, 20, 21, 5, 30, 31, 32, 33, 5]
    assert all(b.shape == (4,) for b in blocks)


def test_causal_lm_batches_are_shifted_by_one():
    ds = causal_lm_dataset(DOCUMENTS, WordTokenizer(), seq_len=3, batch_size=2,
                           shuffle=False, repeat=False)
    (inputs, targets), = list(ds.as_numpy_iterator())
    assert inputs.tolist() == [[10, 11, 12], [20, 21, 5]]
    assert targets.tolist() == [[11, 12, 5], [21, 5, 30]]


def test_training_stream_repeats_shuffles_with_seed_and_keeps_every_token():
    documents = [" ".join(str(10 + i) for _ in range(3)) for i in range(40)]

    def first_batches(seed):
        ds = causal_lm_dataset(documents, WordTokenizer(), seq_len=7, batch_size=4, seed=seed,
                               shuffle_buffer=64)
        return [x for x, _ in ds.take(12).as_numpy_iterator()]

    a, b, c = first_batches(1), first_batches(1), first_batches(2)
    assert all((x == y).all() for x, y in zip(a, b))
    assert any((x != y).any() for x, y in zip(a, c))
    # 12 batches * 4 * 8 tokens = 384: over two passes of 160 tokens, even with 16 blocks
    # held back in the block shuffle buffer.
    tokens = np.concatenate([x.ravel() for x in a])
    assert set(range(10, 50)) <= set(tokens.tolist())


def test_split_is_deterministic_disjoint_and_sized():
    documents = [f"document number {i}" for i in range(2000)] + ["duplicate"] * 10
    train, validation = split_documents(documents, 0.1, seed=3)
    train = [t.decode() for t in train.as_numpy_iterator()]
    validation = [t.decode() for t in validation.as_numpy_iterator()]
    assert len(train) + len(validation) == len(documents)
    assert not set(train) & set(validation)  # duplicates land on one side only
    assert 150 < len(validation) < 260
    again = [t.decode() for t in split_documents(documents[::-1], 0.1, seed=3)[1]
             .as_numpy_iterator()]
    assert sorted(again) == sorted(validation)  # depends on content, not order
    other = [t.decode() for t in split_documents(documents, 0.1, seed=4)[1]
             .as_numpy_iterator()]
    assert sorted(other) != sorted(validation)


def test_unigram_baseline_matches_hand_computation():
    train, validation = ["10 10 11"], ["10 12"]
    baseline = unigram_baseline(train, validation, WordTokenizer())
    # Train stream: 10 10 11 EOS (4 tokens); add-one over 100 ids.
    p = {10: 3 / 104, 12: 1 / 104, 5: 2 / 104}
    expected = -(math.log(p[10]) + math.log(p[12]) + math.log(p[5])) / 3
    assert baseline["cross_entropy"] == pytest.approx(expected)
    assert baseline["perplexity"] == pytest.approx(math.exp(expected))
    assert baseline["validation_tokens"] == 3 and baseline["train_tokens"] == 4
