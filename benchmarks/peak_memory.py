"""Peak memory (RSS) of `keras-llm pretrain` against keras-hub doing the same training steps.

Each contender runs in its own process and the parent reads the child's peak resident set
size (`getrusage(RUSAGE_CHILDREN)` after it exits, so nothing the parent holds counts):

- `keras-llm pretrain`: the real command, at train_throughput's "small" shape (vocabulary
  8192, 6 layers, width 512, 8 heads, sequence 256, batch 8), on the built-in corpus, with a
  BPE tokenizer trained once beforehand and loaded with `--tokenizer`; it writes checkpoints,
  TensorBoard logs and the artifact as usual.
- keras-hub: `GPT2CausalLM` (a `GPT2Backbone` of the same shape, dropout as ours) trained with
  `fit` for the same steps on the same batches (our tf.data pipeline, the same tokenizer),
  with the same AdamW and schedule, then evaluated on the same validation batches.
- the import floor: a process that imports tensorflow, keras and keras-hub and builds nothing.

    python benchmarks/peak_memory.py              # 30 steps, prints the table, writes JSON
    python benchmarks/peak_memory.py --quick      # smoke run: tiny shape, 3 steps
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

SMALL = dict(vocab=8192, layers=6, width=512, heads=8, seq=256, batch=8)
QUICK = dict(vocab=512, layers=2, width=64, heads=2, seq=32, batch=4)


def config_overrides(shape, steps):
    """`--set` overrides turning gpt-small into `shape`, trained for `steps` steps."""
    return {"model.vocab_size": shape["vocab"], "model.num_layers": shape["layers"],
            "model.hidden_size": shape["width"], "model.num_heads": shape["heads"],
            "model.intermediate_size": 4 * shape["width"], "model.max_length": shape["seq"],
            "data.seq_len": shape["seq"], "train.batch_size": shape["batch"],
            "train.steps": steps, "train.eval_every": steps, "train.eval_steps": 2,
            "train.warmup_steps": max(1, steps // 10)}


def keras_hub_child(arguments):
    """Runs in the child: keras-hub's GPT-2 trained on our pipeline's batches."""
    import keras
    import keras_hub
    import numpy as np  # noqa: F401

    from keras_llm.config import load_config
    from keras_llm.training import loop
    from keras_llm.training.objectives import get_objective
    from keras_llm.training.pretrain import prepare_data

    config = load_config("gpt-small", overrides=arguments["overrides"])
    keras.utils.set_random_seed(config.train.seed)
    _, train_documents, validation_documents, tokenizer = prepare_data(
        config, arguments["tokenizer"])
    objective = get_objective(config)

    def as_keras_hub(inputs, targets):
        import tensorflow as tf

        return {"token_ids": inputs, "padding_mask": tf.ones_like(inputs, tf.bool)}, targets

    train = objective.dataset(train_documents, tokenizer, True).map(as_keras_hub)
    validation = objective.dataset(validation_documents, tokenizer, False).map(as_keras_hub)
    m = config.model
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=m.vocab_size, num_layers=m.num_layers, num_heads=m.num_heads,
        hidden_dim=m.hidden_size, intermediate_dim=m.intermediate_size, dropout=m.dropout,
        max_sequence_length=m.max_length)
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    model.compile(optimizer=loop.make_training_optimizer(config.train, config.train.steps),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    model.fit(train, steps_per_epoch=config.train.steps, epochs=1, verbose=0)
    model.evaluate(validation.take(config.train.eval_steps), verbose=0)


def floor_child(arguments):
    import keras  # noqa: F401
    import keras_hub  # noqa: F401
    import tensorflow  # noqa: F401


CHILDREN = {"keras_hub": keras_hub_child, "floor": floor_child}


def measure(contender, shape, steps, tokenizer, work):
    """Peak RSS of one contender, measured from a fresh intermediate process so the
    RUSAGE_CHILDREN maximum belongs to that contender alone."""
    overrides = config_overrides(shape, steps)
    if contender == "keras_llm":
        options = {"data.seq_len": "--seq-len", "train.batch_size": "--batch-size",
                   "train.steps": "--steps"}
        arguments = [item for key, value in overrides.items() for item in (
            (options[key], str(value)) if key in options else ("--set", f"{key}={value}"))]
        command = ["keras-llm", "pretrain", "--config", "gpt-small", *arguments,
                   "--tokenizer", tokenizer, "--output-dir", os.path.join(work, "keras_llm")]
    else:
        payload = json.dumps({"overrides": overrides, "tokenizer": tokenizer})
        command = [sys.executable, os.path.abspath(__file__), "--child", contender, payload]
    probe = ("import json, resource, subprocess, sys, time\n"
             "start = time.perf_counter()\n"
             "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
             "seconds = time.perf_counter() - start\n"
             "print(json.dumps({'rc': r.returncode, 'stderr': r.stderr[-3000:], 'seconds': seconds,"
             " 'peak_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n")
    result = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True,
                            text=True, check=True)
    record = json.loads(result.stdout.strip().splitlines()[-1])
    if record["rc"] != 0:
        benchlib.fail(f"{contender} failed:\n{record['stderr']}")
    return record["peak_kib"] / 1024, record["seconds"]


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        CHILDREN[sys.argv[2]](json.loads(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    benchlib.add_common_arguments(parser)
    parser.add_argument("--steps", type=int, default=None, help="training steps (30)")
    args = benchlib.start(parser)
    shape = QUICK if args.quick else SMALL
    steps = args.steps or (3 if args.quick else 30)
    with tempfile.TemporaryDirectory() as work:
        tokenizer = os.path.join(work, "tokenizer")
        subprocess.run(["keras-llm", "tokenizer", "train", "--kind", "bpe", "--vocab-size",
                        str(shape["vocab"]), "--output", tokenizer], check=True,
                       capture_output=True)
        rows = {name: measure(name, shape, steps, tokenizer, work)
                for name in ("floor", "keras_hub", "keras_llm")}
    floor = rows["floor"][0]
    table = []
    for name, (peak, seconds) in rows.items():
        above = peak - floor
        ratio = "" if name == "floor" else f"{above / (rows['keras_hub'][0] - floor):.2f}x"
        table.append([name, f"{peak:,.0f}", f"{above:,.0f}", ratio, f"{seconds:.0f}"])
    print(f"shape {shape}, {steps} steps")
    print(benchlib.format_table(
        ["contender", "peak RSS MiB", "above import floor MiB", "vs keras-hub (above floor)",
         "wall s"], table))
    path = benchlib.write_result("peak_memory", args, {
        "shape": shape, "steps": steps,
        "rows": [{"contender": name, "peak_rss_mib": peak, "wall_seconds": seconds}
                 for name, (peak, seconds) in rows.items()]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
