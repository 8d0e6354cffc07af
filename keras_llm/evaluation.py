"""Evaluation of fine-tuned (and pretrained) artifacts: metrics, tables, eval.json.

    classifier (TextClassifier)  accuracy, macro and per-class precision/recall/F1, confusion
    language model (GPTCausalLM) perplexity (every token after the first scored exactly once)
    seq2seq (Seq2SeqLM)          corpus BLEU (sacrebleu-compatible: 13a tokenization, "exp"
                                 smoothing, brevity penalty) and teacher-forced token accuracy

The metric functions are plain Python/NumPy and checked by hand in the tests;
`evaluate_artifact` runs a model on labeled data and returns the report.

Example:

>>> round(corpus_bleu(["the cat sat on the mat ."], ["the cat sat on the mat ."]), 1)
100.0
>>> classification_metrics([0, 1, 1], [0, 1, 0], ["a", "b"])["accuracy"]
0.6666666666666666
"""
import collections
import math
import os
import re

import numpy as np

from keras_llm.errors import ArtifactError

EVAL_FILE = "eval.json"

# mteval-v13a's tokenization, as sacrebleu's `13a` tokenizer applies it.
_13A_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation and symbols
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma unless after a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period and comma unless before a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
]


def tokenize_13a(line):
    """The tokens of `line` under mteval-v13a's rules (sacrebleu's default tokenizer)."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = (line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
                .replace("&gt;", ">"))
    line = f" {line} "
    for pattern, replacement in _13A_RULES:
        line = pattern.sub(replacement, line)
    return line.split()


def _ngrams(tokens, max_order):
    counts = collections.Counter()
    for n in range(1, max_order + 1):
        for i in range(len(tokens) - n + 1):
            counts[tuple(tokens[i:i + n])] += 1
    return counts


def bleu_statistics(hypotheses, references, max_order=4):
    """Clipped n-gram matches and totals per order, hypothesis and reference lengths.

    `references` holds one string per hypothesis, or a list of strings (several
    references): counts are clipped by the maximum over references and the reference
    length is the one closest to the hypothesis (shorter wins ties), as in sacrebleu.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    correct, total = [0] * max_order, [0] * max_order
    hypothesis_length = reference_length = 0
    for hypothesis, refs in zip(hypotheses, references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        tokens = tokenize_13a(hypothesis)
        ref_tokens = [tokenize_13a(r) for r in refs]
        hypothesis_length += len(tokens)
        reference_length += min((abs(len(r) - len(tokens)), len(r)) for r in ref_tokens)[1]
        maximum = collections.Counter()
        for r in ref_tokens:
            maximum |= _ngrams(r, max_order)
        for ngram, count in _ngrams(tokens, max_order).items():
            correct[len(ngram) - 1] += min(count, maximum[ngram])
        for n in range(1, max_order + 1):
            total[n - 1] += max(0, len(tokens) - n + 1)
    return {"correct": correct, "total": total, "hypothesis_length": hypothesis_length,
            "reference_length": reference_length}


def bleu_from_statistics(stats, max_order=4):
    """BLEU in [0, 100] with sacrebleu's defaults ("exp" smoothing of zero precisions)."""
    precisions = [0.0] * max_order
    smoothing = 1.0
    for n in range(max_order):
        if stats["total"][n] == 0:
            break
        if stats["correct"][n] == 0:
            smoothing *= 2
            precisions[n] = 100.0 / (smoothing * stats["total"][n])
        else:
            precisions[n] = 100.0 * stats["correct"][n] / stats["total"][n]
    hypothesis_length, reference_length = stats["hypothesis_length"], stats["reference_length"]
    if hypothesis_length == 0 or min(precisions) == 0.0:
        return 0.0
    brevity_penalty = 1.0 if hypothesis_length >= reference_length else math.exp(
        1.0 - reference_length / hypothesis_length)
    return brevity_penalty * math.exp(sum(math.log(p) for p in precisions) / max_order)


def corpus_bleu(hypotheses, references, max_order=4):
    """Corpus-level BLEU (0-100) of detokenized `hypotheses` against `references`;
    the same number as `sacrebleu.corpus_bleu(hypotheses, [references]).score`."""
    return bleu_from_statistics(bleu_statistics(hypotheses, references, max_order), max_order)


def classification_metrics(true_ids, predicted_ids, label_names):
    """Accuracy, per-class and macro precision/recall/F1, and the confusion matrix.

    `confusion_matrix[i][j]` counts examples of true class i predicted as class j. A ratio
    with a zero denominator (a class never predicted, or absent) is 0.
    """
    true_ids = np.asarray(true_ids, np.int64)
    predicted_ids = np.asarray(predicted_ids, np.int64)
    size = len(label_names)
    confusion = np.zeros((size, size), np.int64)
    np.add.at(confusion, (true_ids, predicted_ids), 1)
    per_class = {}
    for i, name in enumerate(label_names):
        hits, predicted, actual = confusion[i, i], confusion[:, i].sum(), confusion[i].sum()
        precision = hits / predicted if predicted else 0.0
        recall = hits / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": float(precision), "recall": float(recall),
                           "f1": float(f1), "support": int(actual)}
    return {
        "examples": int(len(true_ids)),
        "accuracy": float((true_ids == predicted_ids).mean()) if len(true_ids) else 0.0,
        "macro_precision": float(np.mean([c["precision"] for c in per_class.values()])),
        "macro_recall": float(np.mean([c["recall"] for c in per_class.values()])),
        "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])),
        "per_class": per_class,
        "labels": list(label_names),
        "confusion_matrix": confusion.tolist(),
    }


