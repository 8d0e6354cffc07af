"""Export: a model artifact -> a SavedModel for TensorFlow Serving, strings in, strings out.

`export(model_dir, output)` writes `output/<version>/`, TF Serving's layout (the next
version number by default; an existing version is never overwritten):

    <version>/saved_model.pb, variables/, assets/     the SavedModel; the tokenizer's tables
                                                      and the model's weights are inside it
    <version>/assets.extra/tf_serving_warmup_requests TFRecord of PredictionLog protos that
                                                      TF Serving replays on load (warmup)
    <version>/assets.extra/metadata.json              parent artifact, signatures, versions
    metadata.json                                     the export base's record (all versions)

Signatures take raw strings; the tokenizer runs inside the graph:

    GPT, seq2seq  generate(prompt: string[b], max_new_tokens: int32, temperature: float32,
                           top_k: int32) -> text: string[b]            (= serving_default)
                  The decoding loop (a `tf.while_loop` over the model's `call_with_cache`,
                  KV cache included) runs in the graph; `top_k <= 1` or `temperature <= 0`
                  is greedy, otherwise a sample from the top_k tokens at that temperature.
                  `export(..., xla=True)` (`keras-llm export --xla`) compiles the prefill and
                  the loop with XLA: several times faster per call on CPU, but each new
                  batch size and padded length compiles first, and the server needs
                  TensorFlow's XLA JIT (recorded as "xla" in the version's metadata).
                  A seq2seq model with its own target vocabulary carries both tokenizers:
                  the source one reads the prompt, the target one writes the text.
    classifiers   serving_default(text: string[b][, text_pair: string[b]]) ->
                  probabilities: float32[b, classes], label: string[b], label_id: int32[b]
    encoders      embed(text: string[b]) -> pooled: float32[b, hidden]  (= serving_default)

The version is written to a hidden temporary directory under `output`, reloaded in a
subprocess that imports only TensorFlow and TensorFlow Text (never keras-llm), and its
outputs compared with the Keras model's (greedy generation must equal the in-process
generator's exactly, probabilities and vectors agree within 1e-5);
only then is it renamed to `output/<version>`. Any mismatch raises `ArtifactError` and
leaves no version behind.

Serving needs the TensorFlow Text ops (the tokenizers use them): `import tensorflow_text`
before `tf.saved_model.load`, or a TF Serving build that links them.

Example:

    from keras_llm.export import export
    version_dir = export("runs/gpt-tiny", "exports/gpt-tiny")      # exports/gpt-tiny/1
"""
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile

from keras_llm.artifacts import (
    METADATA_FILE,
    MODEL_FILE,
    is_complete,
    load_model_artifact,
    make_metadata,
    read_json,
    write_json,
)
from keras_llm.errors import ArtifactError

logger = logging.getLogger(__name__)

EXPORTED_MODEL = "keras_llm.ExportedModel"
ASSETS_EXTRA = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
SAMPLE_PROMPTS = ("", "def", "Return the number of items in a list.")
SAMPLE_TEXTS = ("Return the number of items in a list.", "Open a file for reading.")
VALIDATION_TIMEOUT_S = 600
BEST_MODEL_LINK = "best_model"  # a tuning result's link to its best trial's model artifact


# ---------------------------------------------------------------------------- versions


def existing_versions(export_base):
    """The numeric version directories under `export_base` (finished or not)."""
    if not os.path.isdir(export_base):
        return []
    return sorted(int(name) for name in os.listdir(export_base)
                  if name.isdigit() and os.path.isdir(os.path.join(export_base, name)))


def next_version(export_base):
    found = existing_versions(export_base)
    return found[-1] + 1 if found else 1


# ---------------------------------------------------------------------------- graph pieces


def graph_tokenizer(tokenizer):
    """The keras-hub tokenizer layer, its lookup tables built now (eagerly): keras-hub
    builds them lazily on first use, which inside a trace would put them in the trace."""
    layer = tokenizer.keras_tokenizer
    initialize = getattr(layer, "_maybe_initialized_tf", None)
    if initialize is not None:
        initialize()
    return layer


def target_graph_detokenizer(tokenizer):
    """What detokenizes a seq2seq model's own target vocabulary in the graph (`detokenize`).

    A SentencePiece target gets a TF Text tokenizer with a name of its own: keras-hub's
    layer leaves the TF Text model resource unnamed, and a SavedModel holding two unnamed
    SentencePiece models decodes with the first one's after reloading (TF Text 2.21)."""
    if tokenizer.kind == "sentencepiece":
        import tensorflow_text

        return tensorflow_text.SentencepieceTokenizer(model=tokenizer.files["spm.model"],
                                                      name="target_sentencepiece")
    return graph_tokenizer(tokenizer)


