"""Model artifacts: a directory holding everything needed to use and trace a trained model.

Layout (`MODEL_DIR/`):
    model.keras      weights and architecture, loaded with `safe_mode=True`
    tokenizer/       the tokenizer's files (a seq2seq model's source tokenizer)
    target_tokenizer/  a seq2seq model's target tokenizer, only when the target has its own
                     vocabulary (`model.target_vocab_size`); absent: `tokenizer/` serves both
    config.yaml      the resolved config the model was trained with
    metrics.json     final metrics
    metadata.json    how it was made: artifact type, command, config, data source and
                     fingerprint, parent artifact, package versions, time
    logs/            TensorBoard event files

Every file is written to a temporary name and renamed into place, so a crash never leaves a
half-written file under a final name, and `metadata.json` is written last: a directory
without it is not a finished artifact.
"""
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import sys
import tempfile

import yaml

from keras_llm.config import Config
from keras_llm.errors import ArtifactError

MODEL_FILE = "model.keras"
TOKENIZER_DIR = "tokenizer"
TARGET_TOKENIZER_DIR = "target_tokenizer"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
METADATA_FILE = "metadata.json"
LOGS_DIR = "logs"

TRACKED_PACKAGES = ("keras-llm", "tensorflow", "keras", "keras-hub", "tensorflow-text",
                    "tensorflow-datasets", "keras-tuner", "numpy")


def package_versions():
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def atomic_write(path, data):
    """Writes `data` (str or bytes) to `path` through a temporary file and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path, value):
    atomic_write(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def config_fingerprint(config_dict):
    """A stable hash of a resolved config (used to detect changed parameters)."""
    text = json.dumps(config_dict, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def make_metadata(artifact_type, config, data=None, parent=None, command=None, extra=None):
    """The record of how an artifact was made."""
    config_dict = config.to_dict() if dataclasses.is_dataclass(config) else config
    return {
        "artifact_type": artifact_type,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "command": list(command if command is not None else sys.argv),
        "config": config_dict,
        "config_fingerprint": config_fingerprint(config_dict),
        "data": data,
        "parent": parent,
        "versions": package_versions(),
        **(extra or {}),
    }


def save_model_artifact(output_dir, model, tokenizer, config, metrics, metadata,
                        target_tokenizer=None):
    """Writes a complete model artifact; `metadata.json` last. `target_tokenizer`: a seq2seq
    model's own target tokenizer (None, or `tokenizer` itself, when the vocabulary is shared)."""
    os.makedirs(output_dir, exist_ok=True)
    fd, tmp_model = tempfile.mkstemp(dir=output_dir, prefix=".model.", suffix=".keras")
    os.close(fd)
    try:
        model.save(tmp_model)
        os.replace(tmp_model, os.path.join(output_dir, MODEL_FILE))
    finally:
        if os.path.exists(tmp_model):
            os.remove(tmp_model)
    tokenizer.save(os.path.join(output_dir, TOKENIZER_DIR))
    target_dir = os.path.join(output_dir, TARGET_TOKENIZER_DIR)
    if target_tokenizer is not None and target_tokenizer is not tokenizer:
        target_tokenizer.save(target_dir)
    elif os.path.isdir(target_dir):  # left by an overwritten artifact
        import shutil

        shutil.rmtree(target_dir)
    atomic_write(os.path.join(output_dir, CONFIG_FILE),
                 yaml.safe_dump(config.to_dict(), sort_keys=False))
    write_json(os.path.join(output_dir, METRICS_FILE), metrics)
    write_json(os.path.join(output_dir, METADATA_FILE), metadata)


def is_complete(model_dir):
    return os.path.isfile(os.path.join(model_dir, METADATA_FILE))


@dataclasses.dataclass
class ModelArtifact:
    """A loaded model artifact; `target_tokenizer` is `tokenizer` unless a seq2seq model's
    target has its own vocabulary."""

    directory: str
    model: object
    tokenizer: object
    config: Config
    metadata: dict
    metrics: dict
    target_tokenizer: object = None

    def __post_init__(self):
        if self.target_tokenizer is None:
            self.target_tokenizer = self.tokenizer


def load_model_artifact(model_dir):
    """Loads the model (safe mode), tokenizer, config and records of an artifact directory."""
    import keras

    from keras_llm import models, tasks  # noqa: F401  (registers the model classes)
    from keras_llm.data.tokenizers import load_tokenizer
    # ... and the loss and optimizer a model.keras was compiled with.
    from keras_llm.training import losses, optim  # noqa: F401

    if not os.path.isdir(model_dir):
        raise ArtifactError(f"{model_dir}: no such model directory")
    for name in (METADATA_FILE, MODEL_FILE, CONFIG_FILE):
        if not os.path.exists(os.path.join(model_dir, name)):
            raise ArtifactError(
                f"{model_dir}: not a finished keras-llm model artifact ({name} is missing)")
    metadata = read_json(os.path.join(model_dir, METADATA_FILE))
    config = Config.from_dict(metadata["config"], where=os.path.join(model_dir, METADATA_FILE))
    try:
        model = keras.saving.load_model(os.path.join(model_dir, MODEL_FILE), safe_mode=True)
    except (ValueError, TypeError, KeyError) as e:
        saved_by = metadata.get("versions", {}).get("keras-llm")
        raise ArtifactError(
            f"{os.path.join(model_dir, MODEL_FILE)}: cannot load the model (saved by keras-llm "
            f"{saved_by or 'unknown'}; its layers or weights do not match this version's): "
            f"{_first_line(e)}") from e
    tokenizer = load_tokenizer(os.path.join(model_dir, TOKENIZER_DIR))
    target_dir = os.path.join(model_dir, TARGET_TOKENIZER_DIR)
    target_tokenizer = load_tokenizer(target_dir) if os.path.isdir(target_dir) else None
    metrics_path = os.path.join(model_dir, METRICS_FILE)
    metrics = read_json(metrics_path) if os.path.exists(metrics_path) else {}
    return ModelArtifact(model_dir, model, tokenizer, config, metadata, metrics,
                         target_tokenizer)


def _first_line(error):
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
