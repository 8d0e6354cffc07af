"""Statistical checks of BERT-style masking: rate, 80/10/10 split, specials, static/dynamic."""
import numpy as np
import pytest
import tensorflow as tf

from keras_llm.data.masking import masked_lm_dataset, mask_tokens, wrap_blocks

SPECIALS = dict(pad=0, unk=1, cls=2, sep=3, mask=4, eos=5)
VOCABULARY_SIZE = 200


def synthetic_sequences(count=2000, length=64, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(6, VOCABULARY_SIZE, size=(count, length)).astype("int32")
    ids[:, 0], ids[:, -1], ids[:, length // 2] = 2, 3, 5  # cls, sep, an eos inside
    ids[:, -6:-1] = 0  # padding
    return ids


def run(ids, **options):
    ds = tf.data.Dataset.from_tensor_slices({"token_ids": ids})
    out = list(masked_lm_dataset(ds, SPECIALS, VOCABULARY_SIZE, **options).as_numpy_iterator())
    masked = np.stack([features["token_ids"] for features, _, _ in out])
    positions = np.stack([features["mask_positions"] for features, _, _ in out])
    labels = np.stack([mask_ids for _, mask_ids, _ in out])
    weights = np.stack([mask_weights for _, _, mask_weights in out])
    return masked, positions, labels, weights


@pytest.fixture(scope="module")
def dynamic_run():
    ids = synthetic_sequences()
    return ids, run(ids, masking="dynamic", seed=1)


def test_selection_rate_is_fifteen_percent(dynamic_run):
    ids, (_, _, _, weights) = dynamic_run
    candidates = (ids > 5).sum()
    assert abs(weights.sum() / candidates - 0.15) < 0.01


def test_replacement_split_is_80_10_10(dynamic_run):
    ids, (masked, positions, labels, weights) = dynamic_run
    rows = np.repeat(np.arange(len(ids)), positions.shape[1])[weights.ravel() > 0]
    cols = positions.ravel()[weights.ravel() > 0]
    chosen_before, chosen_after = ids[rows, cols], masked[rows, cols]
    assert np.array_equal(labels.ravel()[weights.ravel() > 0], chosen_before)
    as_mask = np.mean(chosen_after == SPECIALS["mask"])
    kept = np.mean(chosen_after == chosen_before)
    random = 1.0 - as_mask - kept
    assert abs(as_mask - 0.8) < 0.01
    # A random replacement equals the original 1 time in 194, so "kept" runs a hair high.
    assert abs(kept - 0.1) < 0.01 and abs(random - 0.1) < 0.01
    replaced_randomly = chosen_after[(chosen_after != chosen_before) & (chosen_after != 4)]
    assert np.all(replaced_randomly > 5)  # random tokens are never specials


def test_specials_are_never_selected_or_changed(dynamic_run):
    ids, (masked, positions, _, weights) = dynamic_run
    special = ids <= 5
    assert np.array_equal(masked[special], ids[special])
    rows = np.repeat(np.arange(len(ids)), positions.shape[1])[weights.ravel() > 0]
    assert not np.any(special[rows, positions.ravel()[weights.ravel() > 0]])
    # Outside the selected positions nothing changes.
    changed = masked != ids
    selected = np.zeros_like(changed)
    selected[rows, positions.ravel()[weights.ravel() > 0]] = True
    assert not np.any(changed & ~selected)


def test_dynamic_masks_differ_between_passes_static_ones_do_not():
    ids = synthetic_sequences(count=50)
    twice = np.concatenate([ids, ids])
    _, dynamic_positions, _, _ = run(twice, masking="dynamic", seed=3)
    _, static_positions, _, _ = run(twice, masking="static", seed=3)
    assert np.mean(np.all(dynamic_positions[:50] == dynamic_positions[50:], axis=1)) < 0.05
    assert np.array_equal(static_positions[:50], static_positions[50:])
    # Two separate iterations of one dataset: dynamic masks are redrawn too.
    ds = masked_lm_dataset(tf.data.Dataset.from_tensor_slices({"token_ids": ids}), SPECIALS,
                           VOCABULARY_SIZE, masking="dynamic", seed=3)
    first = [f["mask_positions"] for f, _, _ in ds.as_numpy_iterator()]
    second = [f["mask_positions"] for f, _, _ in ds.as_numpy_iterator()]
    assert not all(np.array_equal(a, b) for a, b in zip(first, second))


def test_whole_word_masking_selects_complete_words():
    ids = synthetic_sequences(count=300)
    continuation = set(range(100, VOCABULARY_SIZE))  # ids >= 100 play "##" pieces
    masked, positions, _, weights = run(ids, masking="static", seed=5,
                                        continuation_ids=sorted(continuation))
    selected = np.zeros_like(ids, bool)
    for row in range(len(ids)):
        selected[row, positions[row][weights[row] > 0]] = True
    is_continuation = np.isin(ids, list(continuation))
    # A continuation piece is selected exactly when the piece before it is.
    assert np.array_equal(selected[:, 1:][is_continuation[:, 1:]],
                          selected[:, :-1][is_continuation[:, 1:]])
    rate = weights.sum() / (ids > 5).sum()
    assert 0.10 < rate <= 0.15


def test_mask_tokens_is_deterministic_for_a_seed():
    ids = tf.range(6, 70)
    a = mask_tokens(ids, tf.constant([1, 2], tf.int64), SPECIALS, VOCABULARY_SIZE)
    b = mask_tokens(ids, tf.constant([1, 2], tf.int64), SPECIALS, VOCABULARY_SIZE)
    assert np.array_equal(a["token_ids"], b["token_ids"])
    assert int(tf.reduce_sum(a["mask_weights"])) == round(0.15 * 64)


def test_wrap_blocks_adds_cls_sep_and_padding():
    blocks = tf.data.Dataset.from_tensor_slices(tf.ragged.constant([[7, 8, 9], [10, 11]]))
    out = list(wrap_blocks(blocks, SPECIALS, 6).as_numpy_iterator())
    assert out[1]["token_ids"].tolist() == [2, 10, 11, 3, 0, 0]
    assert out[1]["padding_mask"].tolist() == [True, True, True, True, False, False]


def test_bad_arguments_raise_one_line_errors():
    ds = tf.data.Dataset.from_tensor_slices({"token_ids": synthetic_sequences(count=2)})
    with pytest.raises(ValueError, match="masking must be one of"):
        masked_lm_dataset(ds, SPECIALS, VOCABULARY_SIZE, masking="sometimes")
    with pytest.raises(ValueError, match="lacks mask"):
        masked_lm_dataset(ds, {k: v for k, v in SPECIALS.items() if k != "mask"}, 10)
