"""Separate source and target vocabularies end to end: a word-for-word "translation" from
English words into made-up target words, fine-tuned with `--target-vocab-size` from a
shared-vocabulary parent, then evaluated, generated from and reloaded."""
import json
import os
import random

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from keras_llm import artifacts
from keras_llm.cli import main
from keras_llm.config import load_config
from keras_llm.data.tokenizers import train_tokenizer
from keras_llm.errors import ArtifactError, ConfigError
from keras_llm.generation import Seq2SeqGenerator
from keras_llm.training.finetune import FinetuneOptions, finetune
from keras_llm.training.objectives import get_objective

LEXICON = {"apple": "apfel", "banana": "banane", "cherry": "kirsche", "grape": "traube",
           "lemon": "zitrone", "pear": "birne", "plum": "pflaume", "peach": "pfirsich"}
TINY = {"model.num_layers": 1, "model.hidden_size": 32, "model.num_heads": 2,
        "model.intermediate_size": 64, "model.max_length": 16, "data.seq_len": 16}


@pytest.fixture(scope="module")
def translation(tmp_path_factory):
    root = tmp_path_factory.mktemp("translation")
    rng = random.Random(0)
    rows = []
    for _ in range(160):
        words = [rng.choice(sorted(LEXICON)) for _ in range(5)]  # 4-grams for BLEU
        rows.append({"source": " ".join(words), "target": " ".join(LEXICON[w] for w in words)})
    data = root / "translation.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # The parent's (source) vocabulary knows only the English side.
    tokenizer = train_tokenizer("sentencepiece", [r["source"] for r in rows] * 4, 40)
    config = load_config("seq2seq-tiny", overrides={**TINY, "data.source": str(data)})
    keras.utils.set_random_seed(0)
    model = get_objective(config).build_model(tokenizer)
    parent = str(root / "parent")
    artifacts.save_model_artifact(parent, model, tokenizer, config, {}, artifacts.make_metadata(
        "keras_llm.PretrainedModel", config, extra={"family": "seq2seq", "task": config.task}))
    return {"data": str(data), "rows": rows, "parent": parent, "root": root}


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.slow
def test_finetune_with_a_target_vocabulary_trains_evaluates_and_generates(translation):
    output = str(translation["root"] / "translator")
    result = run("finetune", "--model", translation["parent"], "--task", "seq2seq",
                 "--data", translation["data"], "--text-column", "source",
                 "--target-column", "target", "--target-vocab-size", "40", "--epochs", "12",
                 "--batch-size", "16", "--learning-rate", "3e-3", "--max-seq-len", "16",
                 "--output-dir", output)
    assert result.exit_code == 0, result.output
    artifact = artifacts.load_model_artifact(output)
    parent = artifacts.load_model_artifact(translation["parent"])
    source, target = artifact.tokenizer, artifact.target_tokenizer
    assert os.path.isdir(os.path.join(output, artifacts.TARGET_TOKENIZER_DIR))
    assert target is not source and target.vocabulary() != source.vocabulary()
    assert source.vocabulary() == parent.tokenizer.vocabulary()  # the parent's, kept
    backbone = artifact.model.backbone
    assert not backbone.shared_vocabulary
    assert backbone.vocabulary_size == source.vocabulary_size()
    assert backbone.target_vocabulary_size == target.vocabulary_size()
    assert artifact.config.model.target_vocab_size == target.vocabulary_size()
    assert target.encode(["kirsche"])[0] != source.encode(["kirsche"])[0]
    artifact.model.check_tokenizer(source, target)
    with pytest.raises(ArtifactError, match="target"):
        artifact.model.check_tokenizer(source, source)
    metrics = json.load(open(os.path.join(output, artifacts.METRICS_FILE)))
    assert metrics["val_token_accuracy"] > 0.6, metrics

    # Generated target ids are decoded with the target tokenizer into target words.
    sources = [r["source"] for r in translation["rows"][:8]]
    references = [r["target"] for r in translation["rows"][:8]]
    greedy = Seq2SeqGenerator(artifact.model, source, target).generate(
        sources, max_new_tokens=14, sampler="greedy")
    words = [w for text in greedy for w in text.split()]
    assert words and sum(w in LEXICON.values() for w in words) / len(words) > 0.6, greedy
    assert sum(g == r for g, r in zip(greedy, references)) >= 2, (greedy, references)
    result = run("generate", output, *sources[:2], "--sampler", "greedy",
                 "--max-new-tokens", "14")
    assert result.exit_code == 0 and result.output.splitlines() == greedy[:2]
    result = run("generate", output, sources[0], "--sampler", "beam", "--num-beams", "2",
                 "--max-new-tokens", "14")
    assert result.exit_code == 0 and set(result.output.split()) <= set(LEXICON.values())

    result = run("evaluate", output, "--data", translation["data"], "--decoding", "beam",
                 "--num-beams", "2")
    assert result.exit_code == 0, result.output
    report = json.load(open(os.path.join(output, "eval.json")))
    assert report["bleu"] > 10.0 and report["token_accuracy"] > 0.6, report

    # Fine-tuning the fine-tuned model again keeps its target vocabulary.
    again = str(translation["root"] / "again")
    finetune(FinetuneOptions(task="seq2seq", data=translation["data"], text_column="source",
                             target_column="target", epochs=1, batch_size=16,
                             max_seq_len=16), output, again, verbose=0)
    reloaded = artifacts.load_model_artifact(again)
    assert reloaded.target_tokenizer.vocabulary() == target.vocabulary()
    assert reloaded.model.backbone.target_vocabulary_size == target.vocabulary_size()


def test_target_vocabulary_is_refused_where_it_does_not_apply(translation, tmp_path):
    with pytest.raises(ConfigError, match="target-vocab-size applies to --task seq2seq"):
        FinetuneOptions(task="classification", target_vocab_size=100).validate()
    with pytest.raises(ConfigError, match="--freeze embeddings would keep the new target"):
        FinetuneOptions(task="seq2seq", target_vocab_size=100, freeze="embeddings").validate()
    with pytest.raises(ConfigError, match="target_vocab_size"):
        load_config("seq2seq-tiny", overrides={"model.target_vocab_size": 100})


def test_artifact_without_target_tokenizer_shares_one_and_overwrite_drops_a_stale_one(
        translation, tmp_path):
    parent = artifacts.load_model_artifact(translation["parent"])
    assert parent.target_tokenizer is parent.tokenizer
    target = train_tokenizer("sentencepiece", [r["target"] for r in translation["rows"]], 40)
    directory = str(tmp_path / "artifact")
    save = lambda target_tokenizer: artifacts.save_model_artifact(
        directory, parent.model, parent.tokenizer, parent.config, {}, parent.metadata,
        target_tokenizer=target_tokenizer)
    save(target)
    assert artifacts.load_model_artifact(directory).target_tokenizer.vocabulary() == \
        target.vocabulary()
    save(None)
    assert not os.path.exists(os.path.join(directory, artifacts.TARGET_TOKENIZER_DIR))
    reloaded = artifacts.load_model_artifact(directory)
    assert reloaded.target_tokenizer is reloaded.tokenizer
    np.testing.assert_array_equal(reloaded.model.backbone.token_embedding.embeddings.numpy(),
                                  parent.model.backbone.token_embedding.embeddings.numpy())
