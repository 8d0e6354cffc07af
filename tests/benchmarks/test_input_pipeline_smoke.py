"""The input-pipeline benchmark still runs (quick mode) and writes its JSON record."""
import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "input_pipeline.py")


@pytest.mark.slow
def test_input_pipeline_quick(tmp_path):
    subprocess.run([sys.executable, SCRIPT, "--quick", "--kinds", "bpe,wordpiece",
                    "--repeats", "2", "--results-dir", str(tmp_path)], check=True,
                   capture_output=True, timeout=600)
    record = json.load(open(tmp_path / "input_pipeline.json"))
    assert [result["kind"] for result in record["results"]] == ["bpe", "wordpiece"]
    for result in record["results"]:
        assert result["tokens_per_pass"] > 0
        assert len(result["first_pass_samples"]) == len(result["hf_encode_samples"]) == 2
        assert result["first_pass_tokens_per_s"] > 0 and result["hf_encode_tokens_per_s"] > 0
