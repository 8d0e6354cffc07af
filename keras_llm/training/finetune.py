"""Fine-tuning: a pretrained model artifact + labeled data -> a fine-tuned model artifact.

Tasks (`FinetuneOptions.task`):
    classification  one text or a text pair -> a class; BERT, RoBERTa, ELECTRA (the
                    discriminator) or GPT artifacts (see `keras_llm.tasks.TextClassifier`)
    causal_lm       continued next-token training of a GPT on new text
    seq2seq         source text -> target text on an encoder-decoder artifact; with
                    `target_vocab_size` the target gets its own vocabulary, trained on the
                    training targets, and a fresh decoder embedding (every other weight kept)

The fine-tuned artifact has the usual layout (`keras_llm.artifacts`), keeps the pretrained
tokenizer, records its parent (path, type, config and metadata fingerprints) in
`metadata.json`, and for classifiers holds `labels.json` (class id -> label).

Learning rate: AdamW, linear warmup then cosine decay (`keras_llm.training.optim`). With
`layerwise_lr_decay` d < 1 (Clark et al., 2020), block i of L gets d ** (L - i) of the rate
and the embeddings d ** (L + 1); the new head keeps the full rate. `freeze` "embeddings"
freezes the embeddings; "blocks:K" freezes the embeddings and the first K blocks.

Scale (as in pretraining, `keras_llm.training.distribute`): `strategy` picks the
tf.distribute strategy the model is loaded, built and trained under; `batch_size` is the
GLOBAL batch (each replica gets `batch_size / replicas` rows of it), or with `scale_lr` the
per-replica batch, the learning rate then times the replicas. `mixed_precision` computes in
mixed_float16 on GPU (with loss scaling) or mixed_bfloat16 on CPU/TPU, the pretrained
weights recast; `xla` compiles the train step (None: Keras decides, on for one GPU).
"""
import dataclasses
import difflib
import hashlib
import logging
import math
import os
import time
import typing

import keras
import numpy as np

from keras_llm import artifacts
from keras_llm.errors import ArtifactError, ConfigError, DataError
from keras_llm.training import distribute, loop
from keras_llm.training.losses import TokenCrossEntropy

logger = logging.getLogger(__name__)

ARTIFACT_TYPE = "keras_llm.FineTunedModel"
LABELS_FILE = "labels.json"
DEFAULT_PRETRAINED_DIR = os.path.join("runs", "gpt-tiny")
TASK_FAMILIES = {
    "classification": ("bert", "roberta", "electra", "gpt"),
    "causal_lm": ("gpt",),
    "seq2seq": ("seq2seq",),
}
# Validation metrics early stopping can watch, per task, and whether larger is better.
EARLY_STOPPING_METRICS = {
    "classification": {"loss": False, "accuracy": True, "macro_f1": True},
    "causal_lm": {"loss": False, "perplexity": False, "accuracy": True},
    "seq2seq": {"loss": False, "perplexity": False, "token_accuracy": True},
}


