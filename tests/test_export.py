"""keras-llm export: TF Serving layout, string signatures reloaded without keras-llm, warmup
records, version numbering, failure cleanup, and the REST server serving an export."""
import json
import os
import subprocess
import sys
import threading
import urllib.request

import keras_hub
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from keras_llm import export as export_lib
from keras_llm.artifacts import read_json
from keras_llm.errors import ArtifactError

PROMPTS = ["", "the quick", "def return value list string number file over lazy dog"]
WORDS = "the quick brown fox jumps over lazy dog def return value list string number file"


# ---------------------------------------------------------------------------- fast checks


def prediction_log_class():
    """`tensorflow.serving.PredictionLog` rebuilt from a minimal descriptor (the field
    numbers of tensorflow_serving/apis), in a private pool: an independent protobuf parser
    for the hand-written wire format."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from tensorflow.core.framework import tensor_pb2

    pool = descriptor_pool.DescriptorPool()
    added = set()

    def add(file_descriptor):
        if file_descriptor.name in added:
            return
        for dependency in file_descriptor.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file_descriptor.CopyToProto(proto)
        pool.Add(proto)
        added.add(file_descriptor.name)

    add(tensor_pb2.DESCRIPTOR)
    F = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="test/prediction_log.proto", package="tensorflow.serving", syntax="proto3",
        dependency=[tensor_pb2.DESCRIPTOR.name])

    def message(name, fields, parent=None):
        msg = (parent.nested_type if parent else file.message_type).add(name=name)
        for field_name, number, kind, type_name, label in fields:
            msg.field.add(name=field_name, number=number, type=kind, type_name=type_name,
                          label=label)
        return msg

    optional, repeated = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    message("ModelSpec", [("name", 1, F.TYPE_STRING, None, optional),
                          ("signature_name", 3, F.TYPE_STRING, None, optional)])
    request = message("PredictRequest", [
        ("model_spec", 1, F.TYPE_MESSAGE, ".tensorflow.serving.ModelSpec", optional),
        ("inputs", 2, F.TYPE_MESSAGE, ".tensorflow.serving.PredictRequest.InputsEntry",
         repeated)])
    entry = message("InputsEntry", [
        ("key", 1, F.TYPE_STRING, None, optional),
        ("value", 2, F.TYPE_MESSAGE, ".tensorflow.TensorProto", optional)], parent=request)
    entry.options.map_entry = True
    message("PredictLog", [
        ("request", 1, F.TYPE_MESSAGE, ".tensorflow.serving.PredictRequest", optional)])
    message("PredictionLog", [
        ("predict_log", 6, F.TYPE_MESSAGE, ".tensorflow.serving.PredictLog", optional)])
    pool.Add(file)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.PredictionLog"))


def test_varint_matches_the_protobuf_encoding():
    assert export_lib._varint(1) == b"\x01"
    assert export_lib._varint(300) == b"\xac\x02"
    assert export_lib._varint(2 ** 35) == b"\x80\x80\x80\x80\x80\x01"


def test_prediction_log_parses_as_tf_serving_proto():
    record = export_lib.prediction_log("gpt", "generate", {
        "prompt": tf.constant(["héllo", ""]), "max_new_tokens": tf.constant(4),
        "temperature": tf.constant(0.5)})
    log = prediction_log_class().FromString(record)
    request = log.predict_log.request
    assert request.model_spec.name == "gpt"
    assert request.model_spec.signature_name == "generate"
    assert sorted(request.inputs) == ["max_new_tokens", "prompt", "temperature"]
    assert tf.make_ndarray(request.inputs["prompt"]).tolist() == ["héllo".encode(), b""]
    assert tf.make_ndarray(request.inputs["max_new_tokens"]) == 4
    assert tf.make_ndarray(request.inputs["temperature"]) == np.float32(0.5)
    # And the parser's own serialization is byte-identical (same fields, same order).
    assert log.SerializeToString(deterministic=True) == record


def test_next_version_counts_numeric_directories_only(tmp_path):
    assert export_lib.next_version(str(tmp_path / "missing")) == 1
    for name in ("1", "3", ".export-4-abc", "notes"):
        os.makedirs(tmp_path / name)
    (tmp_path / "9").write_text("a file, not a version")
    assert export_lib.existing_versions(str(tmp_path)) == [1, 3]
    assert export_lib.next_version(str(tmp_path)) == 4


def test_a_tuning_result_exports_its_best_model(tmp_path):
    (tmp_path / "trial_1").mkdir()
    (tmp_path / "trial_1" / "metadata.json").write_text("{}")
    (tmp_path / "tune").mkdir()
    os.symlink("../trial_1", tmp_path / "tune" / "best_model")
    assert export_lib.resolve_model_dir(str(tmp_path / "tune")) == \
        str(tmp_path / "tune" / "best_model")
    assert export_lib.resolve_model_dir(str(tmp_path / "trial_1")) == str(tmp_path / "trial_1")


def test_choose_tokens_greedy_and_top_k():
    logits = tf.constant([[0.0, 3.0, 2.9, -5.0]] * 4000)
    greedy = export_lib.choose_tokens(logits, tf.constant(1.0), tf.constant(1))
    assert set(greedy.numpy().tolist()) == {1}
    greedy = export_lib.choose_tokens(logits, tf.constant(0.0), tf.constant(3))
    assert set(greedy.numpy().tolist()) == {1}
    tf.random.set_seed(0)
    sampled = export_lib.choose_tokens(logits, tf.constant(1.0), tf.constant(2)).numpy()
    assert set(sampled.tolist()) == {1, 2}
    # p(1) / (p(1) + p(2)) = sigmoid(0.1) = 0.525 within the top 2.
    assert abs(np.mean(sampled == 1) - 0.525) < 0.03
    hot = export_lib.choose_tokens(logits, tf.constant(0.05), tf.constant(4)).numpy()
    assert np.mean(hot == 1) > 0.85  # low temperature sharpens toward the argmax


@pytest.mark.parametrize("jit_compile", [False, True])
def test_decoding_loop_writes_one_cache_position_per_step(jit_compile):
    """A toy model whose next token is the sum of the tokens so far (mod 7), its cache the
    tokens: under XLA, a `[:, i - 1:i]` slice of the newest token had a dynamic width, and
    the cache update (`slice_update`, a dynamic-update-slice) wrote that whole padded
    block from position 0, so the real KV cache held copies of the newest key and value."""
    from keras import ops

    vocabulary, length = 7, 10

    def step(ids, cache, index):
        cache = ops.slice_update(cache, (0, index), ids)
        seen = tf.range(length)[None, :] < index + tf.shape(ids)[1]
        total = tf.reduce_sum(tf.where(seen, cache, 0), axis=1) % vocabulary
        # The same logits at every position of `ids`: only a step's last ones are used.
        logits = tf.one_hot(total, vocabulary)[:, None, :]
        return tf.repeat(logits, tf.shape(ids)[1], axis=1), cache

    def empty_cache(batch_size, length):
        return tf.zeros([batch_size, length], tf.int32)

    prompts = [[3], [1, 5, 2, 6], [4] * length]  # the last one fills the context
    token_ids = np.zeros((3, length), "int32")
    prompt_mask = np.zeros((3, length), bool)
    expected = []
    for row, prompt in enumerate(prompts):
        token_ids[row, :len(prompt)], prompt_mask[row, :len(prompt)] = prompt, True
        ids = list(prompt)
        while len(ids) < length:
            ids.append(sum(ids) % vocabulary)
        expected.append(ids)
    loop = tf.function(lambda token_ids, prompt_mask: export_lib.decoding_loop(
        step, token_ids, prompt_mask, empty_cache, -1, tf.constant(0.0), tf.constant(1)),
        jit_compile=jit_compile)
    assert loop(token_ids, prompt_mask).numpy().tolist() == expected


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_shape_polymorphic_decoding_step_has_no_runtime_shape_arithmetic(position):
    # A signature takes any batch and prompt length, so the loop's shapes are unknown: keras'
    # 3-D matmul (tf.tensordot) would compute its reshapes at run time, about ten small ops
    # per product, per layer, per step (7-10% of an exported decoding step).
    import collections

    from keras_llm.models import GPTBackbone, GPTCausalLM

    model = GPTCausalLM(GPTBackbone(vocabulary_size=40, num_layers=2, num_heads=2,
                                    hidden_size=16, intermediate_size=32, max_length=16,
                                    position=position))

    def step(previous, cache, index):
        logits, _, cache = model.call_with_cache(previous, cache, index)
        return logits, cache

    spec = [tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None, None], tf.bool)]
    loop = tf.function(lambda ids, mask: export_lib.decoding_loop(
        step, ids, mask, model.backbone.empty_cache, -1, tf.constant(0.0), tf.constant(1)),
        input_signature=spec)  # end id -1: no row stops early, as generate_step without one
    library = loop.get_concrete_function().graph.as_graph_def().library.function
    body = max((f for f in library if "while_body" in f.signature.name),
               key=lambda f: len(f.node_def))
    operations = collections.Counter(node.op for node in body.node_def)
    assert operations["MatMul"] == 2 * 4 + 1  # q|k|v, output, two feed-forward; logits
    assert operations["Prod"] == 0
    assert not [node.name for node in body.node_def if "Tensordot" in node.name]
    ids = np.array([[3, 4, 0, 0], [5, 6, 7, 0]], "int32")
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], bool)
    greedy = keras_hub.samplers.GreedySampler()
    expected = model.generate_step(ids, mask, greedy).numpy()
    assert loop(ids, mask).numpy().tolist() == expected.tolist()


class TinyPlan(export_lib.ExportPlan):
    """A trivial model (doubling) to test publishing without building a language model."""

    def __init__(self, wrong=False):
        module = tf.Module()
        module.scale = tf.Variable(2.0)
        module.double = tf.function(lambda x: {"y": x * module.scale},
                                    input_signature=[tf.TensorSpec([None], tf.float32)])
        function = module.double.get_concrete_function()
        expected = {"y": [2.0, 5.0 if wrong else 4.0]}
        super().__init__("tiny", module, {"serving_default": function},
                         [("serving_default", {"x": tf.constant([1.0])})],
                         [({"signature": "serving_default",
                            "inputs": {"x": [[1.0, 2.0], "float32"]}}, expected)],
                         tolerance=1e-6)


def test_versions_numbered_and_never_overwritten(tmp_path):
    base = str(tmp_path / "tiny")
    plan = TinyPlan()
    assert export_lib.write_version(plan, base, validate=False) == os.path.join(base, "1")
    assert export_lib.write_version(plan, base, validate=False) == os.path.join(base, "2")
    assert export_lib.write_version(plan, base, 7, validate=False) == os.path.join(base, "7")
    assert export_lib.write_version(plan, base, validate=False) == os.path.join(base, "8")
    with pytest.raises(ArtifactError, match="2 already exists; versions are never overwritten"):
        export_lib.write_version(plan, base, 2, validate=False)
    with pytest.raises(ArtifactError, match="version must be a positive integer"):
        export_lib.write_version(plan, base, 0, validate=False)
    assert sorted(os.listdir(base)) == ["1", "2", "7", "8"]  # no staging directory left
    assert os.path.isfile(os.path.join(base, "8", "saved_model.pb"))
    records = list(tf.data.TFRecordDataset(
        os.path.join(base, "8", "assets.extra", "tf_serving_warmup_requests")).as_numpy_iterator())
    assert len(records) == 1


def test_check_outputs_refuses_a_mismatch():
    plan = TinyPlan(wrong=True)
    answer = {"signatures": ["serving_default"], "results": [{"y": [2.0, 4.0]}]}
    with pytest.raises(ArtifactError, match=r"differs from the Keras model's by 1"):
        export_lib.check_outputs(plan, answer, where="test")
    with pytest.raises(ArtifactError, match="lacks signature serving_default"):
        export_lib.check_outputs(plan, {"signatures": [], "results": []}, where="test")


# ---------------------------------------------------------------------------- a real GPT


def train_tiny_gpt(root, **overrides):
    """A 3-step `pretrain` of a one-block GPT on random words; returns the artifact path."""
    from keras_llm.config import load_config
    from keras_llm.training.pretrain import pretrain

    rng = np.random.default_rng(0)
    words = WORDS.split()
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 40))}) + "\n"
                              for _ in range(120)))
    config = load_config("gpt-tiny", overrides={
        "train.steps": 3, "model.num_layers": 1, "model.hidden_size": 32,
        "model.num_heads": 2, "model.intermediate_size": 64, "model.vocab_size": 300,
        "model.max_length": 32, "data.seq_len": 32, "train.batch_size": 4,
        "train.eval_every": 3, "train.eval_steps": 1, "data.source": str(corpus), **overrides})
    pretrain(config, str(root / "model"), verbose=0)
    return str(root / "model")


@pytest.fixture(scope="module")
def gpt_artifact(tmp_path_factory):
    return train_tiny_gpt(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def gpt_export(gpt_artifact):
    base = os.path.join(os.path.dirname(gpt_artifact), "exports", "gpt")
    return export_lib.export(gpt_artifact, base)  # validated in a subprocess


def greedy_generation(artifact_dir):
    from keras_llm.artifacts import load_model_artifact
    from keras_llm.generation import TextGenerator

    artifact = load_model_artifact(artifact_dir)
    return [str(text) for text in TextGenerator(artifact.model, artifact.tokenizer).generate(
        PROMPTS, max_new_tokens=6, sampler="greedy")]


@pytest.fixture(scope="module")
def greedy_texts(gpt_artifact):
    return greedy_generation(gpt_artifact)


PLAIN_TF_CHECK = r"""
import json, sys
import tensorflow as tf
import tensorflow_text  # noqa: F401