def tokenize_in_graph(tokenizer, layer, texts):
    """string[b] -> int32 RaggedTensor[b, None], as `Tokenizer.tokenize` (lowercasing too)."""
    import tensorflow as tf

    if tokenizer.lowercase and tokenizer.kind != "wordpiece":
        texts = tf.strings.lower(texts, encoding="utf-8")
    # Unconverted, as in `Tokenizer.tokenize`: keras-hub's code needs no AutoGraph.
    ids = tf.autograph.experimental.do_not_convert(layer.tokenize)(texts)
    if not isinstance(ids, tf.RaggedTensor):
        ids = tf.RaggedTensor.from_tensor(ids)
    return tf.cast(ids, tf.int32)


def keep_last(ids, keep):
    """The last `keep` ids of every row of a RaggedTensor."""
    import tensorflow as tf

    starts = ids.row_starts() + tf.maximum(ids.row_lengths() - tf.cast(keep, tf.int64), 0)
    return tf.gather(ids.values, tf.ragged.range(starts, ids.row_limits()))


def choose_tokens(logits, temperature, top_k):
    """Next ids `(batch,)`: greedy when `top_k <= 1` or `temperature <= 0`, else a sample
    from the `top_k` most likely tokens at `temperature`."""
    import tensorflow as tf

    logits = tf.cast(logits, tf.float32)

    def greedy():
        # argmax of the softmax, as keras-hub's GreedySampler (identical on near-ties).
        return tf.argmax(tf.nn.softmax(logits), axis=-1, output_type=tf.int32)

    def sample():
        k = tf.clip_by_value(top_k, 1, tf.shape(logits)[-1])
        values, indices = tf.math.top_k(logits / tf.maximum(temperature, 1e-6), k=k)
        picked = tf.random.categorical(values, 1, dtype=tf.int32)
        return tf.gather(indices, picked[:, 0], batch_dims=1)

    # A branch, not both computed and one selected: greedy steps skip top-k and sampling.
    return tf.cond((top_k <= 1) | (temperature <= 0.0), greedy, sample)


def decoding_loop(step, token_ids, prompt_mask, empty_cache, end_id, temperature, top_k):
    """Fills `token_ids` `(batch, length)` after each prompt (`prompt_mask` True on prompt
    tokens, which are kept) with a `tf.while_loop`, as keras-hub's samplers do:
    `step(ids (batch, n), cache, index) -> (logits (batch, n, vocab), cache)` is the
    model's KV-cached step, `empty_cache(batch, length)` its empty cache; the loop ends
    when every row has a new end token."""
    import tensorflow as tf

    batch_size, length = tf.shape(token_ids)[0], tf.shape(token_ids)[1]
    # Prefill over the whole padded block; positions past a prompt hold garbage that each
    # step overwrites before it is attended to (as GPTCausalLM.generate_step).
    _, cache = step(token_ids, empty_cache(batch_size, length), 0)

    def unfinished(token_ids, cache, index):
        ended = tf.reduce_any((token_ids == end_id) & ~prompt_mask, axis=-1)
        return ~tf.reduce_all(ended)

    def body(token_ids, cache, index):
        # `token_ids[:, index - 1:index]` would have a width XLA cannot infer: it becomes a
        # dynamic dimension padded to `length`, and the KV-cache update with that block (a
        # dynamic-update-slice, whose start XLA clamps so the block fits) would overwrite
        # the cache from position 0 instead of writing one position at `index - 1`.
        previous = token_ids[:, index - 1][:, None]
        logits, cache = step(previous, cache, index - 1)
        chosen = choose_tokens(logits[:, 0, :], temperature, top_k)
        chosen = tf.where(prompt_mask[:, index], token_ids[:, index], chosen)
        column = tf.one_hot(index, length, on_value=True, off_value=False)
        return tf.where(column[None, :], chosen[:, None], token_ids), cache, index + 1

    start = tf.reduce_min(tf.reduce_sum(tf.cast(prompt_mask, tf.int32), axis=1))
    token_ids, _, _ = tf.while_loop(unfinished, body, (token_ids, cache, start),
                                    maximum_iterations=length - start)
    return token_ids


def continuation_text(layer, tokenizer, token_ids, starts, max_new_tokens):
    """Text of each row's `max_new_tokens` ids from `starts`, cut at the first end token,
    special tokens dropped (as the generators and `Tokenizer.decode` do)."""
    import tensorflow as tf

    specials = tokenizer.special_token_ids()
    special_ids = tf.constant(sorted(set(specials.values())), tf.int32)
    position = tf.range(tf.shape(token_ids)[1])[None, :]
    window = (position >= starts[:, None]) & (position < starts[:, None] + max_new_tokens)
    ended = tf.math.cumsum(tf.cast(window & (token_ids == specials["eos"]), tf.int32),
                           axis=1) > 0
    special = tf.reduce_any(token_ids[..., None] == special_ids, axis=-1)
    text = tf.autograph.experimental.do_not_convert(layer.detokenize)(
        tf.ragged.boolean_mask(token_ids, window & ~ended & ~special))
    return tf.reshape(tf.cast(text, tf.string), [-1])


