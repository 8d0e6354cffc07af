"""Labeled data: columns by role, the built-in topic task, label ids, packed tf.data batches."""
import json

import numpy as np
import pytest

from keras_llm.data.labeled import (
    MODULE_AREAS,
    LabelVocabulary,
    balanced_class_weights,
    builtin_split_of,
    builtin_topic_records,
    classification_dataset,
    lm_blocks,
    read_labeled,
    seq2seq_arrays,
)
from keras_llm.data.tokenizers import train_tokenizer
from keras_llm.errors import DataError

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


@pytest.fixture(scope="module")
def tokenizer():
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(10)] * 4
    return train_tokenizer("wordpiece", texts, 200, lowercase=True)


def test_jsonl_csv_and_tsv_columns_by_role(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"q": "one", "p": "two", "y": 3}) + "\n\n"
        + json.dumps({"q": "three", "p": "four", "y": "x"}) + "\n")
    (tmp_path / "b.csv").write_text("q,p,y\nfive,\"six, seven\",pos\n")
    (tmp_path / "c.tsv").write_text("q\tp\ty\neight\tnine\tneg\n")
    roles = {"text": "q", "text_pair": "p", "label": "y"}
    data = read_labeled(f"{tmp_path}/a.jsonl,{tmp_path}/b.csv,{tmp_path}/c.tsv", roles)
    assert data.columns == {"text": ["one", "three", "five", "eight"],
                            "text_pair": ["two", "four", "six, seven", "nine"],
                            "label": ["3", "x", "pos", "neg"]}
    assert len(data) == 4 and data.fingerprint.startswith("sha256:")
    assert read_labeled(f"{tmp_path}/b.csv", {"text": "q", "text_pair": None}).columns == {
        "text": ["five"]}


