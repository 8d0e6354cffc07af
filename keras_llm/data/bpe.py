r"""Byte-level BPE that looks words up before it merges: keras-hub's `BytePairTokenizer` with
GPT-2's pre-tokenizer computed from character classes and a table of known words.

keras-hub's layer cuts text into words with four regex passes and runs the BPE merge loop,
a `tf.while_loop` over string tensors, on every word its cache has not seen; its first pass
over a corpus runs at a quarter of HuggingFace `tokenizers`' speed. Here:

- `pretokenize` cuts text as GPT-2's pattern (the one HuggingFace's byte-level
  pre-tokenizer uses, and with it the vocabulary's training) without a regex: each
  character gets a class (letter, number, whitespace, other) from a table, and word starts
  follow from the classes of neighbours, a few vectorized ops per batch;
- the words of the tokenizer's own training text (`keras_llm.data.tokenizers` builds the
  table when it trains the vocabulary) are looked up in a static hash table;
- only words missing from the table are merged: in tf.data by HuggingFace `tokenizers`
  through `tf.py_function` (`tokenize_for_tf_data`), in SavedModels by keras-hub's loop
  (`tokenize`).

The ids equal HuggingFace `tokenizers`' encoding with the same vocabulary and merges (the
tests compare them on real and on randomly generated text). keras-hub's own pre-tokenizer
departs from GPT-2's on runs of mixed whitespace (it keeps " \n" whole) and on Unicode
spaces beyond four, so there the ids differ from keras-hub's. Text that is not valid UTF-8
is read with U+FFFD in place of the bad bytes.
"""
import functools
import sys
import unicodedata

import keras_hub
import numpy as np
import tensorflow as tf