@dataclasses.dataclass
class FinetuneOptions:
    """What `keras-llm finetune` accepts; see the module docstring."""

    task: str = "classification"
    data: str = "builtin"
    validation_data: typing.Optional[str] = None
    text_column: str = "text"
    text_pair_column: typing.Optional[str] = None
    label_column: str = "label"
    target_column: str = "target"
    learning_rate: float = 5e-4
    epochs: int = 3
    batch_size: int = 32
    warmup_steps: typing.Optional[int] = None  # None: 10% of the steps
    weight_decay: float = 0.01
    freeze: str = "none"
    layerwise_lr_decay: float = 1.0
    class_weights: str = "none"
    early_stopping_metric: typing.Optional[str] = None
    patience: int = 2
    max_seq_len: typing.Optional[int] = None  # None: min(128, the model's max_length)
    pooling: typing.Optional[str] = None
    dropout: float = 0.1
    validation_fraction: float = 0.1
    seed: int = 1337
    target_vocab_size: typing.Optional[int] = None  # seq2seq: a new target vocabulary
    strategy: str = "auto"  # auto, default, mirrored, multi-worker, tpu
    scale_lr: bool = False
    mixed_precision: bool = False
    xla: typing.Optional[bool] = None  # None: Keras decides (XLA on a single GPU)

    @classmethod
    def from_dict(cls, values, where="finetune options"):
        """Options from `{field: value}` (a `--config` file, tune's best_config.yaml), typed
        like the fields and validated; an unknown key is a `ConfigError` naming it."""
        from keras_llm.config import _coerce

        hints = typing.get_type_hints(cls)
        for key in values:
            if key not in hints:
                close = difflib.get_close_matches(str(key), list(hints), n=1)
                hint = (f"did you mean {close[0]!r}?" if close else "finetune options are "
                        "flat: learning_rate, batch_size, ... (the long options, with _)")
                raise ConfigError(f"{where}: unknown finetune option {key!r} ({hint})")
        return cls(**{key: _coerce(value, hints[key], where, key)
                      for key, value in values.items()}).validate()

    def validate(self):
        if self.task not in TASK_FAMILIES:
            raise ConfigError(f"--task must be one of {', '.join(TASK_FAMILIES)}; "
                              f"got {self.task!r}")
        for key in ("learning_rate", "epochs", "batch_size", "patience"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be > 0, got "
                                  f"{getattr(self, key)!r}")
        if not 0.0 < self.layerwise_lr_decay <= 1.0:
            raise ConfigError(f"--layerwise-lr-decay must be in (0, 1], got "
                              f"{self.layerwise_lr_decay!r}")
        if self.class_weights not in ("none", "balanced"):
            raise ConfigError(f"--class-weights must be none or balanced, got "
                              f"{self.class_weights!r}")
        if self.class_weights != "none" and self.task != "classification":
            raise ConfigError("--class-weights applies to --task classification only")
        if self.target_vocab_size is not None and (self.task != "seq2seq"
                                                   or self.target_vocab_size < 16):
            raise ConfigError(f"--target-vocab-size applies to --task seq2seq and must be "
                              f">= 16; got {self.target_vocab_size!r} for {self.task}")
        if self.target_vocab_size is not None and self.freeze != "none":
            raise ConfigError(f"--freeze {self.freeze} would keep the new target embedding of "
                              f"--target-vocab-size at its random initialization; use "
                              f"--freeze none")
        if self.strategy not in distribute.STRATEGIES:
            raise ConfigError(f"--strategy must be one of {', '.join(distribute.STRATEGIES)}; "
                              f"got {self.strategy!r}")
        parse_freeze(self.freeze)
        metrics = EARLY_STOPPING_METRICS[self.task]
        if self.early_stopping_metric is not None and self.early_stopping_metric not in metrics:
            raise ConfigError(f"--early-stopping-metric for task {self.task} must be one of "
                              f"{', '.join(metrics)}; got {self.early_stopping_metric!r}")
        if not 0.0 < self.validation_fraction < 0.5:
            raise ConfigError(f"validation_fraction must be in (0, 0.5), got "
                              f"{self.validation_fraction!r}")
        return self


def load_options(config_file=None, overrides=None):
    """`FinetuneOptions` from a YAML file of options by name (None: the defaults), with
    `overrides` (`{field: value}`, e.g. the options given on the command line) on top."""
    from keras_llm.config import read_config_file

    values, where = read_config_file(config_file) if config_file else ({}, "finetune options")
    return FinetuneOptions.from_dict({**values, **(overrides or {})}, where)


def parse_freeze(spec):
    """(freeze the embeddings?, number of first blocks to freeze) for a `--freeze` value."""
    if spec == "none":
        return False, 0
    if spec == "embeddings":
        return True, 0
    if spec.startswith("blocks:"):
        try:
            count = int(spec.split(":", 1)[1])
        except ValueError:
            count = -1
        if count >= 0:
            return True, count
    raise ConfigError(f"--freeze must be none, embeddings or blocks:K (K >= 0); got {spec!r}")


# ---------------------------------------------------------------------------- the backbone

def backbone_of(model):
    """The backbone inside any artifact's model (the ELECTRA discriminator for ELECTRA)."""
    from keras_llm.models import ElectraPretrainer

    return model.discriminator if isinstance(model, ElectraPretrainer) else model.backbone


