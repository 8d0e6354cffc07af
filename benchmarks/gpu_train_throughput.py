"""Training tokens/s and MFU on one GPU with JAX in bf16: our GPT and BERT vs keras-hub's, one run.

The GPU form of `train_throughput.py`, and it reuses that script's model builders (our
`GPTCausalLM` and `BertMaskedLM`; keras-hub's `GPT2CausalLM` and `BertMaskedLM` on their
backbones), FLOPs formulas (`6 N + 12 L T D` per token, the masked-LM head counted on the
15% predicted positions only), masked-LM batches, optimizer (the product's AdamW) and loss
(`SparseCategoricalCrossentropy(from_logits=True)`), on the same random token batches.
Differences: `KERAS_BACKEND=jax` and the `mixed_bfloat16` policy, and each model is trained
by one jitted stateless step (Keras' JAX training-loop recipe: `stateless_call` under
`jax.value_and_grad`, then `optimizer.stateless_apply`, the state donated), dispatched
asynchronously and synchronized only at the end of a timed window, so host overhead hides
behind the GPU as it does in `fit()`. TensorFlow is not needed.

The first `--warmup-steps` (tracing and XLA compilation) are excluded; then `--windows`
windows of `--steps / --windows` steps run interleaved across the models, and the median
window gives tokens/s. MFU is reported against two peaks: the device's dense bf16 datasheet
peak (989 TFLOP/s for an H100 SXM or H200; `--peak-tflops` overrides it) and a square
`--peak-size` bf16 matmul measured in the same run. Shapes run in order and each one's
results are written as soon as it finishes; a shape is skipped when the previous shape's
duration would take the run past `--budget-s` (device time on a remote run is short), and
a shape or a model that fails (out of memory) is recorded while the others still run.

    KERAS_BACKEND=jax python benchmarks/gpu_train_throughput.py                 # GPU
    KERAS_BACKEND=jax python benchmarks/gpu_train_throughput.py --quick         # CPU smoke run
"""
import os

# Both must be set before keras and jax start: the backend, and the share of GPU memory jax
# preallocates (75% by default; the batch-32 shape wants more).
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import argparse
import functools
import time

import jax
import keras
import numpy as np

import benchlib
import train_throughput

