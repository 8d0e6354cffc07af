"""Fine-tuning: every task path from small generated data, lineage, options and every error.

Parent artifacts are the real models of each family at tiny sizes; most are saved straight
from their pretraining objective (untrained: fine-tuning must work from any artifact), and
the GPT one is pretrained for a few steps by `pretrain()`, as `keras-llm pretrain` writes it.
"""
import dataclasses
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from keras_llm import artifacts
from keras_llm.cli import main
from keras_llm.config import load_config
from keras_llm.data.tokenizers import load_tokenizer, train_tokenizer
from keras_llm.errors import ArtifactError, ConfigError, DataError
from keras_llm.evaluation import evaluate_artifact, seq2seq_token_accuracy
from keras_llm.models import GPTBackbone
from keras_llm.training.finetune import (
    FinetuneOptions,
    LayerwiseAdamW,
    finetune,
    freeze_layers,
    layerwise_multipliers,
    load_options,
)
from keras_llm.training.objectives import get_objective

FRUIT = "apple banana cherry grape lemon mango melon peach pear plum".split()
VEHICLE = "train plane truck bus car boat ship bike tram van".split()
FILLER = "the a of and to in is it that for on with as was".split()
TINY = {"model.num_layers": 2, "model.hidden_size": 32, "model.num_heads": 2,
        "model.intermediate_size": 64, "model.vocab_size": 300, "model.max_length": 32,
        "data.seq_len": 32, "train.batch_size": 4, "train.steps": 4, "train.eval_every": 4,
        "train.eval_steps": 1}


def sentence(rng, words, length=10):
    return " ".join(rng.choice(words) if rng.random() < 0.5 else rng.choice(FILLER)
                    for _ in range(length))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune_data")
    rng = random.Random(0)
    topics = [rng.choice(["fruit", "vehicle"]) for _ in range(160)]
    pair_rows = []
    for _ in range(96):
        a, b = rng.choice([FRUIT, VEHICLE]), rng.choice([FRUIT, VEHICLE])
        pair_rows.append({"first": sentence(rng, a, 6), "second": sentence(rng, b, 6),
                          "label": "same" if a is b else "different"})
    copy_rows = [{"source": s, "target": s} for s in
                 (" ".join(rng.choice(FRUIT) for _ in range(4)) for _ in range(96))]
    return {
        "corpus": write_jsonl(root / "corpus.jsonl", [
            {"text": sentence(rng, FRUIT + VEHICLE, 14)} for _ in range(200)]),
        "topics": write_jsonl(root / "topics.jsonl", [
            {"text": sentence(rng, FRUIT if t == "fruit" else VEHICLE), "label": t}
            for t in topics]),
        "pairs": write_jsonl(root / "pairs.jsonl", pair_rows),
        "copy": write_jsonl(root / "copy.jsonl", copy_rows),
        "unseen": write_jsonl(root / "unseen.jsonl", [
            {"text": "apple", "label": "fruit"}, {"text": "mars", "label": "planet"}]),
        "no_label": write_jsonl(root / "no_label.jsonl", [{"text": "apple"}] * 10),
        "root": root,
    }


def save_parent(directory, config_name, tokenizer, corpus, **overrides):
    config = load_config(config_name, overrides={**TINY, "data.source": corpus, **overrides})
    model = get_objective(config).build_model(tokenizer)
    metadata = artifacts.make_metadata("keras_llm.PretrainedModel", config,
                                       extra={"family": config.model.family,
                                              "task": config.task})
    artifacts.save_model_artifact(str(directory), model, tokenizer, config, {}, metadata)
    return str(directory)