path, prompts = sys.argv[1], json.loads(sys.argv[2])
model = tf.saved_model.load(path)
generate = model.signatures["generate"]
greedy = generate(prompt=tf.constant(prompts), max_new_tokens=tf.constant(6),
                  temperature=tf.constant(0.0), top_k=tf.constant(1))["text"]
sampled = model.signatures["serving_default"](
    prompt=tf.constant(prompts), max_new_tokens=tf.constant(6), temperature=tf.constant(1.0),
    top_k=tf.constant(20))["text"]
# Replay the warmup requests as TF Serving does: every record runs.
warmup = 0
for record in tf.data.TFRecordDataset(path + "/assets.extra/tf_serving_warmup_requests"):
    warmup += 1
print(json.dumps({
    "greedy": [t.decode("utf-8", "replace") for t in greedy.numpy()],
    "sampled_rows": int(sampled.shape[0]), "warmup_records": warmup,
    "keras_llm_imported": any(m.startswith(("keras_llm", "keras_hub")) for m in sys.modules),
}))
"""


@pytest.mark.slow
def test_export_reloads_without_keras_llm_and_generates(gpt_export, greedy_texts):
    assert gpt_export.endswith(os.path.join("gpt", "1"))
    process = subprocess.run(
        [sys.executable, "-c", PLAIN_TF_CHECK, gpt_export, json.dumps(PROMPTS)],
        capture_output=True, text=True, cwd=os.path.dirname(gpt_export), timeout=300)
    assert process.returncode == 0, process.stderr[-2000:]
    answer = json.loads(process.stdout.strip().splitlines()[-1])
    assert answer["keras_llm_imported"] is False
    assert answer["greedy"] == greedy_texts
    assert answer["sampled_rows"] == len(PROMPTS)
    assert answer["warmup_records"] == 2


@pytest.mark.slow
def test_rotary_gpt_exports_and_generates_like_the_keras_model(tmp_path):
    # Rotary models rotate each decoding step's query and key by its cache position inside
    # the exported while loop; the export's own check compares its greedy text with Keras'.
    artifact = train_tiny_gpt(tmp_path, **{"model.position": "rotary"})
    version_dir = export_lib.export(artifact, str(tmp_path / "exports"))
    process = subprocess.run(
        [sys.executable, "-c", PLAIN_TF_CHECK, version_dir, json.dumps(PROMPTS)],
        capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert process.returncode == 0, process.stderr[-2000:]
    assert json.loads(process.stdout.strip().splitlines()[-1])["greedy"] == greedy_generation(
        artifact)


@pytest.mark.slow
def test_export_layout_metadata_and_warmup(gpt_export, gpt_artifact):
    base = os.path.dirname(gpt_export)
    assert sorted(os.listdir(base)) == ["1", "metadata.json"]
    assert sorted(os.listdir(gpt_export)) == [
        "assets", "assets.extra", "fingerprint.pb", "saved_model.pb", "variables"]
    record = read_json(os.path.join(gpt_export, "assets.extra", "metadata.json"))
    assert record["kind"] == "gpt" and record["version"] == 1 and record["xla"] is False
    assert record["parent"]["directory"] == os.path.abspath(gpt_artifact)
    assert record["signatures"]["generate"] == {
        "inputs": {"max_new_tokens": "int32[]", "prompt": "string[None]",
                   "temperature": "float32[]", "top_k": "int32[]"},
        "outputs": {"text": "string[None]"}}
    assert record["signatures"]["serving_default"] == record["signatures"]["generate"]
    base_record = read_json(os.path.join(base, "metadata.json"))
    assert base_record["artifact_type"] == "keras_llm.ExportedModel"
    assert base_record["latest_version"] == 1
    assert base_record["parent"] == os.path.abspath(gpt_artifact)
    parse = prediction_log_class().FromString
    logs = [parse(r) for r in tf.data.TFRecordDataset(
        os.path.join(gpt_export, "assets.extra", "tf_serving_warmup_requests")
    ).as_numpy_iterator()]
    assert [log.predict_log.request.model_spec.signature_name for log in logs] == [
        "serving_default", "generate"]
    inputs = logs[0].predict_log.request.inputs
    assert sorted(inputs) == ["max_new_tokens", "prompt", "temperature", "top_k"]
    assert tf.make_ndarray(inputs["top_k"]) == 1


@pytest.mark.slow
def test_cli_export_explicit_version_and_refused_overwrite(gpt_export, gpt_artifact):
    from keras_llm.cli import main

    base = os.path.dirname(gpt_export)
    runner = CliRunner()
    result = runner.invoke(main, ["export", gpt_artifact, "--output", base, "--version", "5",
                                  "--no-validate"])
    assert result.exit_code == 0, result.output
    assert "to " + os.path.join(base, "5") in result.output
    assert "generate(max_new_tokens: int32[], prompt: string[None]" in result.output
    result = runner.invoke(main, ["export", gpt_artifact, "--output", base, "--version", "1"])
    assert result.exit_code == 1
    assert "1 already exists; versions are never overwritten" in result.output
    assert sorted(os.listdir(base)) == ["1", "5", "metadata.json"]
    assert read_json(os.path.join(base, "metadata.json"))["latest_version"] == 5


def xla_compiled_functions(version_dir):
    """Names of the SavedModel's functions marked for XLA compilation."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(version_dir, "saved_model.pb"), "rb") as file:
        saved_model.ParseFromString(file.read())
    library = saved_model.meta_graphs[0].graph_def.library
    return [function.signature.name for function in library.function
            if function.attr["_XlaMustCompile"].b]