def test_missing_column_names_file_line_and_columns(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a", "label": "x"}) + "\n" + json.dumps({"text": "b"})
                    + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: no column 'label' \(found: text\)"):
        read_labeled(str(path), {"text": "text", "label": "label"})
    with pytest.raises(DataError, match=r"d.jsonl:1: no column 'sentence'"):
        read_labeled(str(path), {"text": "sentence"})
    with pytest.raises(DataError, match="no such file"):
        read_labeled(str(tmp_path / "nope.csv"), {"text": "text"})


def test_builtin_topic_task_is_fixed_and_covers_six_areas():
    test = builtin_topic_records("test")
    assert test == builtin_topic_records("test")  # deterministic
    assert {r["label"] for r in test} == {"text", "networking", "concurrency", "data formats",
                                          "files", "numbers"}
    train, validation = builtin_topic_records("train"), builtin_topic_records("validation")
    total = len(train) + len(validation) + len(test)
    assert 0.75 < len(train) / total < 0.85 and 0.05 < len(test) / total < 0.15
    texts = {r["text"] for r in train}
    assert not texts & {r["text"] for r in test}
    assert builtin_split_of("hello") == builtin_split_of("hello")
    assert MODULE_AREAS["asyncio"] == "concurrency" and MODULE_AREAS["json"] == "data formats"
    data = read_labeled("builtin:test", {"text": "ignored", "label": "ignored"})
    assert data.columns["label"] == [r["label"] for r in test]
    with pytest.raises(DataError, match="split must be one of train, validation, test"):
        read_labeled("builtin:dev", {"text": "text"})


def test_label_vocabulary_sorts_numbers_numerically_and_refuses_unseen_labels():
    labels = LabelVocabulary.from_labels(["10", "2", "1", "2"])
    assert labels.names == ["1", "2", "10"] and labels.ids(["10", "1"]) == [2, 0]
    with pytest.raises(DataError, match=r"eval.csv: label '7' never seen in training \(known "
                                        r"labels: 1, 2, 10\)"):
        labels.ids(["1", "7"], "eval.csv")


def test_balanced_class_weights_match_sklearn_formula():
    # n / (classes * count): 6 / (3 * 3), 6 / (3 * 2), 6 / (3 * 1)
    assert balanced_class_weights([0, 0, 0, 1, 1, 2], 3) == [pytest.approx(2 / 3), 1.0, 2.0]
    assert balanced_class_weights([0, 0], 2) == [0.5, 0.0]  # an absent class weighs 0


def test_encoder_layout_packs_pairs_with_segments_and_truncates(tokenizer):
    a, b = tokenizer.encode(["alpha beta gamma", "delta epsilon"])
    dataset = classification_dataset(["alpha beta gamma"], [1], tokenizer, 10, 4, "encoder",
                                     text_pairs=["delta epsilon"])
    features, labels = next(iter(dataset))
    specials = tokenizer.special_token_ids()
    expected = [specials["cls"], *a, specials["sep"], *b, specials["sep"]]
    assert features["token_ids"].numpy()[0].tolist() == expected + [0] * (10 - len(expected))
    assert features["segment_ids"].numpy()[0].tolist() == (
        [0] * (len(a) + 2) + [1] * (len(b) + 1) + [0] * (10 - len(expected)))
    assert features["padding_mask"].numpy()[0].tolist() == [True] * len(expected) + [False] * (
        10 - len(expected))
    assert labels.numpy().tolist() == [1]
    long = classification_dataset([" ".join(WORDS * 3)], [0], tokenizer, 8, 4, "encoder")
    ids = next(iter(long))[0]["token_ids"].numpy()[0]
    assert len(ids) == 8 and ids[0] == specials["cls"] and ids[-1] == specials["sep"]


def test_decoder_layout_ends_with_eos_and_carries_weights(tokenizer):
    a, = tokenizer.encode(["alpha beta"])
    dataset = classification_dataset(["alpha beta"], [0], tokenizer, 8, 2, "decoder",
                                     sample_weights=[2.5])
    features, labels, weights = next(iter(dataset))
    eos = tokenizer.special_token_ids()["eos"]
    assert features["token_ids"].numpy()[0].tolist()[:len(a) + 2] == [eos, *a, eos]
    assert weights.numpy().tolist() == [2.5]
    unlabeled = next(iter(classification_dataset(["alpha"], None, tokenizer, 8, 2, "decoder")))
    assert set(unlabeled) == {"token_ids", "segment_ids", "padding_mask"}


def test_shuffled_batches_keep_every_example_once(tokenizer):
    texts = [WORDS[i] for i in range(10)]
    dataset = classification_dataset(texts, list(range(10)), tokenizer, 6, 3, "encoder",
                                     shuffle=True, seed=1)
    labels = np.concatenate([y.numpy() for _, y in dataset])
    assert sorted(labels.tolist()) == list(range(10)) and labels.tolist() != list(range(10))


def test_seq2seq_arrays_follow_the_pretraining_layout(tokenizer):
    (source,), (target,) = tokenizer.encode(["alpha beta"]), tokenizer.encode(["gamma"])
    features, targets, weights = seq2seq_arrays(["alpha beta"], ["gamma"], tokenizer, 6)
    s = tokenizer.special_token_ids()
    assert features["encoder_token_ids"][0].tolist() == (source + [s["eos"]] + [0] * 6)[:6]
    assert features["decoder_token_ids"][0].tolist() == ([s["cls"]] + target + [0] * 6)[:6]
    assert targets[0].tolist() == (target + [s["eos"]] + [0] * 6)[:6]
    assert weights[0].tolist() == [1.0] * (len(target) + 1) + [0.0] * (5 - len(target))
    assert features["decoder_padding_mask"].dtype == bool


def test_seq2seq_arrays_tokenize_targets_with_the_target_tokenizer(tokenizer):
    target_tokenizer = train_tokenizer("wordpiece", ["eins zwei drei vier"] * 20, 60)
    source_text, target_text = "alpha beta gamma", "drei eins zwei"
    (source,), (target,) = (tokenizer.encode([source_text]),
                            target_tokenizer.encode([target_text]))
    assert target != tokenizer.encode([target_text])[0]
    features, targets, weights = seq2seq_arrays([source_text], [target_text], tokenizer, 8,
                                                target_tokenizer=target_tokenizer)
    s = target_tokenizer.special_token_ids()
    assert features["encoder_token_ids"][0].tolist() == (source + [s["eos"]] + [0] * 8)[:8]
    assert features["decoder_token_ids"][0].tolist() == ([s["cls"]] + target + [0] * 8)[:8]
    assert targets[0].tolist() == (target + [s["eos"]] + [0] * 8)[:8]
    assert targets.max() < target_tokenizer.vocabulary_size()
    assert weights[0].sum() == len(target) + 1


def test_lm_blocks_score_every_token_after_the_first_once(tokenizer):
    texts = ["alpha beta gamma", "delta"]
    stream_length = 1 + sum(len(ids) + 1 for ids in tokenizer.encode(texts))
    blocks, weights = lm_blocks(texts, tokenizer, 4)
    assert blocks.shape[1] == 4
    assert weights[:, 1:].sum() == stream_length - 1
    assert blocks[1][0] == blocks[0][3]  # consecutive blocks overlap by one token


def test_tfds_class_labels_are_read_by_name():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=6):  # generated records, no network
        data = read_labeled("tfds:imdb_reviews:test", {"text": "text", "label": "label"})
        assert len(data) == 6 and set(data.columns["label"]) <= {"neg", "pos"}
        assert data.fingerprint == "tfds:imdb_reviews:test:1.0.0"
        with pytest.raises(DataError, match=r"no column 'stars' \(found: label, text\)"):
            read_labeled("tfds:imdb_reviews", {"text": "text", "label": "stars"})
