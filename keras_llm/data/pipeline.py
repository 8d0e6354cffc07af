"""tf.data pipelines: split, tokenize in the graph, pack into fixed-length blocks, batch.

Packing concatenates documents with an end-of-document token between them and cuts the
stream into blocks, so no position is wasted on padding (the GPT-2 / nanoGPT recipe). Every
stage is a native tf.data transformation, so iterators can be checkpointed and the pipeline
runs in parallel with training.

Example:

>>> import tensorflow as tf
>>> chunks = tf.data.Dataset.from_tensor_slices(tf.ragged.constant([[1, 2, 3], [4, 5, 6, 7]]))
>>> [b.tolist() for b in pack_tokens(chunks, 3).as_numpy_iterator()]
[[1, 2, 3], [4, 5, 6]]
"""
import math

import numpy as np
import tensorflow as tf

TOKENIZE_BATCH = 64
AUTOTUNE = tf.data.AUTOTUNE


def as_dataset(documents):
    """A dataset of document strings from a list of strings or a dataset."""
    if isinstance(documents, tf.data.Dataset):
        return documents
    return tf.data.Dataset.from_tensor_slices(tf.constant(list(documents), tf.string))


def split_documents(documents, validation_fraction, seed=0):
    """(train, validation) datasets, split by a keyed hash of each document's text.

    Hashing the content (not the position) makes the split independent of order and puts
    duplicate documents on the same side, so validation never contains a training document.
    """
    buckets = 10_000
    threshold = int(round(validation_fraction * buckets))
    documents = as_dataset(documents)

    def is_validation(text):
        return tf.strings.to_hash_bucket_strong(text, buckets, key=[seed, 7]) < threshold

    return (documents.filter(lambda t: tf.logical_not(is_validation(t))),
            documents.filter(is_validation))


def tokenized_documents(documents, tokenizer, eos_id):
    """One int32 vector per document, tokenized in the graph, with EOS appended."""

    def tokenize(texts):
        ids = tf.cast(tokenizer.tokenize(texts), tf.int32)
        eos = tf.fill([tf.shape(texts)[0], 1], tf.constant(eos_id, tf.int32))
        return tf.concat([ids, eos], axis=1)

    return (as_dataset(documents).batch(TOKENIZE_BATCH)
            .map(tokenize, num_parallel_calls=AUTOTUNE, deterministic=True)
            .unbatch())


def document_lengths(documents, tokenizer):
    """Tokens in each document (no EOS), as an int64 array: one tokenization pass, no more."""

    def lengths(texts):
        return tf.cast(tokenizer.tokenize(texts).row_lengths(), tf.int64)

    batches = (as_dataset(documents).batch(TOKENIZE_BATCH)
               .map(lengths, num_parallel_calls=AUTOTUNE, deterministic=True))
    return np.concatenate([np.zeros([0], np.int64), *batches.as_numpy_iterator()])


def token_chunks(documents, tokenizer, eos_id):
    """1-D int32 token streams, one per batch of documents, each document followed by EOS."""
    return to_chunks(tokenized_documents(documents, tokenizer, eos_id))


def to_chunks(token_documents):
    return token_documents.ragged_batch(TOKENIZE_BATCH).map(lambda ids: ids.flat_values)


def pack_tokens(chunks, block_length):
    """Cuts a stream of 1-D token tensors into [block_length] blocks, carrying the remainder."""

    def cut(carry, chunk):
        tokens = tf.concat([carry, tf.cast(chunk, tf.int32)], axis=0)
        count = tf.shape(tokens)[0] // block_length
        blocks = tf.reshape(tokens[:count * block_length], [count, block_length])
        return tokens[count * block_length:], blocks

    initial = tf.zeros([0], tf.int32)
    return chunks.scan(initial, cut).unbatch()


def pack_documents(documents, tokenizer, block_length, eos_id=None):
    """Blocks of `block_length` tokens from a dataset (or list) of document strings."""
    if eos_id is None:
        eos_id = tokenizer.special_token_ids()["eos"]
    return pack_tokens(token_chunks(as_dataset(documents), tokenizer, eos_id), block_length)


def causal_lm_dataset(documents, tokenizer, seq_len, batch_size, seed=0, shuffle_buffer=2048,
                      shuffle=True, repeat=True):
    """Batches of (inputs, next-token targets), each [batch_size, seq_len].

    Documents are tokenized once and their ids cached in memory, so later passes cost no
    tokenization. Training (shuffle, repeat): documents are shuffled each pass, packed across
    pass boundaries, and the blocks shuffled again. Evaluation (neither): a fixed sequence.
    """
    eos_id = tokenizer.special_token_ids()["eos"]
    token_documents = tokenized_documents(documents, tokenizer, eos_id).cache()
    if shuffle:
        token_documents = token_documents.shuffle(shuffle_buffer, seed=seed,
                                                  reshuffle_each_iteration=True)
    if repeat:
        token_documents = token_documents.repeat()
    blocks = pack_tokens(to_chunks(token_documents), seq_len + 1)
    if shuffle:
        blocks = blocks.shuffle(max(1, shuffle_buffer // 4), seed=seed + 1)
    # Split whole batches into (inputs, targets): one map call per batch, not per block.
    batches = blocks.batch(batch_size, drop_remainder=True)
    return batches.map(lambda ids: (ids[:, :-1], ids[:, 1:]),
                       num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)


def token_counts(documents, tokenizer, vocabulary_size):
    """How often each token id occurs in the packed stream (EOS included)."""
    eos_id = tokenizer.special_token_ids()["eos"]
    counts = np.zeros(vocabulary_size, np.int64)
    for chunk in token_chunks(as_dataset(documents), tokenizer, eos_id).as_numpy_iterator():
        counts += np.bincount(chunk, minlength=vocabulary_size)[:vocabulary_size]
    return counts


def unigram_baseline(train_documents, validation_documents, tokenizer, train_counts=None):
    """Validation perplexity of the add-one smoothed unigram model of the training tokens.

    The floor any language model must beat: it knows token frequencies and nothing else.
    `train_counts` (from `token_counts`) saves tokenizing the training documents again.
    """
    size = tokenizer.vocabulary_size()
    train = (train_counts if train_counts is not None
             else token_counts(train_documents, tokenizer, size))
    validation = token_counts(validation_documents, tokenizer, size)
    log_probabilities = np.log((train + 1) / (train.sum() + size))
    cross_entropy = -float((validation * log_probabilities).sum() / max(1, validation.sum()))
    return {"perplexity": math.exp(cross_entropy), "cross_entropy": cross_entropy,
            "validation_tokens": int(validation.sum()), "train_tokens": int(train.sum())}
