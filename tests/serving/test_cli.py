"""`keras-llm serve` argument handling (the server itself is tested in test_rest.py)."""
from click.testing import CliRunner

from keras_llm.serving.cli import serve_command


def test_help_shows_defaults():
    result = CliRunner().invoke(serve_command, ["--help"])
    assert result.exit_code == 0
    assert "127.0.0.1" in result.output and "8501" in result.output


def test_missing_export_base_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(serve_command, [str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_port_out_of_range_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(serve_command, [str(tmp_path), "--port", "70000"])
    assert result.exit_code == 2
    assert "--port" in result.output
