"""Training tokens/s of our models vs keras-hub's at identical shapes, in one run; plus MFU.

Pairs (ours vs keras-hub): `gpt` vs `keras_hub_gpt2` (GPT2Backbone + its tied LM head,
i.e. `GPT2CausalLM` without a preprocessor); `bert` vs `keras_hub_bert` (each one's
`BertMaskedLM`, 15% of positions predicted) when `keras_llm.models.bert` exists. To add a
pair, write two builders and list them in `MODEL_BUILDERS`. Every model gets the same
optimizer settings (`make_optimizer`: AdamW, the schedule, weight decay, global-norm
clipping), no metrics (keras-hub's tasks add an accuracy metric unless
`weighted_metrics=[]`; every step's logs are checked to hold only the loss), the same
`jit_compile` and dtype policy, the same random token batches. Each side trains with its
library's own training recipe (`RECIPES`): ours as `keras-llm pretrain` does (the fused
`TokenCrossEntropy` loss and keras-llm's `AdamW`, whose whole update is one XLA program
on TensorFlow), keras-hub's with Keras' `SparseCategoricalCrossentropy(from_logits=True)`
(its tasks' default loss) and `keras.optimizers.AdamW`. The `gpt_keras_recipe` and
`bert_keras_recipe` rows train our models with Keras' recipe: the models alone, like for
like, and the before of the fused loss and optimizer. Each model is stepped with
`train_on_batch` (one synchronized step at a time); the first `--warmup-steps` (tracing,
XLA compilation) are excluded, then `--windows` timed windows of `--window-steps` steps
run interleaved across models (so load changes hit every model alike), and the median
window gives tokens/s. `paired` is the median over windows of the ratio of a model's window
to its rival's window of the same round: the steadiest figure on a shared machine, whose
speed drifts by 10% within a run.

Model FLOPs utilization (PaLM, appendix B; nanoGPT's `estimate_mfu`), for causal LMs:

    flops_per_token = 6 * N + 12 * L * T * D

N = trainable parameters without the position table (the tied token embedding counts once:
it is the LM head's matmul); L layers, T sequence length, D width; the second term is the
attention score and value matmuls (counted without the causal halving); masked LMs use
`masked_lm_flops` (the same, with the last block's query side and the MLM head counted on
the predicted positions only: what the loss needs). MFU = achieved
FLOP/s / peak, with the peak measured in the same run (a square `--peak-size` matmul in the
compute dtype) or given by `--peak-tflops` (e.g. 989 for an H100 SXM's bf16 dense peak).

    python benchmarks/train_throughput.py                       # CPU, fp32, tiny + small
    python benchmarks/train_throughput.py --shapes long --models gpt,keras_hub_gpt2  # 1,024
    python benchmarks/train_throughput.py --jit-compile false,true
    KERAS_BACKEND=jax python benchmarks/train_throughput.py --precision mixed_bfloat16 \\
        --shapes gpu --peak-tflops 989                          # GPU
"""
import argparse
import importlib.util
import time

import keras
import numpy as np

import benchlib