@pytest.mark.slow
def test_cli_export_xla_generates_like_the_keras_model(gpt_export, gpt_artifact, greedy_texts):
    from keras_llm.cli import main

    base = os.path.join(os.path.dirname(gpt_artifact), "exports", "gpt-xla")
    result = CliRunner().invoke(main, ["export", gpt_artifact, "--output", base, "--xla"])
    assert result.exit_code == 0, result.output
    assert f"(gpt, XLA) to {os.path.join(base, '1')} (validated" in result.output
    version_dir = os.path.join(base, "1")
    assert read_json(os.path.join(version_dir, "assets.extra", "metadata.json"))["xla"] is True
    assert xla_compiled_functions(version_dir) and not xla_compiled_functions(gpt_export)
    generate = tf.saved_model.load(version_dir).signatures["generate"]
    for max_new_tokens, expected in ((6, greedy_texts), (20, None)):
        texts = generate(prompt=tf.constant(PROMPTS), max_new_tokens=tf.constant(max_new_tokens),
                         temperature=tf.constant(0.0), top_k=tf.constant(1))["text"].numpy()
        if expected is None:  # the last prompt, cut to its newest tokens, fills the context
            from keras_llm.artifacts import load_model_artifact
            from keras_llm.generation import TextGenerator

            artifact = load_model_artifact(gpt_artifact)
            expected = TextGenerator(artifact.model, artifact.tokenizer).generate(
                PROMPTS, max_new_tokens=max_new_tokens, sampler="greedy")
        assert [t.decode("utf-8", "replace") for t in texts] == [str(t) for t in expected]
    sampled = generate(prompt=tf.constant(PROMPTS), max_new_tokens=tf.constant(6),
                       temperature=tf.constant(1.0), top_k=tf.constant(20))["text"]
    assert sampled.shape == (len(PROMPTS),)


