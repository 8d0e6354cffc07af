"""Subword tokenizers: trained fast with HuggingFace `tokenizers` / `sentencepiece`, run in the
TensorFlow graph by keras-hub's tokenizer layers, saved as plain files next to the model.

Every kind has the same six special tokens at ids 0-5, so objectives can ask for a role
(`pad`, `unk`, `cls`, `sep`, `mask`, `eos`) without knowing the kind:

    bpe            byte-level BPE (GPT-2 style), keras_hub BytePairTokenizer
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
        return layer.tokenize(texts)

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
        return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value

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
        vocabulary = json.loads(files["vocab.json"].decode("utf-8"))
        merges = [line for line in files["merges.txt"].decode("utf-8").splitlines()
                  if line and not line.startswith("#version")]
        # Special tokens are inserted by id, never parsed out of text: declaring them
        # `unsplittable_tokens` would add 12 regex passes to every tokenize call.
        layer = keras_hub.tokenizers.BytePairTokenizer(vocabulary=vocabulary, merges=merges)
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


def _train_bpe(texts, vocab_size):
    import tempfile

    from tokenizers import ByteLevelBPETokenizer

    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                                special_tokens=list(SPECIAL_TOKENS.values()),
                                show_progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        trainer.save_model(tmp)
        return {name: open(os.path.join(tmp, name), "rb").read()
                for name in ("vocab.json", "merges.txt")}


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
        files = _train_bpe(texts, vocab_size)
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
