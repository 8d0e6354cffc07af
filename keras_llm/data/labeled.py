"""Labeled data for fine-tuning and evaluation: columns in, tf.data batches out.

A labeled source spec (the `--data` option of `keras-llm finetune` / `evaluate`) is one of:

    builtin[:SPLIT]          the built-in topic task (below); SPLIT train|validation|test
    tfds:NAME[:SPLIT]        a TensorFlow Datasets dataset (class labels read by name)
    PATH[,PATH...]           .jsonl / .csv / .tsv files (with a header row) or globs

Columns are picked by role: `text` (and `text_pair`) hold the input, `label` the class, or
`target` the output text of a seq2seq task. A missing column is a one-line error naming the
file, the line and the columns found.

The built-in task: topic classification of the built-in corpus (standard-library
docstrings) by the area of the library the docstring comes from. `MODULE_AREAS` maps each
top-level module to one of six areas; docstrings of other modules are left out. The split
is by a hash of the docstring text: 80% train, 10% validation, 10% test, the same on every
machine with the same Python version.

Example:

>>> data = read_labeled("builtin:validation", {"text": "text", "label": "label"})
>>> sorted(set(data.columns["label"]))[:3]
['concurrency', 'data formats', 'files']
"""
import dataclasses
import hashlib
import os

import numpy as np

from keras_llm.errors import DataError

AREAS = {
    "text": ("re", "string", "textwrap", "difflib", "codecs", "locale", "gettext", "shlex",
             "stringprep", "rlcompleter", "pprint", "reprlib", "unicodedata"),
    "networking": ("http", "urllib", "socket", "socketserver", "ssl", "smtplib", "smtpd",
                   "imaplib", "poplib", "nntplib", "ftplib", "telnetlib", "xmlrpc", "wsgiref",
                   "webbrowser", "ipaddress", "cgi", "cgitb"),
    "concurrency": ("asyncio", "threading", "_threading_local", "multiprocessing",
                    "concurrent", "queue", "sched", "subprocess", "selectors", "asynchat",
                    "asyncore", "signal"),
    "data formats": ("json", "csv", "xml", "email", "mailbox", "mailcap", "pickle",
                     "pickletools", "copyreg", "shelve", "dbm", "sqlite3", "configparser",
                     "plistlib", "tomllib", "base64", "quopri", "uu", "html", "mimetypes",
                     "netrc", "xdrlib", "chunk", "wave", "aifc", "sunau"),
    "files": ("os", "pathlib", "shutil", "tempfile", "glob", "fnmatch", "tarfile", "zipfile",
              "gzip", "bz2", "lzma", "_compression", "fileinput", "filecmp", "stat", "io",
              "_pyio", "ntpath", "posixpath", "genericpath", "linecache", "zipapp"),
    "numbers": ("decimal", "_pydecimal", "fractions", "numbers", "statistics", "random",
                "secrets", "colorsys", "math", "cmath"),
}
# Top-level module -> area of the built-in topic task.
MODULE_AREAS = {module: area for area, modules in AREAS.items() for module in modules}
BUILTIN_SPLITS = {"train": (0, 80), "validation": (80, 90), "test": (90, 100)}
TOKENIZE_BATCH = 256


def builtin_split_of(text):
    """"train", "validation" or "test": a fixed function of the text (sha256 mod 100)."""
    bucket = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % 100
    return next(name for name, (low, high) in BUILTIN_SPLITS.items() if low <= bucket < high)


def builtin_topic_records(split="train"):
    """The built-in task's {"text", "label"} records of one split."""
    from keras_llm.data.corpus import builtin_records

    if split not in BUILTIN_SPLITS:
        raise DataError(f"--data builtin:{split}: split must be one of "
                        f"{', '.join(BUILTIN_SPLITS)}")
    records = []
    for record in builtin_records():
        area = MODULE_AREAS.get(record["module"].split(".")[0])
        if area is not None and builtin_split_of(record["text"]) == split:
            records.append({"text": record["text"], "label": area})
    return records


