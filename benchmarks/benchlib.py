"""What every benchmark script shares: where the data is, result JSON, tables, timing.

Benchmarks are scripts, not tests: each compares its contenders side by side in one run
(so a ratio means something on a shared machine), prints a table and writes a JSON record
under `benchmarks/results/`. Real data comes from the shared data folder beside the
project (`../shared/data`, or `$KERAS_LLM_DATA_DIR`); when it is absent a script stops
with one clear line instead of a traceback.
"""
import datetime
import json
import os
import platform
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")


def data_dir():
    """The shared data folder: `$KERAS_LLM_DATA_DIR`, else `../shared/data` beside the repo."""
    return os.environ.get("KERAS_LLM_DATA_DIR") or os.path.join(
        os.path.dirname(REPO_ROOT), "shared", "data")


def fail(message):
    """Stops the script with one line on stderr and exit status 1."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def require_file(path, what):
    if not os.path.isfile(path):
        fail(f"{what} not found at {path} (pass --data, or set KERAS_LLM_DATA_DIR to the "
             f"folder holding the shared data sets)")
    return path


def load_average():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def device_description():
    """A short name of the accelerator training ran on, else the CPU."""
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            device = jax.devices()[0]
            if device.platform != "cpu":
                return device.device_kind
        elif backend == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            if gpus:
                return tf.config.experimental.get_device_details(gpus[0]).get(
                    "device_name", "GPU")
        elif backend == "torch":
            import torch

            if torch.cuda.is_available():
                return torch.cuda.get_device_name(0)
    except Exception:  # the description is informative only
        pass
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def metadata(args):
    import keras

    try:
        import keras_hub

        keras_hub_version = keras_hub.__version__
    except ImportError:
        keras_hub_version = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.argv[0], REPO_ROOT), *sys.argv[1:]]),
        "arguments": vars(args),
        "backend": keras.backend.backend(),
        "dtype_policy": keras.config.dtype_policy().name,
        "device": device_description(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_average_start": args.load_average_start,
        "load_average_end": load_average(),
        "python": platform.python_version(),
        "keras": keras.__version__,
        "keras_hub": keras_hub_version,
    }


def write_result(name, args, payload):
    """Writes `{results_dir}/{name}.json` (metadata first, then the payload); returns the path."""
    os.makedirs(args.results_dir, exist_ok=True)
    path = os.path.join(args.results_dir, f"{name}.json")
    record = {"benchmark": name, **metadata(args), **payload}
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path


def clear_session():
    """`keras.backend.clear_session()`, keeping the global dtype policy it would reset to
    float32 (a mixed-precision run would silently go on in float32)."""
    import keras

    policy = keras.config.dtype_policy()
    keras.backend.clear_session()
    keras.config.set_dtype_policy(policy)


def add_common_arguments(parser):
    parser.add_argument("--quick", action="store_true",
                        help="a fast smoke run with few steps; numbers are not meaningful")
    parser.add_argument("--results-dir", default=RESULTS_DIR,
                        help="where the result JSON is written")
    parser.add_argument("--seed", type=int, default=1337)


def start(parser):
    """Parses arguments and records the load average before any work starts."""
    args = parser.parse_args()
    args.load_average_start = load_average()
    if args.load_average_start is not None and args.load_average_start > 1.5:
        print(f"note: load average {args.load_average_start} > 1.5: other work is running, "
              f"timings are distorted (ratios from the same run are still comparable)")
    return args


def choose_shapes(text, shapes, default):
    """The shape names of a comma-separated `--shapes` value (or `default`), each checked
    against `shapes`."""
    names = (text or default).split(",")
    for name in names:
        if name not in shapes:
            fail(f"--shapes: unknown shape {name!r}; choose from {', '.join(shapes)}")
    return names


def parse_seeds(text, default, option="--seeds"):
    """The seeds of a comma-separated option value, or `[default]` when it is empty."""
    if not text:
        return [default]
    try:
        return [int(seed) for seed in text.split(",")]
    except ValueError:
        fail(f"{option}: {text!r} is not a comma-separated list of integers")


def mean_and_std(values):
    """Mean and sample standard deviation (0.0 for a single value) of a list of numbers."""
    values = [float(v) for v in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def format_table(columns, rows):
    """Plain-text table: `columns` are header names, `rows` lists of already formatted cells."""
    cells = [list(map(str, columns))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class Stopwatch:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def median(values):
    return statistics.median(values) if values else float("nan")
