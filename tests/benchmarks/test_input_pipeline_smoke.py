"""The input-pipeline benchmark still runs (quick mode) and writes its JSON record."""
import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "input_pipeline.py")


@pytest.mark.slow
def test_input_pipeline_quick(tmp_path):
    subprocess.run([sys.executable, SCRIPT, "--quick", "--kinds", "wordpiece",
                    "--results-dir", str(tmp_path)], check=True, capture_output=True,
                   timeout=600)
    record = json.load(open(tmp_path / "input_pipeline.json"))
    (result,) = record["results"]
    assert result["kind"] == "wordpiece"
    assert result["tokens_per_pass"] > 0
    assert result["first_pass_tokens_per_s"] > 0 and result["hf_encode_tokens_per_s"] > 0