@pytest.fixture(scope="module")
def parents(data):
    texts = [json.loads(line)["text"] for line in open(data["corpus"])]
    texts += [r for line in open(data["pairs"]) for r in json.loads(line).values()]
    bpe = train_tokenizer("bpe", texts, 300)
    wordpiece = train_tokenizer("wordpiece", texts, 300, lowercase=True)
    sentencepiece = train_tokenizer("sentencepiece", texts, 120)
    root = data["root"]
    keras.utils.set_random_seed(0)
    return {
        "gpt": save_parent(root / "gpt", "gpt-tiny", bpe, data["corpus"]),
        "bert": save_parent(root / "bert", "bert-tiny", wordpiece, data["corpus"]),
        "roberta": save_parent(root / "roberta", "roberta-tiny", bpe, data["corpus"]),
        "electra": save_parent(root / "electra", "electra-small", wordpiece, data["corpus"],
                               **{"model.embedding_size": 16,
                                  "model.generator_hidden_size": 16}),
        "seq2seq": save_parent(root / "seq2seq", "seq2seq-tiny", sentencepiece,
                               data["corpus"]),
    }


def options(**kwargs):
    defaults = dict(epochs=1, batch_size=16, learning_rate=2e-3, max_seq_len=24)
    return FinetuneOptions(**{**defaults, **kwargs})


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# ------------------------------------------------------------------ optimizer and freezing

def test_layerwise_multipliers_and_freezing_of_a_gpt_backbone():
    backbone = GPTBackbone(vocabulary_size=30, num_layers=2, num_heads=2, hidden_size=8,
                           intermediate_size=16, max_length=6)
    backbone.build((None, 6))
    multipliers = layerwise_multipliers(backbone, 0.5)
    assert multipliers[backbone.token_embedding.embeddings.path] == 0.125  # 0.5 ** (2 + 1)
    assert {multipliers[v.path] for v in backbone.blocks[0].weights} == {0.25}
    assert {multipliers[v.path] for v in backbone.blocks[1].weights} == {0.5}
    assert not any(v.path in multipliers for v in backbone.final_norm.weights)
    freeze_layers(backbone, "blocks:1")
    trainable = {v.path for v in backbone.trainable_weights}
    assert not trainable & {v.path for v in backbone.blocks[0].weights}
    assert backbone.token_embedding.embeddings.path not in trainable
    assert {v.path for v in backbone.blocks[1].weights} <= trainable
    with pytest.raises(ConfigError, match="the model has only 2 blocks"):
        freeze_layers(backbone, "blocks:3")


def test_freezing_embeddings_of_rotary_models_without_position_tables():
    from keras_llm.models.seq2seq import Seq2SeqBackbone

    gpt = GPTBackbone(vocabulary_size=30, num_layers=1, num_heads=2, hidden_size=8,
                      intermediate_size=16, max_length=6, position="rotary")
    gpt.build((None, 6))
    seq2seq = Seq2SeqBackbone(vocabulary_size=30, num_layers=1, num_heads=2, hidden_size=8,
                              intermediate_size=16, max_length=6, position="rotary")
    seq2seq.build({"encoder_token_ids": (None, 6)})
    for backbone in (gpt, seq2seq):
        freeze_layers(backbone, "embeddings")
        assert backbone.token_embedding.embeddings.path not in {
            v.path for v in backbone.trainable_weights}
        assert {v.path for v in backbone.trainable_weights}  # the blocks still train


def test_layerwise_adamw_scales_each_variables_step():
    layer = keras.layers.Dense(1, kernel_initializer="ones", bias_initializer="zeros")
    layer.build((None, 2))
    optimizer = LayerwiseAdamW({layer.kernel.path: 0.5}, learning_rate=0.1, weight_decay=0.0)
    gradients = [np.ones((2, 1), "float32"), np.ones((1,), "float32")]
    optimizer.apply_gradients(zip(gradients, [layer.kernel, layer.bias]))
    # Adam's first step moves every weight by the learning rate (times the sign).
    np.testing.assert_allclose(layer.kernel.numpy(), 1 - 0.05, atol=1e-5)
    np.testing.assert_allclose(layer.bias.numpy(), -0.1, atol=1e-5)


# ------------------------------------------------------------------ task paths