def check_max_new_tokens(max_new_tokens, max_length):
    import tensorflow as tf

    tf.debugging.assert_greater_equal(max_new_tokens, 1, message="max_new_tokens must be >= 1")
    tf.debugging.assert_less(
        max_new_tokens, max_length,
        message=f"max_new_tokens must be below the model's context length ({max_length})")


def xla_compiled(function, jit_compile):
    """`function` compiled with XLA as one cluster (`jit_compile`), or as is: then it is
    traced into the signature's graph like the rest."""
    import tensorflow as tf

    return tf.function(function, jit_compile=True) if jit_compile else function


def gpt_generation(model, tokenizer, layer, jit_compile=False):
    """`generate(prompt, max_new_tokens, temperature, top_k) -> {"text"}` for a GPTCausalLM,
    with `keras_llm.generation.TextGenerator`'s prompt handling: each prompt starts after an
    end-of-document token, and the newest tokens are kept when prompt plus continuation
    exceed the context. `jit_compile` runs the prefill and the decoding loop under XLA."""
    import tensorflow as tf

    backbone = model.backbone
    max_length = backbone.max_length
    end_id = tokenizer.special_token_ids()["eos"]

    def step(previous, cache, index):
        logits, _, cache = model.call_with_cache(previous, cache, index)
        return logits, cache

    def decode(token_ids, prompt_mask, temperature, top_k):
        return decoding_loop(step, token_ids, prompt_mask, backbone.empty_cache, end_id,
                             temperature, top_k)

    decode = xla_compiled(decode, jit_compile)

    def generate(prompt, max_new_tokens, temperature, top_k):
        check_max_new_tokens(max_new_tokens, max_length)
        ids = tokenize_in_graph(tokenizer, layer, prompt)
        batch_size = ids.nrows(out_type=tf.int32)
        ids = tf.concat([tf.fill([batch_size, 1], end_id), ids], axis=1)
        longest = tf.cast(tf.reduce_max(ids.row_lengths()), tf.int32)
        ids = keep_last(ids, tf.maximum(1, tf.minimum(longest, max_length - max_new_tokens)))
        prompt_lengths = tf.cast(ids.row_lengths(), tf.int32)
        length = tf.minimum(max_length, tf.reduce_max(prompt_lengths) + max_new_tokens)
        token_ids = ids.to_tensor(default_value=0,
                                  shape=tf.cast(tf.stack([batch_size, length]), tf.int64))
        token_ids = decode(token_ids, tf.sequence_mask(prompt_lengths, length), temperature,
                           top_k)
        return {"text": continuation_text(layer, tokenizer, token_ids, prompt_lengths,
                                          max_new_tokens)}

    return generate


def seq2seq_generation(model, tokenizer, layer, target_tokenizer=None, target_layer=None,
                       jit_compile=False):
    """`generate(prompt, max_new_tokens, temperature, top_k) -> {"text"}` for a Seq2SeqLM,
    with `keras_llm.generation.Seq2SeqGenerator`'s layout: the encoder reads the source and
    `[EOS]`, the decoder starts from `[CLS]`. Outputs are detokenized by `target_layer`
    (the target tokenizer's) when the target has its own vocabulary. `jit_compile` runs
    the encoder, the prefill and the decoding loop under XLA."""
    import tensorflow as tf

    backbone = model.backbone
    max_length = backbone.max_length
    source_specials = tokenizer.special_token_ids()
    target_tokenizer, target_layer = target_tokenizer or tokenizer, target_layer or layer
    specials = target_tokenizer.special_token_ids()

    def decode(encoder_ids, encoder_mask, token_ids, prompt_mask, temperature, top_k):
        cross_cache = backbone.cross_attention_cache(backbone.encode(encoder_ids, encoder_mask))

        def step(previous, cache, index):
            logits, _, cache = model.call_with_cache(previous, cache, index, cross_cache,
                                                     encoder_mask)
            return logits, cache

        return decoding_loop(step, token_ids, prompt_mask, backbone.empty_cache,
                             specials["eos"], temperature, top_k)

    decode = xla_compiled(decode, jit_compile)

    def generate(prompt, max_new_tokens, temperature, top_k):
        check_max_new_tokens(max_new_tokens, max_length)
        ids = tokenize_in_graph(tokenizer, layer, prompt)[:, :max_length - 1]
        batch_size = ids.nrows(out_type=tf.int32)
        ids = tf.concat([ids, tf.fill([batch_size, 1], source_specials["eos"])], axis=1)
        encoder_ids = ids.to_tensor(default_value=source_specials["pad"])
        encoder_mask = tf.sequence_mask(ids.row_lengths(), tf.shape(encoder_ids)[1])
        length = tf.minimum(max_length, max_new_tokens + 1)
        first = tf.one_hot(tf.zeros([batch_size], tf.int32), length, on_value=True,
                           off_value=False)
        token_ids = tf.where(first, specials["cls"], specials["pad"])
        token_ids = decode(encoder_ids, encoder_mask, token_ids, first, temperature, top_k)
        return {"text": continuation_text(target_layer, target_tokenizer, token_ids,
                                          tf.ones([batch_size], tf.int32), max_new_tokens)}

    return generate


