"""Masked-LM inputs in tf.data: BERT's 15% selection with 80/10/10 replacement.

Of the non-special tokens of a sequence, `round(mask_rate * n)` are selected for prediction
(Devlin et al., 2019); of those, 80% become `[MASK]`, 10% a random non-special token and 10%
stay as they are. Special tokens (pad, unk, cls, sep, mask, eos) are never selected.

Two ways to seed the choice:

- static: the seed is a hash of the sequence's content, so a sequence gets the same masks
  every time it is seen (BERT fixed its masks once, when it wrote its training data);
- dynamic: the seed comes from a `tf.data.Dataset.random` stream re-randomized each
  iteration, so masks change every time a sequence is seen (RoBERTa, Liu et al., 2019).

With `whole_word_masking`, the continuation pieces of a WordPiece word (ids whose token
starts with "##") are selected together with the word's first piece.

Every function works on token-id tensors and a `special_token_ids` dict, so it runs on
synthetic ids as well as on a tokenizer's output.

Example:

>>> import tensorflow as tf
>>> specials = dict(pad=0, unk=1, cls=2, sep=3, mask=4, eos=5)
>>> features = mask_tokens(tf.range(6, 46), tf.constant([0, 7], tf.int64), specials,
...                        vocabulary_size=100, max_predictions=6)
>>> int(tf.reduce_sum(features["mask_weights"]))
6
"""
import math

import tensorflow as tf

SPECIAL_ROLES = ("pad", "unk", "cls", "sep", "mask", "eos")
MASKING_MODES = ("static", "dynamic")
AUTOTUNE = tf.data.AUTOTUNE


def check_special_token_ids(special_token_ids):
    """Raises `ValueError` unless every special role has an id."""
    missing = [role for role in SPECIAL_ROLES if role not in special_token_ids]
    if missing:
        raise ValueError(f"special_token_ids lacks {', '.join(missing)}; expected keys "
                         f"{', '.join(SPECIAL_ROLES)}")


def special_token_mask(token_ids, special_token_ids):
    """Boolean tensor, True where `token_ids` holds a special token."""
    is_special = tf.zeros_like(token_ids, tf.bool)
    for token_id in set(special_token_ids.values()):
        is_special |= tf.equal(token_ids, token_id)
    return is_special


def max_predictions_for(seq_len, mask_rate):
    """The most positions one sequence of `seq_len` tokens can have selected."""
    return max(1, int(math.ceil(seq_len * mask_rate)))


def content_seed(token_ids, seed):
    """A stateless seed `[seed, hash(token_ids)]`: equal sequences get equal masks."""
    digest = tf.bitcast(tf.fingerprint(tf.cast(token_ids, tf.int32)[None])[0], tf.int64)
    return tf.stack([tf.constant(seed, tf.int64), digest])


def select_positions(token_ids, seed, special_token_ids, mask_rate=0.15, max_predictions=None,
                     word_starts=None):
    """Boolean mask of the positions chosen for prediction in one 1-D sequence.

    Exactly `min(max_predictions, max(1, round(mask_rate * candidates)))` positions when
    every word is one token; with `word_starts` (True on the first piece of each word),
    whole words are taken in random order while they fit in that budget.
    """
    length = tf.shape(token_ids)[0]
    candidates = tf.logical_not(special_token_mask(token_ids, special_token_ids))
    count = tf.reduce_sum(tf.cast(candidates, tf.int32))
    budget = tf.maximum(1, tf.cast(tf.round(mask_rate * tf.cast(count, tf.float32)), tf.int32))
    if max_predictions is not None:
        budget = tf.minimum(budget, max_predictions)
    budget = tf.minimum(budget, count)
    if word_starts is None:
        word_starts = tf.ones_like(candidates)
    # A special token always starts a new word, so words never span specials.
    word_starts = tf.logical_or(word_starts, tf.logical_not(candidates))
    word_index = tf.cumsum(tf.cast(word_starts, tf.int32)) - 1
    word_scores = tf.random.stateless_uniform([length], seed)
    token_scores = tf.where(candidates, tf.gather(word_scores, word_index), 2.0)
    # Tokens of one word share a score, so a stable sort keeps each word contiguous.
    order = tf.argsort(token_scores, stable=True)
    rank = tf.math.invert_permutation(order)
    last_rank_of_word = tf.gather(
        tf.math.unsorted_segment_max(rank, word_index, length), word_index)
    return tf.logical_and(candidates, last_rank_of_word < budget)