@pytest.mark.slow
def test_failed_validation_publishes_no_version(gpt_artifact, tmp_path, monkeypatch):
    def wrong_answer(version_dir, calls):
        return {"signatures": ["generate", "serving_default"],
                "results": [{"text": ["not it"] * len(calls[0]["inputs"]["prompt"][0])},
                            {"text": ["x"] * len(calls[1]["inputs"]["prompt"][0])}]}

    monkeypatch.setattr(export_lib, "reload_and_run", wrong_answer)
    base = str(tmp_path / "exports")
    with pytest.raises(ArtifactError, match="output text differs from the Keras model's"):
        export_lib.export(gpt_artifact, base)
    assert os.listdir(base) == []


@pytest.mark.slow
def test_rest_server_serves_the_export(gpt_export, greedy_texts):
    from keras_llm.serving.rest import make_server

    server = make_server(os.path.dirname(gpt_export), port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        body = {"signature_name": "generate",
                "inputs": {"prompt": PROMPTS, "max_new_tokens": 6, "temperature": 0.0,
                           "top_k": 1}}
        request = urllib.request.Request(server.url + ":predict",
                                         data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        # Invalid UTF-8 (a byte-level BPE model may cut a character) comes back as base64.
        texts = [t if isinstance(t, str) else "(binary)" for t in answer["outputs"]]
        assert texts == [t if "\ufffd" not in t else "(binary)" for t in greedy_texts]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def bert_artifact(tmp_path_factory):
    """An untrained tiny BERT with a WordPiece tokenizer, saved as a model artifact."""
    import keras

    from keras_llm.artifacts import make_metadata, save_model_artifact
    from keras_llm.config import load_config
    from keras_llm.data.tokenizers import train_tokenizer
    from keras_llm.models import BertBackbone

    keras.utils.set_random_seed(3)
    tokenizer = train_tokenizer("wordpiece", [WORDS, WORDS.upper(), "Open a file."] * 10, 120,
                                lowercase=True)
    config = load_config("bert-tiny", overrides={
        "model.num_layers": 1, "model.hidden_size": 16, "model.num_heads": 2,
        "model.intermediate_size": 32, "model.max_length": 16, "data.seq_len": 16})
    backbone = BertBackbone.from_model_config(
        config.model, vocabulary_size=tokenizer.vocabulary_size(),
        special_token_ids=tokenizer.special_token_ids())
    backbone({"token_ids": np.ones((1, 4), "int32"), "padding_mask": np.ones((1, 4), bool),
              "segment_ids": np.zeros((1, 4), "int32")})
    directory = str(tmp_path_factory.mktemp("bert") / "model")
    save_model_artifact(directory, backbone, tokenizer, config, {},
                        make_metadata("keras_llm.PretrainedModel", config))
    return directory


@pytest.mark.slow
def test_encoder_export_embeds_like_the_keras_model(bert_artifact):
    from keras_llm.artifacts import load_model_artifact

    base = os.path.join(os.path.dirname(bert_artifact), "exports")
    version_dir = export_lib.export(bert_artifact, base)  # validated within 1e-5
    record = read_json(os.path.join(version_dir, "assets.extra", "metadata.json"))
    assert record["kind"] == "encoder"
    assert record["signatures"]["embed"] == {"inputs": {"text": "string[None]"},
                                             "outputs": {"pooled": "float32[None, 16]"}}
    # Long text is truncated to the context; mixed case is lowercased in the graph.
    texts = ["the QUICK brown fox " * 10, "Open a file."]
    loaded = tf.saved_model.load(version_dir)
    pooled = loaded.signatures["embed"](text=tf.constant(texts))["pooled"].numpy()
    backbone = load_model_artifact(bert_artifact).model
    tokenizer = load_model_artifact(bert_artifact).tokenizer
    ids = [[2] + row[:14] + [3] for row in tokenizer.encode([t.lower() for t in texts])]
    token_ids = np.zeros((2, max(map(len, ids))), "int32")
    for row, values in enumerate(ids):
        token_ids[row, :len(values)] = values
    expected = backbone({"token_ids": token_ids, "padding_mask": token_ids != 0,
                         "segment_ids": np.zeros_like(token_ids)})["pooled_output"]
    np.testing.assert_allclose(pooled, np.asarray(expected), atol=1e-5)


@pytest.mark.slow
def test_xla_export_of_an_encoder_is_refused(bert_artifact, tmp_path):
    from keras_llm.cli import main

    base = str(tmp_path / "exports")
    with pytest.raises(ArtifactError, match="xla .* GPT and seq2seq exports; this encoder model"):
        export_lib.export(bert_artifact, base, xla=True)
    result = CliRunner().invoke(main, ["export", bert_artifact, "--output", base, "--xla"])
    assert result.exit_code == 1
    assert "compiles the decoding loop of GPT and seq2seq exports" in result.output
    assert len(result.output.strip().splitlines()) == 1  # one line, no traceback
    assert not os.path.exists(base)


@pytest.mark.slow
def test_classifier_export_serves_probabilities_and_labels(tmp_path):
    pytest.importorskip("keras_llm.tasks")
    pytest.importorskip("keras_llm.data.labeled")
    import keras

    from keras_llm.artifacts import make_metadata, save_model_artifact
    from keras_llm.config import load_config
    from keras_llm.data.tokenizers import train_tokenizer
    from keras_llm.models import GPTBackbone
    from keras_llm.tasks import TextClassifier

    keras.utils.set_random_seed(5)
    tokenizer = train_tokenizer("bpe", [WORDS, "Open a file."] * 20, 280)
    config = load_config("gpt-tiny", overrides={
        "model.num_layers": 1, "model.hidden_size": 16, "model.num_heads": 2,
        "model.intermediate_size": 32, "model.max_length": 24, "data.seq_len": 12})
    backbone = GPTBackbone.from_model_config(config.model, tokenizer.vocabulary_size())
    classifier = TextClassifier(backbone, num_classes=3)
    classifier({"token_ids": np.ones((1, 12), "int32"), "padding_mask": np.ones((1, 12), bool)})
    # Larger head weights so the classes differ clearly (an untrained head is near-uniform).
    kernel = classifier.output_layer.kernel
    kernel.assign(np.random.default_rng(0).normal(0, 1, kernel.shape).astype("float32"))
    model_dir = str(tmp_path / "classifier")
    save_model_artifact(model_dir, classifier, tokenizer, config, {}, make_metadata(
        "keras_llm.FinetunedModel", config,
        extra={"labels": ["files", "text", "numbers"],
               "columns": {"text": "text", "text_pair": "pair", "label": "label"}}))
    version_dir = export_lib.export(model_dir, str(tmp_path / "exports"))  # within 1e-5
    loaded = tf.saved_model.load(version_dir)
    function = loaded.signatures["serving_default"]
    assert sorted(function.structured_input_signature[1]) == ["text", "text_pair"]
    texts, pairs = ["the quick brown fox " * 8, "Open a file."], ["lazy dog", ""]
    outputs = function(text=tf.constant(texts), text_pair=tf.constant(pairs))
    probabilities = outputs["probabilities"].numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    assert outputs["label_id"].numpy().tolist() == probabilities.argmax(axis=1).tolist()
    names = np.array(["files", "text", "numbers"])
    assert [v.decode() for v in outputs["label"].numpy()] == \
        names[probabilities.argmax(axis=1)].tolist()
    # The same texts through the fine-tuning pipeline and the Keras model.
    from keras_llm.data.labeled import classification_dataset

    features = next(iter(classification_dataset(texts, None, tokenizer, 12, 2, "decoder",
                                                text_pairs=pairs)))
    expected = keras.ops.softmax(classifier(features, training=False)).numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)


@pytest.mark.slow
# XLA with separate vocabularies covers the shared loop and both tokenizers; the GPT XLA
# export and the toy loop test cover the rest.
@pytest.mark.parametrize("separate_vocabularies,xla", [(False, False), (True, False),
                                                       (True, True)])
def test_seq2seq_export_generates_like_the_keras_model(tmp_path, separate_vocabularies, xla):
    from keras_llm import generation

    if not hasattr(generation, "Seq2SeqGenerator"):
        pytest.skip("keras_llm.generation has no Seq2SeqGenerator yet")
    import keras

    from keras_llm.artifacts import make_metadata, save_model_artifact
    from keras_llm.config import load_config
    from keras_llm.data.tokenizers import train_tokenizer
    from keras_llm.models import Seq2SeqBackbone, Seq2SeqLM

    keras.utils.set_random_seed(7)
    tokenizer = train_tokenizer("sentencepiece", [WORDS, "Open a file."] * 20, 60)
    tiny = {"model.num_layers": 1, "model.num_decoder_layers": 1, "model.hidden_size": 16,
            "model.num_heads": 2, "model.intermediate_size": 32, "model.max_length": 16,
            "data.seq_len": 16}
    config = load_config("seq2seq-tiny", overrides=tiny)
    # Separate: a target vocabulary of other words (and size), its own embedding.
    target = (train_tokenizer("sentencepiece", ["Ein schneller Hund. Eine Datei."] * 40, 40)
              if separate_vocabularies else None)
    backbone = Seq2SeqBackbone.from_model_config(
        config.model, tokenizer.vocabulary_size(), tokenizer.special_token_ids(),
        *((target.vocabulary_size(), target.special_token_ids()) if target else ()))
    model = Seq2SeqLM(backbone)
    ones = np.ones((1, 4), "int32")
    model({"encoder_token_ids": ones, "encoder_padding_mask": ones > 0,
           "decoder_token_ids": ones, "decoder_padding_mask": ones > 0})
    if target:  # as `keras-llm finetune --target-vocab-size` records it
        config = load_config("seq2seq-tiny", overrides={
            **tiny, "task": "seq2seq", "model.target_vocab_size": target.vocabulary_size()})
    model_dir = str(tmp_path / "seq2seq")
    save_model_artifact(model_dir, model, tokenizer, config, {},
                        make_metadata("keras_llm.PretrainedModel", config),
                        target_tokenizer=target)
    version_dir = export_lib.export(model_dir, str(tmp_path / "exports"), xla=xla)  # validated
    assert read_json(os.path.join(version_dir, "assets.extra", "metadata.json"))["xla"] is xla
    assert bool(xla_compiled_functions(version_dir)) is xla
    generate = tf.saved_model.load(version_dir).signatures["generate"]
    sources = ["the quick brown fox " * 6, "lazy dog"]
    texts = generate(prompt=tf.constant(sources), max_new_tokens=tf.constant(5),
                     temperature=tf.constant(0.0), top_k=tf.constant(1))["text"].numpy()
    expected = generation.Seq2SeqGenerator(model, tokenizer, target).generate(
        sources, max_new_tokens=5, sampler="greedy")
    assert [t.decode("utf-8", "replace") for t in texts] == [str(t) for t in expected]
    assert all(expected)  # a real continuation, not an immediate end token
    if target:  # decoded with the target vocabulary, not the source one
        ids = generation.Seq2SeqGenerator(model, tokenizer, target).generate_ids(
            sources, max_new_tokens=5)
        assert [target.decode(row) for row in ids] == [str(t) for t in expected]
        assert [tokenizer.decode(row) for row in ids] != [str(t) for t in expected]