# ---------------------------------------------------------------------------- warmup records
#
# TF Serving replays `assets.extra/tf_serving_warmup_requests` on load: a TFRecord file whose
# records are serialized `tensorflow.serving.PredictionLog` protos. tensorflow-serving-api is
# not a dependency, so the few messages needed are written here in protobuf wire format:
#
#     PredictionLog  { PredictLog predict_log = 6; }
#     PredictLog     { PredictRequest request = 1; }
#     PredictRequest { ModelSpec model_spec = 1; map<string, TensorProto> inputs = 2; }
#     ModelSpec      { string name = 1; string signature_name = 3; }
#     map entry      { string key = 1; TensorProto value = 2; }
#
# (field numbers from tensorflow_serving/apis/{prediction_log,predict,model}.proto;
# TensorProto is TensorFlow's own, serialized by `tf.make_tensor_proto`).


def _varint(value):
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _length_delimited(field_number, payload):
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    return _varint(field_number << 3 | 2) + _varint(len(payload)) + payload


def prediction_log(model_name, signature_name, inputs):
    """A serialized `PredictionLog` holding one `PredictRequest`; `inputs` maps names to
    values `tf.make_tensor_proto` accepts (or TensorProtos)."""
    import tensorflow as tf

    model_spec = _length_delimited(1, model_name) + _length_delimited(3, signature_name)
    request = _length_delimited(1, model_spec)
    for name in sorted(inputs):
        value = inputs[name]
        proto = value if hasattr(value, "SerializeToString") else tf.make_tensor_proto(value)
        entry = _length_delimited(1, name) + _length_delimited(2, proto.SerializeToString())
        request += _length_delimited(2, entry)
    return _length_delimited(6, _length_delimited(1, request))


