"""Fine-tuning quality: the gain from pretraining, shown on AG News and TREC-6; Multi30k BLEU.

(1) For each family (bert-tiny, roberta-tiny, gpt-tiny): train one tokenizer and pretrain
the model from scratch on the shared corpora (WikiText-2 plus the unlabeled texts of the AG
News and TREC training sets), and save a second artifact with the same tokenizer and
architecture but random weights. Fine-tune both on AG News and on TREC-6 (5,452 train, 10%
held out for validation / 500 test) with the same options, and report test accuracy and
macro-F1: the difference is what pretraining buys. The shared AG News dev.csv (1,000) is a
subset of its train.csv (5,000), so the benchmark trains on the 4,000 training rows not in
dev, validates on dev and tests on test.csv (1,000).

Pretraining steps (`--pretrain-steps`) default to what shows the gain on both tasks
(`benchmarks/results/finetune_quality_roberta10k_seeds.json`, `..._gpt3k_seeds.json`):
roberta-tiny 10,000 (a masked LM learns from the 15% of positions it masks, and needs
thousands of steps to leave the unigram plateau), gpt-tiny 3,000 (at its built-in 900 it
gained on TREC-6 but lost on AG News), bert-tiny 3,000.
(2) Train seq2seq-tiny (its SentencePiece vocabulary learned on Multi30k) on Multi30k
en->de and report test BLEU (sacrebleu-compatible, greedy and beam search). One vocabulary
for English and German by default; `--separate-vocabularies` learns the source vocabulary
on the English side and lets fine-tuning learn a German one (`--target-vocab-size`).

Everything goes through the product's executors (`pretrain`, `finetune`,
`evaluate_artifact`), as `keras-llm pretrain/finetune/evaluate` run them. Prints one table
with the wall time of every run and writes `benchmarks/results/finetune_quality.json`.

    python benchmarks/finetune_quality.py            # full run (an hour or more on 2 CPUs)
    python benchmarks/finetune_quality.py --quick    # smoke run on a few hundred examples
    python benchmarks/finetune_quality.py --families gpt-tiny --skip-seq2seq \
        --finetune-seeds 1,2,3                       # fine-tuning noise: mean +- std
"""
import argparse
import csv
import json
import os
import random

import benchlib

AG_NEWS_LABELS = {"0": "world", "1": "sports", "2": "business", "3": "sci/tech"}
DEFAULT_PRETRAIN_STEPS = "bert-tiny=3000,roberta-tiny=10000,gpt-tiny=3000"
QUICK_MODEL = {"model.num_layers": 1, "model.hidden_size": 32, "model.num_heads": 2,
               "model.intermediate_size": 64, "model.vocab_size": 600,
               "model.max_length": 64, "data.seq_len": 64, "train.batch_size": 8,
               "train.eval_every": 5, "train.eval_steps": 2}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    benchlib.add_common_arguments(parser)
    parser.add_argument("--work-dir", default=None,
                        help="where converted data and artifacts go (default: "
                             "benchmarks/results/finetune_quality_work)")
    parser.add_argument("--families", default="bert-tiny,roberta-tiny,gpt-tiny",
                        help="comma-separated pretraining configs to compare")
    parser.add_argument("--pretrain-steps", default=None,
                        help="pretraining steps: N for every family, or FAMILY=N,... (default: "
                             f"{DEFAULT_PRETRAIN_STEPS}, others their config's; quick: 5)")
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (4)")
    parser.add_argument("--seq2seq-epochs", type=int, default=None, help="Multi30k epochs (10)")
    parser.add_argument("--finetune-seeds", default=None,
                        help="comma list: fine-tune every (model, task) once per seed and "
                             "report the mean and standard deviation (default: --seed)")
    parser.add_argument("--reuse-pretrained", action="store_true",
                        help="keep a family's pretrained and random-init artifacts from an "
                             "earlier run in --work-dir when their config is the same")
    parser.add_argument("--skip-seq2seq", action="store_true")
    parser.add_argument("--separate-vocabularies", action="store_true",
                        help="seq2seq: an English source and a German target vocabulary, "
                             "each of the configured size, instead of one shared")
    args = benchlib.start(parser)
    args.pretrain_steps = parse_steps(args.pretrain_steps or ("5" if args.quick else
                                                              DEFAULT_PRETRAIN_STEPS))
    args.epochs = args.epochs or (1 if args.quick else 4)
    args.finetune_seeds = benchlib.parse_seeds(args.finetune_seeds, args.seed,
                                               "--finetune-seeds")
    args.seq2seq_epochs = args.seq2seq_epochs or (1 if args.quick else 10)
    args.work_dir = args.work_dir or os.path.join(
        benchlib.RESULTS_DIR, "finetune_quality_work" + ("_quick" if args.quick else ""))
    return args


