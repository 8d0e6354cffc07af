"""Evaluation metrics checked by hand and against sacrebleu's numbers; beam search; reports."""

import numpy as np
import pytest
from keras import ops

from keras_llm.evaluation import (
    classification_metrics,
    corpus_bleu,
    format_report,
    language_model_perplexity,
    tokenize_13a,
)
from keras_llm.generation import beam_search

# (hypotheses, references, sacrebleu 2.x `corpus_bleu(hyps, [refs]).score`)
SACREBLEU_CASES = [
    (["The cat is on the mat.", "There is a dog in the garden, it's 3.5 m-long!", "Hello world"],
     ["The cat sat on the mat.", "A dog is in the garden; it is 3.5 m-long.",
      "Hello there world"], 24.378969612691474),
    (["a b c x"], ["a b c d"], 59.460355750136046),  # no 4-gram match: "exp" smoothing
    (["the the the", "a b"], ["the cat", "a b c d e f"], 0.0),  # no 4-gram at all
    (["Tom &amp; Jerry &quot;run&quot;", "x-y 1-2 1,000.5, ok."],
     ['Tom & Jerry "run"', "x-y 1-2 1,000.5, ok."], 100.0),  # entities unescaped
    (["a man rides a horse on the beach .", "two dogs play"],
     ["a man is riding a horse along the beach .", "two dogs are playing in the snow ."],
     15.16326649281584),  # brevity penalty
]


@pytest.mark.parametrize("hypotheses,references,expected", SACREBLEU_CASES)
def test_corpus_bleu_matches_sacrebleu(hypotheses, references, expected):
    assert corpus_bleu(hypotheses, references) == pytest.approx(expected, abs=1e-9)


def test_corpus_bleu_with_several_references_matches_sacrebleu():
    score = corpus_bleu(["the quick brown fox jumps over a dog"],
                        [["the quick brown fox jumped over the lazy dog",
                          "a quick brown fox jumps over a dog today"]])
    assert score == pytest.approx(88.24969025845958, abs=1e-9)


def test_corpus_bleu_by_hand():
    # 6 tokens, 1-grams 5/6, 2-grams 3/5, 3-grams 2/4, 4-grams 1/3; reference 6 tokens (BP 1).
    score = corpus_bleu(["a b c d x f"], ["a b c d e f"])
    assert score == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)


def test_13a_tokenization():
    assert " ".join(tokenize_13a("There is a dog in the garden, it's 3.5 m-long! (x) $5 1-2")) \
        == "There is a dog in the garden , it's 3.5 m-long ! ( x ) $ 5 1 - 2"


def test_classification_metrics_by_hand():
    report = classification_metrics([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], ["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    # a: P 2/2 R 2/3; b: P 1/2 R 1/2; c: P 1/2 R 1/1
    assert report["per_class"]["a"] == {"precision": 1.0, "recall": pytest.approx(2 / 3),
                                        "f1": pytest.approx(0.8), "support": 3}
    assert report["per_class"]["c"]["f1"] == pytest.approx(2 / 3)
    assert report["macro_precision"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert report["macro_recall"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert report["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    never_predicted = classification_metrics([0, 1], [0, 0], ["a", "b"])["per_class"]["b"]
    assert never_predicted == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_format_report_prints_a_table():
    report = {"task": "classification",
              **classification_metrics([0, 1, 1], [0, 1, 0], ["neg", "pos"])}
    text = format_report(report)
    assert "accuracy         0.6667" in text
    assert "pos    1.0000     0.5000  0.6667  2" in text
    assert "confusion matrix (rows: true, columns: predicted)" in text


class _UniformLM:
    """Scores every token 1/vocabulary: perplexity must be exactly the vocabulary size."""

    def __call__(self, ids, training=False):
        return np.zeros((*ids.shape, 37), "float32")


class _Tokenizer:
    def special_token_ids(self):
        return {"pad": 0, "eos": 5}

    def encode(self, texts):
        return [[6 + len(w) for w in t.split()] for t in texts]


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    report = language_model_perplexity(_UniformLM(), _Tokenizer(), ["a bb ccc", "dddd e"], 4)
    assert report["perplexity"] == pytest.approx(37.0)
    assert report["tokens"] == 7  # 5 words + 2 EOS, after the leading EOS


def test_beam_search_finds_the_sequence_greedy_misses():
    # From the start token 1: greedy takes 2 (p=0.6) then at best p=0.4; beam takes 3
    # (p=0.4) then 4 (p=1.0): 0.4 > 0.6 * 0.4. Token 9 ends a sequence.
    table = np.full((10, 10), 1e-9)
    table[1, 2], table[1, 3] = 0.6, 0.4
    table[2, 4], table[2, 5], table[2, 6] = 0.4, 0.3, 0.3
    table[3, 4] = 1.0
    table[4, 9] = table[5, 9] = table[6, 9] = 1.0
    logits_table = np.log(table / table.sum(1, keepdims=True)).astype("float32")

    def step(token_ids, cache, index):
        return ops.convert_to_tensor(logits_table[np.asarray(token_ids)]), cache

    cache = ops.zeros((2, 1))
    best = beam_search(step, cache, np.array([[1]], "int32"), 5, num_beams=2,
                       end_token_id=9, length_penalty=0.0)
    assert best.tolist() == [[1, 3, 4, 9, 0]]
    greedy = beam_search(step, ops.zeros((1, 1)), np.array([[1]], "int32"), 5, num_beams=1,
                         end_token_id=9)
    assert greedy.tolist() == [[1, 2, 4, 9, 0]]
