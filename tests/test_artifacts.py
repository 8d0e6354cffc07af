"""Model artifacts: an artifact whose model no longer matches the code fails in one line."""
import json
import zipfile

import pytest
from click.testing import CliRunner

from keras_llm import artifacts
from keras_llm.cli import main
from keras_llm.config import load_config
from keras_llm.data import train_tokenizer
from keras_llm.errors import ArtifactError
from keras_llm.models import GPTBackbone, GPTCausalLM

SIZES = {"model.vocab_size": 300, "model.hidden_size": 16, "model.num_heads": 2,
         "model.num_layers": 1, "model.intermediate_size": 32, "model.max_length": 16,
         "data.seq_len": 16}


@pytest.fixture
def artifact(tmp_path):
    config = load_config("gpt-tiny", overrides=SIZES)
    tokenizer = train_tokenizer("bpe", ["a small corpus of words, words and more words"] * 20,
                                300)
    model = GPTCausalLM(GPTBackbone.from_model_config(config.model,
                                                      tokenizer.vocabulary_size()))
    model.build((None, 16))
    directory = str(tmp_path / "model")
    artifacts.save_model_artifact(directory, model, tokenizer, config, {},
                                  artifacts.make_metadata("model", config))
    return directory


def rewrite_model_config(directory, change):
    """Edits config.json inside model.keras, as if another version had saved the model."""
    path = f"{directory}/{artifacts.MODEL_FILE}"
    with zipfile.ZipFile(path) as source:
        members = {name: source.read(name) for name in source.namelist()}
    config = json.loads(members["config.json"])
    change(config)
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as target:
        for name, data in members.items():
            target.writestr(name, data)


def test_an_artifact_loads(artifact):
    loaded = artifacts.load_model_artifact(artifact)
    assert loaded.model.count_params() > 0


def test_a_model_that_no_longer_matches_is_one_clean_line(artifact):
    def more_layers(config):
        config["config"]["backbone"]["config"]["num_layers"] = 2

    rewrite_model_config(artifact, more_layers)
    with pytest.raises(ArtifactError, match=r"model\.keras: cannot load the model \(saved by "
                                            r"keras-llm 0\.1\.0"):
        artifacts.load_model_artifact(artifact)
    result = CliRunner().invoke(main, ["generate", artifact, "hello"])
    assert result.exit_code == 1
    assert "cannot load the model" in result.output
    assert "Traceback" not in result.output
    assert result.output.count("\n") == 1, result.output


def test_an_artifact_compiled_with_the_product_loss_loads_in_a_fresh_process(tmp_path):
    """`model.keras` keeps the compile config; its `TokenCrossEntropy` and `AdamW` must be
    registered by `load_model_artifact` itself, not by whoever imported the training code."""
    import subprocess
    import sys

    from keras_llm.config import TrainConfig
    from keras_llm.training.objectives import get_objective
    from keras_llm.training.optim import make_optimizer

    config = load_config("gpt-tiny", overrides=SIZES)
    tokenizer = train_tokenizer("bpe", ["a small corpus of words, words and more words"] * 20,
                                300)
    objective = get_objective(config)
    model = objective.build_model(tokenizer)
    objective.compile(model, make_optimizer(TrainConfig(), total_steps=10))
    directory = str(tmp_path / "compiled")
    artifacts.save_model_artifact(directory, model, tokenizer, config, {},
                                  artifacts.make_metadata("model", config))
    code = ("import sys; from keras_llm.artifacts import load_model_artifact; "
            "model = load_model_artifact(sys.argv[1]).model; "
            "print(type(model.loss).__name__, type(model.optimizer).__module__)")
    result = subprocess.run([sys.executable, "-c", code, directory], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == (
        "TokenCrossEntropy keras_llm.training.optim")
