"""Training tokens/s with 1 and 2 replicas, with and without XLA and mixed precision.

All combinations (XLA only on one replica: Keras 3 cannot jit-compile a step spanning
devices, so the training loop turns it off there) run in one process, one after the other, through the same resumable
training loop `keras-llm pretrain` uses (`keras_llm.training.loop.train`), on a GPT of fixed
shape and synthetic tokens, so the ratios are comparable. Without GPUs the two replicas are
two logical CPU devices sharing the same cores (it measures the cost of the distribution
machinery, not a speed-up); with two GPUs or more they are the first two GPUs.

    python benchmarks/scaling.py            # table + benchmarks/results/scaling.json
    python benchmarks/scaling.py --quick    # smoke run, numbers not meaningful
"""
import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

SHAPES = {
    "quick": dict(vocab=256, layers=1, width=32, heads=2, seq=16, batch=8),
    "tiny": dict(vocab=4096, layers=4, width=128, heads=4, seq=128, batch=32),
}


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    benchlib.add_common_arguments(parser)
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="model shape (default: tiny, quick with --quick)")
    parser.add_argument("--warmup-steps", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per combination")
    parser.add_argument("--name", default=None, help="result file name (without .json)")
    args = benchlib.start(parser)
    args.shape = args.shape or ("quick" if args.quick else "tiny")
    args.warmup_steps = args.warmup_steps or (1 if args.quick else 3)
    args.steps = args.steps or (2 if args.quick else 20)
    return args


def make_strategy(tf, replicas):
    if replicas == 1:
        return tf.distribute.get_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))[:replicas]]
    return tf.distribute.MirroredStrategy(devices)


def synthetic_batches(tf, shape, seed):
    import numpy as np

    tokens = np.random.RandomState(seed).randint(
        0, shape["vocab"], size=(64 * shape["batch"], shape["seq"] + 1)).astype("int32")
    return (tf.data.Dataset.from_tensor_slices(tokens).repeat()
            .map(lambda t: (t[:-1], t[1:])).batch(shape["batch"], drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE))


def measure(args, replicas, xla, mixed):
    import keras
    import tensorflow as tf

    from keras_llm.models import GPTBackbone, GPTCausalLM
    from keras_llm.training import loop

    shape = SHAPES[args.shape]
    policy = loop.use_mixed_precision(mixed)
    strategy = make_strategy(tf, replicas)
    keras.utils.set_random_seed(args.seed)
    with strategy.scope():
        model = GPTCausalLM(GPTBackbone(
            vocabulary_size=shape["vocab"], num_layers=shape["layers"], num_heads=shape["heads"],
            hidden_size=shape["width"], intermediate_size=4 * shape["width"],
            max_length=shape["seq"]))
        model.build((None, shape["seq"]))
        model.compile(optimizer=keras.optimizers.AdamW(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    loop.configure_speed(model, xla=xla)
    data = synthetic_batches(tf, shape, args.seed)
    loop.train(model, data, steps=args.warmup_steps, interval=args.warmup_steps,
               strategy=strategy, verbose=0)  # traces and compiles
    with benchlib.Stopwatch() as timed:
        history = loop.train(model, data, steps=args.steps, interval=args.steps,
                             strategy=strategy, verbose=0)
    loop.use_mixed_precision(False)
    tokens = args.steps * shape["batch"] * shape["seq"]
    return {"replicas": replicas, "xla": xla, "mixed_precision": mixed, "policy": policy,
            "tokens_per_second": round(tokens / timed.seconds, 1),
            "seconds": round(timed.seconds, 3), "final_loss": history.history["loss"][-1]}


def main():
    args = parse_arguments()
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    # XLA with 2 replicas is skipped: the loop turns it off (see loop.configure_speed).
    runs = [measure(args, replicas, xla, mixed) for replicas, xla, mixed in
            itertools.product((1, 2), (False, True), (False, True))
            if not (xla and replicas > 1)]
    base = runs[0]["tokens_per_second"]
    for run in runs:
        run["vs_baseline"] = round(run["tokens_per_second"] / base, 3)
    print(benchlib.format_table(
        ["replicas", "xla", "precision", "tokens/s", "vs 1 replica fp32"],
        [[r["replicas"], "on" if r["xla"] else "off", r["policy"],
          f"{r['tokens_per_second']:,.0f}", f"{r['vs_baseline']:.2f}x"] for r in runs]))
    name = args.name or ("scaling" + ("_quick" if args.quick else ""))
    print("wrote", benchlib.write_result(name, args, {"shape": SHAPES[args.shape],
                                                      "runs": runs}))


if __name__ == "__main__":
    main()