def write_warmup_requests(version_dir, model_name, requests):
    """Writes `[(signature_name, inputs), ...]` to `assets.extra/tf_serving_warmup_requests`."""
    import tensorflow as tf

    path = os.path.join(version_dir, ASSETS_EXTRA, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for signature_name, inputs in requests:
            writer.write(prediction_log(model_name, signature_name, inputs))
    return path


# ---------------------------------------------------------------------------- validation
#
# The check runs in a fresh interpreter that imports only TensorFlow and TensorFlow Text, as
# a serving process would: it proves the SavedModel carries everything (graph, weights,
# tokenizer tables) and needs no keras-llm code.

RELOAD_SCRIPT = r"""
import json, sys
import tensorflow as tf
import tensorflow_text  # noqa: F401  (registers the tokenizers' ops)

path, calls = sys.argv[1], json.loads(sys.stdin.read())
loaded = tf.saved_model.load(path)
results = []
for call in calls:
    function = loaded.signatures[call["signature"]]
    inputs = {name: tf.constant(value, dtype=dtype)
              for name, (value, dtype) in call["inputs"].items()}
    outputs = {}
    for name, tensor in function(**inputs).items():
        array = tensor.numpy()
        if array.dtype == object:
            outputs[name] = [v.decode("utf-8", errors="replace") for v in array.reshape(-1)]
        else:
            outputs[name] = array.tolist()
    results.append(outputs)
imported = sorted(m for m in sys.modules if m.split(".")[0] in ("keras_llm", "keras_hub"))
print(json.dumps({"signatures": sorted(loaded.signatures), "results": results,
                  "imported": imported}))
"""


def reload_and_run(version_dir, calls, timeout=VALIDATION_TIMEOUT_S):
    """Runs `calls` (`[{"signature", "inputs": {name: [value, dtype]}}]`) on the SavedModel
    in a subprocess with plain TensorFlow; returns its JSON answer."""
    # Run from the export directory so the working directory's packages are not importable.
    process = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, os.path.abspath(version_dir)],
        input=json.dumps(calls), capture_output=True, text=True, timeout=timeout,
        cwd=os.path.dirname(os.path.abspath(version_dir)))
    if process.returncode != 0:
        last = (process.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ArtifactError(f"{version_dir}: the SavedModel does not load and run with plain "
                            f"TensorFlow: {last}")
    answer = json.loads(process.stdout.strip().splitlines()[-1])
    if answer["imported"]:
        raise ArtifactError(f"{version_dir}: reloading the SavedModel imported "
                            f"{', '.join(answer['imported'])}")
    return answer


# ---------------------------------------------------------------------------- plans


class ExportPlan:
    """What to write and check for one model: the module and its signatures, warmup
    requests `[(signature, inputs)]`, and checks `[(call, expected outputs or None)]`
    (None: only the batch size of every output is checked, e.g. for sampled text)."""

    def __init__(self, kind, module, signatures, warmup, checks, tolerance=0.0, xla=False):
        self.kind = kind
        self.module = module
        self.signatures = signatures
        self.warmup = warmup
        self.checks = checks
        self.tolerance = tolerance
        self.xla = xla  # the decoding loop is compiled with XLA


def model_kind(model):
    """'gpt', 'seq2seq', 'encoder' or 'classifier' for a loaded artifact's model."""
    from keras_llm import models

    if isinstance(model, models.GPTCausalLM):
        return "gpt"
    if isinstance(model, models.Seq2SeqLM):
        return "seq2seq"
    if isinstance(model, (models.BertBackbone, models.BertMaskedLM, models.ElectraPretrainer)):
        return "encoder"
    try:
        from keras_llm.tasks import TextClassifier
    except ImportError:  # fine-tuning tasks not installed
        TextClassifier = ()
    if isinstance(model, TextClassifier):
        return "classifier"
    raise ArtifactError(f"cannot export a {type(model).__name__}: export supports GPT causal "
                        f"LMs, seq2seq models, BERT-family encoders and text classifiers")


def _module(model, tokenizer):
    import tensorflow as tf

    module = tf.Module()
    module.model = model  # tracked: its variables are saved
    module.tokenizer = graph_tokenizer(tokenizer)  # tracked: its lookup tables are saved
    return module


def _call(signature, **inputs):
    """A validation call: `{name: [value, dtype]}` in JSON for the subprocess."""
    dtypes = {str: "string", int: "int32", float: "float32"}
    return {"signature": signature, "inputs": {
        name: [list(value) if isinstance(value, (list, tuple)) else value,
               dtypes[type(value[0] if isinstance(value, (list, tuple)) else value)]]
        for name, value in inputs.items()}}


GENERATION_SIGNATURE = (("prompt", "string", [None]), ("max_new_tokens", "int32", []),
                        ("temperature", "float32", []), ("top_k", "int32", []))


def generator_plan(artifact, xla=False):
    """`generate` (= `serving_default`) for GPT and seq2seq models, its decoding loop
    compiled with XLA when `xla`; greedy output must equal the in-process generator's
    (`keras_llm.generation`, without XLA)."""
    import tensorflow as tf

    from keras_llm import models

    seq2seq = isinstance(artifact.model, models.Seq2SeqLM)
    if seq2seq:
        from keras_llm.generation import Seq2SeqGenerator as Generator
    else:
        from keras_llm.generation import TextGenerator as Generator
    module = _module(artifact.model, artifact.tokenizer)
    if seq2seq:
        target, target_layer = artifact.target_tokenizer, None
        if target is not artifact.tokenizer:  # tracked too: its own tables are saved
            module.target_tokenizer = target_layer = target_graph_detokenizer(target)
        generation = seq2seq_generation(artifact.model, artifact.tokenizer, module.tokenizer,
                                        target, target_layer, jit_compile=xla)
        generator = Generator(artifact.model, artifact.tokenizer, target)
    else:
        generation = gpt_generation(artifact.model, artifact.tokenizer, module.tokenizer,
                                    jit_compile=xla)
        generator = Generator(artifact.model, artifact.tokenizer)
    module.generate = tf.function(
        generation, input_signature=[tf.TensorSpec(shape, dtype, name=name)
                                     for name, dtype, shape in GENERATION_SIGNATURE])
    generate = module.generate.get_concrete_function()
    max_new_tokens = min(8, artifact.model.backbone.max_length - 1)
    prompts = list(SAMPLE_PROMPTS)
    greedy = generator.generate(prompts, max_new_tokens=max_new_tokens, sampler="greedy")
    checks = [
        (_call("generate", prompt=prompts, max_new_tokens=max_new_tokens, temperature=0.0,
               top_k=1), {"text": [str(text) for text in greedy]}),
        (_call("serving_default", prompt=prompts[1:], max_new_tokens=max_new_tokens,
               temperature=0.8, top_k=10), None),
    ]
    warmup = [(name, {"prompt": tf.constant(prompts, tf.string),
                      "max_new_tokens": tf.constant(max_new_tokens, tf.int32),
                      "temperature": tf.constant(0.0, tf.float32),
                      "top_k": tf.constant(1, tf.int32)})
              for name in ("serving_default", "generate")]
    return ExportPlan("seq2seq" if seq2seq else "gpt", module,
                      {"generate": generate, "serving_default": generate}, warmup, checks,
                      xla=xla)


def encoder_backbone(model):
    from keras_llm import models

    if isinstance(model, models.BertMaskedLM):
        return model.backbone
    if isinstance(model, models.ElectraPretrainer):
        return model.discriminator
    return model


def pack_encoder_inputs(tokenizer, ids, max_length):
    """`[cls] ids [sep]`, truncated to `max_length`, right-padded: the packing the encoder
    objectives train on (`keras_llm.data.masking`)."""
    import tensorflow as tf

    specials = tokenizer.special_token_ids()
    ids = ids[:, :max_length - 2]
    batch_size = ids.nrows()
    ids = tf.concat([tf.fill([batch_size, 1], specials["cls"]), ids,
                     tf.fill([batch_size, 1], specials["sep"])], axis=1)
    token_ids = ids.to_tensor(default_value=specials["pad"])
    padding_mask = tf.sequence_mask(ids.row_lengths(), tf.shape(token_ids)[1])
    return {"token_ids": token_ids, "padding_mask": padding_mask,
            "segment_ids": tf.zeros_like(token_ids)}


def encoder_plan(artifact):
    """`embed(text) -> pooled` (= `serving_default`); within 1e-5 of the Keras model."""
    import numpy as np
    import tensorflow as tf

    backbone = encoder_backbone(artifact.model)
    tokenizer = artifact.tokenizer
    module = _module(backbone, tokenizer)

    def embed(text):
        ids = tokenize_in_graph(tokenizer, module.tokenizer, text)
        outputs = backbone(pack_encoder_inputs(tokenizer, ids, backbone.max_length))
        return {"pooled": tf.cast(outputs["pooled_output"], tf.float32)}

    module.embed = tf.function(embed, input_signature=[
        tf.TensorSpec([None], tf.string, name="text")])
    concrete = module.embed.get_concrete_function()
    texts = list(SAMPLE_TEXTS)
    ids = tf.ragged.constant(tokenizer.encode(texts), dtype=tf.int32, ragged_rank=1)
    expected = backbone(pack_encoder_inputs(tokenizer, ids, backbone.max_length))
    checks = [(_call("embed", text=texts),
               {"pooled": np.asarray(expected["pooled_output"], "float32").tolist()})]
    warmup = [(name, {"text": tf.constant(texts, tf.string)})
              for name in ("serving_default", "embed")]
    return ExportPlan("encoder", module, {"embed": concrete, "serving_default": concrete},
                      warmup, checks, tolerance=1e-5)


def classifier_labels(artifact):
    """Class names by id: the artifact's `labels.json` (or its metadata's `labels`)."""
    path = os.path.join(artifact.directory, "labels.json")
    labels = read_json(path)["labels"] if os.path.isfile(path) else \
        artifact.metadata.get("labels")
    if not labels or len(labels) != artifact.model.num_classes:
        raise ArtifactError(f"{artifact.directory}: classifier without label names for its "
                            f"{artifact.model.num_classes} classes (labels.json)")
    return [str(label) for label in labels]


def classifier_plan(artifact):
    """`serving_default(text[, text_pair]) -> probabilities, label, label_id`; the
    probabilities within 1e-5 of the Keras model fed by the fine-tuning input pipeline."""
    import numpy as np
    import tensorflow as tf

    from keras_llm.data.labeled import classification_dataset, packer_for
    from keras_llm.models import BertBackbone

    model, tokenizer = artifact.model, artifact.tokenizer
    labels = classifier_labels(artifact)
    max_seq_len = artifact.config.data.seq_len  # fine-tuning stores its --max-seq-len here
    columns = artifact.metadata.get("columns") or {}
    pairs = bool(columns.get("text_pair"))
    layout = "encoder" if isinstance(model.backbone, BertBackbone) else "decoder"
    packer = packer_for(tokenizer, max_seq_len, layout)
    pad_id = tokenizer.special_token_ids()["pad"]
    module = _module(model, tokenizer)
    module.labels = tf.constant(labels)

    def classify(*texts):
        segments = tuple(tokenize_in_graph(tokenizer, module.tokenizer, t) for t in texts)
        token_ids, segment_ids = packer(segments)
        logits = model({"token_ids": token_ids, "segment_ids": segment_ids,
                        "padding_mask": tf.not_equal(token_ids, pad_id)}, training=False)
        probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
        label_id = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        return {"probabilities": probabilities, "label_id": label_id,
                "label": tf.gather(module.labels, label_id)}

    specs = [tf.TensorSpec([None], tf.string, name="text")]
    if pairs:
        specs.append(tf.TensorSpec([None], tf.string, name="text_pair"))
        module.classify = tf.function(lambda text, text_pair: classify(text, text_pair),
                                      input_signature=specs)
    else:
        module.classify = tf.function(lambda text: classify(text), input_signature=specs)
    concrete = module.classify.get_concrete_function()
    texts = list(SAMPLE_TEXTS)
    text_pairs = list(reversed(SAMPLE_TEXTS)) if pairs else None
    dataset = classification_dataset(texts, None, tokenizer, max_seq_len, len(texts), layout,
                                     text_pairs=text_pairs)
    logits = np.concatenate([np.asarray(model(features, training=False), "float32")
                             for features in dataset])
    probabilities = np.asarray(tf.nn.softmax(logits, axis=-1))
    label_ids = probabilities.argmax(axis=-1)
    inputs = {"text": texts, **({"text_pair": text_pairs} if pairs else {})}
    checks = [(_call("serving_default", **inputs),
               {"probabilities": probabilities.tolist(), "label_id": label_ids.tolist()})]
    warmup = [("serving_default", {name: tf.constant(value, tf.string)
                                   for name, value in inputs.items()})]
    return ExportPlan("classifier", module, {"serving_default": concrete}, warmup, checks,
                      tolerance=1e-5)


PLANS = {"gpt": generator_plan, "seq2seq": generator_plan, "encoder": encoder_plan,
         "classifier": classifier_plan}


def check_outputs(plan, answer, where):
    """Raises `ArtifactError` unless the reloaded model's outputs match the plan's."""
    import numpy as np

    missing = sorted(set(plan.signatures) - set(answer["signatures"]))
    if missing:
        raise ArtifactError(f"{where}: the reloaded SavedModel lacks signature {missing[0]}")
    for (call, expected), got in zip(plan.checks, answer["results"]):
        name = call["signature"]
        batch_size = len(next(iter(call["inputs"].values()))[0])
        for output, values in got.items():
            if len(values) != batch_size:
                raise ArtifactError(f"{where}: signature {name} output {output} has "
                                    f"{len(values)} rows for {batch_size} inputs")
        if expected is None:
            continue
        for output, want in expected.items():
            have = got.get(output)
            if have is None:
                raise ArtifactError(f"{where}: signature {name} has no output {output}")
            if plan.tolerance == 0.0:
                if have != want:
                    raise ArtifactError(
                        f"{where}: signature {name} output {output} differs from the Keras "
                        f"model's: {have!r} != {want!r}")
            else:
                error = float(np.max(np.abs(np.asarray(have) - np.asarray(want))))
                if not error <= plan.tolerance:
                    raise ArtifactError(
                        f"{where}: signature {name} output {output} differs from the Keras "
                        f"model's by {error:.3g} (tolerance {plan.tolerance:g})")


# ---------------------------------------------------------------------------- export


def export(model_dir, output, version=None, validate=True, xla=False):
    """Exports the model artifact `model_dir` to `output/<version>`; returns that path.

    Args:
        model_dir: a keras-llm model artifact (pretrained or fine-tuned), or a tuning
            result (its `best_model` is exported).
        output: the export base directory (created if missing), TF Serving's model base
            path; its versions are numeric subdirectories.
        version: the version number; default: one more than the newest under `output`.
            An existing version is refused, never overwritten.
        validate: reload the SavedModel with plain TensorFlow in a subprocess and compare
            its outputs with the Keras model's before publishing the version.
        xla: compile the `generate` signature's prefill and decoding loop with XLA (GPT and
            seq2seq models only): faster per call once compiled, but each new batch size
            and padded length compiles first (as `keras-llm generate --xla`), and the
            server needs TensorFlow's XLA JIT.
    """
    check_version_free(output, version)
    artifact = load_model_artifact(resolve_model_dir(model_dir))
    kind = model_kind(artifact.model)
    if xla and PLANS[kind] is not generator_plan:
        raise ArtifactError(f"{model_dir}: xla (--xla) compiles the decoding loop of GPT and "
                            f"seq2seq exports; this {kind} model has none")
    plan = generator_plan(artifact, xla=True) if xla else PLANS[kind](artifact)
    version_dir = write_version(plan, output, version, validate=validate,
                                record=lambda v: export_record(artifact, plan, v),
                                where=f"export of {model_dir}")
    update_base_metadata(output, artifact, export_record(artifact, plan, int(
        os.path.basename(version_dir))))
    logger.info("exported %s (%s) to %s", model_dir, plan.kind, version_dir)
    return version_dir


def resolve_model_dir(model_dir):
    """The model artifact behind `model_dir`: itself, or a tuning result's `best_model`."""
    best = os.path.join(model_dir, BEST_MODEL_LINK)
    if not os.path.exists(os.path.join(model_dir, MODEL_FILE)) and is_complete(best):
        return best
    return model_dir


def check_version_free(output, version):
    """Raises `ArtifactError` for a bad `version` or one that exists under `output`."""
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                or version < 1):
        raise ArtifactError(f"version must be a positive integer, got {version!r}")
    if os.path.exists(output) and not os.path.isdir(output):
        raise ArtifactError(f"{output}: the export base exists and is not a directory")
    if version is not None and os.path.exists(os.path.join(output, str(version))):
        raise ArtifactError(f"{os.path.join(output, str(version))} already exists; versions "
                            f"are never overwritten (pick another --version or omit it)")


