"""Subword tokenizers: trained fast with HuggingFace `tokenizers` / `sentencepiece`, run in the
TensorFlow graph by keras-hub's tokenizer layers, saved as plain files next to the model.

Every kind has the same six special tokens at ids 0-5, so objectives can ask for a role
(`pad`, `unk`, `cls`, `sep`, `mask`, `eos`) without knowing the kind:

    bpe            byte-level BPE (GPT-2 style), keras_hub BytePairTokenizer, with a table of
                   the training corpus's words (`WordTableBytePairTokenizer`)
    wordpiece      BERT's WordPiece, keras_hub WordPieceTokenizer (tensorflow-text inside)
    sentencepiece  unigram SentencePiece, keras_hub SentencePieceTokenizer

Example:

>>> tokenizer = train_tokenizer("bpe", ["hello world"] * 20 + ["a tokenizer"] * 20, 300)
>>> tokenizer.decode(tokenizer.encode(["hello world"])[0])
'hello world'
>>> tokenizer.special_token_ids()["eos"]
5
"""
import io
import json
import os

import numpy as np

from keras_llm.errors import ConfigError, DataError

SPECIAL_TOKENS = {
    "pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]",
    "eos": "[EOS]",
}
KINDS = ("bpe", "wordpiece", "sentencepiece")
METADATA_FILE = "tokenizer.json"
WORD_TABLE_FILE = "bpe_words.json"
# The word table keeps the most frequent words of the tokenizer's training text: enough for
# WikiText-103's common words, small enough to load in a second (about 4 MB of JSON).
MAX_TABLE_WORDS = 1 << 17
TABLE_TEXT_CHARACTERS = 50_000_000  # the words are counted on at most this much text


class Tokenizer:
    """A trained tokenizer: graph tokenization through keras-hub plus Python conveniences.

    Args:
        kind: one of `KINDS`.
        keras_tokenizer: the keras-hub tokenizer layer that runs in the graph.
        files: {file name: bytes} written by `save()` to rebuild the tokenizer.
        lowercase: whether text is lowercased before tokenization.
    """

    def __init__(self, kind, keras_tokenizer, files, lowercase=False):
        self.kind = kind
        self.keras_tokenizer = keras_tokenizer
        self.files = files
        self.lowercase = lowercase
        self._special_ids = {role: self.token_to_id(token)
                             for role, token in SPECIAL_TOKENS.items()}

    def vocabulary_size(self):
        return int(self.keras_tokenizer.vocabulary_size())

    def token_to_id(self, token):
        return int(self.keras_tokenizer.token_to_id(token))

    def id_to_token(self, token_id):
        return self.keras_tokenizer.id_to_token(int(token_id))

    def special_token_ids(self):
        """{role: id} for pad, unk, cls, sep, mask, eos."""
        return dict(self._special_ids)

    def vocabulary(self):
        """The tokens, ordered by id."""
        if self.kind == "bpe":
            ids = self.keras_tokenizer.vocabulary  # {token: id}
            return sorted(ids, key=ids.get)
        return list(self.keras_tokenizer.get_vocabulary())

    def tokenize(self, texts):
        """Graph op: a string tensor (scalar or batch) -> int32 token ids (ragged for batches)."""
        import tensorflow as tf

        if self.lowercase and self.kind != "wordpiece":
            texts = tf.strings.lower(texts, encoding="utf-8")
        layer = self.keras_tokenizer
        if self.kind == "sentencepiece":
            # The SentencePiece op keeps its model in a kernel resource that
            # `tf.random.set_seed` (run by `keras.utils.set_random_seed`) destroys with
            # the kernel cache; a layer per call (per tf.data trace) is cheap and immune.
            import keras_hub

            layer = keras_hub.tokenizers.SentencePieceTokenizer(proto=self.files["spm.model"])
        # Pipelines take the byte-level BPE's tf.data path; SavedModels call the layer's
        # `tokenize` (`keras_llm.export`), all in the graph, for the same ids. keras-hub's and
        # tensorflow-text's code branches on Python values only, so it runs unconverted:
        # AutoGraph took 2-3 s to convert it on the first trace of every process.
        tokenize = getattr(layer, "tokenize_for_tf_data", layer.tokenize)
        return tf.autograph.experimental.do_not_convert(tokenize)(texts)

    def encode(self, texts):
        """Python lists of ids for a list of strings."""
        import tensorflow as tf

        texts = list(texts)
        if not texts:
            return []
        ids = self.tokenize(tf.constant(texts, tf.string))
        # keras-hub hands eager callers Python lists; graph callers get a RaggedTensor.
        rows = ids.to_list() if hasattr(ids, "to_list") else ids
        return [[int(i) for i in row] for row in rows]

    def decode(self, ids):
        """Text for one sequence of ids; special tokens are dropped."""
        specials = set(self._special_ids.values())
        ids = [int(i) for i in ids if int(i) not in specials]
        if not ids:
            return ""
        text = self.keras_tokenizer.detokenize(np.asarray([ids], "int32"))
        value = np.asarray(text).reshape(-1)[0]
        return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)

    def save(self, directory):
        from keras_llm.artifacts import atomic_write, write_json

        os.makedirs(directory, exist_ok=True)
        for name, data in self.files.items():
            atomic_write(os.path.join(directory, name), data)
        write_json(os.path.join(directory, METADATA_FILE), {
            "kind": self.kind, "lowercase": self.lowercase,
            "vocabulary_size": self.vocabulary_size(),
            "special_tokens": {role: [token, self._special_ids[role]]
                               for role, token in SPECIAL_TOKENS.items()},
            "files": sorted(self.files),
        })


