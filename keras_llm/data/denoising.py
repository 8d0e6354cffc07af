"""Seq2seq denoising in tf.data: BART-style text infilling (Lewis et al., 2020, section 2.2).

Spans with Poisson(3) lengths cover about 30% of the tokens; each span is replaced by a
single `[mask]` token, so the model must also tell how many tokens are missing. The encoder
reads the corrupted text, the decoder rebuilds the original.

Why text infilling and not T5's span corruption: it needs only the `[mask]` token every
tokenizer here already has (span corruption needs a hundred sentinel ids in the vocabulary),
and its target, the whole original block, makes the decoder a full language model, so the
same `Seq2SeqLM` generates text after pretraining. The price is a longer target than T5's
(which holds only the dropped spans). BART's other noise (sentence permutation) is left out.

Example:

>>> import tensorflow as tf
>>> specials = dict(pad=0, unk=1, cls=2, sep=3, mask=4, eos=5)
>>> corrupted = infill_spans(tf.range(10, 60), tf.constant([0, 3], tf.int64), specials)
>>> bool(tf.shape(corrupted)[0] < 50)
True
"""
import math

import tensorflow as tf

from keras_llm.data.masking import special_token_mask

AUTOTUNE = tf.data.AUTOTUNE
DECODER_START_ROLE = "cls"  # the decoder's first input token ("[CLS]" doubles as BOS)


def noise_mask(token_ids, seed, special_token_ids, noise_density=0.3, mean_span_length=3.0,
               max_span_length=10):
    """Boolean mask of the tokens inside noise spans (special tokens are never noise).

    A span starts at each token with probability `-log(1 - noise_density) / mean_span_length`
    and runs for `clip(Poisson(mean_span_length), 1, max_span_length)` tokens; spans overlap
    as a Poisson process would, so about `noise_density` of the tokens end up covered.
    """
    length = tf.shape(token_ids)[0]
    start_seed, length_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    start_probability = -math.log(1.0 - noise_density) / mean_span_length
    starts = tf.random.stateless_uniform([length], start_seed) < start_probability
    span_lengths = tf.clip_by_value(
        tf.random.stateless_poisson([length], length_seed, mean_span_length, tf.int32),
        1, max_span_length)
    covered = tf.zeros([length], tf.bool)
    for offset in range(max_span_length):
        # Token j is covered when a span started at j - offset and runs past it.
        reaches = tf.logical_and(starts, span_lengths > offset)
        covered |= tf.pad(reaches, [[offset, 0]])[:length]
    return tf.logical_and(covered, tf.logical_not(special_token_mask(token_ids,
                                                                     special_token_ids)))


def infill_spans(token_ids, seed, special_token_ids, noise_density=0.3, mean_span_length=3.0):
    """The corrupted 1-D sequence: each noise span collapsed into one `[mask]` token."""
    token_ids = tf.cast(token_ids, tf.int32)
    noise = noise_mask(token_ids, seed, special_token_ids, noise_density, mean_span_length)
    previous = tf.pad(noise, [[1, 0]])[:-1]
    span_start = tf.logical_and(noise, tf.logical_not(previous))
    replaced = tf.where(span_start, special_token_ids["mask"], token_ids)
    return tf.boolean_mask(replaced, tf.logical_or(tf.logical_not(noise), span_start))


def _pad_to(ids, length, pad_id):
    ids = ids[:length]
    padding = length - tf.shape(ids)[0]
    return (tf.ensure_shape(tf.pad(ids, [[0, padding]], constant_values=pad_id), [length]),
            tf.ensure_shape(tf.pad(tf.ones_like(ids, tf.bool), [[0, padding]]), [length]))


def denoising_example(block, seed, special_token_ids, seq_len, noise_density=0.3,
                      mean_span_length=3.0):
    """`(features, targets, weights)` for one block of at most `seq_len - 1` tokens.

    Encoder: corrupted block + `[eos]`. Decoder input: `[cls]` + block (teacher forcing).
    Targets: block + `[eos]`. Weights: 1.0 on real target tokens, 0.0 on padding.
    """
    pad, eos = special_token_ids["pad"], special_token_ids["eos"]
    block = tf.cast(block, tf.int32)[:seq_len - 1]
    corrupted = infill_spans(block, seed, special_token_ids, noise_density, mean_span_length)
    encoder_ids, encoder_mask = _pad_to(tf.concat([corrupted, [eos]], 0), seq_len, pad)
    start = special_token_ids[DECODER_START_ROLE]
    decoder_ids, decoder_mask = _pad_to(tf.concat([[start], block], 0), seq_len, pad)
    targets, _ = _pad_to(tf.concat([block, [eos]], 0), seq_len, pad)
    features = {"encoder_token_ids": encoder_ids, "encoder_padding_mask": encoder_mask,
                "decoder_token_ids": decoder_ids, "decoder_padding_mask": decoder_mask}
    return features, targets, tf.cast(decoder_mask, tf.float32)


def denoising_dataset(blocks, special_token_ids, seq_len, noise_density=0.3,
                      mean_span_length=3.0, seed=0):
    """Maps a dataset of 1-D token blocks to `(features, targets, weights)` examples.

    The noise is redrawn every time a block is seen (dynamic, like RoBERTa's masks).
    """
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1); got {noise_density!r}")
    if mean_span_length < 1.0:
        raise ValueError(f"mean_span_length must be >= 1; got {mean_span_length!r}")
    element_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    return tf.data.Dataset.zip(blocks, element_seeds).map(
        lambda block, r: denoising_example(
            block, tf.stack([tf.constant(seed, tf.int64), r]), special_token_ids, seq_len,
            noise_density, mean_span_length),
        num_parallel_calls=AUTOTUNE, deterministic=True)