def layer_groups(backbone):
    """(embedding layers, blocks from input to output) of a backbone."""
    if hasattr(backbone, "encoder_blocks"):  # Seq2SeqBackbone
        positions = [backbone.encoder_position, backbone.decoder_position]
        return ([backbone.token_embedding] + [p for p in positions if p is not None]
                + ([] if backbone.shared_vocabulary else [backbone.target_token_embedding]),
                list(backbone.encoder_blocks) + list(backbone.decoder_blocks))
    names = ("token_embedding", "position_embedding", "segment_embedding", "embedding_norm",
             "embedding_projection")
    embeddings = [getattr(backbone, n) for n in names if getattr(backbone, n, None) is not None]
    return embeddings, list(backbone.blocks)


def freeze_layers(backbone, spec):
    """Sets `trainable = False` on what `spec` names (see `parse_freeze`)."""
    freeze_embeddings, blocks = parse_freeze(spec)
    embeddings, all_blocks = layer_groups(backbone)
    if blocks > len(all_blocks):
        raise ConfigError(f"--freeze {spec}: the model has only {len(all_blocks)} blocks")
    for layer in (embeddings if freeze_embeddings else []) + all_blocks[:blocks]:
        layer.trainable = False


def layerwise_multipliers(backbone, decay):
    """{variable path: learning-rate multiplier} (see the module docstring)."""
    embeddings, blocks = layer_groups(backbone)
    depth = len(blocks)
    multipliers = {}
    for layer in embeddings:
        for variable in layer.weights:
            multipliers[variable.path] = decay ** (depth + 1)
    for i, block in enumerate(blocks):
        for variable in block.weights:
            multipliers[variable.path] = decay ** (depth - i)
    return multipliers


@keras.saving.register_keras_serializable(package="keras_llm")
class LayerwiseAdamW(keras.optimizers.AdamW):
    """AdamW whose learning rate is scaled per variable (layer-wise learning-rate decay).

    Args:
        multipliers: {variable path: factor}; variables not listed use 1.0.
        **kwargs: `keras.optimizers.AdamW` arguments.

    Example:

    >>> layer = keras.layers.Dense(1)
    >>> layer.build((None, 2))
    >>> optimizer = LayerwiseAdamW({layer.kernel.path: 0.5}, learning_rate=0.1)
    >>> optimizer.build(layer.trainable_variables)
    >>> optimizer.learning_rate_multiplier(layer.kernel)
    0.5
    """

    def __init__(self, multipliers=None, **kwargs):
        super().__init__(**kwargs)
        self.multipliers = dict(multipliers or {})

    def build(self, variables):
        super().build(variables)
        self._factors = [float(self.multipliers.get(v.path, 1.0)) for v in variables]

    def learning_rate_multiplier(self, variable):
        return self._factors[self._get_variable_index(variable)]

    def update_step(self, gradient, variable, learning_rate):
        factor = self.learning_rate_multiplier(variable)
        if factor != 1.0:
            learning_rate = learning_rate * factor
        return super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "multipliers": self.multipliers}


def make_finetune_optimizer(options, total_steps, backbone):
    from keras_llm.config import TrainConfig
    from keras_llm.training.optim import NO_DECAY, learning_rate_schedule

    warmup = options.warmup_steps if options.warmup_steps is not None else total_steps // 10
    schedule = learning_rate_schedule(TrainConfig(
        learning_rate=options.learning_rate, warmup_steps=warmup,
        weight_decay=options.weight_decay, steps=max(total_steps, 1)), total_steps)
    multipliers = ({} if options.layerwise_lr_decay == 1.0
                   else layerwise_multipliers(backbone, options.layerwise_lr_decay))
    optimizer = LayerwiseAdamW(multipliers, learning_rate=schedule,
                               weight_decay=options.weight_decay, beta_1=0.9, beta_2=0.999,
                               global_clipnorm=1.0)
    optimizer.exclude_from_weight_decay(var_names=NO_DECAY)
    return optimizer


# ---------------------------------------------------------------------------- artifacts