def write_version(plan, output, version=None, validate=True, record=None, where="export"):
    """Writes `plan` as `output/<version>` through a hidden staging directory; returns it.

    The staging directory is renamed into place only once the SavedModel, its warmup
    requests and `record(version)` are written and (with `validate`) its reloaded outputs
    match the plan's checks; on any failure it is removed, so no version appears.
    """
    import tensorflow as tf

    check_version_free(output, version)
    os.makedirs(output, exist_ok=True)
    version = next_version(output) if version is None else version
    model_name = os.path.basename(os.path.normpath(os.path.abspath(output)))
    # TF Serving and `keras-llm serve` only look at numeric names: the hidden staging
    # directory is invisible to them until the rename publishes it whole.
    staging = tempfile.mkdtemp(dir=output, prefix=f".export-{version}-")
    try:
        # Serving never differentiates: without the layers' custom gradients the graph
        # holds no training-only functions (their XLA-compiled kernels among them).
        tf.saved_model.save(plan.module, staging, signatures=plan.signatures,
                            options=tf.saved_model.SaveOptions(
                                experimental_custom_gradients=False))
        write_warmup_requests(staging, model_name, plan.warmup)
        if record is not None:
            write_json(os.path.join(staging, ASSETS_EXTRA, METADATA_FILE), record(version))
        if validate:
            check_outputs(plan, reload_and_run(staging, [call for call, _ in plan.checks]),
                          where=where)
        final = os.path.join(output, str(version))
        if os.path.exists(final):
            raise ArtifactError(f"{final} appeared while exporting; versions are never "
                                f"overwritten")
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def signature_summary(signatures):
    """`{name: {"inputs": {name: "dtype[shape]"}, "outputs": {...}}}` of concrete functions."""
    summary = {}
    for name, function in signatures.items():
        inputs = function.structured_input_signature[1] or {
            spec.name: spec for spec in function.structured_input_signature[0]}
        summary[name] = {
            "inputs": {key: f"{spec.dtype.name}{spec.shape.as_list()}"
                       for key, spec in inputs.items()},
            "outputs": {key: f"{spec.dtype.name}{spec.shape.as_list()}"
                        for key, spec in function.structured_outputs.items()}}
    return summary


