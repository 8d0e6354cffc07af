"""The command line: help, usage errors, and a small end-to-end pretrain -> generate run."""
import json
import os
import subprocess

import pytest
from click.testing import CliRunner
from small_corpus import write_corpus

from keras_llm.cli import main


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path)


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_help_lists_commands():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("pretrain", "generate", "configs"):
        assert command in result.output


def test_configs_lists_builtins():
    result = run("configs")
    assert result.exit_code == 0
    assert "gpt-tiny" in result.output and "gpt-small" in result.output


def test_bad_config_key_is_a_usage_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: 130\n  num_heads: 4\n")
    result = CliRunner().invoke(main, ["pretrain", "--config", str(bad)])
    assert result.exit_code == 2
    assert "model.hidden_size (130) must be divisible by model.num_heads (4)" in result.output
    assert "Traceback" not in result.output


def test_missing_data_is_a_one_line_runtime_error(tmp_path):
    result = CliRunner().invoke(main, ["pretrain", "--data", str(tmp_path / "nope.txt"),
                                       "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "nope.txt" in result.output
    assert result.output.count("\n") == 1


@pytest.mark.slow
def test_pretrain_then_generate(tmp_path, corpus):
    out = str(tmp_path / "model")
    result = run("pretrain", "--data", corpus, "--output-dir", out, "--steps", "30",
                 "--batch-size", "4", "--seq-len", "32")
    assert "validation perplexity" in result.output, result.output
    for name in ("model.keras", "tokenizer", "config.yaml", "metrics.json", "metadata.json",
                 "logs"):
        assert os.path.exists(os.path.join(out, name)), name
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["steps"] == 30
    assert metrics["val_perplexity"] < metrics["unigram_val_perplexity"]
    metadata = json.load(open(os.path.join(out, "metadata.json")))
    assert metadata["artifact_type"] == "keras_llm.PretrainedModel"
    assert metadata["data"]["fingerprint"]
    assert metadata["config"]["train"]["steps"] == 30
    assert metadata["versions"]["tensorflow"].startswith("2.21")

    # The same output directory is not silently overwritten.
    again = CliRunner().invoke(main, ["pretrain", "--data", corpus, "--output-dir", out,
                                      "--steps", "30"])
    assert again.exit_code == 1 and "--overwrite" in again.output

    generated = run("generate", out, "The quick", "--sampler", "greedy",
                    "--max-new-tokens", "8")
    assert generated.exit_code == 0
    assert generated.output.startswith("The quick")
    # Greedy decoding is deterministic, and the XLA-compiled loop decodes the same.
    assert run("generate", out, "The quick", "--sampler", "greedy",
               "--max-new-tokens", "8").output == generated.output
    assert run("generate", out, "The quick", "--sampler", "greedy", "--max-new-tokens", "8",
               "--xla").output == generated.output


@pytest.mark.slow
def test_console_script_is_installed():
    result = subprocess.run(["keras-llm", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "pretrain" in result.stdout


@pytest.mark.slow
def test_python_dash_m_cli_answers_help_without_a_circular_import(tmp_path):
    import sys

    result = subprocess.run([sys.executable, "-m", "keras_llm.cli", "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("pretrain", "finetune", "evaluate", "tune", "export"):
        assert f"  {command} " in result.stdout
    assert "ImportError" not in result.stderr


def test_pretrain_reuses_a_saved_tokenizer_and_counts_epochs(tmp_path, corpus):
    first = str(tmp_path / "first")
    run("pretrain", "--data", corpus, "--output-dir", first, "--steps", "2", "--batch-size",
        "4", "--seq-len", "16")
    second = str(tmp_path / "second")
    result = run("pretrain", "--data", corpus, "--output-dir", second, "--epochs", "1",
                 "--batch-size", "4", "--seq-len", "16", "--tokenizer",
                 os.path.join(first, "tokenizer"))
    assert result.exit_code == 0, result.output
    for name in ("vocab.json", "merges.txt"):
        assert (open(os.path.join(first, "tokenizer", name), "rb").read()
                == open(os.path.join(second, "tokenizer", name), "rb").read())
    metrics = json.load(open(os.path.join(second, "metrics.json")))
    from keras_llm.data import load_tokenizer, open_source, split_documents
    from keras_llm.data.pipeline import causal_lm_dataset

    train, _ = split_documents(open_source(corpus).dataset(), 0.05, seed=1337)
    batches = causal_lm_dataset(train, load_tokenizer(os.path.join(first, "tokenizer")),
                                seq_len=16, batch_size=4, shuffle=False, repeat=False)
    assert metrics["steps"] == sum(1 for _ in batches)


@pytest.mark.slow
def test_default_pretrain_runs_on_the_builtin_corpus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("pretrain", "--steps", "3", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    metadata = json.load(open(tmp_path / "runs" / "gpt-tiny" / "metadata.json"))
    assert metadata["data"]["kind"] == "builtin"
    assert metadata["config"]["name"] == "gpt-tiny"


def test_tokenizer_train_writes_a_loadable_tokenizer(tmp_path, corpus):
    out = str(tmp_path / "wp")
    result = run("tokenizer", "train", "--kind", "wordpiece", "--data", corpus,
                 "--vocab-size", "200", "--output", out)
    assert result.exit_code == 0, result.output
    from keras_llm.data import load_tokenizer

    tokenizer = load_tokenizer(out)
    assert tokenizer.kind == "wordpiece" and tokenizer.vocabulary_size() <= 200
    assert f"written to {out}" in result.output


def test_serve_and_pipeline_commands_are_attached():
    for command in ("serve", "pipeline", "tokenizer"):
        result = run(command, "--help")
        assert result.exit_code == 0, command


def test_set_overrides_any_key_and_bad_keys_are_usage_errors(tmp_path):
    result = CliRunner().invoke(main, ["pretrain", "--set", "model.hiden_size=64",
                                       "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "unknown key 'model.hiden_size' (did you mean 'model.hidden_size'?)" in result.output
    result = CliRunner().invoke(main, ["pretrain", "--set", "no-equals-sign"])
    assert result.exit_code == 2 and "expected KEY=VALUE" in result.output


def test_parse_settings_reads_yaml_scalars():
    from keras_llm.cli import parse_settings

    assert parse_settings(["model.dropout=0.1", "train.xla=true", "data.source=a.txt"]) == {
        "model.dropout": 0.1, "train.xla": True, "data.source": "a.txt"}


def test_set_reaches_keys_that_also_have_options_and_given_options_win(monkeypatch, tmp_path):
    """`--set data.seq_len=...` used to be erased by the unset `--seq-len` option."""
    import keras_llm.training.pretrain

    seen = {}

    def fake_pretrain(config, output_dir, **kwargs):
        seen["config"] = config
        return {"val_loss": 1.0, "steps": 1, "train_seconds": 1.0,
                "train_tokens_per_second": 1.0}

    monkeypatch.setattr(keras_llm.training.pretrain, "pretrain", fake_pretrain)
    result = CliRunner().invoke(main, [
        "pretrain", "--set", "data.seq_len=32", "--set", "train.steps=7",
        "--set", "train.batch_size=3", "--batch-size", "5",
        "--output-dir", str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert (config.data.seq_len, config.train.steps, config.train.batch_size) == (32, 7, 5)