def parse_steps(text):
    """'N' (every family) or 'FAMILY=N,...' -> {family or None: N}."""
    steps = {}
    for item in text.split(","):
        family, _, number = item.rpartition("=")
        try:
            steps[family or None] = int(number)
        except ValueError:
            raise SystemExit(f"--pretrain-steps: {item!r} is not N or FAMILY=N") from None
    return steps


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def prepare_data(args):
    """Converts the shared files to JSONL (`text`/`label`, `text`/`target`); returns paths."""
    shared, work = benchlib.data_dir(), os.path.join(args.work_dir, "data")
    os.makedirs(work, exist_ok=True)
    limit = 300 if args.quick else None
    paths = {}
    ag_news = {}
    for split in ("train", "dev", "test"):
        with open(benchlib.require_file(os.path.join(shared, "ag_news", f"{split}.csv"),
                                        "AG News"), encoding="utf-8") as f:
            ag_news[split] = [{"text": text, "label": AG_NEWS_LABELS[label]}
                              for text, label in csv.reader(f)]
    dev_texts = {row["text"] for row in ag_news["dev"]}  # dev.csv is drawn from train.csv
    ag_news["train"] = [row for row in ag_news["train"] if row["text"] not in dev_texts]
    for split, rows in ag_news.items():
        paths[f"ag_news_{split}"] = write_jsonl(os.path.join(work, f"ag_news_{split}.jsonl"),
                                                rows[:limit])
    for split, name in (("train", "train_5500.label"), ("test", "TREC_10.label")):
        with open(benchlib.require_file(os.path.join(shared, "trec6", name), "TREC-6"),
                  encoding="latin-1") as f:
            rows = [{"text": line.split(" ", 1)[1].strip(), "label": line.split(":", 1)[0]}
                    for line in f if line.strip()][:limit]
        paths[f"trec6_{split}"] = write_jsonl(os.path.join(work, f"trec6_{split}.jsonl"), rows)
    for split in ("train", "val", "test"):
        with open(benchlib.require_file(os.path.join(shared, "multi30k", f"{split}.en"),
                                        "Multi30k"), encoding="utf-8") as en, \
                open(os.path.join(shared, "multi30k", f"{split}.de"), encoding="utf-8") as de:
            rows = [{"text": s.strip(), "target": t.strip()} for s, t in zip(en, de)][
                :(100 if args.quick else None)]
        paths[f"multi30k_{split}"] = write_jsonl(os.path.join(work, f"multi30k_{split}.jsonl"),
                                                 rows)
    corpus = [p for p in (os.path.join(shared, "wikitext2", f"wiki.{s}.raw")
                          for s in ("valid", "test")) if os.path.isfile(p)]
    unlabeled = [json.loads(line)["text"] for key in ("ag_news_train", "trec6_train")
                 for line in open(paths[key], encoding="utf-8")]
    paths["unlabeled"] = write_jsonl(os.path.join(work, "unlabeled.jsonl"),
                                     [{"text": t} for t in unlabeled])
    paths["pretrain"] = ",".join(corpus[:1 if args.quick else None] + [paths["unlabeled"]])
    return paths