def load_parent(pretrained_dir, task):
    """Loads the pretrained artifact and checks it suits `task` and its tokenizer."""
    from keras_llm.models.vocabulary import check_tokenizer_matches

    if pretrained_dir is None:
        if not artifacts.is_complete(DEFAULT_PRETRAINED_DIR):
            raise ArtifactError(
                f"no pretrained model: pass --model PRETRAINED_DIR, or run `keras-llm "
                f"pretrain` first (it writes {DEFAULT_PRETRAINED_DIR}, the default)")
        pretrained_dir = DEFAULT_PRETRAINED_DIR
    parent = artifacts.load_model_artifact(pretrained_dir)
    family = parent.config.model.family
    if family not in TASK_FAMILIES[task]:
        raise ArtifactError(
            f"{pretrained_dir} holds a {family} model; task {task} fine-tunes "
            f"{' or '.join(TASK_FAMILIES[task])} models")
    backbone = backbone_of(parent.model)
    check_tokenizer_matches(f"{pretrained_dir} ({family})", backbone.vocabulary_size,
                            getattr(backbone, "special_token_ids", None), parent.tokenizer)
    return parent


def parent_record(parent):
    """Lineage: where the pretrained artifact is and fingerprints of what it was."""
    path = os.path.join(parent.directory, artifacts.METADATA_FILE)
    with open(path, "rb") as f:
        metadata_sha256 = hashlib.sha256(f.read()).hexdigest()
    return {"path": os.path.abspath(parent.directory),
            "artifact_type": parent.metadata.get("artifact_type"),
            "config_fingerprint": parent.metadata.get("config_fingerprint"),
            "metadata_sha256": metadata_sha256,
            "created_at": parent.metadata.get("created_at")}