# name: vocabulary, layers, width, heads, sequence length, batch
SHAPES = {
    "tiny": dict(vocab=8192, layers=4, width=256, heads=4, seq=128, batch=16),
    "small": dict(vocab=8192, layers=6, width=512, heads=8, seq=256, batch=8),
    # small's model over 1,024 positions (gpt-small's context): attention's share grows
    "long": dict(vocab=8192, layers=6, width=512, heads=8, seq=1024, batch=2),
    "gpu": dict(vocab=50304, layers=12, width=768, heads=12, seq=1024, batch=16),
    "quick": dict(vocab=512, layers=2, width=64, heads=2, seq=32, batch=4),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    benchlib.add_common_arguments(parser)
    parser.add_argument("--shapes", default=None, help="comma list of " + ", ".join(SHAPES))
    parser.add_argument("--models", default=None,
                        help="comma list (default: every available pair): "
                             + ", ".join(MODEL_BUILDERS))
    parser.add_argument("--jit-compile", default="auto",
                        help="comma list of auto/true/false; each value is its own column set")
    parser.add_argument("--precision", default="float32",
                        choices=["float32", "mixed_bfloat16", "mixed_float16"])
    parser.add_argument("--warmup-steps", type=int, default=None, help="(6)")
    parser.add_argument("--windows", type=int, default=None, help="timed windows (5)")
    parser.add_argument("--window-steps", type=int, default=None, help="steps per window (5)")
    parser.add_argument("--peak-size", type=int, default=None, help="matmul size (2048)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="nominal peak for MFU instead of the measured matmul")
    parser.add_argument("--name", default=None, help="result file stem")
    args = benchlib.start(parser)
    quick = args.quick
    args.shapes = benchlib.choose_shapes(args.shapes, SHAPES,
                                         "quick" if quick else "tiny,small")
    args.jit_compile = args.jit_compile.split(",")
    args.warmup_steps = args.warmup_steps or (1 if quick else 6)
    args.windows = args.windows or (2 if quick else 5)
    args.window_steps = args.window_steps or (2 if quick else 5)
    args.peak_size = args.peak_size or (256 if quick else 2048)
    return args


# ---------------------------------------------------------------------------------------
# Training recipes: each library's loss and optimizer (see the docstring).

def keras_recipe():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True), keras.optimizers.AdamW


def keras_llm_recipe():
    from keras_llm.training.losses import TokenCrossEntropy
    from keras_llm.training.optim import AdamW

    return TokenCrossEntropy(), AdamW


# name: () -> (loss, optimizer class given to `make_optimizer`)
RECIPES = {"keras": keras_recipe, "keras-llm": keras_llm_recipe}


# ---------------------------------------------------------------------------------------
# Models. A builder takes a shape dict and returns `(model, make_step, flops_per_token)`:
# the uncompiled model, a function turning a `(batch, seq + 1)` id array into one training
# step's `(inputs, targets)`, and the model FLOPs of one input token (see the docstring).

def causal_lm_flops(model, shape):
    """6 N + 12 L T D with N = trainable parameters without the position table."""
    return 6 * (count_parameters(model) - shape["seq"] * shape["width"]) + attention_flops(shape)


def attention_flops(shape):
    return 12 * shape["layers"] * shape["seq"] * shape["width"]


def build_gpt(shape):
    from keras_llm.models.gpt import GPTBackbone, GPTCausalLM

    backbone = GPTBackbone(
        vocabulary_size=shape["vocab"], num_layers=shape["layers"], num_heads=shape["heads"],
        hidden_size=shape["width"], intermediate_size=4 * shape["width"],
        max_length=shape["seq"], dropout=0.0, activation="gelu_tanh")  # GPT-2's activation
    return GPTCausalLM(backbone), lambda ids: (ids[:, :-1], ids[:, 1:]), causal_lm_flops


def build_keras_hub_gpt2(shape):
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=shape["vocab"], num_layers=shape["layers"], num_heads=shape["heads"],
        hidden_dim=shape["width"], intermediate_dim=4 * shape["width"], dropout=0.0,
        max_sequence_length=shape["seq"])
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)

    def make_step(ids):
        # keras-hub's causal LM always takes a padding mask (its preprocessor makes one).
        x = {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1], dtype=bool)}
        return x, ids[:, 1:]

    return model, make_step, causal_lm_flops


MASK_RATE = 0.15  # BERT predicts 15% of the positions


def masked_lm_step(ids, with_segments):
    """Masked-LM inputs with fixed-count random mask positions (the tokens are left in
    place: the cost, not the task, is measured)."""
    token_ids = ids[:, :-1]
    batch, seq = token_ids.shape
    predictions = max(1, round(MASK_RATE * seq))
    rng = np.random.default_rng(int(ids[0, 0]))
    positions = np.sort(np.stack([rng.choice(seq, predictions, replace=False)
                                  for _ in range(batch)]), axis=1).astype(np.int32)
    x = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids, dtype=bool),
         "mask_positions": positions}
    if with_segments:
        x["segment_ids"] = np.zeros_like(token_ids)
    return x, np.take_along_axis(token_ids, positions, axis=1)


