"""Pretraining every model family on real text: loss curves and tokens/s, side by side.

For each family's tiny config (bert-tiny: MLM + NSP, roberta-tiny: dynamic MLM, a shrunken
electra-small: MLM + 50 * RTD, seq2seq-tiny: BART text infilling, gpt-tiny: causal LM for
reference) the script trains a tokenizer of the config's kind on the corpus, builds the
model through its objective (exactly what `keras-llm pretrain` runs), trains for `--steps`
steps and evaluates every `--eval-every` steps. It records the validation-loss curve, the
objective's own metrics and the training throughput (input tokens per second, the first
interval, which holds graph tracing, left out), prints a one-line-per-family table and writes
`benchmarks/results/pretrain_families.json`.

The loss scales differ by objective (ELECTRA's includes 50 x RTD; seq2seq's covers every
target token): compare each family's curve with itself, and throughput across families.

    python benchmarks/pretrain_families.py                 # wikitext-2 (valid + test)
    python benchmarks/pretrain_families.py --quick         # smoke run, a few steps
    python benchmarks/pretrain_families.py --data ../shared/data/tinyshakespeare/input.txt
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

FAMILIES = {
    "bert": ("bert-tiny", {}),
    "roberta": ("roberta-tiny", {}),
    "electra": ("electra-small", {"model.num_layers": 2, "model.vocab_size": 4096,
                                  "train.batch_size": 32, "train.learning_rate": 1e-3}),
    "seq2seq": ("seq2seq-tiny", {}),
    "gpt": ("gpt-tiny", {}),
}
CURVE_KEYS = ("mlm_accuracy", "nsp_accuracy", "rtd_accuracy", "token_accuracy", "accuracy")


class IntervalTimer:
    """Keras callback: wall time of each `fit` epoch (one evaluation interval)."""

    def __init__(self):
        import keras

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(cb, epoch, logs=None):
                cb.started = time.perf_counter()

            def on_epoch_end(cb, epoch, logs=None):
                self.seconds.append(time.perf_counter() - cb.started)

        self.seconds = []
        self.callback = Callback()


def run_family(family, args, texts_train, texts_validation):
    import keras

    from keras_llm.config import load_config
    from keras_llm.data import train_tokenizer
    from keras_llm.training.objectives import get_objective
    from keras_llm.training.optim import make_optimizer

    name, overrides = FAMILIES[family]
    overrides = {**overrides, "train.steps": args.steps, "train.seed": args.seed,
                 "train.warmup_steps": max(1, args.steps // 10)}
    config = load_config(name, overrides=overrides)
    keras.utils.set_random_seed(config.train.seed)
    tokenizer = train_tokenizer(config.data.tokenizer, texts_train, config.model.vocab_size,
                                lowercase=config.data.lowercase)
    objective = get_objective(config)
    objective.check_tokenizer(tokenizer)
    train = objective.dataset(texts_train, tokenizer, training=True)
    validation = objective.dataset(texts_validation, tokenizer, training=False)
    validation = validation.take(args.eval_batches).cache()
    model = objective.build_model(tokenizer)
    objective.compile(model, make_optimizer(config.train, total_steps=args.steps))
    timer = IntervalTimer()
    intervals = max(1, args.steps // args.eval_every)
    history = model.fit(train, epochs=intervals, steps_per_epoch=args.eval_every,
                        validation_data=validation, callbacks=[timer.callback], verbose=0)
    logs = history.history
    steady = timer.seconds[1:] or timer.seconds
    tokens_per_step = config.train.batch_size * config.data.seq_len
    return {
        "family": family, "config": name, "task": config.task,
        "parameters": int(model.count_params()), "vocabulary_size": tokenizer.vocabulary_size(),
        "batch_size": config.train.batch_size, "seq_len": config.data.seq_len,
        "steps": intervals * args.eval_every,
        "curve": [{"step": (i + 1) * args.eval_every, "train_loss": logs["loss"][i],
                   "val_loss": logs["val_loss"][i],
                   **{f"val_{k}": logs[f"val_{k}"][i] for k in CURVE_KEYS
                      if f"val_{k}" in logs}} for i in range(len(logs["loss"]))],
        "tokens_per_second": tokens_per_step * args.eval_every * len(steady) / sum(steady),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchlib.add_common_arguments(parser)
    default_data = ",".join(os.path.join(benchlib.data_dir(), "wikitext2", f"wiki.{s}.raw")
                            for s in ("valid", "test"))
    parser.add_argument("--data", default=default_data,
                        help="corpus source spec (files as `keras-llm pretrain --data`)")
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help=f"comma-separated subset of {', '.join(FAMILIES)}")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=8)
    args = benchlib.start(parser)
    if args.quick:
        args.steps, args.eval_every, args.eval_batches = 20, 10, 2
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        benchlib.fail(f"unknown families {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    for path in args.data.split(","):
        benchlib.require_file(path, "corpus file")

    from keras_llm.data import open_source, split_documents

    source = open_source(args.data)
    train_docs, validation_docs = split_documents(source.dataset(), 0.05, seed=args.seed)
    texts_train = [t.decode("utf-8") for t in train_docs.as_numpy_iterator()]
    texts_validation = [t.decode("utf-8") for t in validation_docs.as_numpy_iterator()]

    results = []
    for family in families:
        with benchlib.Stopwatch() as watch:
            result = run_family(family, args, texts_train, texts_validation)
        result["seconds"] = round(watch.seconds, 1)
        results.append(result)
        first, last = result["curve"][0], result["curve"][-1]
        print(f"{family}: val loss {first['val_loss']:.3f} -> {last['val_loss']:.3f} in "
              f"{result['steps']} steps, {result['tokens_per_second']:,.0f} tokens/s", flush=True)

    rows = []
    for r in results:
        first, last = r["curve"][0], r["curve"][-1]
        metric = next((k for k in ("val_mlm_accuracy", "val_token_accuracy", "val_accuracy")
                       if k in last), None)
        rows.append([r["family"], r["task"], f"{r['parameters']:,}", r["steps"],
                     f"{first['val_loss']:.3f}", f"{last['val_loss']:.3f}",
                     f"{metric[4:]}={last[metric]:.3f}" if metric else "-",
                     f"{r['tokens_per_second']:,.0f}", r["seconds"]])
    print(benchlib.format_table(
        ["family", "task", "params", "steps", f"val@{args.eval_every}", "val@end",
         "accuracy", "tokens/s", "seconds"], rows))
    path = benchlib.write_result("pretrain_families", args, {
        "data": args.data, "documents": {"train": len(texts_train),
                                         "validation": len(texts_validation)},
        "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