def _check_special_tokens(kind, keras_tokenizer, where):
    for position, token in enumerate(SPECIAL_TOKENS.values()):
        found = keras_tokenizer.token_to_id(token)
        if found != position:
            raise DataError(f"{where}: {kind} vocabulary must hold {token} at id {position}, "
                            f"found id {found}")


def _from_files(kind, files, lowercase, where="tokenizer"):
    import keras_hub

    if kind == "bpe":
        from keras_llm.data.bpe import WordTableBytePairTokenizer

        vocabulary = json.loads(files["vocab.json"].decode("utf-8"))
        merges = [line for line in files["merges.txt"].decode("utf-8").splitlines()
                  if line and not line.startswith("#version")]
        # Special tokens are inserted by id, never parsed out of text: declaring them
        # `unsplittable_tokens` would add 12 regex passes to every tokenize call.
        if WORD_TABLE_FILE in files:
            layer = WordTableBytePairTokenizer(
                vocabulary=vocabulary, merges=merges,
                word_table=_read_word_table(files[WORD_TABLE_FILE], len(vocabulary), where))
        else:  # saved before the word table: keras-hub's pre-tokenizer, as it was trained
            layer = keras_hub.tokenizers.BytePairTokenizer(vocabulary=vocabulary,
                                                           merges=merges)
    elif kind == "wordpiece":
        vocabulary = files["vocab.txt"].decode("utf-8").splitlines()
        layer = keras_hub.tokenizers.WordPieceTokenizer(
            vocabulary=vocabulary, lowercase=lowercase, strip_accents=lowercase,
            oov_token=SPECIAL_TOKENS["unk"], special_tokens=list(SPECIAL_TOKENS.values()))
    elif kind == "sentencepiece":
        layer = keras_hub.tokenizers.SentencePieceTokenizer(proto=files["spm.model"])
    else:
        raise ConfigError(f"{where}: tokenizer kind must be one of {', '.join(KINDS)}; "
                          f"got {kind!r}")
    _check_special_tokens(kind, layer, where)
    return Tokenizer(kind, layer, files, lowercase=lowercase)


def _train_bpe(texts, vocab_size, lowercase):
    import tempfile

    from tokenizers import ByteLevelBPETokenizer

    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                                special_tokens=list(SPECIAL_TOKENS.values()),
                                show_progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        trainer.save_model(tmp)
        files = {name: open(os.path.join(tmp, name), "rb").read()
                 for name in ("vocab.json", "merges.txt")}
        # Encodes words without special-token matching: as keras-hub's layer does.
        plain = ByteLevelBPETokenizer(os.path.join(tmp, "vocab.json"),
                                      os.path.join(tmp, "merges.txt"))
    files[WORD_TABLE_FILE] = _build_word_table(texts, plain, lowercase)
    return files


