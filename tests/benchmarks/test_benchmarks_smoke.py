"""Each benchmark script's `--quick` mode runs on tiny synthetic sizes, so scripts can't rot.

The scripts run as subprocesses exactly as a user runs them; data is a small synthetic text
(the shared data folder does not exist on a user's machine or in CI).
"""
import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCHMARKS = os.path.join(REPO_ROOT, "benchmarks")


def run_script(name, *arguments, env=None):
    return subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, name), *arguments], capture_output=True,
        text=True, timeout=300, env={**os.environ, "KERAS_BACKEND": "tensorflow", **(env or {})})


def synthetic_text(path):
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "KING:", "lord"]
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8)) for i in range(400)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.slow
def test_shakespeare_char_quick(tmp_path):
    text = synthetic_text(tmp_path / "input.txt")
    result = run_script("shakespeare_char.py", "--quick", "--steps", "6", "--eval-interval", "3",
                        "--data", str(text), "--results-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "shakespeare_char_quick.json").read_text())
    assert record["steps"] == 6
    assert [h["step"] for h in record["history"]] == [3, 6]
    assert record["vocabulary_size"] == len(set(text.read_text()))
    # An untrained character model starts near ln(vocabulary); 6 steps cannot get far below.
    assert 0.5 < record["val_loss"] < 5.0 and 0.5 < record["full_val_loss"] < 5.0
    assert record["target_val_loss"] == 1.88
    assert "val loss (20 batches)" in result.stdout
    # Rotary and learned positions side by side; the headline figures are rotary's.
    assert list(record["by_position"]) == ["rotary", "learned"]
    assert [r["position"] for r in record["runs"]] == ["rotary", "learned"]
    assert record["val_loss"] == record["by_position"]["rotary"]["val_loss"]
    assert record["by_position"]["learned"]["parameters"] == (
        record["by_position"]["rotary"]["parameters"] + 64 * 128)  # the position table


def test_shakespeare_char_unknown_position_is_one_line(tmp_path):
    result = run_script("shakespeare_char.py", "--quick", "--positions", "rotary,alibi",
                        "--results-dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --positions: unknown position encoding 'alibi' (rotary, learned, sinusoidal)")


def test_shakespeare_char_missing_data_is_one_line(tmp_path):
    result = run_script("shakespeare_char.py", "--quick", "--results-dir", str(tmp_path),
                        env={"KERAS_LLM_DATA_DIR": str(tmp_path / "absent")})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: tinyshakespeare text not found at ")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_train_throughput_quick(tmp_path):
    result = run_script("train_throughput.py", "--quick", "--results-dir", str(tmp_path),
                        "--models", "gpt,gpt_keras_recipe,keras_hub_gpt2")
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "train_throughput_quick.json").read_text())
    rows = {r["model"]: r for r in record["rows"]}
    assert set(rows) == {"gpt", "gpt_keras_recipe", "keras_hub_gpt2"}
    # Each library's own recipe, and our model with Keras' for the like-for-like row.
    assert rows["gpt"]["recipe"] == "keras-llm"
    assert rows["gpt_keras_recipe"]["recipe"] == rows["keras_hub_gpt2"]["recipe"] == "keras"
    assert rows["gpt_keras_recipe"]["speedup_vs_keras_hub"] == pytest.approx(
        rows["gpt_keras_recipe"]["tokens_per_s"] / rows["keras_hub_gpt2"]["tokens_per_s"])
    pairs = [a / b for a, b in zip(rows["gpt"]["windows_tokens_per_s"],
                                   rows["keras_hub_gpt2"]["windows_tokens_per_s"])]
    assert rows["gpt"]["paired_speedup_vs_keras_hub"] == pytest.approx(sorted(pairs)[0] + (
        sorted(pairs)[1] - sorted(pairs)[0]) / 2)  # the median of two windows
    assert rows["keras_hub_gpt2"]["paired_speedup_vs_keras_hub"] is None
    # Identical shapes: the same parameter count and so the same FLOPs per token.
    assert rows["gpt"]["parameters"] == rows["keras_hub_gpt2"]["parameters"]
    layers, seq, width = 2, 32, 64
    n = rows["gpt"]["parameters"] - seq * width
    assert rows["gpt"]["flops_per_token"] == 6 * n + 12 * layers * seq * width
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and len(row["windows_tokens_per_s"]) == 2
        assert 0 < row["mfu"] < 1
    assert rows["gpt"]["speedup_vs_keras_hub"] == pytest.approx(
        rows["gpt"]["tokens_per_s"] / rows["keras_hub_gpt2"]["tokens_per_s"])
    assert record["peak_measured_tflops"] > 0
    assert "vs keras-hub" in result.stdout