def format_report(report):
    """The report as a plain-text table (what `keras-llm evaluate` prints)."""
    lines = []
    scalars = {k: v for k, v in report.items() if isinstance(v, (int, float))}
    width = max([len(k) for k in scalars] + [6])
    for key, value in scalars.items():
        lines.append(f"{key:<{width}}  {value:.4f}" if isinstance(value, float)
                     else f"{key:<{width}}  {value}")
    if "per_class" in report:
        names = report["labels"]
        name_width = max(len(n) for n in names + ["class"])
        lines.append("")
        lines.append(f"{'class':<{name_width}}  precision  recall  f1      support")
        for name in names:
            c = report["per_class"][name]
            lines.append(f"{name:<{name_width}}  {c['precision']:<9.4f}  {c['recall']:<6.4f}  "
                         f"{c['f1']:<6.4f}  {c['support']}")
        lines.append("")
        lines.append("confusion matrix (rows: true, columns: predicted)")
        cell = max(max(len(str(v)) for row in report["confusion_matrix"] for v in row), 3)
        lines.append(" " * name_width + "  " + " ".join(f"{i:>{cell}}" for i in range(len(names))))
        for i, (name, row) in enumerate(zip(names, report["confusion_matrix"])):
            lines.append(f"{name:<{name_width}}  " + " ".join(f"{v:>{cell}}" for v in row)
                         + f"   ({i})")
    return "\n".join(lines)


def _batches(arrays, batch_size):
    count = len(next(iter(arrays.values())) if isinstance(arrays, dict) else arrays)
    for start in range(0, count, batch_size):
        if isinstance(arrays, dict):
            yield {k: v[start:start + batch_size] for k, v in arrays.items()}
        else:
            yield arrays[start:start + batch_size]


