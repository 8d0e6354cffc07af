"""Configs: YAML files validated into dataclasses at load time.

One source of defaults (the dataclasses below); a YAML file overrides them; command-line
options override the file through dotted keys (`train.batch_size=32`). The resolved config is
saved with every artifact, so `Config.from_dict(resolved)` rebuilds exactly what ran.

Example:

>>> config = load_config("gpt-tiny", overrides={"train.steps": 10})
>>> config.model.hidden_size % config.model.num_heads
0
"""
import dataclasses
import difflib
import importlib.resources
import os
import typing

import yaml

from keras_llm.errors import ConfigError

MODEL_FAMILIES = ("gpt", "bert", "roberta", "electra", "seq2seq")
TOKENIZER_KINDS = ("bpe", "wordpiece", "sentencepiece")
# Each task and the model families it trains.
TASK_FAMILIES = {
    "causal_lm": ("gpt",),
    "mlm": ("bert", "roberta"),
    "mlm_nsp": ("bert",),
    "electra": ("electra",),
    "seq2seq_denoising": ("seq2seq",),
    # Fine-tuning (`keras-llm finetune`, keras_llm/training/finetune.py).
    "classification": ("gpt", "bert", "roberta", "electra"),
    "seq2seq": ("seq2seq",),
}


@dataclasses.dataclass
class ModelConfig:
    family: str = "gpt"
    vocab_size: int = 8192
    max_length: int = 128
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024
    dropout: float = 0.0
    activation: str = "gelu"
    norm_first: bool = True
    position: str = "learned"  # or "sinusoidal", "rotary" (RoPE in attention, no table)
    layer_norm_epsilon: float = 1e-5
    tie_embeddings: bool = True  # output projection = the token embedding's transpose
    # Encoder families (keras_llm/models/{bert,electra,seq2seq}.py); None = derived default.
    embedding_size: typing.Optional[int] = None  # None: hidden_size (ELECTRA-small: 128)
    generator_hidden_size: typing.Optional[int] = None  # ELECTRA; None: hidden_size // 4
    num_decoder_layers: typing.Optional[int] = None  # seq2seq; None: num_layers
    # seq2seq: None shares one vocabulary (vocab_size) between source, target and output;
    # a number is the size of the target's own vocabulary (its own tokenizer and embedding).
    target_vocab_size: typing.Optional[int] = None

    def validate(self, where):
        _check_choice(where, "model.family", self.family, MODEL_FAMILIES)
        _check_choice(where, "model.position", self.position,
                      ("learned", "sinusoidal", "rotary"))
        _check_choice(where, "model.activation", self.activation, ("gelu", "gelu_tanh", "relu"))
        for key in ("vocab_size", "max_length", "hidden_size", "num_layers", "num_heads",
                    "intermediate_size"):
            _check_positive(where, f"model.{key}", getattr(self, key))
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"{where}: model.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.num_heads ({self.num_heads})")
        _check_fraction(where, "model.dropout", self.dropout)
        _check_positive(where, "model.layer_norm_epsilon", self.layer_norm_epsilon)
        for key in ("embedding_size", "generator_hidden_size", "num_decoder_layers",
                    "target_vocab_size"):
            if getattr(self, key) is not None:
                _check_positive(where, f"model.{key}", getattr(self, key))


@dataclasses.dataclass
class DataConfig:
    source: str = "builtin"
    text_field: str = "text"
    tokenizer: str = "bpe"
    tokenizer_path: typing.Optional[str] = None
    seq_len: int = 128
    validation_fraction: float = 0.05
    shuffle_buffer: int = 2048
    lowercase: bool = False
    # Masked LM (mlm, mlm_nsp, electra) and denoising (seq2seq_denoising) objectives.
    masking: str = "dynamic"
    mask_rate: float = 0.15
    whole_word_masking: bool = False
    noise_density: float = 0.3
    mean_noise_span_length: float = 3.0

    def validate(self, where):
        _check_choice(where, "data.tokenizer", self.tokenizer, TOKENIZER_KINDS)
        _check_positive(where, "data.seq_len", self.seq_len)
        if not 0.0 < self.validation_fraction < 0.5:
            raise ConfigError(
                f"{where}: data.validation_fraction must be in (0, 0.5), got "
                f"{self.validation_fraction!r}")
        _check_positive(where, "data.shuffle_buffer", self.shuffle_buffer)
        _check_choice(where, "data.masking", self.masking, ("static", "dynamic"))
        for key in ("mask_rate", "noise_density"):
            if not 0.0 < getattr(self, key) < 1.0:
                raise ConfigError(f"{where}: data.{key} must be in (0, 1), got "
                                  f"{getattr(self, key)!r}")
        if self.mean_noise_span_length < 1.0:
            raise ConfigError(f"{where}: data.mean_noise_span_length must be >= 1, got "
                              f"{self.mean_noise_span_length!r}")


