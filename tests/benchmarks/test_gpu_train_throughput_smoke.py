"""The GPU training benchmark's quick mode runs under JAX on CPU, and without TensorFlow.

Skipped where jax is not installed (the project's own environment trains with TensorFlow).
"""
import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("jax")

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks",
                      "gpu_train_throughput.py")
# Makes `import tensorflow` fail in the child, as on a GPU machine that has none.
NO_TENSORFLOW = "import sys; sys.modules['tensorflow'] = None; "


@pytest.mark.slow
def test_gpu_train_throughput_quick_without_tensorflow(tmp_path):
    code = (NO_TENSORFLOW + f"sys.argv = [{SCRIPT!r}, '--quick', '--results-dir', "
            f"{str(tmp_path)!r}]; import runpy; runpy.run_path({SCRIPT!r}, run_name='__main__')")
    env = {**os.environ, "KERAS_BACKEND": "jax",
           "PYTHONPATH": os.path.dirname(SCRIPT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "gpu_train_throughput_quick.json").read_text())
    assert record["backend"] == "jax" and record["dtype_policy"] == "mixed_bfloat16"
    rows = {r["model"]: r for r in record["rows"]}
    assert set(rows) == {"gpt", "keras_hub_gpt2", "bert", "keras_hub_bert"}
    assert record["shapes_skipped"] == {}
    assert rows["gpt"]["parameters"] == rows["keras_hub_gpt2"]["parameters"]
    assert rows["bert"]["parameters"] == rows["keras_hub_bert"]["parameters"]
    layers, seq, width, vocab = 2, 32, 64, 512
    n = rows["gpt"]["parameters"] - seq * width
    assert rows["gpt"]["flops_per_token"] == 6 * n + 12 * layers * seq * width
    # BERT's masked-LM head runs on 15% of the positions: fewer FLOPs per token than 6 N.
    assert rows["bert"]["flops_per_token"] < 6 * rows["bert"]["parameters"]
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and len(row["windows_tokens_per_s"]) == 2
        assert 0 < row["mfu_vs_measured_peak"] < 1
        # Random tokens: a few steps leave the loss near ln(vocabulary).
        assert abs(row["last_loss"] - math.log(vocab)) < 1.0
    for ours, theirs in (("gpt", "keras_hub_gpt2"), ("bert", "keras_hub_bert")):
        assert rows[ours]["speedup_vs_keras_hub"] == pytest.approx(
            rows[ours]["tokens_per_s"] / rows[theirs]["tokens_per_s"])
    assert "vs keras-hub" in result.stdout