def pretrained_and_random(args, family, paths):
    """(pretrained artifact dir, random-init artifact dir, pretraining seconds)."""
    from keras_llm import artifacts
    from keras_llm.config import load_config
    from keras_llm.data import load_tokenizer
    from keras_llm.training.objectives import get_objective
    from keras_llm.training.pretrain import pretrain

    overrides = {**(QUICK_MODEL if args.quick else {}), "data.source": paths["pretrain"],
                 "train.steps": args.pretrain_steps.get(family, args.pretrain_steps.get(None)),
                 "train.seed": args.seed}
    config = load_config(family, overrides=overrides)
    pretrained = os.path.join(args.work_dir, family)
    random_dir = pretrained + "-random"
    if args.reuse_pretrained and all(artifacts.is_complete(d) for d in (pretrained, random_dir)):
        import yaml

        with open(os.path.join(pretrained, artifacts.CONFIG_FILE), encoding="utf-8") as f:
            if yaml.safe_load(f) == config.to_dict():
                metrics = artifacts.read_json(os.path.join(pretrained, artifacts.METRICS_FILE))
                print(f"reusing {pretrained} (same config)")
                return pretrained, random_dir, metrics.get("train_seconds", 0.0), metrics
        print(f"{pretrained}: config differs; pretraining again")
    with benchlib.Stopwatch() as watch:
        metrics = pretrain(config, pretrained, overwrite=True, verbose=0)
    tokenizer = load_tokenizer(os.path.join(pretrained, artifacts.TOKENIZER_DIR))
    model = get_objective(config).build_model(tokenizer)  # same shape, same tokenizer
    artifacts.save_model_artifact(random_dir, model, tokenizer, config, {},
                                  artifacts.make_metadata(
                                      "keras_llm.PretrainedModel", config,
                                      extra={"family": config.model.family,
                                             "task": config.task, "random_init": True}))
    return pretrained, random_dir, watch.seconds, metrics


def finetune_and_test(args, parent, name, train, test, validation=None, seed=None, **options):
    from keras_llm.evaluation import evaluate_artifact
    from keras_llm.training.finetune import FinetuneOptions, finetune

    output = os.path.join(args.work_dir, name)
    settings = FinetuneOptions(data=train, validation_data=validation,
                               seed=args.seed if seed is None else seed,
                               **{"epochs": args.epochs, "batch_size": 32,
                                  "learning_rate": 5e-4, "max_seq_len": 64 if args.quick
                                  else 128, **options})
    with benchlib.Stopwatch() as watch:
        metrics = finetune(settings, parent, output, overwrite=True, verbose=0)
    report, _ = evaluate_artifact(output, test)
    return metrics, report, watch.seconds


def main():
    args = parse_args()
    random.seed(args.seed)
    paths = prepare_data(args)
    rows, records = [], []
    for family in args.families.split(","):
        pretrained, random_dir, pretrain_seconds, pretrain_metrics = pretrained_and_random(
            args, family, paths)
        records.append({"run": f"pretrain {family}", "seconds": round(pretrain_seconds, 1),
                        "metrics": pretrain_metrics})
        rows.append([f"pretrain {family}", "-", "-", "-", f"{pretrain_seconds:.0f}"])
        for task, train, validation, test in (
                ("ag_news", paths["ag_news_train"], paths["ag_news_dev"], paths["ag_news_test"]),
                ("trec6", paths["trec6_train"], None, paths["trec6_test"])):
            scores = {}
            for init, parent in (("pretrained", pretrained), ("random", random_dir)):
                for seed in args.finetune_seeds:
                    suffix = "" if len(args.finetune_seeds) == 1 else f"-seed{seed}"
                    metrics, report, seconds = finetune_and_test(
                        args, parent, f"{family}-{init}-{task}{suffix}", train, test,
                        validation, seed=seed)
                    records.append({"run": f"{family} {init} {task}", "seed": seed,
                                    "seconds": round(seconds, 1), "finetune": metrics,
                                    "test": {k: report[k]
                                             for k in ("accuracy", "macro_f1", "examples")}})
                    rows.append([f"{family} {init}" + (f" seed {seed}" if suffix else ""),
                                 task, f"{report['accuracy']:.4f}",
                                 f"{report['macro_f1']:.4f}", f"{seconds:.0f}"])
                    scores.setdefault(init, []).append((report["accuracy"],
                                                        report["macro_f1"]))
            if len(args.finetune_seeds) > 1:
                rows.extend(seed_summary(family, task, scores, records))
    if not args.skip_seq2seq:
        rows.append(seq2seq_run(args, paths, records))
    print(benchlib.format_table(
        ["run", "task", "test accuracy / BLEU", "macro-F1 / beam BLEU", "seconds"], rows))
    path = benchlib.write_result("finetune_quality" + ("_quick" if args.quick else ""), args,
                                 {"runs": records})
    print(f"results: {path}")