@dataclasses.dataclass
class TrainConfig:
    batch_size: int = 16
    steps: int = 1000
    epochs: typing.Optional[int] = None
    learning_rate: float = 1e-3
    min_learning_rate_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"  # after warmup: "cosine" decay, or "wsd" (constant, then linear)
    decay_fraction: float = 0.2  # wsd: the last fraction of the steps that decays
    weight_decay: float = 0.1
    beta_2: float = 0.99
    clip_norm: float = 1.0
    eval_every: int = 250
    eval_steps: int = 20
    seed: int = 1337
    rtd_weight: float = 50.0  # ELECTRA: loss = MLM + rtd_weight * replaced-token detection
    # Scale and fault tolerance (keras_llm/training/{distribute,loop,checkpoint}.py).
    strategy: str = "auto"
    scale_lr: bool = False
    mixed_precision: bool = False
    xla: bool = False
    grad_accum_steps: int = 1
    steps_per_execution: int = 1
    checkpoint_every: typing.Optional[int] = None
    keep_checkpoints: int = 3

    def validate(self, where):
        for key in ("batch_size", "steps", "learning_rate", "eval_every", "eval_steps",
                    "grad_accum_steps", "steps_per_execution", "keep_checkpoints"):
            _check_positive(where, f"train.{key}", getattr(self, key))
        if self.checkpoint_every is not None:
            _check_positive(where, "train.checkpoint_every", self.checkpoint_every)
        _check_choice(where, "train.strategy", self.strategy,
                      ("auto", "default", "mirrored", "multi-worker", "tpu"))
        if self.epochs is not None:
            _check_positive(where, "train.epochs", self.epochs)
        _check_positive(where, "train.rtd_weight", self.rtd_weight)
        if self.warmup_steps < 0:
            raise ConfigError(f"{where}: train.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check_fraction(where, "train.min_learning_rate_ratio", self.min_learning_rate_ratio)
        _check_choice(where, "train.schedule", self.schedule, ("cosine", "wsd"))
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(
                f"{where}: train.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        _check_fraction(where, "train.beta_2", self.beta_2)
        if self.weight_decay < 0 or self.clip_norm < 0:
            raise ConfigError(f"{where}: train.weight_decay and train.clip_norm must be >= 0")


@dataclasses.dataclass
class Config:
    name: str = "custom"
    task: str = "causal_lm"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def validate(self, where="config"):
        _check_choice(where, "task", self.task, tuple(TASK_FAMILIES))
        self.model.validate(where)
        if self.model.family not in TASK_FAMILIES[self.task]:
            raise ConfigError(f"{where}: task {self.task} trains model.family "
                              f"{' or '.join(TASK_FAMILIES[self.task])}; got {self.model.family!r}")
        self.data.validate(where)
        self.train.validate(where)
        if self.model.target_vocab_size is not None and self.task != "seq2seq":
            raise ConfigError(
                f"{where}: model.target_vocab_size (a separate target vocabulary) is for "
                f"seq2seq translation fine-tuning; task {self.task} reads and writes one "
                f"vocabulary (fine-tune with `keras-llm finetune --task seq2seq "
                f"--target-vocab-size N`)")
        if self.data.seq_len > self.model.max_length:
            raise ConfigError(
                f"{where}: data.seq_len ({self.data.seq_len}) exceeds model.max_length "
                f"({self.model.max_length})")
        return self

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values, where="config"):
        return _build(cls, values or {}, where, prefix="").validate(where)


# Shipped YAML files that are not model configs: pipelines and search spaces.
NON_MODEL_CONFIG_PREFIXES = ("pipeline-", "tune-")


def builtin_config_names():
    """Names of the model configs shipped in the package (`gpt-tiny`, `gpt-small`, ...)."""
    root = importlib.resources.files("keras_llm.configs")
    return sorted(p.name[:-5] for p in root.iterdir()
                  if p.name.endswith(".yaml") and not p.name.startswith(NON_MODEL_CONFIG_PREFIXES))


def read_config_file(name_or_path):
    """Returns `(mapping, where)` for a config path or the name of a shipped config."""
    if os.path.exists(name_or_path):
        where = name_or_path
        with open(name_or_path, encoding="utf-8") as f:
            text = f.read()
    else:
        stem = os.path.basename(name_or_path)
        stem = stem[:-5] if stem.endswith(".yaml") else stem
        resource = importlib.resources.files("keras_llm.configs") / f"{stem}.yaml"
        if not resource.is_file():
            raise ConfigError(
                f"config {name_or_path!r} not found: not a file, and not one of the built-in "
                f"configs ({', '.join(builtin_config_names())})")
        where = f"configs/{stem}.yaml"
        text = resource.read_text(encoding="utf-8")
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{where}:{line} is not valid YAML ({getattr(e, 'problem', e)})")
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"{where}: top level must be a mapping of sections, got "
                          f"{type(values).__name__}")
    return values or {}, where


def load_config(name_or_path="gpt-tiny", overrides=None):
    """Loads, overrides and validates a config.

    Args:
        name_or_path: a YAML file path or the name of a built-in config.
        overrides: mapping of dotted keys to values (`{"train.steps": 10}`); `None` values
            are ignored so unset command-line options leave the file's value alone.
    """
    values, where = read_config_file(name_or_path)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section = values
        *parents, leaf = dotted.split(".")
        for part in parents:
            section = section.setdefault(part, {})
        section[leaf] = value
    return Config.from_dict(values, where)


def _build(cls, values, where, prefix):
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {prefix + key!r}{hint}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, where, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, where, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value, hint, where, key):
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    if optional:
        if value is None:
            return None
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads `1e-3` as a string.
            except ValueError:
                pass
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
    return value


def _check_choice(where, key, value, choices):
    if value not in choices:
        raise ConfigError(f"{where}: {key} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive(where, key, value):
    if value <= 0:
        raise ConfigError(f"{where}: {key} must be > 0, got {value!r}")


def _check_fraction(where, key, value):
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{where}: {key} must be in [0, 1), got {value!r}")