@pytest.mark.slow
def test_pretrained_gpt_classifier_learns_an_easy_task_and_evaluates(data, tmp_path):
    from keras_llm.training.pretrain import pretrain

    config = load_config("gpt-tiny", overrides={
        **TINY, "model.num_layers": 1, "train.steps": 5, "data.source": data["corpus"]})
    parent = str(tmp_path / "gpt")
    pretrain(config, parent, verbose=0)
    output = str(tmp_path / "gpt-cls")
    metrics = finetune(options(data=data["topics"], epochs=3, layerwise_lr_decay=0.9,
                               early_stopping_metric="macro_f1", patience=2),
                       parent, output, verbose=0)
    assert metrics["val_accuracy"] >= 0.9 and metrics["val_macro_f1"] >= 0.9

    metadata = json.load(open(os.path.join(output, "metadata.json")))
    parent_metadata = open(os.path.join(parent, "metadata.json"), "rb").read()
    assert metadata["parent"]["path"] == os.path.abspath(parent)
    assert metadata["parent"]["metadata_sha256"] == hashlib.sha256(parent_metadata).hexdigest()
    assert metadata["parent"]["config_fingerprint"] == json.loads(parent_metadata)[
        "config_fingerprint"]
    assert metadata["artifact_type"] == "keras_llm.FineTunedModel"
    assert metadata["labels"] == ["fruit", "vehicle"]
    assert json.load(open(os.path.join(output, "labels.json"))) == {
        "labels": ["fruit", "vehicle"]}
    for name in os.listdir(os.path.join(parent, "tokenizer")):  # the pretrained tokenizer
        assert open(os.path.join(parent, "tokenizer", name), "rb").read() == open(
            os.path.join(output, "tokenizer", name), "rb").read()
    assert artifacts.load_model_artifact(output).config.task == "classification"

    predictions = str(tmp_path / "predictions.jsonl")
    result = run("evaluate", output, "--data", data["topics"], "--predictions", predictions)
    assert result.exit_code == 0, result.output
    report = json.load(open(os.path.join(output, "eval.json")))
    rows = [json.loads(line) for line in open(predictions)]
    assert len(rows) == report["examples"] == 160
    assert report["accuracy"] == pytest.approx(
        np.mean([r["label"] == r["predicted"] for r in rows]))
    assert report["accuracy"] >= 0.9 and "confusion matrix" in result.output
    assert sum(map(sum, report["confusion_matrix"])) == 160


@pytest.mark.slow
def test_bert_text_pair_classification_with_class_weights(data, parents, tmp_path):
    output = str(tmp_path / "pairs")
    metrics = finetune(options(data=data["pairs"], text_column="first",
                               text_pair_column="second", class_weights="balanced",
                               freeze="embeddings"), parents["bert"], output, verbose=0)
    assert metrics["num_classes"] == 2 and 0.0 <= metrics["val_accuracy"] <= 1.0
    # The embeddings (token Vx32, segment 2x32, position 32x32, norm 2x32) were frozen.
    vocabulary = load_tokenizer(os.path.join(parents["bert"], "tokenizer")).vocabulary_size()
    assert metrics["parameters"] - metrics["trainable_parameters"] == vocabulary * 32 + \
        2 * 32 + 32 * 32 + 2 * 32
    report, rows = evaluate_artifact(output, data["pairs"])
    assert {"text", "text_pair", "label", "predicted"} <= set(rows[0])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["electra", "roberta"])
def test_electra_and_roberta_classifiers(data, parents, tmp_path, family):
    # From random weights (post-layer-norm encoders): 4 epochs of 9 steps learn the topics.
    metrics = finetune(options(data=data["topics"], epochs=4, learning_rate=3e-3),
                       parents[family], str(tmp_path / family), verbose=0)
    assert metrics["val_accuracy"] >= 0.75, metrics
    loaded = artifacts.load_model_artifact(str(tmp_path / family))
    assert loaded.metadata["family"] == family and loaded.model.pooling == "cls"


def test_early_stopping_stops_when_the_metric_stalls(data, parents, tmp_path):
    metrics = finetune(options(data=data["topics"], epochs=5, learning_rate=1e-9,
                               warmup_steps=0, early_stopping_metric="accuracy", patience=1),
                       parents["gpt"], str(tmp_path / "stalled"), verbose=0)
    assert metrics["epochs"] == 2


