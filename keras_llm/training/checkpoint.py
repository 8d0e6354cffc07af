"""Training checkpoints for exact resume.

A checkpoint is a directory `OUTPUT_DIR/checkpoints/ckpt-<step>/` holding
    state.index, state.data-*   (tf.train.Checkpoint) model variables (weights and the dropout
                                seed generators' state), optimizer variables (moments,
                                iterations, so the learning-rate schedule position, gradient
                                accumulators, loss scale), metric accumulators, the step
                                counter, TensorFlow's global random generator and the tf.data
                                iterator's position (shuffle buffer and prefetched batches
                                included)
    meta.json                   step, the resolved config, Python and NumPy random state and
                                a SHA-256 of every state file; written last

It is written into a temporary directory that is renamed into place only when complete, so a
crash mid-write leaves no `ckpt-*` directory at all; a checkpoint whose files no longer match
their recorded hashes (or that fails to load) is skipped for the previous one, with a warning.
The last `keep` checkpoints are kept; older ones are removed only after a new one is in place.

On a multi-worker run each worker keeps its own checkpoints (its iterator is its own): the
chief in `checkpoints/`, worker i in `checkpoints/worker-<i>/`.

Example:

>>> import keras
>>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
>>> import tempfile
>>> manager = CheckpointManager(tempfile.mkdtemp(), model)
>>> path = manager.save(step=5)
>>> manager.restore()
5
"""
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time

import numpy as np
import tensorflow as tf

from keras_llm.errors import ArtifactError, ConfigError, DataError

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
META_FILE = "meta.json"
STATE_PREFIX = "state"
NAME = re.compile(r"^ckpt-(\d+)$")

# Keys that may change between a run and its resumption without changing what is trained.
RESUMABLE_CHANGES = (
    "train.steps", "train.epochs", "train.eval_every", "train.eval_steps",
    "train.checkpoint_every", "train.keep_checkpoints", "train.strategy", "train.xla",
    "train.steps_per_execution",
)

# Test hook: "exit-during-write" (or "exit-during-write@STEP") makes the writer exit the
# process half-way through a checkpoint write, to show that a crash there never leaves a
# checkpoint that loads wrong.
FAULT_ENV = "KERAS_LLM_TEST_CHECKPOINT_FAULT"


def flatten_config(values, prefix=""):
    """`{"train": {"steps": 5}}` -> `{"train.steps": 5}`."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved, current, ignore=RESUMABLE_CHANGES):
    """Dotted keys whose values differ between two resolved config dicts, minus `ignore`."""
    saved, current = flatten_config(saved), flatten_config(current)
    keys = sorted(set(saved) | set(current))
    return [k for k in keys if k not in ignore and saved.get(k) != current.get(k)]


def checkpointable_dataset(dataset):
    """`dataset` set up so its iterator can be checkpointed.

    Tokenizers keep caches in lookup tables (keras-hub's BPE does); they do not change what
    the pipeline yields, so their state is left out of the checkpoint (IGNORE policy) rather
    than refusing to save the iterator.
    """
    options = tf.data.Options()
    options.experimental_external_state_policy = (
        tf.data.experimental.ExternalStatePolicy.IGNORE)
    return dataset.with_options(options)


def check_iterator_checkpointable(iterator):
    """Raises `DataError` if the iterator's position cannot be saved (e.g. `from_generator`)."""
    try:
        iterator._serialize_to_tensors()
    except (tf.errors.UnimplementedError, tf.errors.FailedPreconditionError) as e:
        reason = e.message.split("}}")[-1].split("[Op:")[0].strip().rstrip(".")
        raise DataError(
            f"the training data pipeline cannot be checkpointed ({reason}); build it from "
            f"tensors or files (from_tensor_slices, TextLineDataset...), not from_generator")


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _python_random_state():
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), position, has_gauss, cached]}


def _set_python_random_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))


