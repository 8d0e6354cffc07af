"""Next-sentence pairs: balanced labels, each correct by construction, segment ids right."""
import numpy as np
import pytest
import tensorflow as tf

from keras_llm.data.nsp import (assemble_pair, document_segments, next_sentence_dataset,
                                pair_count)

SPECIALS = dict(pad=0, unk=1, cls=2, sep=3, mask=4, eos=5)
SEQ_LEN = 32  # segments of (32 - 3) // 2 = 14 tokens


def documents():
    # Token id = 1000 * document + position, so every token says where it came from.
    rng = np.random.default_rng(0)
    return [[1000 * d + p for p in range(int(rng.integers(5, 120)))] for d in range(1, 400)]


@pytest.fixture(scope="module")
def examples():
    ds = tf.data.Dataset.from_tensor_slices(tf.ragged.constant(documents()))
    return list(next_sentence_dataset(ds, SPECIALS, SEQ_LEN, seed=3).as_numpy_iterator())


def split(example):
    ids, segments = example["token_ids"], example["segment_ids"]
    real = example["padding_mask"]
    first = ids[(segments == 0) & real][1:-1]
    second = ids[(segments == 1) & real][:-1]
    return first, second


def test_pair_count_is_the_pass_before_its_few_same_document_draws(examples):
    lengths = [len(d) for d in documents()] + [0, 1, 2]  # nothing, nothing, one pair of halves
    count = pair_count(lengths, SEQ_LEN)
    assert count == pair_count(lengths[:-3], SEQ_LEN) + 1
    # A not-next draw from the pair's own document is dropped: half the draws land in a
    # 1024-segment buffer holding about 4.5 of its own, so about 0.2% of the pairs.
    assert 0 <= count - 1 - len(examples) <= 0.01 * count


def test_labels_are_balanced(examples):
    labels = np.array([e["next_sentence_label"] for e in examples])
    assert len(examples) > 1000
    assert abs(labels.mean() - 0.5) < 0.04


def test_labels_are_correct_by_construction(examples):
    for example in examples:
        first, second = split(example)
        same_document = first[0] // 1000 == second[0] // 1000
        if example["next_sentence_label"] == 0:
            assert same_document and second[0] == first[-1] + 1
        else:
            assert not same_document


def test_layout_and_segment_ids(examples):
    for example in examples[:200]:
        ids, segments, real = (example["token_ids"], example["segment_ids"],
                               example["padding_mask"])
        length = real.sum()
        assert ids[0] == SPECIALS["cls"] and ids[length - 1] == SPECIALS["sep"]
        assert np.sum(ids[:length] == SPECIALS["sep"]) == 2
        assert np.all(ids[length:] == SPECIALS["pad"]) and not real[length:].any()
        # segment 0 runs through the first [sep], segment 1 after it.
        first_sep = int(np.argmax(ids == SPECIALS["sep"]))
        assert np.all(segments[:first_sep + 1] == 0) and np.all(segments[first_sep + 1:length] == 1)
        assert np.all(segments[length:] == 0)
        assert 1 <= len(split(example)[0]) <= 14 and 1 <= len(split(example)[1]) <= 14


def test_segments_and_pair_assembly():
    segments = document_segments(tf.range(10, 15), 2).numpy()
    assert segments.tolist() == [[10, 11], [12, 13], [14, -1]]
    pair = assemble_pair(tf.constant([7, 8]), tf.constant([9, -1]), SPECIALS, 8)
    assert pair["token_ids"].numpy().tolist() == [2, 7, 8, 3, 9, 3, 0, 0]
    assert pair["segment_ids"].numpy().tolist() == [0, 0, 0, 0, 1, 1, 0, 0]


def test_a_short_document_gives_a_pair_of_its_two_halves():
    # Documents of 2 to 21 tokens: shorter than two 14-token segments, so each is cut into
    # halves (the first half the longer), and each still yields one example.
    lengths = [2 + d % 20 for d in range(60)]
    documents = tf.data.Dataset.from_tensor_slices(tf.ragged.constant(
        [[1000 * (d + 1) + p for p in range(n)] for d, n in enumerate(lengths)]))
    examples = list(next_sentence_dataset(documents, SPECIALS, SEQ_LEN, seed=0)
                    .as_numpy_iterator())
    is_next = [split(e) for e in examples if e["next_sentence_label"] == 0]
    assert len(examples) > 20 and len(is_next) > 10
    for first, second in is_next:
        length = lengths[first[0] // 1000 - 1]
        whole = list(range(first[0], first[0] + length))
        assert first.tolist() + second.tolist() == whole
        assert len(first) == (length + 1) // 2


def test_too_short_sequence_is_refused():
    ds = tf.data.Dataset.from_tensor_slices(tf.ragged.constant([[7, 8, 9]]))
    with pytest.raises(ValueError, match="seq_len must be at least 5"):
        next_sentence_dataset(ds, SPECIALS, 4)


def test_pairs_are_redrawn_each_pass_only_when_asked():
    documents = tf.data.Dataset.from_tensor_slices(tf.ragged.constant(
        [[1000 * d + p for p in range(60)] for d in range(1, 30)]))

    def two_passes(redraw):
        ds = next_sentence_dataset(documents, SPECIALS, SEQ_LEN, seed=2, redraw_each_pass=redraw)
        return [[e["token_ids"].tolist() for e in ds.as_numpy_iterator()] for _ in range(2)]

    first, second = two_passes(True)
    assert first != second
    first, second = two_passes(False)
    assert first == second