@pytest.mark.slow
def test_continued_causal_lm_lowers_perplexity_then_generates(data, parents, tmp_path):
    before, _ = evaluate_artifact(parents["gpt"], data["corpus"])
    output = str(tmp_path / "lm")
    metrics = finetune(options(task="causal_lm", data=data["corpus"], epochs=2,
                               batch_size=8), parents["gpt"], output, verbose=0)
    after, _ = evaluate_artifact(output, data["corpus"])
    assert after["perplexity"] < 0.5 * before["perplexity"]
    assert metrics["val_perplexity"] > 1.0
    for sampler in ("greedy", "beam"):
        result = run("generate", output, "apple", "--sampler", sampler,
                     "--max-new-tokens", "5")
        assert result.exit_code == 0 and result.output.startswith("apple")


@pytest.mark.slow
def test_seq2seq_finetune_evaluate_and_generate(data, parents, tmp_path):
    rows = [json.loads(line) for line in open(data["copy"])]
    parent = artifacts.load_model_artifact(parents["seq2seq"])
    before = seq2seq_token_accuracy(parent.model, parent.tokenizer,
                                    [r["source"] for r in rows], [r["target"] for r in rows],
                                    24)["token_accuracy"]
    output = str(tmp_path / "copy")
    metrics = finetune(options(task="seq2seq", data=data["copy"], text_column="source",
                               target_column="target", epochs=3, learning_rate=3e-3),
                       parents["seq2seq"], output, verbose=0)
    assert metrics["val_token_accuracy"] > max(0.2, 5 * before)
    assert 0.0 <= metrics["val_bleu_greedy"] <= 100.0
    result = run("evaluate", output, "--data", data["copy"], "--decoding", "beam",
                 "--num-beams", "2", "--predictions", str(tmp_path / "p.jsonl"))
    assert result.exit_code == 0, result.output
    report = json.load(open(os.path.join(output, "eval.json")))
    assert report["decoding"] == "beam2" and 0.0 <= report["bleu"] <= 100.0
    row = json.loads(open(tmp_path / "p.jsonl").readline())
    assert set(row) == {"source", "target", "prediction"}
    for sampler in ("greedy", "top_p"):
        result = run("generate", output, "apple pear", "--sampler", sampler, "--seed", "1",
                     "--max-new-tokens", "8")
        assert result.exit_code == 0 and len(result.output.splitlines()) == 1


# ------------------------------------------------------------------ errors

def test_label_never_seen_in_training_is_one_line(data, parents, tmp_path):
    with pytest.raises(DataError, match=r"label 'planet' never seen in training"):
        finetune(options(data=data["topics"], validation_data=data["unseen"]),
                 parents["gpt"], str(tmp_path / "x"))


def test_missing_columns_are_one_line(data, parents, tmp_path):
    with pytest.raises(DataError, match=r"no_label.jsonl:1: no column 'label'"):
        finetune(options(data=data["no_label"]), parents["gpt"], str(tmp_path / "x"))
    with pytest.raises(DataError, match=r"topics.jsonl:1: no column 'sentence'"):
        finetune(options(data=data["topics"], text_column="sentence"), parents["gpt"],
                 str(tmp_path / "x"))


def test_wrong_family_for_the_task(data, parents, tmp_path):
    with pytest.raises(ArtifactError, match=r"holds a gpt model; task seq2seq fine-tunes "
                                            r"seq2seq models"):
        finetune(options(task="seq2seq", data=data["copy"]), parents["gpt"],
                 str(tmp_path / "x"))
    with pytest.raises(ArtifactError, match=r"holds a bert model; task causal_lm"):
        finetune(options(task="causal_lm", data=data["corpus"]), parents["bert"],
                 str(tmp_path / "x"))