# name: vocabulary, layers, width, heads, sequence length, batch
SHAPES = {
    "small": train_throughput.SHAPES["gpu"],  # GPT-2 small, batch 16
    "small_b32": {**train_throughput.SHAPES["gpu"], "batch": 32},
    "medium": dict(vocab=50304, layers=24, width=1024, heads=16, seq=1024, batch=16),
    "quick": train_throughput.SHAPES["quick"],
}
MODELS = ["gpt", "keras_hub_gpt2", "bert", "keras_hub_bert"]

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, in TFLOP/s; the first
# name contained in `device_kind` wins.
NOMINAL_BF16_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H200 NVL", 835),
                       ("H100", 989), ("H200", 989), ("A100", 312)]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    benchlib.add_common_arguments(parser)
    parser.add_argument("--shapes", default=None,
                        help="comma list of " + ", ".join(SHAPES) + " (small,small_b32)")
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma list of " + ", ".join(MODELS) + " (all)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per model and shape (50)")
    parser.add_argument("--windows", type=int, default=None, help="timed windows (5)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="(2)")
    parser.add_argument("--peak-size", type=int, default=None, help="bf16 matmul size (8192)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="nominal bf16 peak (default: from the device name)")
    parser.add_argument("--budget-s", type=float, default=180.0,
                        help="skip a shape if the previous one's duration would end the run "
                             "past this many seconds (from the start of measurements)")
    args = benchlib.start(parser)
    quick = args.quick
    args.shapes = benchlib.choose_shapes(args.shapes, SHAPES,
                                         "quick" if quick else "small,small_b32")
    args.windows = args.windows or (2 if quick else 5)
    args.steps = args.steps or (4 if quick else 50)
    if args.steps < args.windows:
        benchlib.fail(f"--steps must be at least --windows ({args.windows}); got {args.steps}")
    args.window_steps = args.steps // args.windows
    args.models = args.models.split(",")
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        benchlib.fail(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    args.warmup_steps = args.warmup_steps or (1 if quick else 2)
    args.peak_size = args.peak_size or (256 if quick else 8192)
    return args


def nominal_peak_tflops(device_kind):
    for name, tflops in NOMINAL_BF16_TFLOPS:
        if name in device_kind:
            return tflops
    return None


def flash_attention_available(shape):
    """Whether JAX's cuDNN fused attention accepts this shape in bf16 (both models may use
    it through `ops.dot_product_attention`); informative only, so any failure reads False."""
    try:
        from keras.src.backend.jax.nn import _can_use_flash_attention

        q = jax.ShapeDtypeStruct(
            (shape["batch"], shape["seq"], shape["heads"], shape["width"] // shape["heads"]),
            "bfloat16")
        return bool(_can_use_flash_attention(q, q, q, None))
    except Exception:
        return False


# ---------------------------------------------------------------------------------------
# Training.

def make_train_step(model, optimizer, loss_fn):
    """One jitted training step on explicit state, as `JAXTrainer.train_step` does it."""
    def compute_loss(trainable, non_trainable, x, y):
        logits, non_trainable = model.stateless_call(trainable, non_trainable, x,
                                                     training=True)
        return loss_fn(y, logits), non_trainable

    gradients = jax.value_and_grad(compute_loss, has_aux=True)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def train_step(trainable, non_trainable, optimizer_state, x, y):
        (loss, non_trainable), grads = gradients(trainable, non_trainable, x, y)
        trainable, optimizer_state = optimizer.stateless_apply(optimizer_state, grads,
                                                               trainable)
        return trainable, non_trainable, optimizer_state, loss

    return train_step


def prepare(name, shape, batches, args):
    """Builds one contender, compiles its step and runs the warmup steps."""
    from keras_llm.config import TrainConfig
    from keras_llm.training.optim import make_optimizer

    keras.utils.set_random_seed(args.seed)
    model, make_step, model_flops = train_throughput.MODEL_BUILDERS[name][0](shape)
    steps = [jax.device_put(make_step(b)) for b in batches]
    if not model.built:  # subclassed: weights from the input shapes (a dict for BERT)
        model.build(keras.tree.map_structure(np.shape, steps[0][0]))
    total_steps = args.warmup_steps + args.windows * args.window_steps
    optimizer = make_optimizer(TrainConfig(warmup_steps=0), total_steps=total_steps)
    optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    contender = dict(
        name=name, steps=steps, windows=[],
        parameters=train_throughput.count_parameters(model),
        flops_per_token=model_flops(model, shape),
        train_step=make_train_step(model, optimizer, loss_fn),
        state=([v.value for v in model.trainable_variables],
               [v.value for v in model.non_trainable_variables],
               [v.value for v in optimizer.variables]))
    with benchlib.Stopwatch() as warmup:
        run_steps(contender, args.warmup_steps)
    contender["warmup_s"] = warmup.seconds
    return contender


def run_steps(contender, count):
    """Dispatches `count` steps, then waits for the last one; returns its loss."""
    state, loss = contender["state"], None
    for i in range(count):
        x, y = contender["steps"][i % len(contender["steps"])]
        *state, loss = contender["train_step"](*state, x, y)
    contender["state"] = jax.block_until_ready(tuple(state))
    return float(loss)


def run_shape(shape_name, args, skipped):
    """Times every model that builds and compiles at this shape; one that fails (out of
    memory, say) is recorded in `skipped` as `"shape/model"` while the others still run."""
    shape = SHAPES[shape_name]
    rng = np.random.default_rng(args.seed)
    batches = [rng.integers(0, shape["vocab"], size=(shape["batch"], shape["seq"] + 1),
                            dtype=np.int32) for _ in range(4)]
    contenders = []
    for name in args.models:
        try:
            contenders.append(prepare(name, shape, batches, args))
        except Exception as e:  # noqa: BLE001  (recorded; the other models still run)
            key = f"{shape_name}/{name}"
            skipped[key] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            print(f"note: {key} {skipped[key]}")
    tokens_per_window = args.window_steps * shape["batch"] * shape["seq"]
    for _ in range(args.windows):
        for c in contenders:
            with benchlib.Stopwatch() as window:
                c["last_loss"] = run_steps(c, args.window_steps)
            c["windows"].append(tokens_per_window / window.seconds)
    flash = flash_attention_available(shape)
    memory = jax.devices()[0].memory_stats() or {}  # None on CPU
    rows = []
    for c in contenders:
        tokens_per_s = benchlib.median(c["windows"])
        rows.append({
            "shape": shape_name, **shape, "model": c["name"],
            "tokens_per_s": tokens_per_s, "windows_tokens_per_s": c["windows"],
            "step_ms": 1000 * shape["batch"] * shape["seq"] / tokens_per_s,
            "warmup_s": c["warmup_s"], "parameters": c["parameters"],
            "flops_per_token": c["flops_per_token"],
            "achieved_tflops": tokens_per_s * c["flops_per_token"] / 1e12,
            "last_loss": c["last_loss"], "cudnn_flash_attention_available": flash,
            "device_peak_gib_so_far": memory.get("peak_bytes_in_use", 0) / 2 ** 30,
        })
    contenders.clear()
    benchlib.clear_session()
    return rows


# ---------------------------------------------------------------------------------------
# Report.

def finish_rows(rows, peak_measured, peak_nominal):
    by_key = {(r["shape"], r["model"]): r for r in rows}
    for r in rows:
        r["mfu_vs_measured_peak"] = r["achieved_tflops"] * 1e12 / peak_measured
        r["mfu"] = r["achieved_tflops"] / peak_nominal if peak_nominal else None
        rival = train_throughput.MODEL_BUILDERS[r["model"]][1]
        other = by_key.get((r["shape"], rival))
        r["speedup_vs_keras_hub"] = r["tokens_per_s"] / other["tokens_per_s"] if other else None


def print_table(rows):
    table = [[r["shape"], r["model"], f"{r['parameters'] / 1e6:.1f}M", str(r["batch"]),
              f"{r['tokens_per_s']:,.0f}", f"{r['step_ms']:.1f}",
              f"{r['achieved_tflops']:.1f}",
              f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "",
              f"{100 * r['mfu_vs_measured_peak']:.1f}%",
              f"{r['speedup_vs_keras_hub']:.2f}x" if r["speedup_vs_keras_hub"] else "",
              f"{r['warmup_s']:.1f}", f"{r['last_loss']:.3f}"] for r in rows]
    print(benchlib.format_table(
        ["shape", "model", "params", "batch", "tokens/s", "ms/step", "TFLOP/s",
         "MFU", "MFU (matmul)", "vs keras-hub", "warmup s", "loss"], table))


def write(args, rows, skipped, peaks):
    device = jax.devices()[0]
    name = "gpu_train_throughput" + ("_quick" if args.quick else "")
    return benchlib.write_result(name, args, {
        "jax": jax.__version__,
        "device_kind": device.device_kind,
        "device_platform": device.platform,
        "xla_python_client_mem_fraction": os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"],
        "flops_formula": "GPT: 6*N + 12*L*T*D per token, N = trainable params - position "
                         "table; BERT: 6*N_body + 12*L*T*D with the last block's query side "
                         "and the masked-LM head (6*(V*D + D*D)) counted on the 15% predicted "
                         "positions only (train_throughput.masked_lm_flops)",
        "training_step": "jitted stateless step (stateless_call, value_and_grad, "
                         "optimizer.stateless_apply), state donated; async dispatch",
        **peaks,
        "shapes_skipped": skipped,
        "rows": rows,
    })


def run_shapes(args, started, peaks):
    """Runs the shapes in order, writing the results after each; a shape is skipped when
    the previous one's duration would take the run past `--budget-s`, or recorded as failed
    (out of memory, say) while the others go on. Returns `(rows, {shape or "shape/model":
    why skipped})`."""
    rows, skipped, last_duration = [], {}, 0.0
    for shape_name in args.shapes:
        elapsed = time.perf_counter() - started
        if rows and elapsed + last_duration > args.budget_s:
            skipped[shape_name] = f"budget: {elapsed:.0f} s + {last_duration:.0f} s > --budget-s"
            print(f"note: skipping shape {shape_name} ({skipped[shape_name]})")
            continue
        try:
            with benchlib.Stopwatch() as shape_time:
                rows.extend(run_shape(shape_name, args, skipped))
        except Exception as e:  # noqa: BLE001  (recorded; the other shapes still run)
            skipped[shape_name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            print(f"note: shape {shape_name} {skipped[shape_name]}")
            benchlib.clear_session()
            continue
        last_duration = shape_time.seconds
        finish_rows(rows, peaks["peak_measured_tflops"] * 1e12, peaks["peak_nominal_tflops"])
        write(args, rows, skipped, peaks)  # so each shape's rows survive a later timeout
    if not rows:
        benchlib.fail(f"no shape ran: {skipped}")
    return rows, skipped


def main():
    args = parse_args()
    started = time.perf_counter()
    if keras.backend.backend() != "jax":
        benchlib.fail(f"needs KERAS_BACKEND=jax; got {keras.backend.backend()}")
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    device_kind = jax.devices()[0].device_kind
    peak_measured = train_throughput.measure_matmul_peak(args.peak_size, "bfloat16")
    nominal = args.peak_tflops or nominal_peak_tflops(device_kind)
    peaks = {"peak_matmul_size": args.peak_size, "peak_measured_tflops": peak_measured / 1e12,
             "peak_nominal_tflops": nominal,
             "peak_nominal_source": "--peak-tflops" if args.peak_tflops else
             ("datasheet (dense bf16)" if nominal else None)}
    print(f"{device_kind}: bf16 {args.peak_size}x{args.peak_size} matmul "
          f"{peak_measured / 1e12:.1f} TFLOP/s measured; nominal bf16 peak "
          f"{f'{nominal:g} TFLOP/s' if nominal else 'unknown (MFU column left empty)'}")

    rows, skipped = run_shapes(args, started, peaks)
    path = write(args, rows, skipped, peaks)
    print_table(rows)
    print("FLOPs/token = 6*N + 12*L*T*D (N: trainable params without the position table; "
          "BERT's last-block query side and masked-LM head counted on its 15% predicted "
          "positions only); "
          "MFU vs the nominal dense bf16 peak, MFU (matmul) vs the measured matmul")
    print(f"wrote {path} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