def resolved_config(parent, options, max_seq_len, steps):
    """The parent's config with this run's task, data and training settings."""
    config = parent.config
    return dataclasses.replace(
        config, name=f"{config.name}-{options.task}", task=options.task,
        data=dataclasses.replace(config.data, source=options.data,
                                 text_field=options.text_column, seq_len=max_seq_len),
        train=dataclasses.replace(
            config.train, batch_size=options.batch_size, steps=max(steps, 1),
            epochs=options.epochs, learning_rate=options.learning_rate,
            warmup_steps=options.warmup_steps if options.warmup_steps is not None
            else steps // 10, weight_decay=options.weight_decay, seed=options.seed))


def read_labels(model_dir):
    """The label names of a fine-tuned classifier artifact, by class id."""
    path = os.path.join(model_dir, LABELS_FILE)
    if not os.path.isfile(path):
        raise ArtifactError(f"{model_dir}: {LABELS_FILE} is missing (not a classifier "
                            f"artifact?)")
    return artifacts.read_json(path)["labels"]


# ---------------------------------------------------------------------------- data

def columns_for(options):
    if options.task == "classification":
        return {"text": options.text_column, "text_pair": options.text_pair_column,
                "label": options.label_column}
    if options.task == "seq2seq":
        return {"text": options.text_column, "target": options.target_column}
    return {"text": options.text_column}


def split_off_validation(data, fraction, seed):
    """(train columns, validation columns), split by a keyed hash of the text."""
    key = f"{seed}:".encode("utf-8")
    validation = [int(hashlib.sha256(key + t.encode("utf-8")).hexdigest()[:8], 16) % 10_000
                  < fraction * 10_000 for t in data.columns["text"]]
    pick = lambda keep: {role: [v for v, is_val in zip(values, validation) if is_val == keep]
                         for role, values in data.columns.items()}
    return pick(False), pick(True)


def read_data(options):
    from keras_llm.data.labeled import read_labeled

    columns = columns_for(options)
    train = read_labeled(options.data, columns, default_split="train")
    if options.validation_data:
        validation = read_labeled(options.validation_data, columns).columns
        train_columns = train.columns
    elif train.description["kind"] == "builtin":
        validation = read_labeled("builtin:validation", columns).columns
        train_columns = train.columns
    else:
        train_columns, validation = split_off_validation(train, options.validation_fraction,
                                                         options.seed)
    if not train_columns["text"] or not validation["text"]:
        raise DataError(f"--data {options.data}: {len(train_columns['text'])} training and "
                        f"{len(validation['text'])} validation examples; need both (add data "
                        f"or pass --validation-data)")
    return train, train_columns, validation


# ---------------------------------------------------------------------------- task setups

class _ValidationF1(keras.callbacks.Callback):
    """Adds `val_macro_f1` to the epoch logs (before early stopping reads them)."""

    def __init__(self, dataset, true_ids, label_names):
        super().__init__()
        self.dataset, self.true_ids, self.label_names = dataset, true_ids, label_names

    def on_epoch_end(self, epoch, logs=None):
        from keras_llm.evaluation import classifier_predictions, classification_metrics

        predicted = classifier_predictions(self.model, self.dataset).argmax(-1)
        if logs is not None:
            logs["val_macro_f1"] = classification_metrics(
                self.true_ids, predicted, self.label_names)["macro_f1"]


class _Perplexity(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        for key in ("loss", "val_loss"):
            if logs is not None and key in logs:
                logs[key.replace("loss", "perplexity")] = math.exp(min(logs[key], 50.0))


def _weighted_lm_loss():
    return TokenCrossEntropy(reduction="mean_with_sample_weight")


def setup_classification(parent, options, train, validation, max_seq_len):
    from keras_llm.data.labeled import (LabelVocabulary, balanced_class_weights,
                                        classification_dataset)
    from keras_llm.models import GPTBackbone
    from keras_llm.tasks import TextClassifier

    labels = LabelVocabulary.from_labels(train["label"])
    if len(labels) < 2:
        raise DataError(f"--data {options.data}: column {options.label_column!r} holds only "
                        f"one label ({labels.names[0]!r}); a classifier needs two or more")
    train_ids = labels.ids(train["label"], f"--data {options.data}")
    validation_ids = labels.ids(validation["label"],
                                f"--validation-data {options.validation_data or options.data}")
    backbone = backbone_of(parent.model)
    layout = "decoder" if isinstance(backbone, GPTBackbone) else "encoder"
    weights = None
    if options.class_weights == "balanced":
        per_class = balanced_class_weights(train_ids, len(labels))
        weights = [per_class[i] for i in train_ids]
    tokenizer = parent.tokenizer
    common = dict(tokenizer=tokenizer, max_seq_len=max_seq_len,
                  batch_size=options.batch_size, layout=layout)
    train_ds = classification_dataset(train["text"], train_ids,
                                      text_pairs=train.get("text_pair"),
                                      sample_weights=weights, shuffle=True, seed=options.seed,
                                      **common)
    validation_ds = classification_dataset(validation["text"], validation_ids,
                                           text_pairs=validation.get("text_pair"), **common)
    model = TextClassifier(backbone, len(labels), pooling=options.pooling,
                           dropout=options.dropout)
    model(next(iter(classification_dataset(validation["text"][:1], None, **common))))
    callbacks = []
    if options.early_stopping_metric == "macro_f1":
        callbacks.append(_ValidationF1(validation_ds, validation_ids, labels.names))

    def compile(optimizer):
        model.compile(optimizer=optimizer,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])

    def final_metrics():
        from keras_llm.evaluation import classifier_predictions, classification_metrics

        predicted = classifier_predictions(model, validation_ds).argmax(-1)
        report = classification_metrics(validation_ids, predicted, labels.names)
        return {"val_accuracy": report["accuracy"], "val_macro_f1": report["macro_f1"],
                "num_classes": len(labels)}

    return dict(model=model, backbone=backbone, train_ds=train_ds, validation_ds=validation_ds,
                steps_per_epoch=math.ceil(len(train_ids) / options.batch_size),
                compile=compile, final_metrics=final_metrics, callbacks=callbacks,
                labels=labels.names)


def setup_causal_lm(parent, options, train, validation, max_seq_len):
    import tensorflow as tf

    from keras_llm.data import causal_lm_dataset
    from keras_llm.data.labeled import lm_blocks
    from keras_llm.models import GPTCausalLM

    model = parent.model if isinstance(parent.model, GPTCausalLM) else GPTCausalLM(
        backbone_of(parent.model))
    tokenizer = parent.tokenizer
    kwargs = dict(tokenizer=tokenizer, seq_len=max_seq_len, batch_size=options.batch_size,
                  seed=options.seed)
    steps = int(causal_lm_dataset(train["text"], shuffle=False, repeat=False, **kwargs)
                .reduce(0, lambda count, _: count + 1))
    if steps == 0:
        raise DataError(f"--data {options.data}: too little text for one batch of "
                        f"{options.batch_size} x {max_seq_len} tokens; lower --batch-size or "
                        f"--max-seq-len")
    train_ds = causal_lm_dataset(train["text"], shuffle=True, repeat=True, **kwargs)
    blocks, weights = lm_blocks(validation["text"], tokenizer, max_seq_len + 1)
    validation_ds = tf.data.Dataset.from_tensor_slices(
        (blocks[:, :-1], blocks[:, 1:], weights[:, 1:])).batch(options.batch_size)

    def compile(optimizer):
        model.compile(optimizer=optimizer, loss=_weighted_lm_loss(),
                      weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(
                          name="accuracy")])

    def final_metrics():
        from keras_llm.evaluation import language_model_perplexity

        report = language_model_perplexity(model, tokenizer, validation["text"], max_seq_len,
                                           options.batch_size)
        return {"val_perplexity": report["perplexity"],
                "val_accuracy": report["token_accuracy"]}

    return dict(model=model, backbone=model.backbone, train_ds=train_ds,
                validation_ds=validation_ds, steps_per_epoch=steps, compile=compile,
                final_metrics=final_metrics, callbacks=[_Perplexity()], labels=None)


BLEU_EXAMPLES = 200  # validation examples decoded for the BLEU in metrics.json


def seq2seq_model_and_target_tokenizer(parent, options, train):
    """The model to fine-tune and its target tokenizer: the parent's, or with
    `options.target_vocab_size` a new target vocabulary trained on the training targets."""
    from keras_llm.data.tokenizers import train_tokenizer
    from keras_llm.models.seq2seq import with_target_vocabulary

    model, tokenizer, target_tokenizer = parent.model, parent.tokenizer, parent.target_tokenizer
    if options.target_vocab_size:
        target_tokenizer = train_tokenizer(tokenizer.kind, train["target"],
                                           options.target_vocab_size,
                                           lowercase=tokenizer.lowercase)
        model = with_target_vocabulary(model, target_tokenizer.vocabulary_size(),
                                       target_tokenizer.special_token_ids())
        logger.info("target vocabulary: %d %s tokens trained on the training targets",
                    target_tokenizer.vocabulary_size(), tokenizer.kind)
    model.check_tokenizer(tokenizer, target_tokenizer)
    return model, target_tokenizer


def setup_seq2seq(parent, options, train, validation, max_seq_len):
    from keras_llm.data.labeled import seq2seq_dataset

    tokenizer = parent.tokenizer
    model, target_tokenizer = seq2seq_model_and_target_tokenizer(parent, options, train)
    train_ds = seq2seq_dataset(train["text"], train["target"], tokenizer, max_seq_len,
                               options.batch_size, shuffle=True, seed=options.seed,
                               target_tokenizer=target_tokenizer)
    validation_ds = seq2seq_dataset(validation["text"], validation["target"], tokenizer,
                                    max_seq_len, options.batch_size,
                                    target_tokenizer=target_tokenizer)

    def compile(optimizer):
        model.compile(optimizer=optimizer, loss=_weighted_lm_loss(),
                      weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(
                          name="token_accuracy")])

    def final_metrics():
        from keras_llm.evaluation import corpus_bleu, seq2seq_token_accuracy
        from keras_llm.generation import Seq2SeqGenerator

        report = seq2seq_token_accuracy(model, tokenizer, validation["text"],
                                        validation["target"], max_seq_len, options.batch_size,
                                        target_tokenizer)
        sources = validation["text"][:BLEU_EXAMPLES]
        outputs = Seq2SeqGenerator(model, tokenizer, target_tokenizer).generate(
            sources, max_new_tokens=max_seq_len - 1, sampler="greedy")
        return {"val_token_accuracy": report["token_accuracy"],
                "val_perplexity": report["perplexity"],
                "val_bleu_greedy": corpus_bleu(outputs,
                                               validation["target"][:BLEU_EXAMPLES])}

    return dict(model=model, backbone=model.backbone, train_ds=train_ds,
                validation_ds=validation_ds,
                steps_per_epoch=math.ceil(len(train["text"]) / options.batch_size),
                compile=compile, final_metrics=final_metrics, callbacks=[_Perplexity()],
                labels=None, target_tokenizer=(None if model.backbone.shared_vocabulary
                                               else target_tokenizer))


