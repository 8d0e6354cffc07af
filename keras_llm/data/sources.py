"""Text sources: where documents come from, read with one-line errors naming file and line.

A source spec (the `--data` option) is one of:

    builtin                  the built-in corpus (standard-library docstrings)
    tfds:NAME[:SPLIT]        a TensorFlow Datasets dataset (default split: train)
    PATH[,PATH...]           files or globs: .txt (documents separated by blank lines),
                             .jsonl (one object per line, text in `text_field`),
                             .csv / .tsv (text in column `text_field`),
                             .tfrecord (tf.train.Example, bytes feature `text_field`)

Documents are held in memory as Python strings (the corpora this tool targets fit easily);
`TextSource.dataset()` turns them into a checkpointable `tf.data` dataset.

Example:

>>> source = open_source("builtin")
>>> source.describe()["kind"]
'builtin'
"""
import csv
import glob
import hashlib
import json
import os

from keras_llm.data import corpus
from keras_llm.errors import DataError

FILE_KINDS = {".txt": "text", ".text": "text", ".raw": "text", ".jsonl": "jsonl", ".json": "jsonl",
              ".csv": "csv", ".tsv": "tsv", ".tfrecord": "tfrecord", ".tfrecords": "tfrecord"}


def _decode_lines(path):
    """(line number, line) for each line of a UTF-8 text file, with a clear decoding error."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                # A byte-order mark (as Windows editors write) is not part of the text.
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{number}: not valid UTF-8 ({e.reason} at byte "
                                f"{e.start})") from None


def _file_kind(path):
    kind = FILE_KINDS.get(os.path.splitext(path)[1].lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type; use one of "
                        f"{', '.join(sorted(FILE_KINDS))}")
    return kind


def read_records(path, text_field=None):
    """(line number, record dict) for each record of a .jsonl/.csv/.tsv file.

    Lines of a .txt file are records {"text": line}. With `text_field`, every record must
    hold a string in that field; the error names the file, the line and the fields found.
    """
    kind = _file_kind(path)
    if kind == "jsonl":
        records = _jsonl_records(path)
    elif kind in ("csv", "tsv"):
        records = _csv_records(path, "\t" if kind == "tsv" else ",")
    elif kind == "text":
        records = ((n, {"text": line.rstrip("\r\n")}) for n, line in _decode_lines(path))
    else:
        raise DataError(f"{path}: records are read from .jsonl, .csv, .tsv or .txt files")
    for number, record in records:
        if text_field is not None:
            check_field(path, number, record, text_field)
        yield number, record


def check_field(path, number, record, field):
    if field not in record:
        raise DataError(f"{path}:{number}: no field {field!r} (found: "
                        f"{', '.join(map(str, record)) or 'none'}); set --text-field")
    if not isinstance(record[field], str):
        raise DataError(f"{path}:{number}: field {field!r} must be a string, got "
                        f"{type(record[field]).__name__}")


def _jsonl_records(path):
    for number, line in _decode_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got "
                            f"{type(record).__name__}")
        yield number, record


def _csv_records(path, delimiter):
    lines = (line for _, line in _decode_lines(path))
    reader = csv.DictReader(lines, delimiter=delimiter)
    try:
        for record in reader:
            yield reader.line_num, {k: v for k, v in record.items() if k is not None}
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: {e}") from None


def _text_documents(path):
    """Paragraphs (blank-line separated blocks) of a text file."""
    documents, paragraph = [], []
    for _, line in _decode_lines(path):
        if line.strip():
            paragraph.append(line.rstrip("\r\n"))
        elif paragraph:
            documents.append("\n".join(paragraph))
            paragraph = []
    if paragraph:
        documents.append("\n".join(paragraph))
    return documents


def _tfrecord_documents(path, text_field):
    import tensorflow as tf

    documents = []
    try:
        for number, raw in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator(), 1):
            example = tf.train.Example.FromString(raw)
            feature = example.features.feature
            if text_field not in feature:
                raise DataError(f"{path}: record {number}: no feature {text_field!r} (found: "
                                f"{', '.join(sorted(feature)) or 'none'}); set --text-field")
            for value in feature[text_field].bytes_list.value:
                try:
                    documents.append(value.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}: record {number}: not valid UTF-8 "
                                    f"({e.reason})") from None
    except tf.errors.DataLossError as e:
        raise DataError(f"{path}: corrupted TFRecord file ({e.message})") from None
    return documents


def read_documents(path, text_field="text"):
    """The documents of one local file."""
    kind = _file_kind(path)
    if kind == "text":
        return _text_documents(path)
    if kind == "tfrecord":
        return _tfrecord_documents(path, text_field)
    return [record[text_field] for _, record in read_records(path, text_field)]


def expand_paths(spec):
    """Files named by a comma-separated list of paths and globs, each checked to exist."""
    paths = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if glob.has_magic(part):
            matched = sorted(p for p in glob.glob(part, recursive=True) if os.path.isfile(p))
            if not matched:
                raise DataError(f"{part}: the pattern matches no files")
            paths.extend(matched)
        elif os.path.isdir(part):
            raise DataError(f"{part}: is a directory; pass files or a glob such as "
                            f"'{os.path.join(part, '*.txt')}'")
        elif not os.path.isfile(part):
            raise DataError(f"{part}: no such file")
        else:
            paths.append(part)
    if not paths:
        raise DataError(f"--data {spec!r} names no files")
    return paths


class TextSource:
    """Documents from one source spec, with a description and a content fingerprint."""

    def __init__(self, spec, documents, description, fingerprint):
        self.spec = spec
        self.documents = documents
        self._description = description
        self._fingerprint = fingerprint

    def texts(self):
        return list(self.documents)

    def dataset(self):
        import tensorflow as tf

        return tf.data.Dataset.from_tensor_slices(tf.constant(self.documents, tf.string))

    def describe(self):
        return {"spec": self.spec, **self._description, "documents": len(self.documents),
                "characters": sum(len(d) for d in self.documents)}

    def fingerprint(self):
        return self._fingerprint


def _builtin_source():
    path = corpus.builtin_corpus_path()
    documents = [r["text"] for r in corpus.builtin_records()]
    return TextSource("builtin", documents, {"kind": "builtin", "path": path},
                      "sha256:" + corpus.file_fingerprint(path))


def open_tfds(spec):
    """(name, split, builder, dataset) for a `tfds:NAME[:SPLIT]` spec, with one-line errors."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1]:
        raise DataError(f"--data {spec!r}: expected tfds:NAME or tfds:NAME:SPLIT")
    name, split = parts[1], parts[2] if len(parts) == 3 else "train"
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name)
        builder.download_and_prepare()
        dataset = builder.as_dataset(split=split)
    except Exception as e:  # tfds raises many types; the user needs the one line.
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"--data {spec}: cannot load from TensorFlow Datasets: "
                        f"{first_line}") from None
    return name, split, builder, dataset