LETTER, NUMBER, WHITESPACE, OTHER = 0, 1, 2, 3
# Unicode's White_Space characters: `\s` in the pattern as HuggingFace's regex engine reads it.
WHITE_SPACE = [0x9, 0xA, 0xB, 0xC, 0xD, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
               0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
# GPT-2's contractions: 's 't 'm 'd (one letter after the apostrophe), 're 've 'll (two).
ONE_LETTER = "stmd"
TWO_LETTERS = ("re", "ve", "ll")


@functools.lru_cache(maxsize=None)
def character_classes():
    r"""int8[0x110000]: the class of every code point (`\p{L}`, `\p{N}`, `\s`, other)."""
    table = np.full(sys.maxunicode + 1, OTHER, np.int8)
    for code_point in range(sys.maxunicode + 1):
        category = unicodedata.category(chr(code_point))[0]
        if category == "L":
            table[code_point] = LETTER
        elif category == "N":
            table[code_point] = NUMBER
    table[WHITE_SPACE] = WHITESPACE
    return table


BLOCK = 256  # code points per block of the two-level class table


@functools.lru_cache(maxsize=None)
def _class_tables():
    """The class table as (offsets, blocks): the classes of code point `c` are
    `blocks[offsets[c // BLOCK] + c % BLOCK]`. Unicode has 124 distinct 256-code-point
    blocks of classes, so the two tables hold 50 KB where the flat one holds 1.1 MB, a
    constant every trace of a tf.data function would copy and every instantiation load."""
    table = character_classes().reshape(-1, BLOCK)
    blocks, index = np.unique(table, axis=0, return_inverse=True)
    with tf.init_scope():  # eager constants that every trace captures
        return (tf.constant(index.reshape(-1).astype(np.int32) * BLOCK),
                tf.constant(blocks.reshape(-1)))


def classes_of(code_points):
    """int8 classes of an int32 tensor of code points."""
    offsets, blocks = _class_tables()
    block = tf.bitwise.right_shift(code_points, BLOCK.bit_length() - 1)
    return tf.gather(blocks, tf.gather(offsets, block)
                     + tf.bitwise.bitwise_and(code_points, BLOCK - 1))


# Graph code written for the graph: tf.data and `tf.function` would otherwise run it through
# AutoGraph, which converts every Python loop and `len` it meets (building the word table
# that way took two seconds a load).
plain_python = tf.autograph.experimental.do_not_convert


def _next(x, fill):
    """x[i + 1], `fill` past the end."""
    return tf.concat([x, [fill]], axis=0)[1:]


def _previous(x, fill):
    """x[i - 1], `fill` before the start."""
    return tf.concat([[fill], x], axis=0)[:-1]


def _positions(mask):
    """int64 positions where `mask` is True (fewer ops than `tf.boolean_mask`)."""
    return tf.reshape(tf.where(mask), [-1])


@plain_python
def pretokenize(texts):
    r"""string[batch] -> RaggedTensor[batch, words]: GPT-2's pre-tokens,
    `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.

    A word starts where the character class changes, with three exceptions the pattern
    makes: a whitespace run followed by a word gives that word its last character (a
    space joins the word, any other character stands alone); an apostrophe that starts a
    word and begins a contraction takes its one or two letters; the rest of those letters
    start the next word.

    The graph is kept small (no validating ragged constructors, no `tf.boolean_mask`):
    every tf.data pipeline traces and instantiates it anew, and at a few hundred ops that
    fixed cost is a sizeable part of a pass over a small corpus.

    >>> pretokenize(tf.constant(["it's  a\n\nb "])).to_list()
    [[b'it', b"'s", b' ', b' a', b'\n', b'\n', b'b', b' ']]
    """
    chars = tf.strings.unicode_decode(texts, "UTF-8", errors="replace")
    c, splits = chars.flat_values, chars.row_splits
    size = tf.shape(c, out_type=tf.int64)[0]
    # Texts start and end at row splits: mark them all once, then read `first` at i and
    # `last` at i + 1 (empty texts only repeat a split).
    at_split = tf.scatter_nd(splits[:, None], tf.ones_like(splits, tf.int8), [size + 1]) > 0
    first, last = at_split[:-1], at_split[1:]
    kind = classes_of(c)
    run_start = first | tf.not_equal(kind, _previous(kind, -1))
    run_end = last | tf.not_equal(kind, _next(kind, -1))
    # The last character of a whitespace run that a word follows starts a word of its own,
    # and a space there takes the following word's start.
    handed_over = tf.equal(kind, WHITESPACE) & run_end & ~last
    joins = handed_over & tf.equal(c, ord(" "))
    start = (run_start | handed_over) & ~_previous(joins, False)
    # Contractions, at the (few) apostrophes that start a word and are not last.
    at = _positions(start & tf.equal(c, ord("'")) & ~last)
    c1 = tf.gather(c, at + 1)
    c2 = tf.gather(c, tf.minimum(at + 2, size - 1))
    has_c2 = ~tf.gather(last, at + 1)
    two = tf.zeros_like(has_c2)
    for a, b in TWO_LETTERS:
        two |= tf.equal(c1, ord(a)) & tf.equal(c2, ord(b)) & has_c2
    one = tf.reduce_any(tf.equal(c1[:, None], [ord(x) for x in ONE_LETTER]), axis=1)
    length = tf.where(one, tf.constant(2, tf.int64), tf.where(two, tf.constant(3, tf.int64), 0))
    kept = _positions(length > 0)
    at, length = tf.gather(at, kept), tf.gather(length, kept)
    # The letters' own run no longer starts after the apostrophe; the rest of it starts
    # after the contraction (past the end of its text that is the next text's start
    # anyway, so one extra slot takes the write past the last text).
    start = tf.tensor_scatter_nd_update(
        tf.concat([start, [False]], axis=0),
        tf.concat([at + 1, at + length], axis=0)[:, None],
        tf.concat([tf.zeros_like(at, tf.bool), tf.ones_like(at, tf.bool)], axis=0))[:-1]
    word_starts = _positions(start)
    words = tf.strings.unicode_encode(
        tf.RaggedTensor.from_row_starts(c, word_starts, validate=False), "UTF-8")
    # Text k's words are those starting before splits[k + 1] and not before splits[k].
    return tf.RaggedTensor.from_row_splits(
        words, tf.searchsorted(word_starts, splits, side="left"), validate=False)


class WordTableBytePairTokenizer(keras_hub.tokenizers.BytePairTokenizer):
    """keras-hub's `BytePairTokenizer` (integer ids) with GPT-2's pre-tokenizer and a table
    of known words. Tokenizes in the graph (tf.data, `tf.function`, SavedModels); an eager
    call runs the same graph and returns a `tf.RaggedTensor`.

    Args:
        vocabulary: {token: id}, as keras-hub's layer takes it.
        merges: merge rules, as keras-hub's layer takes them.
        word_table: `(words, ids)`: words as `pretokenize` cuts them and the token ids of
            each; the table may be empty.

    Example:

    >>> vocabulary = {"a": 0, "b": 1, "ab": 2, "\u0120": 3, "\u0120ab": 4}
    >>> layer = WordTableBytePairTokenizer(vocabulary, ["a b", "\u0120 ab"],
    ...                                    word_table=(["ab"], [[2]]))
    >>> layer.tokenize(["ab ab ba"]).to_list()
    [[2, 4, 3, 1, 0]]
    """

    def __init__(self, vocabulary=None, merges=None, word_table=((), ()), **kwargs):
        super().__init__(vocabulary=vocabulary, merges=merges, **kwargs)
        if self.sequence_length or self.add_prefix_space or self.unsplittable_tokens:
            raise ValueError("WordTableBytePairTokenizer takes no sequence_length, "
                             "add_prefix_space or unsplittable_tokens")
        # Arrays, not lists: a keras layer wraps list attributes in tracked lists, element
        # by element (a second per load of a 131k-word table).
        words, ids = word_table
        self._table_words = np.asarray(list(words), dtype=object)
        self._table_ids = np.fromiter((i for row in ids for i in row), np.int32)
        self._table_lengths = np.fromiter((len(row) for row in ids), np.int64, len(ids))
        self._word_index = None
        self._eager = None
        self._python_encoder = None

    @property
    def word_table(self):
        """`(words, ids)`: lists, as the constructor takes them."""
        ends = np.cumsum(self._table_lengths)
        return (self._table_words.tolist(),
                [row.tolist() for row in np.split(self._table_ids, ends[:-1])] if len(ends)
                else [])

    @plain_python
    def _maybe_initialized_tf(self):
        # Outside any trace (`init_scope`): the tables are built once, eagerly, and every
        # later trace (each tf.data map, a SavedModel signature) captures the same ones.
        with tf.init_scope():
            super()._maybe_initialized_tf()
            if self._word_index is None:
                self._word_ids = tf.RaggedTensor.from_row_lengths(
                    tf.constant(self._table_ids), tf.constant(self._table_lengths))
                self._word_index = tf.lookup.StaticHashTable(
                    tf.lookup.KeyValueTensorInitializer(
                        tf.constant(self._table_words, tf.string),
                        tf.range(len(self._table_words), dtype=tf.int64)),
                    default_value=-1)

    @plain_python
    def _merge_in_graph(self, words):
        """Ids of whole words by keras-hub's merge loop (through its cache), not re-split."""
        cached = self.cache.lookup(words)
        unseen = tf.equal(cached, "")

        def merge_unseen():
            self._bpe_merge_and_update_cache_tf(tf.boolean_mask(words, unseen))
            return self.cache.lookup(words)

        merged = tf.cond(tf.reduce_any(unseen), merge_unseen, lambda: cached)
        tokens = tf.strings.split(merged, sep=" ")
        return tf.cast(self.token_to_id_map.lookup(tokens), tf.int32)

    @plain_python
    def _merge_in_python(self, words):
        """Ids of whole words by HuggingFace `tokenizers` through `tf.py_function`."""
        if self._python_encoder is None:
            from tokenizers import ByteLevelBPETokenizer

            merges = [tuple(merge.split(" ")) for merge in self.merges]
            self._python_encoder = ByteLevelBPETokenizer(dict(self.vocabulary), merges)

        def encode(words):
            encodings = self._python_encoder.encode_batch(
                [word.decode("utf-8") for word in words.numpy()])
            ids = [i for encoding in encodings for i in encoding.ids]
            return (np.asarray(ids, np.int32),
                    np.asarray([len(encoding.ids) for encoding in encodings], np.int64))

        def call_python():
            ids, lengths = tf.py_function(encode, [words], [tf.int32, tf.int64])
            return tf.ensure_shape(ids, [None]), tf.ensure_shape(lengths, [None])

        # Most batches of a training corpus hold no unknown word: no Python call then.
        ids, lengths = tf.cond(tf.size(words) > 0, call_python,
                               lambda: (tf.zeros([0], tf.int32), tf.zeros([0], tf.int64)))
        return tf.RaggedTensor.from_row_lengths(ids, lengths, validate=False)

    def tokenize(self, inputs):
        """Ids of a batch of strings, entirely in the graph (what SavedModels hold)."""
        return self._tokenize(inputs, self._merge_in_graph)

    def tokenize_for_tf_data(self, inputs):
        """The same ids; unknown words are merged by HuggingFace `tokenizers` in Python.

        keras-hub's merge loop is a `tf.while_loop`, and a tf.data map function that holds
        one runs every op in it about twice as slowly, known words or not; with the loop
        out of the graph the first pass over a corpus runs at table-lookup speed. A graph
        with `tf.py_function` cannot be exported, so SavedModels use `tokenize`.
        """
        return self._tokenize(inputs, self._merge_in_python)

    @plain_python
    def _tokenize(self, inputs, merge):
        inputs = tf.convert_to_tensor(inputs, tf.string)
        if inputs.shape.rank == 0:
            return self._tokenize(inputs[None], merge)[0]
        if not tf.inside_function():
            # Eager calls run the same graph (keras-hub's eager path pre-tokenizes its own
            # way).
            if self._eager is None:
                self._eager = tf.function(
                    lambda texts: self._tokenize(texts, self._merge_in_python),
                    input_signature=[tf.TensorSpec([None], tf.string)])
            return self._eager(inputs)
        self._check_vocabulary()
        self._maybe_initialized_tf()
        words = pretokenize(inputs)
        flat = words.flat_values
        index = self._word_index.lookup(flat)
        unknown = index < 0
        # Rows of the table, then the unknown words' rows in order; one gather picks each
        # word's row.
        rows = tf.concat([self._word_ids, merge(tf.boolean_mask(flat, unknown))], axis=0)
        index = tf.where(unknown, self._word_ids.nrows() + tf.cumsum(tf.cast(unknown, tf.int64))
                         - 1, index)
        ids = tf.gather(rows, index)
        ids = tf.RaggedTensor.from_row_splits(ids.flat_values,
                                              tf.gather(ids.row_splits, words.row_splits),
                                              validate=False)
        return tf.cast(ids, self.compute_dtype)