def test_model_tokenizer_mismatch(data, parents, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(parents["bert"], broken)
    shutil.rmtree(broken / "tokenizer")
    train_tokenizer("wordpiece", ["tiny vocabulary"] * 20, 300).save(str(broken / "tokenizer"))
    with pytest.raises(ArtifactError,
                       match=r"has a vocabulary of \d+ tokens but the tokenizer has"):
        finetune(options(data=data["topics"]), str(broken), str(tmp_path / "x"))


def test_no_model_and_no_default_artifact(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArtifactError, match=r"pass --model PRETRAINED_DIR, or run `keras-llm "
                                            r"pretrain` first"):
        finetune(options(), None, str(tmp_path / "x"))
    result = CliRunner().invoke(main, ["finetune"])
    assert result.exit_code == 1 and "Error: no pretrained model" in result.output


def test_bad_options_are_usage_errors(parents, tmp_path):
    for args, message in [(["--freeze", "blocks:x"], "--freeze must be none, embeddings"),
                          (["--early-stopping-metric", "bleu"], "--early-stopping-metric for "
                                                                 "task classification")]:
        result = CliRunner().invoke(main, ["finetune", "--model", parents["gpt"],
                                           "--output-dir", str(tmp_path / "x"), *args])
        assert result.exit_code == 2 and message in result.output
        assert "Traceback" not in result.output


def test_generate_refuses_a_classifier_and_evaluate_an_unseen_label(data, parents, tmp_path):
    output = str(tmp_path / "cls")
    result = run("finetune", "--model", parents["gpt"], "--data", data["topics"], "--epochs",
                 "1", "--batch-size", "16", "--max-seq-len", "24", "--output-dir", output)
    assert result.exit_code == 0, result.output
    assert "val_accuracy" in result.output and f"model artifact: {output}" in result.output
    result = CliRunner().invoke(main, ["generate", output, "apple", "--max-new-tokens", "5"])
    assert result.exit_code == 1 and "does not generate text" in result.output
    result = CliRunner().invoke(main, ["evaluate", output, "--data", data["unseen"]])
    assert result.exit_code == 1 and "label 'planet' never seen in training" in result.output


# ------------------------------------------------------------------ scale and --config

# Two logical CPUs must be set before TensorFlow starts: the runs go in a fresh process.
MIRRORED_JOB = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from keras_llm.training.finetune import FinetuneOptions, finetune
parent, train, validation, out = sys.argv[1:]
for strategy in ("default", "mirrored"):
    options = FinetuneOptions(data=train, validation_data=validation, epochs=1, batch_size=16,
                              learning_rate=2e-3, max_seq_len=24, dropout=0.0,
                              strategy=strategy)
    finetune(options, parent, f"{out}/{strategy}", verbose=0)
"""


@pytest.mark.slow
def test_mirrored_over_two_logical_cpus_matches_one_device(data, parents, tmp_path):
    rng = random.Random(1)

    def rows(count):
        topics = [rng.choice(["fruit", "vehicle"]) for _ in range(count)]
        return [{"text": sentence(rng, FRUIT if t == "fruit" else VEHICLE), "label": t}
                for t in topics]

    # 128 and 32 rows: every global batch of 16 splits into two equal halves of 8.
    train = write_jsonl(tmp_path / "train.jsonl", rows(128))
    validation = write_jsonl(tmp_path / "validation.jsonl", rows(32))
    result = subprocess.run([sys.executable, "-c", MIRRORED_JOB, parents["gpt"], train,
                             validation, str(tmp_path)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (artifacts.load_model_artifact(str(tmp_path / s)) for s in ("default",
                                                                           "mirrored"))
    assert one.metadata["distribute"]["replicas"] == 1
    assert two.metadata["distribute"] == {"strategy": "MirroredStrategy", "replicas": 2,
                                          "workers": 1, "worker_index": 0,
                                          "dtype_policy": "float32"}
    assert two.metadata["finetune"]["batch_size"] == 16  # the global batch
    assert one.metrics["steps"] == two.metrics["steps"] == 8
    # The first (only) epoch's training loss, the validation loss and the weights agree to
    # a tolerance, not exactly: Keras 3 clips gradients (global_clipnorm=1) on each replica
    # before summing them, so a step whose gradient norm is above 1 differs a little.
    print("train loss", one.metrics["train_loss"], two.metrics["train_loss"], "val loss",
          one.metrics["val_loss"], two.metrics["val_loss"], "largest weight difference",
          max(float(np.abs(a - b).max()) for a, b in zip(one.model.get_weights(),
                                                          two.model.get_weights())))
    # Measured: train loss 0.70736 vs 0.70719, val loss 0.6583 vs 0.6635, largest weight
    # difference 0.012 (8 AdamW steps at 2e-3).
    assert two.metrics["train_loss"] == pytest.approx(one.metrics["train_loss"], rel=2e-3)
    assert two.metrics["val_loss"] == pytest.approx(one.metrics["val_loss"], rel=2e-2)
    for a, b in zip(one.model.get_weights(), two.model.get_weights()):
        np.testing.assert_allclose(a, b, atol=3e-2)
    result = run("evaluate", str(tmp_path / "mirrored"), "--data", validation)
    assert result.exit_code == 0, result.output
    report = json.load(open(tmp_path / "mirrored" / "eval.json"))
    assert report["accuracy"] == pytest.approx(two.metrics["val_accuracy"])


def test_scale_options_reach_the_run(data, parents, tmp_path):
    import tensorflow as tf

    try:
        metrics = finetune(options(data=data["topics"], mixed_precision=True, xla=True,
                                   strategy="default", scale_lr=True, batch_size=8),
                           parents["gpt"], str(tmp_path / "bf16"), verbose=0)
    finally:
        keras.config.set_dtype_policy("float32")
    assert np.isfinite(metrics["val_loss"])
    loaded = artifacts.load_model_artifact(str(tmp_path / "bf16"))
    assert loaded.metadata["distribute"]["dtype_policy"] == "mixed_bfloat16"  # on CPU
    assert loaded.model.backbone.compute_dtype == "bfloat16"
    assert loaded.model.backbone.token_embedding.embeddings.dtype == "float32"
    # One replica: --scale-lr keeps the batch and the rate; the recorded options say so.
    assert loaded.metadata["finetune"]["batch_size"] == 8
    assert loaded.metadata["finetune"]["scale_lr"] is False
    assert not tf.config.list_logical_devices("GPU")
    with pytest.raises(ConfigError, match="--strategy must be one of"):
        options(strategy="horovod").validate()


def test_config_file_with_command_line_overrides(parents, tmp_path, monkeypatch):
    import keras_llm.training.finetune as finetune_module

    path = tmp_path / "best_config.yaml"
    path.write_text("# keras-llm tune: best of 4 trials\n" + yaml.safe_dump(
        {**dataclasses.asdict(FinetuneOptions(learning_rate=1e-3, freeze="embeddings")),
         "batch_size": 8, "strategy": "default"}))
    seen = {}

    def fake_finetune(settings, pretrained_dir, output_dir, **kwargs):
        seen.update(settings=settings, output_dir=output_dir)
        return {"val_loss": 1.0, "epochs": 1, "steps": 1, "train_seconds": 0.0}

    monkeypatch.setattr(finetune_module, "finetune", fake_finetune)
    result = run("finetune", "--model", parents["gpt"], "--config", str(path),
                 "--batch-size", "4", "--xla", "--output-dir", str(tmp_path / "x"))
    assert result.exit_code == 0, result.output
    settings = seen["settings"]
    assert (settings.learning_rate, settings.freeze) == (1e-3, "embeddings")  # the file
    assert (settings.batch_size, settings.xla) == (4, True)  # the command line wins
    assert settings.strategy == "default" and settings.epochs == 3  # file; default
    # Without --config, the command's defaults are FinetuneOptions' own.
    run("finetune", "--model", parents["gpt"], "--output-dir", str(tmp_path / "x"))
    assert seen["settings"] == FinetuneOptions()
    path.write_text("learning_rate: 1.0e-3\nlearning_rat: 2\n")
    result = CliRunner().invoke(main, ["finetune", "--config", str(path)])
    assert result.exit_code == 2
    assert "unknown finetune option 'learning_rat' (did you mean 'learning_rate'?)" in \
        result.output
    path.write_text("batch_size: many\n")
    with pytest.raises(ConfigError, match="batch_size must be an integer, got 'many'"):
        load_options(str(path))