class CheckpointManager:
    """Saves and restores everything a training run needs to continue exactly.

    Args:
        output_dir: the run's output directory; checkpoints go under `checkpoints/`.
        model: a compiled (or plain) Keras model; its optimizer is saved when it has one.
        iterator: the `tf.data.Iterator` training reads from, or None.
        config: the resolved config dict (or `Config`); a resume with other values for keys
            not in `RESUMABLE_CHANGES` is refused.
        keep: how many checkpoints to keep.
        worker_index: this worker's index on a multi-worker run (0 = chief).
    """

    def __init__(self, output_dir, model, iterator=None, config=None, keep=3, worker_index=0):
        self.directory = os.path.join(output_dir, CHECKPOINTS_DIR)
        if worker_index:
            self.directory = os.path.join(self.directory, f"worker-{worker_index}")
        self.model = model
        self.config = config.to_dict() if hasattr(config, "to_dict") else config
        self.keep = max(int(keep), 1)
        self.restored_logs = None
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="checkpoint_step")
        trackables = {"step": self.step, "model": list(model.variables),
                      "global_generator": tf.random.get_global_generator()}
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None:
            trackables["optimizer"] = list(optimizer.variables)
        if getattr(model, "metrics_variables", None):
            trackables["metrics"] = list(model.metrics_variables)
        if iterator is not None:
            check_iterator_checkpointable(iterator)
            trackables["iterator"] = iterator
        self.checkpoint = tf.train.Checkpoint(**trackables)

    # --- listing -----------------------------------------------------------------------------

    def steps(self):
        """Steps of the checkpoints on disk, oldest first (complete or not yet verified)."""
        if not os.path.isdir(self.directory):
            return []
        found = (NAME.match(name) for name in os.listdir(self.directory))
        return sorted(int(m.group(1)) for m in found if m)

    def path(self, step):
        return os.path.join(self.directory, f"ckpt-{step:09d}")

    def exists(self):
        return bool(self.steps())

    # --- saving ------------------------------------------------------------------------------

    def save(self, step, logs=None):
        """Writes the checkpoint for `step` atomically and prunes old ones; returns its path."""
        final = self.path(step)
        tmp = os.path.join(self.directory, f".tmp-ckpt-{step:09d}-{os.getpid()}")
        try:
            os.makedirs(self.directory, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            self.step.assign(step)
            self._write_state(os.path.join(tmp, STATE_PREFIX))
            if os.environ.get(FAULT_ENV) in ("exit-during-write", f"exit-during-write@{step}"):
                os._exit(17)
            files = {name: _sha256(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
            meta = {"step": int(step), "config": self.config, "files": files,
                    "random_state": _python_random_state(), "logs": logs or {},
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
                json.dump(meta, f, default=float)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            if os.path.exists(final):  # re-saving a step after a resume: swap it out
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.directory)
        except (OSError, tf.errors.OpError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            reason = getattr(e, "strerror", None) or getattr(e, "message", None) or str(e)
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                reason = "no space left on device"
            raise ArtifactError(f"cannot write checkpoint to {self.directory}: "
                                f"{reason.splitlines()[0]}") from None
        self._prune()
        return final

    def _write_state(self, prefix):
        self.checkpoint.write(prefix)

    def _prune(self):
        for step in self.steps()[:-self.keep]:
            shutil.rmtree(self.path(step), ignore_errors=True)

    def clear(self):
        """Removes every checkpoint (`--restart`)."""
        shutil.rmtree(self.directory, ignore_errors=True)

    # --- restoring ---------------------------------------------------------------------------

    def read_meta(self, step):
        """The verified `meta.json` of checkpoint `step`; raises ValueError if it is damaged."""
        path = self.path(step)
        try:
            with open(os.path.join(path, META_FILE), encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"unreadable {META_FILE} ({e})")
        for name, digest in meta["files"].items():
            file_path = os.path.join(path, name)
            if not os.path.exists(file_path) or _sha256(file_path) != digest:
                raise ValueError(f"{name} is missing or does not match its recorded hash")
        return meta

    def check_config(self, meta, where):
        if self.config is None or meta.get("config") is None:
            return
        differing = config_differences(meta["config"], self.config)
        if differing:
            saved, now = flatten_config(meta["config"]), flatten_config(self.config)
            changes = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in differing)
            raise ConfigError(
                f"{where} was trained with a different config ({changes}); rerun with the same "
                f"options, pass --restart to start over, or choose another --output-dir")

    def restore(self):
        """Restores the newest loadable checkpoint; returns its step, or None if there is none.

        A damaged checkpoint is skipped for the previous one, with a warning; a config that
        differs from the checkpoint's is refused with `ConfigError` naming the keys.
        """
        if os.path.isdir(self.directory):  # leftovers of writes that a crash cut short
            for name in os.listdir(self.directory):
                if name.startswith(".tmp-ckpt-"):
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        for step in reversed(self.steps()):
            path = self.path(step)
            try:
                meta = self.read_meta(step)
            except ValueError as e:
                logger.warning("checkpoint %s is damaged (%s); falling back to the previous one",
                               path, e)
                continue
            self.check_config(meta, path)
            try:
                status = self.checkpoint.read(os.path.join(path, STATE_PREFIX))
                status.assert_existing_objects_matched()
            except (tf.errors.OpError, ValueError, AssertionError) as e:
                logger.warning("checkpoint %s does not load (%s); falling back to the previous "
                               "one", path, str(e).splitlines()[0])
                continue
            _set_python_random_state(meta["random_state"])
            self.restored_logs = meta.get("logs") or None
            logger.info("resumed from %s (step %d)", path, step)
            return int(self.step.numpy())
        return None
