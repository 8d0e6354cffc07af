"""Byte-level BPE: GPT-2's pre-tokenizer without a regex, the word table, and ids equal to
HuggingFace `tokenizers` on every path (graph merge, tf.data, eager)."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from tokenizers import ByteLevelBPETokenizer, pre_tokenizers

from keras_llm.data.bpe import WordTableBytePairTokenizer, pretokenize
from keras_llm.data.corpus import builtin_records
from keras_llm.data.tokenizers import WORD_TABLE_FILE, load_tokenizer, train_tokenizer
from keras_llm.errors import DataError

# Every rule of the pattern: contractions (and near misses), a space before letters,
# numbers and punctuation, whitespace runs before words and at the end, Unicode spaces,
# letters and numbers outside ASCII, combining marks, emoji.
EDGE_CASES = [
    "", " ", "  ", "a  b", "a \nb", "a\n\nb ", "it's I'll 'S we're they've 'd", "end   ",
    "x'sy", "''s", "a 's", "\n's", "'ll", "'l", "1's", "'", "'r", "x\u00a0y", "x \u00a0 y",
    "x\u3000\u3000y  ", "tab\t x", "\r\n\r\nline", "weird\u2009 thin \u2003em", "\x85\x1cq",
    "naïve café Ж中 ½ Ⅻ ٣", "e\u0301", "emoji 😀😀 ok", "a.b,c!!  ?", "--> <-- 3.14",
]
ALPHABET = list("abcdestrmvlSTRE'''   \n\n\t\r.,!?-_0123456789") + [
    "\u00a0", "\u3000", "\u2009", "\x85", "\x1c", "é", "ß", "Ж", "中", "½", "Ⅻ", "٣", "😀",
    "\u200b", "\ufeff", "\u0301", "'s", "'ll", "'re", "'ve", "  "]


def random_texts(count, seed=0):
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(ALPHABET, size=rng.integers(0, 30))) for _ in range(count)]


def byte_level(word):
    """A pre-token's bytes in GPT-2's byte-level alphabet (HuggingFace's pre-tokens)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    alphabet = {**{b: chr(b) for b in printable},
                **{b: chr(256 + i) for i, b in enumerate(others)}}
    return "".join(alphabet[b] for b in word)


def test_pretokenize_cuts_as_gpt2s_pattern_on_random_text():
    hf = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    texts = EDGE_CASES + random_texts(1500)
    ours = tf.function(pretokenize)(tf.constant(texts)).to_list()
    for text, words in zip(texts, ours):
        assert [byte_level(w) for w in words] == [w for w, _ in hf.pre_tokenize_str(text)], text


def test_pretokenize_handles_empty_batches_and_bad_bytes():
    assert pretokenize(tf.constant([], tf.string)).to_list() == []
    assert pretokenize(tf.constant(["", ""])).to_list() == [[], []]
    assert pretokenize(tf.constant([b"ab\xffcd"])).to_list() == [[b"ab", b"\xef\xbf\xbd", b"cd"]]


@pytest.fixture(scope="module")
def corpus():
    texts = [r["text"] for r in builtin_records()[:400]]
    return texts[:300], texts[300:] + EDGE_CASES + random_texts(200, seed=1)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer("bpe", corpus[0], 600)


def huggingface_ids(tokenizer, texts):
    layer = tokenizer.keras_tokenizer
    merges = [tuple(m.split(" ")) for m in layer.merges]
    return [e.ids for e in ByteLevelBPETokenizer(dict(layer.vocabulary), merges)
            .encode_batch(texts)]


def test_the_table_holds_the_training_words(tokenizer, corpus):
    table = json.loads(tokenizer.files[WORD_TABLE_FILE])
    assert len(table["words"]) == len(table["ids"]) > 1000
    assert " the" in table["words"] and "zzyzx" not in table["words"]
    words = set(table["words"])
    unknown = [w for row in pretokenize(tf.constant(corpus[1])).to_list() for w in row
               if w.decode() not in words]
    assert len(unknown) > 100  # held-out text exercises the merge paths below


@pytest.mark.parametrize("split", [0, 1], ids=["training text", "held-out text"])
def test_ids_equal_huggingface_on_every_path(tokenizer, corpus, split):
    texts = corpus[split]
    expected = huggingface_ids(tokenizer, texts)
    layer = tokenizer.keras_tokenizer
    assert isinstance(layer, WordTableBytePairTokenizer)
    # The SavedModel path: keras-hub's in-graph merge loop for words not in the table.
    graph = tf.function(layer.tokenize)(tf.constant(texts)).to_list()
    assert graph == expected
    # The tf.data path: HuggingFace merges unknown words through tf.py_function.
    dataset = tf.data.Dataset.from_tensor_slices(texts).batch(64).map(tokenizer.tokenize)
    assert [row for batch in dataset for row in batch.to_list()] == expected
    assert tokenizer.encode(texts) == expected  # eager


def test_saved_tokenizer_keeps_the_table(tokenizer, corpus, tmp_path):
    tokenizer.save(str(tmp_path / "tok"))
    assert os.path.isfile(tmp_path / "tok" / WORD_TABLE_FILE)
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert loaded.keras_tokenizer.word_table == tokenizer.keras_tokenizer.word_table
    assert loaded.encode(corpus[1][:20]) == tokenizer.encode(corpus[1][:20])


def test_a_tokenizer_saved_without_a_table_keeps_keras_hubs_layer(tokenizer, tmp_path):
    import keras_hub

    directory = tmp_path / "old"
    tokenizer.save(str(directory))
    os.remove(directory / WORD_TABLE_FILE)
    meta = json.loads((directory / "tokenizer.json").read_text())
    meta["files"].remove(WORD_TABLE_FILE)
    (directory / "tokenizer.json").write_text(json.dumps(meta))
    loaded = load_tokenizer(str(directory))
    assert type(loaded.keras_tokenizer) is keras_hub.tokenizers.BytePairTokenizer
    assert loaded.encode(["The attention layer."]) == tokenizer.encode(["The attention layer."])


@pytest.mark.parametrize("content, message", [
    (b"{not json", "not a BPE word table"),
    (json.dumps({"words": ["a", "b"], "ids": [[1]]}).encode(), "same length"),
    (json.dumps({"words": ["a"], "ids": [[10 ** 6]]}).encode(), r"entry 0 \('a'\)"),
])
def test_a_bad_table_is_a_one_line_error_naming_the_file(tokenizer, tmp_path, content,
                                                         message):
    tokenizer.save(str(tmp_path / "tok"))
    (tmp_path / "tok" / WORD_TABLE_FILE).write_bytes(content)
    with pytest.raises(DataError, match=message) as error:
        load_tokenizer(str(tmp_path / "tok"))
    assert WORD_TABLE_FILE in str(error.value) and "\n" not in str(error.value)