@dataclasses.dataclass
class LabeledData:
    """Columns of one labeled source: {role: list of strings}, plus where they came from."""

    columns: dict
    description: dict
    fingerprint: str

    def __len__(self):
        return len(next(iter(self.columns.values())))


def _value(record, column, where):
    if column not in record:
        raise DataError(f"{where}: no column {column!r} (found: "
                        f"{', '.join(map(str, record)) or 'none'})")
    value = record[column]
    if value is None or isinstance(value, (dict, list)):
        raise DataError(f"{where}: column {column!r} must hold text or a label, got "
                        f"{type(value).__name__}")
    return str(value)


def _from_records(records, columns, where_of):
    values = {role: [] for role in columns}
    for index, record in records:
        for role, column in columns.items():
            values[role].append(_value(record, column, where_of(index)))
    return values


def _read_files(spec, columns):
    from keras_llm.data.corpus import file_fingerprint
    from keras_llm.data.sources import expand_paths, read_records

    paths = expand_paths(spec)
    values = {role: [] for role in columns}
    digest = hashlib.sha256(repr(sorted(columns.items())).encode("utf-8"))
    for path in paths:
        found = _from_records(read_records(path), columns, lambda n, p=path: f"{p}:{n}")
        for role in columns:
            values[role].extend(found[role])
        digest.update(file_fingerprint(path).encode("ascii"))
    return LabeledData(values, {"kind": "files", "files": [os.path.abspath(p) for p in paths],
                                "columns": dict(columns)}, "sha256:" + digest.hexdigest())


def _read_tfds(spec, columns):
    from keras_llm.data.sources import open_tfds

    name, split, builder, dataset = open_tfds(spec)
    features = builder.info.features
    for column in columns.values():
        if column not in features:
            raise DataError(f"--data {spec}: no column {column!r} (found: "
                            f"{', '.join(sorted(features))})")

    def text(column, value):
        names = getattr(features[column], "names", None)  # a ClassLabel: use the names
        if names is not None and not isinstance(value, bytes):
            return names[int(value)]
        return value.decode("utf-8", errors="replace") if isinstance(value, bytes) \
            else str(value)

    values = {role: [] for role in columns}
    for example in dataset.as_numpy_iterator():
        for role, column in columns.items():
            values[role].append(text(column, example[column]))
    return LabeledData(values, {"kind": "tfds", "name": name, "split": split,
                                "columns": dict(columns)},
                       f"tfds:{name}:{split}:{builder.info.version}")


def read_labeled(spec, columns, default_split="train"):
    """Reads the `columns` ({role: column name}) of a labeled source spec.

    Args:
        spec: see the module docstring.
        columns: e.g. `{"text": "sentence", "label": "label"}`; roles are `text`,
            `text_pair`, `label` and `target`.
        default_split: the split of `builtin` when the spec names none.
    """
    spec = (spec or "builtin").strip()
    columns = {role: column for role, column in columns.items() if column}
    if spec == "builtin" or spec.startswith("builtin:"):
        split = spec.split(":", 1)[1] if ":" in spec else default_split
        records = builtin_topic_records(split)
        # The built-in task has fixed column names; the roles still choose what is read.
        columns = {role: {"text": "text", "label": "label"}[role] for role in columns
                   if role in ("text", "label")}
        values = _from_records(enumerate(records), columns, lambda n: f"builtin:{split}")
        from keras_llm.data.corpus import builtin_corpus_path, file_fingerprint

        data = LabeledData(values, {"kind": "builtin", "split": split,
                                    "areas": sorted(AREAS)},
                           f"builtin:{split}:sha256:{file_fingerprint(builtin_corpus_path())}")
    elif spec.startswith("tfds:"):
        data = _read_tfds(spec, columns)
    else:
        data = _read_files(spec, columns)
    data.description["spec"] = spec
    if len(data) == 0:
        raise DataError(f"--data {spec}: no examples")
    return data


def label_sort_key(label):
    """Integers in numeric order before other labels in text order."""
    try:
        return (0, int(label), "")
    except ValueError:
        return (1, 0, label)