def language_model_perplexity(model, tokenizer, texts, seq_len, batch_size=16):
    """exp(mean next-token cross-entropy) of a `GPTCausalLM` over `texts`."""
    from keras import ops

    from keras_llm.data.labeled import lm_blocks

    blocks, weights = lm_blocks(texts, tokenizer, seq_len + 1)
    if len(blocks) == 0:
        raise ArtifactError("evaluation data holds no tokens to score")
    total_loss = total_tokens = correct = 0.0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start:start + batch_size]
        target_weights = weights[start:start + batch_size, 1:]
        logits = ops.convert_to_numpy(model(ids[:, :-1], training=False)).astype(np.float64)
        log_probabilities = logits - _logsumexp(logits)
        targets = ids[:, 1:]
        picked = np.take_along_axis(log_probabilities, targets[..., None], axis=-1)[..., 0]
        total_loss -= float((picked * target_weights).sum())
        correct += float(((logits.argmax(-1) == targets) * target_weights).sum())
        total_tokens += float(target_weights.sum())
    loss = total_loss / total_tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "token_accuracy": correct / total_tokens, "tokens": int(total_tokens)}


def _logsumexp(logits):
    top = logits.max(axis=-1, keepdims=True)
    return top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def seq2seq_token_accuracy(model, tokenizer, sources, targets, max_seq_len, batch_size=16,
                           target_tokenizer=None):
    """Teacher-forced next-token accuracy and loss of a `Seq2SeqLM` on real target tokens
    (targets tokenized by `target_tokenizer` when the target has its own vocabulary)."""
    from keras import ops

    from keras_llm.data.labeled import seq2seq_arrays

    features, target_ids, weights = seq2seq_arrays(sources, targets, tokenizer, max_seq_len,
                                                   target_tokenizer=target_tokenizer)
    total_loss = correct = count = 0.0
    for batch, ids, w in zip(_batches(features, batch_size), _batches(target_ids, batch_size),
                             _batches(weights, batch_size)):
        logits = ops.convert_to_numpy(model(batch, training=False)).astype(np.float64)
        log_probabilities = logits - _logsumexp(logits)
        picked = np.take_along_axis(log_probabilities, ids[..., None], axis=-1)[..., 0]
        total_loss -= float((picked * w).sum())
        correct += float(((logits.argmax(-1) == ids) * w).sum())
        count += float(w.sum())
    loss = total_loss / count
    return {"token_accuracy": correct / count, "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)), "tokens": int(count)}


def classifier_predictions(model, dataset):
    """(probabilities `(examples, classes)`) of a `TextClassifier` on a feature dataset."""
    from keras import ops

    outputs = []
    for batch in dataset:
        features = batch[0] if isinstance(batch, tuple) else batch
        logits = ops.convert_to_numpy(model(features, training=False)).astype(np.float64)
        outputs.append(np.exp(logits - _logsumexp(logits)))
    return np.concatenate(outputs, axis=0)


def _artifact_columns(artifact, overrides):
    columns = dict(artifact.metadata.get("columns") or {"text": artifact.config.data.text_field})
    columns.update({role: column for role, column in overrides.items() if column})
    return columns


def default_data(artifact):
    """The built-in task's test split for a model fine-tuned on the built-in task."""
    data = artifact.metadata.get("data") or {}
    if data.get("kind") == "builtin" and artifact.metadata.get("task") == "classification":
        return "builtin:test"
    return None


def _evaluate_classifier(artifact, data, columns, batch_size):
    from keras_llm.data.labeled import LabelVocabulary, classification_dataset, read_labeled
    from keras_llm.models import GPTBackbone
    from keras_llm.training.finetune import read_labels

    labels = LabelVocabulary(read_labels(artifact.directory))
    examples = read_labeled(data, columns, default_split="test").columns
    true_ids = labels.ids(examples["label"], f"--data {data}")
    model = artifact.model
    dataset = classification_dataset(
        examples["text"], None, artifact.tokenizer,
        artifact.metadata.get("max_seq_len") or artifact.config.data.seq_len, batch_size,
        "decoder" if isinstance(model.backbone, GPTBackbone) else "encoder",
        text_pairs=examples.get("text_pair"))
    probabilities = classifier_predictions(model, dataset)
    predicted = probabilities.argmax(-1)
    report = {"task": "classification",
              **classification_metrics(true_ids, predicted, labels.names)}
    predictions = []
    for i, (label, guess) in enumerate(zip(examples["label"], predicted)):
        row = {"text": examples["text"][i], "label": label, "predicted": labels.names[guess],
               "probability": round(float(probabilities[i, guess]), 6)}
        if "text_pair" in examples:
            row["text_pair"] = examples["text_pair"][i]
        predictions.append(row)
    return report, predictions


def _evaluate_seq2seq(artifact, data, columns, batch_size, sampler, num_beams):
    from keras_llm.data.labeled import read_labeled
    from keras_llm.generation import Seq2SeqGenerator

    examples = read_labeled(data, columns).columns
    max_seq_len = artifact.metadata.get("max_seq_len") or artifact.config.data.seq_len
    report = {"task": "seq2seq", "examples": len(examples["text"]),
              **{f"{k}": v for k, v in seq2seq_token_accuracy(
                  artifact.model, artifact.tokenizer, examples["text"], examples["target"],
                  max_seq_len, batch_size, artifact.target_tokenizer).items()}}
    generator = Seq2SeqGenerator(artifact.model, artifact.tokenizer, artifact.target_tokenizer)
    outputs = []
    for start in range(0, len(examples["text"]), batch_size):
        outputs.extend(generator.generate(examples["text"][start:start + batch_size],
                                          max_new_tokens=max_seq_len - 1, sampler=sampler,
                                          num_beams=num_beams))
    report["bleu"] = corpus_bleu(outputs, examples["target"])
    report["decoding"] = sampler if sampler != "beam" else f"beam{num_beams}"
    predictions = [{"source": s, "target": t, "prediction": p}
                   for s, t, p in zip(examples["text"], examples["target"], outputs)]
    return report, predictions


def evaluate_artifact(model_dir, data=None, columns=None, batch_size=32, sampler="greedy",
                      num_beams=4):
    """Scores the artifact in `model_dir` on labeled `data`; returns (report, predictions).

    Args:
        model_dir: a fine-tuned classifier, a GPT or a seq2seq model artifact.
        data: a labeled source spec (`keras_llm.data.labeled`); default: the built-in
            task's test split for classifiers fine-tuned on it.
        columns: {role: column} overriding the columns the model was fine-tuned with.
        batch_size: examples per forward pass.
        sampler: "greedy" or "beam" decoding of seq2seq outputs for BLEU.
        num_beams: beams of beam search.
    """
    from keras_llm.artifacts import load_model_artifact
    from keras_llm.models import GPTCausalLM, Seq2SeqLM
    from keras_llm.tasks import TextClassifier

    artifact = load_model_artifact(model_dir)
    data = data or default_data(artifact)
    if data is None:
        raise ArtifactError(f"{model_dir}: pass --data (the model was not fine-tuned on the "
                            f"built-in task)")
    model = artifact.model
    if isinstance(model, Seq2SeqLM):
        model.check_tokenizer(artifact.tokenizer, artifact.target_tokenizer)
    elif hasattr(model, "check_tokenizer"):
        model.check_tokenizer(artifact.tokenizer)
    columns = _artifact_columns(artifact, columns or {})
    if isinstance(model, TextClassifier):
        columns.setdefault("label", "label")
        report, predictions = _evaluate_classifier(artifact, data, columns, batch_size)
    elif isinstance(model, Seq2SeqLM):
        columns.setdefault("target", "target")
        report, predictions = _evaluate_seq2seq(artifact, data, columns, batch_size, sampler,
                                                num_beams)
    elif isinstance(model, GPTCausalLM):
        from keras_llm.data.labeled import read_labeled

        texts = read_labeled(data, {"text": columns["text"]}).columns["text"]
        report = {"task": "causal_lm", "documents": len(texts),
                  **language_model_perplexity(model, artifact.tokenizer, texts,
                                              artifact.config.data.seq_len, batch_size)}
        predictions = None
    else:
        raise ArtifactError(f"{model_dir} holds a {type(model).__name__}; evaluate scores "
                            f"fine-tuned classifiers, GPT and seq2seq models")
    report["data"] = data
    report["model_dir"] = os.path.abspath(model_dir)
    return report, predictions