def _build_word_table(texts, encoder, lowercase):
    """JSON `{"words": [...], "ids": [[...], ...]}`: the `MAX_TABLE_WORDS` most frequent
    words of `texts` (GPT-2 pre-tokens, `keras_llm.data.bpe.pretokenize`) and their ids,
    encoded by HuggingFace `tokenizers` (one pre-token in, its merges out)."""
    import collections

    import tensorflow as tf

    from keras_llm.data.bpe import pretokenize

    budget, sample = TABLE_TEXT_CHARACTERS, []
    for text in texts:
        if budget <= 0:
            break
        sample.append(text[:budget])
        budget -= len(sample[-1])
    dataset = tf.data.Dataset.from_tensor_slices(tf.constant(sample, tf.string)).batch(256)
    if lowercase:
        dataset = dataset.map(lambda t: tf.strings.lower(t, encoding="utf-8"))
    counts = collections.Counter()
    for words in dataset.map(lambda t: pretokenize(t).flat_values):
        counts.update(words.numpy().tolist())
    # `pretokenize` re-encodes whole characters: every word is valid UTF-8.
    words = [word.decode("utf-8") for word, _ in counts.most_common(MAX_TABLE_WORDS)]
    ids = [encoding.ids for encoding in encoder.encode_batch(words)] if words else []
    return json.dumps({"words": words, "ids": ids}, ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8")


def _read_word_table(data, vocabulary_size, where):
    """`(words, ids)` from a `WORD_TABLE_FILE`, checked: a bad table is a one-line error."""
    path = f"{where}: {WORD_TABLE_FILE}"
    try:
        table = json.loads(data.decode("utf-8"))
        words, ids = table["words"], table["ids"]
    except (UnicodeDecodeError, ValueError, TypeError, KeyError) as e:
        raise DataError(f"{path}: not a BPE word table ({e})") from None
    if not isinstance(words, list) or not isinstance(ids, list) or len(words) != len(ids):
        raise DataError(f"{path}: 'words' and 'ids' must be lists of the same length")
    for index, (word, row) in enumerate(zip(words, ids)):
        if not isinstance(word, str) or not isinstance(row, list) or not all(
                isinstance(i, int) and 0 <= i < vocabulary_size for i in row):
            raise DataError(f"{path}: entry {index} ({word!r}) is not a word with token ids "
                            f"below {vocabulary_size}")
    return words, ids


def _train_wordpiece(texts, vocab_size, lowercase):
    import tempfile

    from tokenizers import BertWordPieceTokenizer

    trainer = BertWordPieceTokenizer(lowercase=lowercase, strip_accents=lowercase)
    trainer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                                special_tokens=list(SPECIAL_TOKENS.values()),
                                show_progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        trainer.save_model(tmp)
        return {"vocab.txt": open(os.path.join(tmp, "vocab.txt"), "rb").read()}


def _train_sentencepiece(texts, vocab_size, lowercase):
    import sentencepiece

    model = io.BytesIO()
    specials = list(SPECIAL_TOKENS.values())
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
        pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, user_defined_symbols=specials[2:],
        pad_piece=specials[0], unk_piece=specials[1],
        normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
        max_sentence_length=1 << 16, minloglevel=2)
    return {"spm.model": model.getvalue()}


def train_tokenizer(kind, texts, vocab_size, lowercase=False):
    """Trains a `kind` tokenizer with at most `vocab_size` tokens on an iterable of strings."""
    if kind not in KINDS:
        raise ConfigError(f"tokenizer kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if vocab_size < len(SPECIAL_TOKENS) + 256 and kind == "bpe":
        raise ConfigError(f"a byte-level BPE vocabulary needs >= {len(SPECIAL_TOKENS) + 256} "
                          f"tokens; got vocab_size={vocab_size}")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError("cannot train a tokenizer on an empty corpus")
    if kind == "bpe":
        files = _train_bpe(texts, vocab_size, lowercase)
    elif kind == "wordpiece":
        files = _train_wordpiece(texts, vocab_size, lowercase)
    else:
        files = _train_sentencepiece(texts, vocab_size, lowercase)
    return _from_files(kind, files, lowercase)


def load_tokenizer(directory):
    """Loads a tokenizer saved by `Tokenizer.save` (a model artifact's `tokenizer/`)."""
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(path):
        raise DataError(f"{directory}: not a keras-llm tokenizer directory ({METADATA_FILE} "
                        f"is missing)")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        files = {}
        for name in meta["files"]:
            with open(os.path.join(directory, name), "rb") as f:
                files[name] = f.read()
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path}: cannot read tokenizer ({e})") from None
    return _from_files(meta["kind"], files, meta.get("lowercase", False), where=path)