class LabelVocabulary:
    """The mapping between string labels and class ids, saved with the model.

    Example:

    >>> labels = LabelVocabulary.from_labels(["b", "a", "b"])
    >>> labels.names, labels.ids(["b", "a"])
    (['a', 'b'], [1, 0])
    """

    def __init__(self, names):
        self.names = list(names)
        self.index = {name: i for i, name in enumerate(self.names)}

    @classmethod
    def from_labels(cls, labels):
        return cls(sorted(set(labels), key=label_sort_key))

    def __len__(self):
        return len(self.names)

    def ids(self, labels, where="data"):
        unknown = sorted(set(labels) - set(self.index), key=label_sort_key)
        if unknown:
            shown = ", ".join(repr(u) for u in unknown[:5])
            raise DataError(f"{where}: label {shown} never seen in training (known labels: "
                            f"{', '.join(self.names)})")
        return [self.index[label] for label in labels]


def balanced_class_weights(label_ids, num_classes):
    """`n / (num_classes * count)` per class (scikit-learn's "balanced"); 0 for absent ones."""
    counts = np.bincount(np.asarray(label_ids, np.int64), minlength=num_classes)
    return [float(len(label_ids) / (num_classes * c)) if c else 0.0 for c in counts]


def packer_for(tokenizer, max_seq_len, layout):
    """The keras-hub packer of one layout.

    "encoder" (BERT family): `[CLS] a [SEP] b [SEP]`, segment ids 0 then 1.
    "decoder" (GPT): `[EOS] a [SEP] b [EOS]`: text starts after an end-of-document token as
    in pretraining, and the closing `[EOS]` is the token whose state a last-token head reads.
    """
    import keras_hub

    specials = tokenizer.special_token_ids()
    if layout == "encoder":
        return keras_hub.layers.MultiSegmentPacker(
            max_seq_len, start_value=specials["cls"], end_value=specials["sep"],
            pad_value=specials["pad"])
    if layout == "decoder":
        return keras_hub.layers.MultiSegmentPacker(
            max_seq_len, start_value=specials["eos"], end_value=specials["eos"],
            sep_value=specials["sep"], pad_value=specials["pad"])
    raise ValueError(f"layout must be 'encoder' or 'decoder'; got {layout!r}")