def mask_tokens(token_ids, seed, special_token_ids, vocabulary_size, mask_rate=0.15,
                max_predictions=None, word_starts=None):
    """Masked-LM features for one 1-D sequence.

    Returns a dict: `token_ids` (with replacements), `mask_positions`, `mask_ids` (the
    original tokens there) and `mask_weights` (1.0 on real predictions), the last three
    padded to `max_predictions` (default: `ceil(mask_rate * length)`).
    """
    token_ids = tf.convert_to_tensor(token_ids, tf.int32)
    if max_predictions is None:
        max_predictions = max_predictions_for(token_ids.shape[0], mask_rate)
    selection_seed, replacement_seed, random_token_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 3))
    selected = select_positions(token_ids, selection_seed, special_token_ids, mask_rate,
                                max_predictions, word_starts)
    length = tf.shape(token_ids)[0]
    draw = tf.random.stateless_uniform([length], replacement_seed)
    random_tokens = random_ordinary_tokens(length, random_token_seed, special_token_ids,
                                           vocabulary_size)
    replaced = tf.where(draw < 0.8, special_token_ids["mask"],
                        tf.where(draw < 0.9, random_tokens, token_ids))
    masked = tf.where(selected, replaced, token_ids)
    positions = tf.cast(tf.where(selected)[:, 0], tf.int32)
    padding = max_predictions - tf.shape(positions)[0]
    return {
        "token_ids": masked,
        "mask_positions": tf.ensure_shape(tf.pad(positions, [[0, padding]]), [max_predictions]),
        "mask_ids": tf.ensure_shape(tf.pad(tf.gather(token_ids, positions), [[0, padding]]),
                                    [max_predictions]),
        "mask_weights": tf.ensure_shape(
            tf.pad(tf.ones_like(positions, tf.float32), [[0, padding]]), [max_predictions]),
    }


def random_ordinary_tokens(length, seed, special_token_ids, vocabulary_size):
    """`length` ids drawn uniformly from the non-special part of the vocabulary."""
    specials = sorted(set(special_token_ids.values()))
    ordinary = tf.constant([i for i in range(vocabulary_size) if i not in specials], tf.int32)
    index = tf.random.stateless_uniform([length], seed, maxval=tf.shape(ordinary)[0],
                                        dtype=tf.int32)
    return tf.gather(ordinary, index)


def continuation_id_table(vocabulary):
    """Sorted ids of WordPiece continuation pieces ("##..."), for `word_starts_fn`."""
    return sorted(i for i, token in enumerate(vocabulary) if token.startswith("##"))


def word_starts_fn(continuation_ids):
    """A function `token_ids -> bool word starts` for whole-word masking."""
    continuation_ids = tf.constant(sorted(continuation_ids) or [-1], tf.int32)

    def word_starts(token_ids):
        index = tf.searchsorted(continuation_ids, token_ids[None])[0]
        index = tf.minimum(index, tf.shape(continuation_ids)[0] - 1)
        return tf.not_equal(tf.gather(continuation_ids, index), token_ids)

    return word_starts


def masked_lm_dataset(sequences, special_token_ids, vocabulary_size, masking="dynamic",
                      mask_rate=0.15, seed=0, max_predictions=None, continuation_ids=None):
    """Maps a dataset of feature dicts (with 1-D `token_ids`) to masked-LM examples.

    Every other feature (`segment_ids`, `padding_mask`, labels) passes through. Yields
    `(features, mask_ids, mask_weights)`, the triple Keras takes as `(x, y, sample_weight)`;
    `features` holds the masked `token_ids` and `mask_positions`.

    Args:
        sequences: dataset of dicts with a fixed-length `token_ids` entry.
        masking: "static" (same masks each time a sequence is seen) or "dynamic".
        continuation_ids: ids of "##" word pieces; when given, whole words are masked.
    """
    check_special_token_ids(special_token_ids)
    if masking not in MASKING_MODES:
        raise ValueError(f"masking must be one of {', '.join(MASKING_MODES)}; got {masking!r}")
    if not 0.0 < mask_rate < 1.0:
        raise ValueError(f"mask_rate must be in (0, 1); got {mask_rate!r}")
    seq_len = sequences.element_spec["token_ids"].shape[0]
    if max_predictions is None:
        max_predictions = max_predictions_for(seq_len, mask_rate)
    word_starts = word_starts_fn(continuation_ids) if continuation_ids is not None else None

    def apply(features, element_seed):
        features = dict(features)
        token_ids = features["token_ids"]
        masked = mask_tokens(token_ids, element_seed, special_token_ids, vocabulary_size,
                             mask_rate, max_predictions,
                             word_starts(token_ids) if word_starts else None)
        mask_ids, mask_weights = masked.pop("mask_ids"), masked.pop("mask_weights")
        features.update(masked)
        return features, mask_ids, mask_weights

    if masking == "static":
        return sequences.map(lambda f: apply(f, content_seed(f["token_ids"], seed)),
                             num_parallel_calls=AUTOTUNE, deterministic=True)
    element_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    return (tf.data.Dataset.zip(sequences, element_seeds)
            .map(lambda f, r: apply(f, tf.stack([tf.constant(seed, tf.int64), r])),
                 num_parallel_calls=AUTOTUNE, deterministic=True))


def wrap_blocks(blocks, special_token_ids, seq_len):
    """`[cls] block [sep]` feature dicts (`token_ids`, `padding_mask`) from token blocks.

    `blocks` holds 1-D blocks of at most `seq_len - 2` tokens; shorter ones are padded.
    """

    def wrap(block):
        block = tf.cast(block, tf.int32)[:seq_len - 2]
        ids = tf.concat([[special_token_ids["cls"]], block, [special_token_ids["sep"]]], 0)
        padding = seq_len - tf.shape(ids)[0]
        return {
            "token_ids": tf.ensure_shape(
                tf.pad(ids, [[0, padding]], constant_values=special_token_ids["pad"]),
                [seq_len]),
            "padding_mask": tf.ensure_shape(
                tf.pad(tf.ones_like(ids, tf.bool), [[0, padding]]), [seq_len]),
        }

    return blocks.map(wrap, num_parallel_calls=AUTOTUNE)
