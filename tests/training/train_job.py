"""A tiny GPT training run in its own process, for the distribution and resume tests.

Run as a script (TensorFlow's devices must be configured before it initializes):
    python train_job.py --out DIR --steps 12 --interval 6 --checkpoint-every 2 \
        [--logical-devices 2] [--strategy default,mirrored] [--kill-at-step 7]

For each strategy it writes `<out>/<strategy>.npz` (final weights) and
`<out>/<strategy>.json` (per-batch running loss).
"""
import argparse
import json
import logging
import os
import signal
import sys

import numpy as np

VOCAB, SEQ_LEN, WIDTH = 64, 8, 16


def synthetic_dataset(seed, batch_size):
    import tensorflow as tf

    # Learnable structure: each sequence counts up from a random start (mod VOCAB).
    starts = np.random.RandomState(seed).randint(0, VOCAB, size=(256, 1))
    tokens = ((starts + np.arange(SEQ_LEN + 1)) % VOCAB).astype("int32")
    return (tf.data.Dataset.from_tensor_slices(tokens)
            .shuffle(64, seed=seed, reshuffle_each_iteration=True)
            .repeat()
            .map(lambda t: (t[:-1], t[1:]))
            .batch(batch_size, drop_remainder=True)
            .prefetch(2))


def build_model(seed, dropout, learning_rate=1e-2, grad_accum_steps=None):
    import keras

    from keras_llm.models import GPTBackbone, GPTCausalLM
    from keras_llm.training.losses import TokenCrossEntropy
    from keras_llm.training.optim import AdamW  # the product's (fused on one device)

    keras.utils.set_random_seed(seed)
    model = GPTCausalLM(GPTBackbone(
        vocabulary_size=VOCAB, num_layers=1, num_heads=2, hidden_size=WIDTH,
        intermediate_size=2 * WIDTH, max_length=SEQ_LEN, dropout=dropout))
    model.build((None, SEQ_LEN))
    model.compile(
        optimizer=AdamW(learning_rate, gradient_accumulation_steps=grad_accum_steps),
        loss=TokenCrossEntropy(),  # the product's loss (fused on TensorFlow)
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    return model


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--interval", type=int, default=6)
    parser.add_argument("--checkpoint-every", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--logical-devices", type=int, default=1)
    parser.add_argument("--strategy", default="default")
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--no-checkpoints", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("keras_llm").setLevel(logging.INFO)

    import tensorflow as tf

    if args.logical_devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * args.logical_devices)
    import keras

    from keras_llm.training import distribute, loop

    class KillAt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) == args.kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)

    class RecordLoss(keras.callbacks.Callback):
        losses = []

        def on_train_batch_end(self, batch, logs=None):
            self.losses.append(float(logs["loss"]))

    os.makedirs(args.out, exist_ok=True)
    for name in args.strategy.split(","):
        if name == "mirrored":
            strategy = tf.distribute.MirroredStrategy(
                [f"/cpu:{i}" for i in range(args.logical_devices)])
        else:
            strategy = distribute.make_strategy(name)
        with strategy.scope():
            model = build_model(args.seed, args.dropout)
        recorder = RecordLoss()
        recorder.losses = []
        callbacks = [recorder] + ([KillAt()] if args.kill_at_step else [])
        loop.train(model, synthetic_dataset(args.seed, args.batch_size), steps=args.steps,
                   interval=args.interval, strategy=strategy,
                   output_dir=None if args.no_checkpoints else os.path.join(args.out, "run"),
                   checkpoint_every=args.checkpoint_every, callbacks=callbacks, verbose=0,
                   config={"train": {"seed": args.seed, "batch_size": args.batch_size}})
        _, worker_index = distribute.worker_count_and_index(strategy)
        stem = os.path.join(args.out, f"{name}-{worker_index}")
        np.savez(stem + ".npz", *model.get_weights())
        with open(stem + ".json", "w") as f:
            json.dump({"losses": recorder.losses,
                       "iterations": int(model.optimizer.iterations.numpy())}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
