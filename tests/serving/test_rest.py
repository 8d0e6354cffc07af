"""The local TF Serving REST server, against tiny SavedModels built with plain TensorFlow."""
import base64
import concurrent.futures
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request

import pytest
import tensorflow as tf

from keras_llm.serving.rest import make_server


class TinyModel(tf.Module):
    """A 'classifier' (long text vs short) and an 'echo' generate, both on raw strings."""

    def __init__(self, version):
        super().__init__()
        self.version = version
        self.threshold = tf.Variable(5.0 if version == 1 else 10.0)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def classify(self, text):
        length = tf.cast(tf.strings.length(text), tf.float32)
        p_long = tf.sigmoid(length - self.threshold)
        label_id = tf.cast(p_long > 0.5, tf.int32)
        return {"probabilities": tf.stack([1.0 - p_long, p_long], axis=1),
                "label": tf.gather(tf.constant(["short", "long"]), label_id),
                "label_id": label_id}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="prompt"),
                                  tf.TensorSpec([None], tf.int32, name="max_new_tokens")])
    def generate(self, prompt, max_new_tokens):
        tf.debugging.assert_non_negative(max_new_tokens, message="max_new_tokens must be >= 0")
        text = tf.strings.join([tf.strings.upper(prompt), tf.strings.as_string(max_new_tokens)],
                               separator=f" v{self.version} ")
        return {"text": text}


def save_version(base, version):
    model = TinyModel(version)
    tf.saved_model.save(model, os.path.join(base, str(version)),
                        signatures={"serving_default": model.classify,
                                    "generate": model.generate})


def p_long(text, version):
    threshold = 5.0 if version == 1 else 10.0
    return 1.0 / (1.0 + pow(2.718281828459045, -(len(text.encode()) - threshold)))


@pytest.fixture(scope="module")
def export_base(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("exports") / "tiny")
    save_version(base, 1)
    save_version(base, 2)
    return base


