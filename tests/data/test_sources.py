"""Sources: every file kind, globs, the built-in corpus, and one-line errors for bad input."""
import json

import pytest

from keras_llm.data import corpus
from keras_llm.data.sources import open_source, read_records
from keras_llm.errors import DataError


def write(path, text, mode="w"):
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def test_text_file_documents_are_paragraphs(tmp_path):
    path = write(tmp_path / "a.txt", "first para\nline two\n\n\nsecond\n\nthird\n")
    source = open_source(path)
    assert source.texts() == ["first para\nline two", "second", "third"]
    assert source.describe()["documents"] == 3


def test_jsonl_csv_tsv_and_globs(tmp_path):
    write(tmp_path / "a.jsonl", json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": "two"}))
    write(tmp_path / "b.csv", 'id,body\n1,"three, with comma"\n2,four\n')
    write(tmp_path / "c.tsv", "id\tbody\n1\tfive\n")
    source = open_source(str(tmp_path / "*"), text_field="body")
    assert source.texts() == ["one", "two", "three, with comma", "four", "five"]
    assert len(source.describe()["files"]) == 3


def test_comma_separated_paths_keep_order(tmp_path):
    a = write(tmp_path / "a.txt", "alpha")
    b = write(tmp_path / "b.txt", "beta")
    assert open_source(f"{b},{a}").texts() == ["beta", "alpha"]


def test_tfrecord_source(tmp_path):
    import tensorflow as tf

    path = str(tmp_path / "docs.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for text in ("first doc", "second doc"):
            feature = {"text": tf.train.Feature(bytes_list=tf.train.BytesList(
                value=[text.encode()]))}
            writer.write(tf.train.Example(
                features=tf.train.Features(feature=feature)).SerializeToString())
    assert open_source(path).texts() == ["first doc", "second doc"]


def test_fingerprint_follows_content_not_name(tmp_path):
    a = write(tmp_path / "a.txt", "same text")
    b = write(tmp_path / "b.txt", "same text")
    c = write(tmp_path / "c.txt", "other text")
    assert open_source(a).fingerprint() == open_source(b).fingerprint()
    assert open_source(a).fingerprint() != open_source(c).fingerprint()


@pytest.mark.parametrize("name, content, field, message", [
    ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', "text", "bad.jsonl:2: invalid JSON"),
    ("field.jsonl", '{"text": "ok"}\n{"body": "x"}\n', "text",
     "field.jsonl:2: no field 'text' (found: body)"),
    ("type.jsonl", '{"text": 3}\n', "text", "type.jsonl:1: field 'text' must be a string"),
    ("col.csv", "id,body\n1,x\n", "text", "col.csv:2: no field 'text' (found: id, body)"),
    ("empty.txt", "\n\n  \n", "text", "the corpus holds no non-empty documents"),
    ("data.parquet", "x", "text", "data.parquet: unsupported file type"),
])
def test_bad_input_is_one_line_error_naming_file_and_line(tmp_path, name, content, field,
                                                          message):
    path = write(tmp_path / name, content)
    with pytest.raises(DataError) as error:
        open_source(path, text_field=field)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_undecodable_bytes_name_the_line(tmp_path):
    path = write(tmp_path / "latin1.txt", b"good line\nbad \xff byte\n", mode="wb")
    with pytest.raises(DataError, match=r"latin1.txt:2: not valid UTF-8"):
        open_source(path)


def test_missing_file_directory_and_empty_glob(tmp_path):
    with pytest.raises(DataError, match="nope.txt: no such file"):
        open_source(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="is a directory"):
        open_source(str(tmp_path))
    with pytest.raises(DataError, match="matches no files"):
        open_source(str(tmp_path / "*.jsonl"))


def test_bad_tfds_spec_is_a_data_error():
    with pytest.raises(DataError, match="expected tfds:NAME"):
        open_source("tfds:")


def test_read_records_yields_line_numbers(tmp_path):
    path = write(tmp_path / "r.csv", "text,label\nhello,a\nworld,b\n")
    assert list(read_records(path, "text")) == [(2, {"text": "hello", "label": "a"}),
                                                (3, {"text": "world", "label": "b"})]


def test_builtin_corpus_is_deterministic_cached_english(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_LLM_CACHE", str(tmp_path))
    records = corpus.builtin_records()
    assert len(records) > 3000
    assert all(set(r) == {"module", "name", "text"} for r in records)
    assert all(corpus.is_english(r["text"]) for r in records)
    assert not any(r["module"].startswith(("test.", "idlelib.idle_test")) for r in records)
    path = corpus.builtin_corpus_path()
    mtime = (tmp_path / path.split("/")[-1]).stat().st_mtime
    assert corpus.builtin_records() == records  # second call reads the cache
    assert (tmp_path / path.split("/")[-1]).stat().st_mtime == mtime
    assert corpus.extract_records()[:50] == records[:50]  # same extraction every time
    source = open_source("builtin")
    assert source.fingerprint() == "sha256:" + corpus.file_fingerprint(path)


def test_module_docstrings_uses_ast_without_importing():
    source = b'"""Module doc here."""\nclass A:\n    """Class doc."""\n    def f(self):\n' \
             b'        """Method doc."""\nimport does_not_exist\n'
    assert corpus.module_docstrings("pkg.mod", source) == [
        ("pkg.mod", "", "Module doc here."), ("pkg.mod", "A", "Class doc."),
        ("pkg.mod", "A.f", "Method doc.")]


def test_tfds_source_reads_text_feature_without_download():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):  # generated records, no network
        source = open_source("tfds:imdb_reviews:train")
        assert len(source.texts()) == 12
        assert source.describe()["split"] == "train"
        assert source.fingerprint() == "tfds:imdb_reviews:train:1.0.0"
        with pytest.raises(DataError, match="no feature 'body' \\(found: label, text\\)"):
            open_source("tfds:imdb_reviews", text_field="body")
    with pytest.raises(DataError, match="no_such_dataset_xyz not found"):
        open_source("tfds:no_such_dataset_xyz")


def test_byte_order_mark_and_crlf_are_not_text(tmp_path):
    path = write(tmp_path / "win.txt", "\ufefffirst line\r\nsecond\r\n\r\nthird\r\n".encode(),
                 mode="wb")
    assert open_source(path).texts() == ["first line\nsecond", "third"]
