"""The SQLite metadata store and directory fingerprints."""
import os
import sqlite3

import pytest

from keras_llm.pipeline.metadata import MetadataStore, fingerprint_directory, fingerprint_json


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_fingerprint_follows_content_and_names_not_time(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for root in (a, b):
        write(os.path.join(root, "model.keras"), "weights")
        write(os.path.join(root, "tokenizer", "vocab.txt"), "x\ny\n")
    fingerprint, files, size = fingerprint_directory(a)
    assert (files, size) == (2, len("weights") + len("x\ny\n"))
    assert fingerprint_directory(b) == (fingerprint, 2, 11)
    os.utime(os.path.join(b, "model.keras"), (0, 0))
    assert fingerprint_directory(b)[0] == fingerprint
    write(os.path.join(b, ".model.keras.tmp"), "half-written")  # atomic-write temporaries
    assert fingerprint_directory(b)[0] == fingerprint
    write(os.path.join(b, "model.keras"), "weightz")
    assert fingerprint_directory(b)[0] != fingerprint
    os.rename(os.path.join(a, "model.keras"), os.path.join(a, "renamed.keras"))
    assert fingerprint_directory(a)[0] != fingerprint
    assert fingerprint_directory(str(tmp_path / "missing")) is None


def test_json_fingerprint_ignores_key_order():
    assert fingerprint_json({"a": 1, "b": [1, 2]}) == fingerprint_json({"b": [1, 2], "a": 1})
    assert fingerprint_json({"a": 1}) != fingerprint_json({"a": 2})


def test_execution_lifecycle_events_and_cache_lookup(tmp_path):
    store = MetadataStore(str(tmp_path / "root" / "metadata.sqlite"))
    source = store.put_artifact("t.Text", str(tmp_path / "in"), "f-in", {"files": 1})
    assert store.put_artifact("t.Text", str(tmp_path / "in"), "f-in", {}) == source  # dedup
    run = store.start_execution("p", "step", "comp", {"n": 1}, "pf", {"text": "f-in"},
                                {"python": "3"}, executor="m:f")
    store.add_events(run, "input", {"text": source})
    assert store.execution(run)["status"] == "running"
    out = store.put_artifact("t.Model", str(tmp_path / "out"), "f-out", {})
    store.finish_execution(run, "complete", outputs={"model": out})

    record = store.execution(run)
    assert (record["status"], record["parameters"], record["input_fingerprints"],
            record["versions"]) == ("complete", {"n": 1}, {"text": "f-in"}, {"python": "3"})
    assert record["started"] <= record["ended"]
    assert store.events(run, "input")["text"]["uri"] == str(tmp_path / "in")
    assert store.events(run, "output")["model"]["fingerprint"] == "f-out"
    assert store.producer(out)["id"] == run
    assert store.producer(source) is None
    assert [e["id"] for e in store.find_cached("p", "step", "pf", {"text": "f-in"})] == [run]
    assert store.find_cached("p", "step", "other", {"text": "f-in"}) == []
    assert store.find_cached("p", "step", "pf", {"text": "changed"}) == []
    store.close()

    reopened = MetadataStore(str(tmp_path / "root" / "metadata.sqlite"))
    assert reopened.artifacts_at(str(tmp_path / "out"))[0]["id"] == out
    assert len(reopened.executions(pipeline="p")) == 1


def test_failed_and_abandoned_executions_are_not_producers(tmp_path):
    store = MetadataStore(":memory:")
    failed = store.start_execution("p", "a", "comp", {}, "pf", {}, {})
    art = store.put_artifact("t.Model", str(tmp_path / "x"), "f", {})
    store.finish_execution(failed, "failed", outputs={"model": art}, error="ValueError: boom")
    assert store.producer(art) is None
    assert store.execution(failed)["error"] == "ValueError: boom"
    assert store.find_cached("p", "a", "pf", {}) == []

    left_running = store.start_execution("p", "b", "comp", {}, "pf", {}, {})
    other_pipeline = store.start_execution("q", "b", "comp", {}, "pf", {}, {})
    assert store.abandon_running("p") == 1
    assert store.execution(left_running)["status"] == "failed"
    assert "interrupted" in store.execution(left_running)["error"]
    assert store.execution(other_pipeline)["status"] == "running"


def test_status_is_constrained():
    store = MetadataStore(":memory:")
    run = store.start_execution("p", "a", "comp", {}, "pf", {}, {})
    with pytest.raises(ValueError, match="status must be one of"):
        store.finish_execution(run, "done")
    with pytest.raises(sqlite3.IntegrityError):
        store.start_execution("p", "a", "comp", {}, "pf", {}, {}, status="weird")


def test_docstring_examples_run():
    import doctest

    import keras_llm.components.base
    import keras_llm.pipeline.metadata

    for module in (keras_llm.pipeline.metadata, keras_llm.components.base):
        assert doctest.testmod(module).failed == 0