SETUPS = {"classification": setup_classification, "causal_lm": setup_causal_lm,
          "seq2seq": setup_seq2seq}


# ---------------------------------------------------------------------------- the executor

def uncompiled_copy(model, dtype_policy=None):
    """The same architecture and weights, without compile state or frozen flags; with
    `dtype_policy` (a name such as "mixed_bfloat16"), every layer computes under it."""
    serialized = keras.saving.serialize_keras_object(model)
    serialized.pop("compile_config", None)
    if dtype_policy is not None:
        serialized = with_dtype_policy(serialized, dtype_policy)
    copy = keras.saving.deserialize_keras_object(serialized)
    copy.set_weights(model.get_weights())
    return copy


def with_dtype_policy(serialized, policy):
    """A serialized model with every layer's dtype policy replaced by `policy`.

    A loaded model keeps the policy it was saved with, whatever the global policy; the
    models here give every sublayer their own policy, so replacing them all is the same
    model built under the global `policy`.
    """
    if isinstance(serialized, dict):
        if serialized.get("class_name") == "DTypePolicy":
            return {**serialized, "config": {**serialized["config"], "name": policy}}
        return {key: with_dtype_policy(value, policy) for key, value in serialized.items()}
    if isinstance(serialized, list):
        return [with_dtype_policy(value, policy) for value in serialized]
    return serialized