def masked_lm_flops(model, shape):
    """The FLOPs a masked-LM training step needs, per input token. The loss reads the last
    block's outputs at the P = 15% predicted positions only, so all of the model but the
    last block's query side runs on every token (6 N + 12 T D per layer, as for a causal
    LM), and that query side (query projection, attention scores and values, output
    projection, feed-forward layer, norms) and the MLM head (dense layer and tied output
    projection) on P / T of them. Our BERT computes just that (plus `[CLS]`'s row for the
    pooler); keras-hub's runs its last block on every position, work this does not count.

    The body's parameters are all but the embedding tables (lookups), the pooler (on
    `[CLS]` only, outside the masked-LM loss) and the MLM head (the output projection is
    tied to the token table, so not a parameter of its own: subtracting it again would
    undercount the body by V D)."""
    vocab, width, seq, layers = shape["vocab"], shape["width"], shape["seq"], shape["layers"]
    tables = (vocab + seq + 2) * width  # token (also the head's projection), position, segment
    dense = width * width + width  # the pooler's, and the head's dense layer
    body = count_parameters(model) - tables - 2 * dense
    block = (body - 2 * width) / layers  # the embedding norm's scale and offset aside
    query_side = block - 2 * (width * width + width)  # all of a block but its key and value
    predicted = max(1, round(MASK_RATE * seq)) / seq
    head = vocab * width + width * width
    every_token = 6 * (body - query_side) + 12 * (layers - 1) * seq * width
    return every_token + predicted * (6 * query_side + 12 * seq * width + 6 * head)


def build_bert(shape):
    """Our BERT (keras_llm/models/bert.py) with its masked-LM head."""
    from keras_llm.models.bert import BertBackbone, BertMaskedLM

    backbone = BertBackbone(
        vocabulary_size=shape["vocab"], num_layers=shape["layers"], num_heads=shape["heads"],
        hidden_size=shape["width"], intermediate_size=4 * shape["width"],
        max_length=shape["seq"], dropout=0.0,
        activation="gelu_tanh")  # keras-hub's BertBackbone's (and Google BERT's) GELU
    return (BertMaskedLM(backbone), lambda ids: masked_lm_step(ids, with_segments=True),
            masked_lm_flops)


def build_keras_hub_bert(shape):
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=shape["vocab"], num_layers=shape["layers"], num_heads=shape["heads"],
        hidden_dim=shape["width"], intermediate_dim=4 * shape["width"], dropout=0.0,
        max_sequence_length=shape["seq"])
    model = keras_hub.models.BertMaskedLM(backbone=backbone, preprocessor=None)
    return model, lambda ids: masked_lm_step(ids, with_segments=True), masked_lm_flops


def bert_available():
    return importlib.util.find_spec("keras_llm.models.bert") is not None


# name: (builder, the keras-hub model it is compared with (None: it is keras-hub's), available,
#        training recipe)
MODEL_BUILDERS = {
    "gpt": (build_gpt, "keras_hub_gpt2", lambda: True, "keras-llm"),
    "gpt_keras_recipe": (build_gpt, "keras_hub_gpt2", lambda: True, "keras"),
    "keras_hub_gpt2": (build_keras_hub_gpt2, None, lambda: True, "keras"),
    "bert": (build_bert, "keras_hub_bert", bert_available, "keras-llm"),
    "bert_keras_recipe": (build_bert, "keras_hub_bert", bert_available, "keras"),
    "keras_hub_bert": (build_keras_hub_bert, None, bert_available, "keras"),
}


def default_models():
    return [name for name, (_, _, available, _) in MODEL_BUILDERS.items() if available()]


# ---------------------------------------------------------------------------------------
# Measurements.

def sync(x):
    """Waits for `x` (and so every op before it) to be computed."""
    from keras import ops

    return ops.convert_to_numpy(ops.reshape(x, (-1,))[:1])


