"""Next-sentence-prediction pairs in tf.data (Devlin et al., 2019, section 3.1).

Each document is cut into segments of `(seq_len - 3) // 2` tokens (the "sentences"; a
tokenizer-independent stand-in for sentence splitting); a document shorter than two such
segments is cut into two halves instead, so that short texts (a headline, a question) still
give a pair and their tokens still reach the masked LM. Every pair of consecutive segments
`(A, B)` of one document becomes an example; with probability 1/2, B is swapped for a
segment of another document. The example is `[cls] A [sep] B [sep]`, padded to `seq_len`,
with segment ids 0 on `[cls] A [sep]` and 1 on `B [sep]`.

Labels follow BERT: 0 = B is the next segment (is-next), 1 = B is random (not-next). A
random segment that happens to come from A's own document is dropped rather than
mislabeled, so every label is correct by construction.

Example:

>>> import tensorflow as tf
>>> specials = dict(pad=0, unk=1, cls=2, sep=3, mask=4, eos=5)
>>> documents = tf.data.Dataset.from_tensor_slices(tf.ragged.constant(
...     [list(range(10, 30)), list(range(40, 60)), list(range(70, 90))]))
>>> example = next(iter(next_sentence_dataset(documents, specials, seq_len=13, seed=1)))
>>> sorted(example)
['next_sentence_label', 'padding_mask', 'segment_ids', 'token_ids']
"""
import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE
IS_NEXT, NOT_NEXT = 0, 1


def segment_length_for(seq_len):
    """Longest segment of a `[cls] first [sep] second [sep]` pair of `seq_len` tokens."""
    segment_length = (seq_len - 3) // 2
    if segment_length < 1:
        raise ValueError(f"seq_len must be at least 5 for sentence pairs; got {seq_len}")
    return segment_length


def pair_count(document_lengths, seq_len):
    """Segment pairs in documents of these token counts: `next_sentence_dataset`'s examples
    in one pass before it drops the not-next draws that hit their own document (a few in a
    thousand with a 1024-segment shuffle buffer; the number differs from pass to pass)."""
    segment_length = segment_length_for(seq_len)
    lengths = np.asarray(document_lengths, np.int64)
    per_segment = np.clip((lengths + 1) // 2, 1, segment_length)  # halves when short
    segments = -(-lengths // per_segment)
    return int(np.maximum(segments - 1, 0).sum())


def document_segments(token_ids, segment_length):
    """`(n, segment_length)` segments of one document, the last padded with -1."""
    token_ids = tf.cast(token_ids, tf.int32)
    count = (tf.shape(token_ids)[0] + segment_length - 1) // segment_length
    padded = tf.pad(token_ids, [[0, count * segment_length - tf.shape(token_ids)[0]]],
                    constant_values=-1)
    return tf.reshape(padded, [count, segment_length])


def assemble_pair(first, second, special_token_ids, seq_len):
    """`token_ids`, `segment_ids`, `padding_mask` of `[cls] first [sep] second [sep]`.

    `first` and `second` are -1-padded segments; the -1s are dropped before padding.
    """
    cls, sep = special_token_ids["cls"], special_token_ids["sep"]
    ids = tf.concat([[cls], first, [sep], second, [sep]], axis=0)
    segments = tf.concat([tf.zeros_like(first, tf.int32), [0, 0],
                          tf.ones_like(second, tf.int32), [1]], axis=0)
    keep = tf.not_equal(ids, -1)
    ids, segments = tf.boolean_mask(ids, keep), tf.boolean_mask(segments, keep)
    padding = seq_len - tf.shape(ids)[0]
    return {
        "token_ids": tf.ensure_shape(
            tf.pad(ids, [[0, padding]], constant_values=special_token_ids["pad"]), [seq_len]),
        "segment_ids": tf.ensure_shape(tf.pad(segments, [[0, padding]]), [seq_len]),
        "padding_mask": tf.ensure_shape(
            tf.pad(tf.ones_like(ids, tf.bool), [[0, padding]]), [seq_len]),
    }


def next_sentence_dataset(documents, special_token_ids, seq_len, seed=0, shuffle_buffer=1024,
                          redraw_each_pass=True):
    """Sentence-pair examples with `next_sentence_label`, balanced between the two labels.

    Args:
        documents: dataset of 1-D token-id tensors, one per document (no specials added).
        special_token_ids: dict with at least `cls`, `sep` and `pad`.
        seq_len: length of every example.
        seed: seed of the pairing.
        shuffle_buffer: segments the random (not-next) segment is drawn from.
        redraw_each_pass: new pairs every pass over the data (training) or the same pairs
            every pass (evaluation).
    """
    segment_length = segment_length_for(seq_len)

    def segment(index, ids):
        # Halves for a document shorter than two segments; -1-padded to one width.
        length = tf.clip_by_value((tf.shape(ids)[0] + 1) // 2, 1, segment_length)
        segments = document_segments(ids, length)
        segments = tf.pad(segments, [[0, 0], [0, segment_length - length]], constant_values=-1)
        return index, tf.ensure_shape(segments, [None, segment_length])

    segmented = documents.enumerate().map(segment, num_parallel_calls=AUTOTUNE,
                                          deterministic=True)

    def consecutive_pairs(index, segments):
        count = tf.maximum(tf.shape(segments)[0] - 1, 0)
        return tf.data.Dataset.from_tensor_slices(
            (tf.fill([count], index), segments[:-1][:count], segments[1:]))

    def single_segments(index, segments):
        return tf.data.Dataset.from_tensor_slices(
            (tf.fill([tf.shape(segments)[0]], index), segments))

    pairs = segmented.flat_map(consecutive_pairs)
    random_segments = (segmented.flat_map(single_segments).repeat()
                       .shuffle(shuffle_buffer, seed=seed,
                                reshuffle_each_iteration=redraw_each_pass))
    coins = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=redraw_each_pass)
    examples = tf.data.Dataset.zip(pairs, random_segments, coins)

    def keep(pair, random_segment, coin):
        is_random = tf.equal(coin % 2, NOT_NEXT)
        return tf.logical_not(tf.logical_and(is_random, tf.equal(pair[0], random_segment[0])))

    def build(pair, random_segment, coin):
        label = tf.cast(coin % 2, tf.int32)
        second = tf.where(tf.equal(label, NOT_NEXT), random_segment[1], pair[2])
        features = assemble_pair(pair[1], second, special_token_ids, seq_len)
        features["next_sentence_label"] = label
        return features

    return examples.filter(keep).map(build, num_parallel_calls=AUTOTUNE, deterministic=True)