def distributed(options):
    """The strategy `options.strategy` names, and the options with the global batch and the
    learning rate it implies (`scale_lr` spent, so the recorded options mean the same run on
    any number of replicas)."""
    strategy = distribute.make_strategy(options.strategy)
    batch_size, _, learning_rate = distribute.batch_and_learning_rate(
        options.batch_size, options.learning_rate, strategy, options.scale_lr)
    logger.info("strategy: %s", distribute.describe_strategy(strategy))
    return strategy, dataclasses.replace(options, batch_size=batch_size,
                                         learning_rate=learning_rate, scale_lr=False)


def build_before_fit(model, dataset, strategy):
    """Builds the optimizer and metrics of a model on several replicas from zeros shaped
    like `dataset`, and keeps `fit` from building them itself: Keras 3 builds from the first
    batch averaged across replicas, which fails on boolean inputs (the padding masks)."""
    loop.build_for_training(model, dataset.element_spec, strategy)
    model._maybe_symbolic_build = lambda *args, **kwargs: None


def finetune(options, pretrained_dir, output_dir, overwrite=False, command=None, verbose=1):
    """Fine-tunes the artifact in `pretrained_dir` (default: runs/gpt-tiny if it exists) and
    writes a fine-tuned artifact to `output_dir`. Returns the metrics of `metrics.json`."""
    options = options.validate()
    if artifacts.is_complete(output_dir) and not overwrite:
        raise ArtifactError(f"{output_dir} already holds a finished model; pass --overwrite "
                            f"to replace it or choose another --output-dir")
    keras.utils.set_random_seed(options.seed)
    strategy, options = distributed(options)
    policy = loop.use_mixed_precision(options.mixed_precision)
    with strategy.scope():  # variables made here are the strategy's (one copy per replica)
        parent = load_parent(pretrained_dir, options.task)
        if parent.model.dtype_policy.name != policy:
            parent.model = uncompiled_copy(parent.model, policy)
    backbone = backbone_of(parent.model)
    max_seq_len = options.max_seq_len or min(128, backbone.max_length)
    if max_seq_len > backbone.max_length or max_seq_len < 4:
        raise ConfigError(f"--max-seq-len must be in [4, {backbone.max_length}] (the "
                          f"pretrained model's max_length); got {max_seq_len}")
    source, train, validation = read_data(options)
    with strategy.scope():
        setup = SETUPS[options.task](parent, options, train, validation, max_seq_len)
        model = setup["model"]
        freeze_layers(setup["backbone"], options.freeze)
        total_steps = options.epochs * setup["steps_per_epoch"]
        setup["compile"](make_finetune_optimizer(options, total_steps, setup["backbone"]))
    if options.xla is not None:
        loop.configure_speed(model, xla=options.xla)
    callbacks = list(setup["callbacks"])
    if options.early_stopping_metric:
        higher = EARLY_STOPPING_METRICS[options.task][options.early_stopping_metric]
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor=f"val_{options.early_stopping_metric}", mode="max" if higher else "min",
            patience=options.patience, restore_best_weights=True))
    logger.info("fine-tuning %s (%s) for %s on %d examples: %d epochs of %d steps; %s of %s "
                "parameters trainable", parent.directory, parent.config.model.family,
                options.task, len(train["text"]), options.epochs, setup["steps_per_epoch"],
                f"{sum(int(np.prod(v.shape)) for v in model.trainable_weights):,}",
                f"{model.count_params():,}")
    started = time.time()
    train_ds = setup["train_ds"] if options.task == "causal_lm" else setup["train_ds"].repeat()
    if strategy.num_replicas_in_sync > 1:
        build_before_fit(model, train_ds, strategy)
    history = model.fit(distribute.with_data_sharding(train_ds), epochs=options.epochs,
                        steps_per_epoch=setup["steps_per_epoch"],
                        validation_data=distribute.with_data_sharding(setup["validation_ds"]),
                        callbacks=callbacks,
                        shuffle=False, verbose=verbose)  # the datasets shuffle themselves
    train_seconds = time.time() - started
    metrics = {
        "task": options.task,
        "epochs": len(history.history["loss"]),
        "steps": int(model.optimizer.iterations.numpy()),
        "train_loss": float(history.history["loss"][-1]),
        "val_loss": float(model.evaluate(setup["validation_ds"], verbose=0,
                                         return_dict=True)["loss"]),
        **setup["final_metrics"](),
        "train_examples": len(train["text"]),
        "validation_examples": len(validation["text"]),
        "train_seconds": round(train_seconds, 1),
        "parameters": int(model.count_params()),
        "trainable_parameters": int(sum(int(np.prod(v.shape))
                                        for v in model.trainable_weights)),
    }
    # Saved without optimizer state (and with every layer trainable again): the artifact is
    # for inference, and further fine-tuning starts a fresh schedule anyway.
    model = uncompiled_copy(model)
    config = resolved_config(parent, options, max_seq_len, total_steps)
    target_tokenizer = setup.get("target_tokenizer")  # seq2seq with its own target vocabulary
    if target_tokenizer is not None:
        config = dataclasses.replace(config, model=dataclasses.replace(
            config.model, target_vocab_size=target_tokenizer.vocabulary_size()))
    extra = {"family": parent.config.model.family, "task": options.task,
             "finetune": dataclasses.asdict(options), "columns": columns_for(options),
             "max_seq_len": max_seq_len,
             "distribute": {**distribute.describe_strategy(strategy), "dtype_policy": policy}}
    if setup["labels"] is not None:
        extra["labels"] = setup["labels"]
        os.makedirs(output_dir, exist_ok=True)
        artifacts.write_json(os.path.join(output_dir, LABELS_FILE),
                             {"labels": setup["labels"]})
    metadata = artifacts.make_metadata(
        ARTIFACT_TYPE, config, data={**source.description, "fingerprint": source.fingerprint},
        parent=parent_record(parent), command=command, extra=extra)
    artifacts.save_model_artifact(output_dir, model, parent.tokenizer, config, metrics,
                                  metadata, target_tokenizer=target_tokenizer)
    return metrics