@pytest.fixture
def server(export_base, tmp_path):
    base = str(tmp_path / "tiny")
    shutil.copytree(export_base, base)
    server = make_server(base, port=0, max_batch_size=4, poll_seconds=0.05)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def call(server, path, body=None, raw=None):
    """Returns (HTTP status, parsed JSON) for GET (no body) or POST."""
    host, port = server.server_address[:2]
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(f"http://{host}:{port}{path}", data=data,
                                     method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_binds_localhost_and_names_model_after_directory(server):
    assert server.server_address[0] == "127.0.0.1"
    assert server.model_name == "tiny"
    assert server.url.endswith("/v1/models/tiny")


def test_model_status_is_tf_serving_json(server):
    assert call(server, "/v1/models/tiny") == (200, {"model_version_status": [
        {"version": "2", "state": "AVAILABLE",
         "status": {"error_code": "OK", "error_message": ""}}]})
    status, body = call(server, "/v1/models/tiny/versions/1")
    assert status == 200
    assert body["model_version_status"][0]["version"] == "1"
    assert body["model_version_status"][0]["state"] == "AVAILABLE"


def test_metadata_describes_signatures(server):
    status, body = call(server, "/v1/models/tiny/metadata")
    assert status == 200
    assert body["model_spec"] == {"name": "tiny", "signature_name": "", "version": "2"}
    defs = body["metadata"]["signature_def"]["signature_def"]
    assert set(defs) == {"serving_default", "generate"}
    text = defs["serving_default"]["inputs"]["text"]
    assert text["dtype"] == "DT_STRING"
    assert text["tensor_shape"] == {"dim": [{"size": "-1", "name": ""}], "unknown_rank": False}
    assert set(defs["serving_default"]["outputs"]) == {"probabilities", "label", "label_id"}
    assert defs["generate"]["outputs"]["text"]["dtype"] == "DT_STRING"
    assert defs["generate"]["method_name"] == "tensorflow/serving/predict"


def test_row_format_predict(server):
    texts = ["hi", "a much longer sentence"]
    status, body = call(server, "/v1/models/tiny:predict", {"instances": texts})
    assert status == 200
    rows = body["predictions"]
    assert [row["label"] for row in rows] == ["short", "long"]
    assert [row["label_id"] for row in rows] == [0, 1]
    for text, row in zip(texts, rows):
        assert row["probabilities"][1] == pytest.approx(p_long(text, 2), rel=1e-5)
        assert sum(row["probabilities"]) == pytest.approx(1.0, rel=1e-6)


def test_row_format_with_named_inputs_and_b64(server):
    encoded = base64.b64encode("naïve".encode()).decode()
    status, body = call(server, "/v1/models/tiny:predict",
                        {"instances": [{"text": {"b64": encoded}}, {"text": "x"}]})
    assert status == 200
    assert body["predictions"][0]["probabilities"][1] == pytest.approx(
        p_long("naïve", 2), rel=1e-5)  # 6 UTF-8 bytes
    assert body["predictions"][1]["label"] == "short"


def test_columnar_format_predict(server):
    status, body = call(server, "/v1/models/tiny:predict", {"inputs": {"text": ["hi", "yo"]}})
    assert status == 200
    outputs = body["outputs"]
    assert outputs["label"] == ["short", "short"]
    assert outputs["label_id"] == [0, 0]
    assert len(outputs["probabilities"]) == 2
    # One input: the bare batch works too.
    assert call(server, "/v1/models/tiny:predict", {"inputs": ["hi", "yo"]})[1] == body


def test_signature_selection_single_output_is_bare(server):
    status, body = call(server, "/v1/models/tiny:predict", {
        "signature_name": "generate",
        "instances": [{"prompt": "abc", "max_new_tokens": 3},
                      {"prompt": "héllo", "max_new_tokens": 7}]})
    assert (status, body) == (200, {"predictions": ["ABC v2 3", "HéLLO v2 7"]})
    status, body = call(server, "/v1/models/tiny:predict", {
        "signature_name": "generate", "inputs": {"prompt": ["q"], "max_new_tokens": [1]}})
    assert (status, body) == (200, {"outputs": ["Q v2 1"]})


def test_version_selection(server):
    request = {"signature_name": "generate", "instances": [{"prompt": "a", "max_new_tokens": 1}]}
    assert call(server, "/v1/models/tiny/versions/1:predict", request)[1] == {
        "predictions": ["A v1 1"]}
    assert call(server, "/v1/models/tiny/versions/2:predict", request)[1] == {
        "predictions": ["A v2 1"]}
    status, body = call(server, "/v1/models/tiny/versions/1/metadata")
    assert body["model_spec"]["version"] == "1"


def test_new_version_is_picked_up(server, export_base):
    base = server.versions.export_base
    # Written under another name first, as an exporter should, then renamed into place.
    shutil.copytree(os.path.join(export_base, "1"), os.path.join(base, ".tmp-3"))
    os.rename(os.path.join(base, ".tmp-3"), os.path.join(base, "3"))
    deadline = time.time() + 30
    while time.time() < deadline and call(server, "/v1/models/tiny/metadata")[1][
            "model_spec"]["version"] != "3":
        time.sleep(0.05)
    status, body = call(server, "/v1/models/tiny")
    assert [v["version"] for v in body["model_version_status"]] == ["3", "2"]
    request = {"signature_name": "generate", "instances": [{"prompt": "a", "max_new_tokens": 2}]}
    # Version 3 is a copy of version 1's files.
    assert call(server, "/v1/models/tiny:predict", request)[1] == {"predictions": ["A v1 2"]}


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/models/tiny:predict", b"{not json", 400, "JSON Parse error: Expecting property name"),
    ("/v1/models/tiny:predict", b'{"instances": ["a"], "inputs": ["a"]}', 400,
     "Not both 'instances' and 'inputs'"),
    ("/v1/models/tiny:predict", b'{"signature_name": "x", "instances": ["a"]}', 400,
     'Serving signature name: "x" not found in signature def'),
    ("/v1/models/tiny:predict", b'{"instances": [{"txt": "a"}]}', 400,
     "Failed to process element: 0 of 'instances' list. Error: input tensor alias not "
     "found in signature: txt. Inputs expected to be in the set {text}."),
    ("/v1/models/tiny:predict", b'{"inputs": {"txt": ["a"]}}', 400,
     "input tensor alias not found in signature: txt"),
    ("/v1/models/tiny:predict", b'{"signature_name": "generate", "instances": '
     b'[{"prompt": "a"}]}', 400, "missing input: max_new_tokens"),
    ("/v1/models/tiny:predict", b'{"instances": [1]}', 400, "input text: expected a string"),
    ("/v1/models/tiny:predict", b'{"signature_name": "generate", "instances": '
     b'[{"prompt": "a", "max_new_tokens": -1}]}', 400,
     "assertion failed: [max_new_tokens must be >= 0"),
    ("/v1/models/tiny:predict", b'{"instances": ["a", "b", "c", "d", "e"]}', 400,
     "Task size 5 is larger than maximum input batch size 4"),
    ("/v1/models/tiny/versions/9:predict", b'{"instances": ["a"]}', 404,
     "Servable not found for request: Specific(tiny, 9)"),
    ("/v1/models/other:predict", b'{"instances": ["a"]}', 404,
     "Servable not found for request: Latest(other)"),
    ("/v1/models/tiny/versions/9", None, 404, "Could not find version 9 of model tiny"),
    ("/v1/models/other", None, 404, "Servable not found for request: Latest(other)"),
    ("/v1/models/tiny/versions/x", None, 400, "Malformed request: GET"),
    ("/v1/models/tiny:predict", None, 400, "Malformed request: GET"),
])
def test_errors_have_tf_serving_shape_and_server_keeps_serving(server, path, body, status,
                                                               message):
    got_status, got = call(server, path, raw=body)
    assert got_status == status
    assert list(got) == ["error"]
    assert message in got["error"]
    assert call(server, "/v1/models/tiny:predict", {"instances": ["ok"]})[0] == 200