def export_record(artifact, plan, version):
    """The version's record (`assets.extra/metadata.json`)."""
    from keras_llm.artifacts import package_versions

    return {
        "artifact_type": EXPORTED_MODEL,
        "version": version,
        "kind": plan.kind,
        "xla": plan.xla,
        "parent": {"directory": os.path.abspath(artifact.directory),
                   "artifact_type": artifact.metadata.get("artifact_type"),
                   "created_at": artifact.metadata.get("created_at"),
                   "config_fingerprint": artifact.metadata.get("config_fingerprint")},
        "signatures": signature_summary(plan.signatures),
        "tokenizer": {"kind": artifact.tokenizer.kind,
                      "vocabulary_size": artifact.tokenizer.vocabulary_size()},
        "warmup_requests": len(plan.warmup),
        "versions": package_versions(),
    }


def update_base_metadata(output, artifact, record):
    """`output/metadata.json`: the export base as an artifact (type, parent, its versions)."""
    path = os.path.join(output, METADATA_FILE)
    versions = read_json(path).get("exported_versions", {}) if is_complete(output) else {}
    versions[str(record["version"])] = record
    metadata = make_metadata(EXPORTED_MODEL, artifact.config,
                             parent=os.path.abspath(artifact.directory),
                             extra={"exported_versions": versions,
                                    "latest_version": max(int(v) for v in versions)})
    write_json(path, metadata)