def _tfds_source(spec, text_field):
    name, split, builder, dataset = open_tfds(spec)
    features = builder.info.features
    if text_field not in features:
        raise DataError(f"--data {spec}: no feature {text_field!r} (found: "
                        f"{', '.join(sorted(features))}); set --text-field")
    documents = [x[text_field].decode("utf-8", errors="replace")
                 for x in dataset.as_numpy_iterator()]
    return TextSource(spec, documents,
                      {"kind": "tfds", "name": name, "split": split,
                       "version": str(builder.info.version)},
                      f"tfds:{name}:{split}:{builder.info.version}")


def _file_source(spec, text_field):
    paths = expand_paths(spec)
    documents, digest = [], hashlib.sha256(text_field.encode("utf-8"))
    for path in paths:
        documents.extend(read_documents(path, text_field))
        digest.update(corpus.file_fingerprint(path).encode("ascii"))
    return TextSource(spec, documents,
                      {"kind": "files", "files": [os.path.abspath(p) for p in paths],
                       "text_field": text_field},
                      "sha256:" + digest.hexdigest())


def open_source(spec="builtin", text_field="text"):
    """Opens a source spec (see the module docstring); raises `DataError` on bad input."""
    spec = (spec or "builtin").strip()
    if spec == "builtin":
        source = _builtin_source()
    elif spec.startswith("tfds:"):
        source = _tfds_source(spec, text_field)
    else:
        source = _file_source(spec, text_field)
    source.documents = [d for d in source.documents if d.strip()]
    if not source.documents:
        raise DataError(f"--data {spec}: the corpus holds no non-empty documents")
    return source