def measure_matmul_peak(size, dtype, repeats=10):
    """FLOP/s of a `size` x `size` matmul in `dtype`: the practical peak of this device."""
    from keras import ops

    a = ops.cast(keras.random.normal((size, size), seed=1), dtype)
    b = ops.cast(keras.random.normal((size, size), seed=2), dtype)
    sync(ops.matmul(a, b))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            c = ops.matmul(a, b)
        sync(c)
        times.append((time.perf_counter() - start) / repeats)
    return 2 * size ** 3 / min(times)


def count_parameters(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


def run_shape(shape_name, jit_compile, args):
    from keras_llm.config import TrainConfig
    from keras_llm.training.optim import AdamW, make_optimizer

    shape = SHAPES[shape_name]
    rng = np.random.default_rng(args.seed)
    batches = [rng.integers(0, shape["vocab"], size=(shape["batch"], shape["seq"] + 1),
                            dtype=np.int32) for _ in range(4)]
    jit = {"auto": "auto", "true": True, "false": False}[jit_compile]
    contenders = {}
    for name in args.models:
        keras.utils.set_random_seed(args.seed)
        builder, _, _, recipe = MODEL_BUILDERS[name]
        model, make_step, model_flops = builder(shape)
        loss, optimizer_class = RECIPES[recipe]()
        total_steps = args.warmup_steps + args.windows * args.window_steps
        optimizer = make_optimizer(TrainConfig(warmup_steps=0), total_steps, optimizer_class)
        if isinstance(optimizer, AdamW):  # the steps of a long run: always the fused update
            optimizer.total_steps = None
        model.compile(optimizer=optimizer, loss=loss, weighted_metrics=[], jit_compile=jit)
        steps = [make_step(b) for b in batches]
        with benchlib.Stopwatch() as warmup:
            for i in range(args.warmup_steps):
                x, y = steps[i % len(steps)]
                logs = model.train_on_batch(x, y, return_dict=True)
        if set(logs) != {"loss"}:
            benchlib.fail(f"{name}: its training step computes {sorted(logs)}, not only the "
                          "loss; the comparison would not be like for like")
        contenders[name] = dict(model=model, steps=steps, windows=[], cpu_windows=[],
                                warmup_s=warmup.seconds, parameters=count_parameters(model),
                                flops_per_token=model_flops(model, shape),
                                jit_compile=str(model.jit_compile),
                                recipe=recipe)
    tokens_per_window = args.window_steps * shape["batch"] * shape["seq"]
    for _ in range(args.windows):
        for name, c in contenders.items():
            cpu_start = time.process_time()
            with benchlib.Stopwatch() as window:
                for i in range(args.window_steps):
                    x, y = c["steps"][i % len(c["steps"])]
                    logs = c["model"].train_on_batch(x, y, return_dict=True)
            c["windows"].append(tokens_per_window / window.seconds)
            c["cpu_windows"].append((time.process_time() - cpu_start) / args.window_steps)
            c["last_loss"] = float(logs["loss"])
    results = []
    for name, c in contenders.items():
        tokens_per_s = benchlib.median(c["windows"])
        results.append({
            "shape": shape_name, **shape, "model": name, "jit_compile": c["jit_compile"],
            "recipe": c["recipe"],
            "tokens_per_s": tokens_per_s, "windows_tokens_per_s": c["windows"],
            "step_ms": 1000 * shape["batch"] * shape["seq"] / tokens_per_s,
            # CPU seconds this process spent per step: on a shared CPU machine the ratio of
            # these is steadier than wall time (meaningless on GPU).
            "cpu_ms_per_step": 1000 * benchlib.median(c["cpu_windows"]),
            "warmup_s": c["warmup_s"], "parameters": c["parameters"],
            "flops_per_token": c["flops_per_token"],
            "achieved_tflops": tokens_per_s * c["flops_per_token"] / 1e12,
            "last_loss": c["last_loss"],
        })
        del c["model"]
    benchlib.clear_session()
    return results


def main():
    args = parse_args()
    args.models = (args.models.split(",") if args.models else default_models())
    for name in args.models:
        if name not in MODEL_BUILDERS:
            benchlib.fail(f"--models: unknown model {name!r}; choose from "
                          f"{', '.join(MODEL_BUILDERS)}")
        if not MODEL_BUILDERS[name][2]():
            benchlib.fail(f"--models: {name} is not available (keras_llm.models.bert missing)")
    keras.mixed_precision.set_global_policy(args.precision)
    compute_dtype = keras.config.dtype_policy().compute_dtype

    peak_measured = measure_matmul_peak(args.peak_size, compute_dtype)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_measured
    print(f"{compute_dtype} {args.peak_size}x{args.peak_size} matmul: "
          f"{peak_measured / 1e9:.1f} GFLOP/s measured; MFU peak used: {peak / 1e12:.3f} "
          f"TFLOP/s ({'nominal' if args.peak_tflops else 'measured'})")

    rows = []
    for jit_compile in args.jit_compile:
        for shape_name in args.shapes:
            rows.extend(run_shape(shape_name, jit_compile, args))
    by_key = {(r["shape"], r["jit_compile"], r["model"]): r for r in rows}
    for r in rows:
        r["mfu"] = r["achieved_tflops"] * 1e12 / peak
        rival = MODEL_BUILDERS[r["model"]][1]
        other = by_key.get((r["shape"], r["jit_compile"], rival))
        r["speedup_vs_keras_hub"] = r["tokens_per_s"] / other["tokens_per_s"] if other else None
        # Windows run interleaved, so window i of both saw the same machine: the median of
        # the per-window ratios cancels load that drifts during the run.
        r["paired_speedup_vs_keras_hub"] = benchlib.median(
            [a / b for a, b in zip(r["windows_tokens_per_s"], other["windows_tokens_per_s"])]
        ) if other else None
        r["cpu_time_speedup_vs_keras_hub"] = (
            other["cpu_ms_per_step"] / r["cpu_ms_per_step"] if other else None)

    table = [[r["shape"], r["model"], r["recipe"], r["jit_compile"],
              f"{r['parameters'] / 1e6:.2f}M",
              f"{r['tokens_per_s']:,.0f}", f"{r['step_ms']:.1f}",
              f"{r['achieved_tflops'] * 1e3:.1f}", f"{100 * r['mfu']:.3g}%",
              f"{r['speedup_vs_keras_hub']:.2f}x" if r["speedup_vs_keras_hub"] else "",
              f"{r['paired_speedup_vs_keras_hub']:.2f}x"
              if r["paired_speedup_vs_keras_hub"] else "",
              f"{r['cpu_ms_per_step']:.0f}",
              f"{r['cpu_time_speedup_vs_keras_hub']:.2f}x"
              if r["cpu_time_speedup_vs_keras_hub"] else "",
              f"{r['warmup_s']:.1f}"] for r in rows]
    print(benchlib.format_table(
        ["shape", "model", "recipe", "jit", "params", "tokens/s", "ms/step", "GFLOP/s", "MFU",
         "vs keras-hub", "paired", "cpu ms/step", "cpu-time vs keras-hub", "warmup s"], table))
    print("FLOPs/token = 6*N + 12*L*T*D (N: trainable params without the position table; "
          "masked LMs count the last block's query side and the MLM head on predicted "
          "positions only)")
    name = args.name or ("train_throughput" + ("_quick" if args.quick else ""))
    print("wrote", benchlib.write_result(name, args, {
        "flops_formula": "6*N + 12*L*T*D per token; causal LM: N = trainable params - position "
                         "table; masked LM: N = params - embedding tables - pooler - MLM head, "
                         "the last block's query side (all of it but the key and value "
                         "projections, attention included) and 6*(V*D + D*D) for the MLM "
                         "head counted on the 15% predicted positions only",
        "compute_dtype": compute_dtype,
        "peak_matmul_size": args.peak_size,
        "peak_measured_tflops": peak_measured / 1e12,
        "peak_used_tflops": peak / 1e12,
        "peak_source": "nominal (--peak-tflops)" if args.peak_tflops else "measured matmul",
        "rows": rows,
    }))


if __name__ == "__main__":
    main()