def classification_dataset(texts, label_ids, tokenizer, max_seq_len, batch_size, layout,
                           text_pairs=None, sample_weights=None, shuffle=False, seed=0):
    """Batches of `(features, label_ids[, sample_weights])` for a text classifier.

    Texts are tokenized in the graph, truncated (round robin between the two texts of a
    pair) so that the packed sequence fits `max_seq_len`, then padded to it. Features:
    `token_ids`, `segment_ids` (int32) and `padding_mask` (bool), each
    `(batch, max_seq_len)`. `label_ids` may be None (prediction only).
    """
    import tensorflow as tf

    packer = packer_for(tokenizer, max_seq_len, layout)
    pad_id = tokenizer.special_token_ids()["pad"]
    inputs = {"text": tf.constant(list(texts), tf.string)}
    if text_pairs is not None:
        inputs["text_pair"] = tf.constant(list(text_pairs), tf.string)
    elements = [inputs]
    if label_ids is not None:
        elements.append(tf.constant(list(label_ids), tf.int32))
        if sample_weights is not None:
            elements.append(tf.constant(list(sample_weights), tf.float32))
    dataset = tf.data.Dataset.from_tensor_slices(tuple(elements))

    def encode(inputs, *rest):
        segments = [tf.cast(tokenizer.tokenize(inputs["text"]), tf.int32)]
        if "text_pair" in inputs:
            segments.append(tf.cast(tokenizer.tokenize(inputs["text_pair"]), tf.int32))
        token_ids, segment_ids = packer(tuple(segments))
        features = {"token_ids": token_ids, "segment_ids": segment_ids,
                    "padding_mask": tf.not_equal(token_ids, pad_id)}
        return (features, *rest) if rest else features

    # Tokenized once, in large batches, and cached: later passes only shuffle and batch.
    dataset = (dataset.batch(TOKENIZE_BATCH).map(encode, num_parallel_calls=tf.data.AUTOTUNE)
               .unbatch().cache())
    if shuffle:
        dataset = dataset.shuffle(len(texts), seed=seed, reshuffle_each_iteration=True)
    # A known length lets Keras tell the end of the data from a fault.
    batches = tf.data.experimental.assert_cardinality(-(-len(texts) // batch_size))
    return dataset.batch(batch_size).apply(batches).prefetch(tf.data.AUTOTUNE)


def _pad(ids, length, pad_id):
    ids = list(ids)[:length]
    return ids + [pad_id] * (length - len(ids)), [True] * len(ids) + [False] * (length - len(ids))


def seq2seq_arrays(sources, targets, tokenizer, max_seq_len, start_role="cls",
                   target_tokenizer=None):
    """Teacher-forcing arrays for an encoder-decoder model (the layout of its pretraining).

    Encoder: source + `[EOS]`. Decoder input: `[CLS]` (the start token) + target. Targets:
    target + `[EOS]`; weights 1.0 on real target tokens. Each side is truncated to
    `max_seq_len` (keeping the closing `[EOS]` of the encoder) and padded. Targets are
    tokenized by `target_tokenizer` (separate vocabularies) or else by `tokenizer`.
    """
    target_tokenizer = target_tokenizer or tokenizer
    source_specials = tokenizer.special_token_ids()
    specials = target_tokenizer.special_token_ids()
    pad, eos, start = specials["pad"], specials["eos"], specials[start_role]
    features = {key: [] for key in ("encoder_token_ids", "encoder_padding_mask",
                                    "decoder_token_ids", "decoder_padding_mask")}
    target_ids, weights = [], []
    for source, target in zip(tokenizer.encode(sources), target_tokenizer.encode(targets)):
        ids, mask = _pad(source[:max_seq_len - 1] + [source_specials["eos"]], max_seq_len,
                         source_specials["pad"])
        features["encoder_token_ids"].append(ids)
        features["encoder_padding_mask"].append(mask)
        ids, mask = _pad([start] + target, max_seq_len, pad)
        features["decoder_token_ids"].append(ids)
        features["decoder_padding_mask"].append(mask)
        ids, _ = _pad(target[:max_seq_len - 1] + [eos], max_seq_len, pad)
        target_ids.append(ids)
        weights.append(mask)
    arrays = {key: np.asarray(value, "bool" if key.endswith("mask") else "int32")
              for key, value in features.items()}
    return arrays, np.asarray(target_ids, "int32"), np.asarray(weights, "float32")


def seq2seq_dataset(sources, targets, tokenizer, max_seq_len, batch_size, shuffle=False,
                    seed=0, target_tokenizer=None):
    """Batches of `(features, target_ids, target_weights)` (see `seq2seq_arrays`)."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices(seq2seq_arrays(
        sources, targets, tokenizer, max_seq_len, target_tokenizer=target_tokenizer))
    if shuffle:
        dataset = dataset.shuffle(len(sources), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def lm_blocks(texts, tokenizer, block_length):
    """Token blocks for scoring a language model: documents joined by `[EOS]`, cut into
    `block_length` pieces; the last, shorter piece is kept and padded. Returns
    `(ids, weights)`, `weights` 1.0 on real tokens."""
    eos, pad = tokenizer.special_token_ids()["eos"], tokenizer.special_token_ids()["pad"]
    stream = [eos]
    for ids in tokenizer.encode(list(texts)):
        stream.extend(ids + [eos])
    blocks, weights = [], []
    for start in range(0, len(stream) - 1, block_length - 1):
        piece = stream[start:start + block_length]
        if len(piece) < 2:
            break
        ids, mask = _pad(piece, block_length, pad)
        blocks.append(ids)
        weights.append(mask)
    return np.asarray(blocks, "int32"), np.asarray(weights, "float32")