def test_broken_version_reports_end_state_and_is_retried_when_rewritten(server, export_base):
    os.makedirs(os.path.join(server.versions.export_base, "5"))
    with open(os.path.join(server.versions.export_base, "5", "saved_model.pb"), "wb") as f:
        f.write(b"not a protobuf")
    status, body = call(server, "/v1/models/tiny/versions/5")
    assert status == 200
    (entry,) = body["model_version_status"]
    assert (entry["version"], entry["state"], entry["status"]["error_code"]) == (
        "5", "END", "UNKNOWN")
    assert call(server, "/v1/models/tiny/versions/5:predict", {"instances": ["a"]})[0] == 404
    assert call(server, "/v1/models/tiny/metadata")[1]["model_spec"]["version"] == "2"
    # Once the files change (the exporter finished), the version is tried again.
    shutil.rmtree(os.path.join(server.versions.export_base, "5"))
    shutil.copytree(os.path.join(export_base, "1"), os.path.join(server.versions.export_base, "5"))
    deadline = time.time() + 30
    while time.time() < deadline and call(server, "/v1/models/tiny/metadata")[1][
            "model_spec"]["version"] != "5":
        time.sleep(0.05)
    assert call(server, "/v1/models/tiny/versions/5")[1]["model_version_status"][0][
        "state"] == "AVAILABLE"


def test_concurrent_requests_all_correct(server):
    def one(i):
        version = 1 + i % 2
        prompt = f"p{i}"
        status, body = call(server, f"/v1/models/tiny/versions/{version}:predict", {
            "signature_name": "generate",
            "instances": [{"prompt": prompt, "max_new_tokens": i}]})
        return status, body, f"P{i} v{version} {i}"

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(48)))
    for status, body, expected in results:
        assert (status, body) == (200, {"predictions": [expected]})