def seed_summary(family, task, scores, records):
    """Mean +- standard deviation over fine-tuning seeds, and the gain of pretraining."""
    rows, summary = [], {}
    for init, values in scores.items():
        accuracy, accuracy_std = benchlib.mean_and_std([a for a, _ in values])
        macro_f1, macro_f1_std = benchlib.mean_and_std([f for _, f in values])
        summary[init] = {"accuracy_mean": accuracy, "accuracy_std": accuracy_std,
                         "macro_f1_mean": macro_f1, "macro_f1_std": macro_f1_std}
        rows.append([f"{family} {init} mean of {len(values)}", task,
                     f"{summary[init]['accuracy_mean']:.4f} +-{summary[init]['accuracy_std']:.4f}",
                     f"{summary[init]['macro_f1_mean']:.4f} +-{summary[init]['macro_f1_std']:.4f}",
                     ""])
    gain = {key: summary["pretrained"][key] - summary["random"][key]
            for key in ("accuracy_mean", "macro_f1_mean")}
    records.append({"run": f"{family} {task} over seeds", **summary, "gain": gain})
    rows.append([f"{family} gain from pretraining", task, f"{gain['accuracy_mean']:+.4f}",
                 f"{gain['macro_f1_mean']:+.4f}", ""])
    return rows


def seq2seq_run(args, paths, records):
    """seq2seq-tiny with SentencePiece vocabularies learned on Multi30k, trained en->de."""
    from keras_llm import artifacts
    from keras_llm.config import load_config
    from keras_llm.data import train_tokenizer
    from keras_llm.evaluation import evaluate_artifact
    from keras_llm.training.finetune import FinetuneOptions, finetune
    from keras_llm.training.objectives import get_objective

    rows = [json.loads(line) for line in open(paths["multi30k_train"], encoding="utf-8")]
    config = load_config("seq2seq-tiny", overrides={
        **(QUICK_MODEL if args.quick else {}), "data.source": paths["multi30k_train"],
        "model.vocab_size": 600 if args.quick else 8000})
    separate = args.separate_vocabularies
    tokenizer = train_tokenizer("sentencepiece", [r["text"] for r in rows] +
                                ([] if separate else [r["target"] for r in rows]),
                                config.model.vocab_size)
    parent = os.path.join(args.work_dir, "seq2seq-tiny-multi30k-init")
    artifacts.save_model_artifact(parent, get_objective(config).build_model(tokenizer),
                                  tokenizer, config, {}, artifacts.make_metadata(
                                      "keras_llm.PretrainedModel", config,
                                      extra={"family": "seq2seq", "task": config.task}))
    output = os.path.join(args.work_dir, "seq2seq-tiny-multi30k")
    settings = FinetuneOptions(task="seq2seq", data=paths["multi30k_train"],
                               validation_data=paths["multi30k_val"], epochs=args.seq2seq_epochs,
                               batch_size=64, learning_rate=1e-3, max_seq_len=64,
                               seed=args.seed, early_stopping_metric="loss",
                               target_vocab_size=config.model.vocab_size if separate else None)
    with benchlib.Stopwatch() as watch:
        metrics = finetune(settings, parent, output, overwrite=True, verbose=0)
    greedy, _ = evaluate_artifact(output, paths["multi30k_test"])
    beam, _ = evaluate_artifact(output, paths["multi30k_test"], sampler="beam", num_beams=4)
    task = "multi30k en-de" + (" (separate vocabularies)" if separate else "")
    records.append({"run": f"seq2seq-tiny {task}", "seconds": round(watch.seconds, 1),
                    "finetune": metrics, "test": {"bleu_greedy": greedy["bleu"],
                                                  "bleu_beam4": beam["bleu"],
                                                  "token_accuracy": greedy["token_accuracy"]}})
    return ["seq2seq-tiny", task, f"{greedy['bleu']:.2f}", f"{beam['bleu']:.2f}",
            f"{watch.seconds:.0f}"]


if __name__ == "__main__":
    main()
