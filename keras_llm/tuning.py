"""Hyperparameter search over keras-llm configs with KerasTuner (`keras-llm tune`).

A search space is a YAML file (`configs/tune-*.yaml`, or any path) naming a base config, the
executor each trial runs (`target`), and the dotted config keys to search:

    name: tune-gpt-tiny
    base: gpt-tiny            # config name or path every trial starts from
    target: pretrain          # pretrain | finetune
    overrides:                # fixed dotted-key values for every trial (optional)
      train.eval_steps: 5
    objective: val_loss       # defaults for the command-line options (optional)
    steps_per_trial: 60
    parameters:
      train.learning_rate: {min: 1.0e-4, max: 1.0e-2, scale: log}
      train.warmup_steps: {min: 0, max: 20, step: 10}
      model.num_layers: {choice: [1, 2]}
      model.dropout: {min: 0.0, max: 0.2, step: 0.1, when: {model.num_layers: [2]}}
      train.batch_size: {fixed: 16}

A parameter is `{choice: [...]}`, a range `{min, max, scale: linear|log, step}` (with
`scale: log`, `step` is a factor, as in KerasTuner: 16..128 step 2 -> 16, 32, 64, 128), or
`{fixed: value}`; `when: {parent.key: [values]}` makes it conditional on a `choice`
parameter (KerasTuner's `conditional_scope`; several parents must all match). Everything is
checked before any trial runs; a combination that makes an invalid config (hidden size not
divisible by heads) is a failed trial whose reason is in the results table.

Each trial resolves its config (base + overrides + values, `train.steps` = the trial's
budget), runs the product's own executor (`pretrain(...)`) into
`OUTPUT_DIR/search/trial_<id>/model`, and reports the objective from its metrics. A search
with `target: finetune` starts from `pretrained` (a model artifact), searches the options of
`keras-llm finetune` as `finetune.<option>` keys, and its budget is `epochs`. Each trial
runs in a fresh (spawned) process, so whatever TensorFlow keeps from a trial goes with it
and the search process stays flat; `in_process=True` runs trials in the search process,
with `keras.backend.clear_session(free_memory=True)` and `gc` between them.
The search state is KerasTuner's (`OUTPUT_DIR/search/`), so rerunning the same command
resumes an interrupted search; a trial cut off mid-way resumes from its checkpoints.
When the search ends, `OUTPUT_DIR` holds:

    best_config.yaml    the best trial's config, accepted by `keras-llm pretrain --config`
                        (target finetune: the options, by `keras-llm finetune --config`)
    best_model          link to the best trial's model artifact
    results.csv/.json   every trial: id, status, objective, values, reason, who ran it
    search.json         what was searched (a rerun with a different search is refused)
    metadata.json       how it was made (written last)

Example:

>>> space = load_search_space("tune-gpt-tiny")
>>> space.parameters["train.learning_rate"].scale, space.parameters["model.dropout"].when
('log', {'model.num_layers': [2]})
>>> results = tune("tune-gpt-tiny", "runs/tune", max_trials=4)   # doctest: +SKIP
"""
import contextlib
import csv
import dataclasses
import difflib
import fcntl
import gc
import importlib
import io
import json
import logging
import math
import os
import resource
import shutil
import sys
import time
import traceback
import typing

import keras
import keras_tuner
import yaml
from keras_tuner.src import config as keras_tuner_config
from keras_tuner.src.distribute import utils as distribute_utils

from keras_llm import artifacts
from keras_llm.config import Config, _coerce, load_config, read_config_file
from keras_llm.errors import ArtifactError, ConfigError, KerasLLMError
from keras_llm.processes import exit_with_parent

logger = logging.getLogger(__name__)

ARTIFACT_TYPE = "keras_llm.TuningResult"
TUNERS = ("random", "bayesian", "hyperband")
SCALES = ("linear", "log")
SPACE_KEYS = ("name", "description", "base", "target", "pretrained", "overrides", "objective",
              "direction", "tuner", "max_trials", "steps_per_trial", "parameters")
SPEC_KEYS = ("choice", "min", "max", "scale", "step", "fixed", "when")
# target -> the executor a trial runs.
TARGETS = {
    "pretrain": "keras_llm.training.pretrain:pretrain",
    "finetune": "keras_llm.training.finetune:finetune",
}
# Keys that change what the tokenizer is trained on: while none is searched, the search
# trains one tokenizer and every trial loads it.
TOKENIZER_KEYS = ("data.source", "data.text_field", "data.tokenizer", "data.tokenizer_path",
                  "data.lowercase", "data.validation_fraction", "model.vocab_size", "train.seed")
SEARCH_DIR = "search"
TOKENIZER_DIR = "tokenizer"
BEST_CONFIG_FILE = "best_config.yaml"
BEST_MODEL_LINK = "best_model"
RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
SEARCH_FILE = "search.json"
RUN_FILE = "run.json"  # per trial: who ran it, its budget, time, memory, failure reason
MANAGED = (SEARCH_DIR, TOKENIZER_DIR, BEST_CONFIG_FILE, BEST_MODEL_LINK, RESULTS_CSV,
           RESULTS_JSON, SEARCH_FILE, artifacts.METADATA_FILE)


# ----------------------------------------------------------------------------- search space

@dataclasses.dataclass
class Parameter:
    """One searched config key: `kind` is choice, int, float or fixed."""

    key: str
    kind: str
    values: list = None  # choice
    min: float = None
    max: float = None
    scale: str = "linear"
    step: float = None
    fixed: typing.Any = None
    when: dict = dataclasses.field(default_factory=dict)  # parent key -> allowed values

    def declare(self, hp):
        """Registers this parameter on a `keras_tuner.HyperParameters`."""
        if self.kind == "choice":
            hp.Choice(self.key, self.values)
        elif self.kind == "fixed":
            hp.Fixed(self.key, self.fixed)
        elif self.kind == "int":
            hp.Int(self.key, self.min, self.max, step=self.step, sampling=self.scale)
        else:
            hp.Float(self.key, self.min, self.max, step=self.step, sampling=self.scale)


@dataclasses.dataclass
class SearchSpace:
    """A validated search space; see the module docstring for the YAML it comes from."""

    name: str
    base: str
    target: str
    parameters: dict  # key -> Parameter, parents before children
    overrides: dict = dataclasses.field(default_factory=dict)
    objective: str = None
    direction: str = None
    tuner: str = None
    pretrained: str = None  # finetune: the pretrained model artifact
    max_trials: int = None
    steps_per_trial: int = None
    description: str = ""
    where: str = "search space"

    def hyperparameters(self):
        """The space as `keras_tuner.HyperParameters`, conditions as conditional scopes."""
        hp = keras_tuner.HyperParameters()
        for parameter in self.parameters.values():
            with contextlib.ExitStack() as scopes:
                for parent, values in parameter.when.items():
                    scopes.enter_context(hp.conditional_scope(parent, values))
                parameter.declare(hp)
        return hp

    def trial_values(self, hp):
        """The active values of a trial's hyperparameters, as `{dotted.key: value}`."""
        return {key: hp.values[key] for key in self.parameters
                if key in hp.values and hp.is_active(key)}

    def resolve(self, values, steps=None):
        """What a trial runs with: for pretrain the `Config` (base + overrides + values,
        `train.steps` = `steps`), for finetune the `FinetuneOptions` (`epochs` = `steps`).
        Raises `ConfigError` naming the key when the combination is invalid."""
        overrides = {**self.overrides, **values}
        if self.target == "finetune":
            return finetune_options(overrides, epochs=steps)
        if steps is not None:
            overrides["train.steps"] = steps
        return load_config(self.base, overrides=overrides)

    @property
    def shares_tokenizer(self):
        return self.target == "pretrain" and not any(
            key in TOKENIZER_KEYS for key in self.parameters)

    def to_dict(self):
        return {
            "name": self.name, "base": self.base, "target": self.target,
            "overrides": self.overrides,
            "parameters": {key: _spec_to_dict(p) for key, p in self.parameters.items()},
        }


def finetune_options(values, epochs=None):
    """`FinetuneOptions` from `{"finetune.learning_rate": ..., ...}`, validated."""
    from keras_llm.training.finetune import FinetuneOptions

    fields = {key.split(".", 1)[1]: value for key, value in values.items()}
    if epochs is not None:
        fields["epochs"] = epochs
    return FinetuneOptions.from_dict(fields)


def target_key_types(target):
    """The keys a search space of `target` may search -> their type hints."""
    if target == "pretrain":
        return config_key_types()
    try:
        from keras_llm.training.finetune import FinetuneOptions
    except ImportError as e:
        raise ConfigError(f"target finetune is not available ({e})")
    hints = typing.get_type_hints(FinetuneOptions)
    return {f"finetune.{f.name}": hints[f.name] for f in dataclasses.fields(FinetuneOptions)}


def config_key_types():
    """Every dotted config key (`train.learning_rate`, ...) -> its type hint."""
    keys = {}

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[field.name]):
                walk(hints[field.name], f"{prefix}{field.name}.")
            else:
                keys[prefix + field.name] = hints[field.name]

    walk(Config, "")
    return keys


def load_search_space(name_or_path):
    """Reads and validates a search space (a `configs/tune-*.yaml` name or a path).

    Every error is one `ConfigError` line naming the file and the key.
    """
    values, where = read_config_file(name_or_path)
    return parse_search_space(values, where)


def parse_search_space(values, where="search space"):
    for key in values:
        if key not in SPACE_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}{_did_you_mean(key, SPACE_KEYS)}")
    target = values.get("target", "pretrain")
    if target not in TARGETS:
        raise ConfigError(f"{where}: target must be one of {', '.join(TARGETS)}; got {target!r}")
    if target == "pretrain" and not values.get("base"):
        raise ConfigError(f"{where}: base is required (the config every trial starts from)")
    if target == "finetune" and values.get("base"):
        raise ConfigError(f"{where}: base is for target pretrain; a finetune search starts "
                          f"from `pretrained` (a model artifact) and finetune.* keys")
    tuner = values.get("tuner")
    if tuner is not None:
        check_tuner(tuner, where)
    direction = values.get("direction")
    if direction is not None and direction not in ("min", "max"):
        raise ConfigError(f"{where}: direction must be min or max; got {direction!r}")
    for key in ("max_trials", "steps_per_trial"):
        if values.get(key) is not None:
            if _coerce(values[key], int, where, key) <= 0:
                raise ConfigError(f"{where}: {key} must be > 0, got {values[key]!r}")
    types = target_key_types(target)
    overrides = values.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: overrides must be a mapping of dotted config keys")
    for key, value in overrides.items():
        _check_key(key, types, where, "overrides")
        _coerce(value, types[key], where, f"overrides.{key}")
    specs = values.get("parameters")
    if not isinstance(specs, dict) or not specs:
        raise ConfigError(f"{where}: parameters must be a non-empty mapping of dotted config "
                          f"keys to {{choice: [...]}}, {{min, max, scale, step}} or {{fixed}}")
    parameters = {key: _parse_parameter(key, spec, types, where) for key, spec in specs.items()}
    _check_conditions(parameters, types, where)
    space = SearchSpace(
        name=values.get("name") or os.path.splitext(os.path.basename(where))[0],
        base=values.get("base"), target=target, parameters=_parents_first(parameters),
        overrides=dict(overrides), objective=values.get("objective"), direction=direction,
        tuner=tuner, pretrained=values.get("pretrained"), max_trials=values.get("max_trials"),
        steps_per_trial=values.get("steps_per_trial"),
        description=values.get("description") or "", where=where)
    try:
        space.resolve({})  # the base config and the overrides must load on their own
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if not str(e).startswith(where) else str(e))
    return space


def _check_key(key, types, where, section):
    if key not in types:
        sections = {k.split(".")[0] for k in types if "." in k}
        what = "a config section, not a key" if key in sections else "not a config key"
        raise ConfigError(f"{where}: {section}.{key} is {what}"
                          f"{_did_you_mean(key, list(types))}")


def _parse_parameter(key, spec, types, where):
    name = f"parameters.{key}"
    _check_key(key, types, where, "parameters")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: {name} must be {{choice: [...]}}, {{min, max, scale, step}} "
                          f"or {{fixed: value}}, got {spec!r}")
    for field in spec:
        if field not in SPEC_KEYS:
            raise ConfigError(f"{where}: {name} has unknown field {field!r}"
                              f"{_did_you_mean(field, SPEC_KEYS)}")
    hint = types[key]
    when = _parse_when(spec.get("when"), where, name)
    forms = [form for form in ("choice", "fixed", "min") if form in spec]
    if "max" in spec and "min" not in spec:
        forms.append("min")
    if len(forms) != 1:
        raise ConfigError(f"{where}: {name} must have exactly one of choice, fixed, or min/max")
    if forms[0] == "choice":
        choices = spec["choice"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: {name}.choice must be a non-empty list")
        choices = [_coerce(v, hint, where, name) for v in choices]
        if len(set(map(repr, choices))) != len(choices):
            raise ConfigError(f"{where}: {name}.choice repeats a value: {choices}")
        return Parameter(key, "choice", values=choices, when=when)
    if forms[0] == "fixed":
        return Parameter(key, "fixed", fixed=_coerce(spec["fixed"], hint, where, name),
                         when=when)
    return _parse_range(key, spec, hint, where, name, when)


def _parse_range(key, spec, hint, where, name, when):
    base_type = _base_type(hint)
    if base_type not in (int, float):
        raise ConfigError(f"{where}: {name} is not a number: give a choice or a fixed value")
    if "min" not in spec or "max" not in spec:
        raise ConfigError(f"{where}: {name} needs both min and max")
    low = _coerce(spec["min"], base_type, where, f"{name}.min")
    high = _coerce(spec["max"], base_type, where, f"{name}.max")
    scale = spec.get("scale", "linear")
    if scale not in SCALES:
        raise ConfigError(f"{where}: {name}.scale must be linear or log; got {scale!r}")
    if low > high:
        raise ConfigError(f"{where}: {name}: min ({low}) > max ({high})")
    if scale == "log" and low <= 0:
        raise ConfigError(f"{where}: {name}: scale log needs min > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        step = _coerce(step, base_type, where, f"{name}.step")
        if step <= 0 or (scale == "log" and step <= 1):
            bound = "> 1 (a factor, with scale log)" if scale == "log" else "> 0"
            raise ConfigError(f"{where}: {name}.step must be {bound}, got {step}")
    kind = "int" if base_type is int else "float"
    return Parameter(key, kind, min=low, max=high, scale=scale, step=step, when=when)


def _parse_when(when, where, name):
    if when is None:
        return {}
    if not isinstance(when, dict) or not when:
        raise ConfigError(f"{where}: {name}.when must map a parent key to its values, e.g. "
                          f"{{model.num_layers: [2, 3]}}")
    return {parent: list(v) if isinstance(v, list) else [v] for parent, v in when.items()}


def _check_conditions(parameters, types, where):
    for key, parameter in parameters.items():
        for parent, values in parameter.when.items():
            name = f"parameters.{key}.when.{parent}"
            if parent not in parameters:
                raise ConfigError(f"{where}: {name}: parent {parent!r} is not a searched "
                                  f"parameter{_did_you_mean(parent, list(parameters))}")
            source = parameters[parent]
            if source.kind not in ("choice", "fixed"):
                raise ConfigError(f"{where}: {name}: parent {parent!r} must be a choice (or "
                                  f"fixed) parameter")
            allowed = source.values if source.kind == "choice" else [source.fixed]
            hint = types[parent]
            for i, value in enumerate(values):
                values[i] = _coerce(value, hint, where, name)
                if values[i] not in allowed:
                    raise ConfigError(f"{where}: {name}: {values[i]!r} is not a value of "
                                      f"{parent} ({allowed})")


def _parents_first(parameters):
    ordered, visiting = {}, set()

    def visit(key):
        if key in ordered:
            return
        if key in visiting:
            raise ConfigError(f"parameters.{key}.when: conditions form a cycle")
        visiting.add(key)
        for parent in parameters[key].when:
            visit(parent)
        ordered[key] = parameters[key]

    for key in parameters:
        visit(key)
    return ordered


def _base_type(hint):
    if typing.get_origin(hint) is typing.Union:
        return next(t for t in typing.get_args(hint) if t is not type(None))
    return hint


def _spec_to_dict(parameter):
    fields = {"choice": {"choice": parameter.values}, "fixed": {"fixed": parameter.fixed}}.get(
        parameter.kind, {"min": parameter.min, "max": parameter.max, "scale": parameter.scale,
                         "step": parameter.step})
    return {**fields, **({"when": parameter.when} if parameter.when else {})}


def _did_you_mean(key, choices):
    close = difflib.get_close_matches(key, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_tuner(tuner, where="--tuner"):
    if tuner not in TUNERS:
        raise ConfigError(f"{where}: unknown tuner {tuner!r}; choose one of {', '.join(TUNERS)}"
                          f"{_did_you_mean(tuner, TUNERS)}")
    return tuner


def objective_direction(objective, direction=None):
    """`direction` when given; else min for losses and perplexities, max for the rest."""
    if direction is not None:
        if direction not in ("min", "max"):
            raise ConfigError(f"direction must be min or max; got {direction!r}")
        return direction
    lowered = objective.lower()
    return "min" if any(word in lowered for word in ("loss", "perplexity", "error")) else "max"


# ----------------------------------------------------------------------------- the tuner

def make_oracle(tuner, space, objective, direction, max_trials, seed=None,
                hyperband_max_epochs=3):
    """The KerasTuner oracle for `tuner` over `space`.

    Hyperband's epochs are fractions of the trial budget: a trial given `e` of
    `hyperband_max_epochs` epochs trains `e / hyperband_max_epochs` of `--steps-per-trial`.
    """
    check_tuner(tuner)
    goal = keras_tuner.Objective(objective, direction)
    common = dict(objective=goal, hyperparameters=space.hyperparameters(),
                  allow_new_entries=False, seed=seed,
                  # Invalid combinations are cheap failed trials, not a reason to stop.
                  max_consecutive_failed_trials=max(max_trials, 3))
    if tuner == "random":
        return keras_tuner.oracles.RandomSearchOracle(max_trials=max_trials, **common)
    if tuner == "bayesian":
        try:
            import sklearn  # noqa: F401  (KerasTuner's Gaussian process)
        except ImportError:
            raise ConfigError("--tuner bayesian needs scikit-learn (pip install scikit-learn)")
        return keras_tuner.oracles.BayesianOptimizationOracle(max_trials=max_trials, **common)
    oracle = keras_tuner.oracles.HyperbandOracle(max_epochs=hyperband_max_epochs, factor=3,
                                                 **common)
    oracle.max_trials = max_trials  # Hyperband has no cap of its own; --max-trials is one
    return oracle


class SearchTuner(keras_tuner.Tuner):
    """Runs each trial as a keras-llm training run; see `tune`.

    Args:
        oracle: from `make_oracle`.
        space: the `SearchSpace`.
        output_dir: the search's output directory (KerasTuner state in `search/`).
        steps_per_trial: the training budget of a trial (all of it for random and
            bayesian; Hyperband gives early rounds a fraction).
        tokenizer_path: a tokenizer every trial loads (None: each trial trains its own).
        patience: evaluations without improvement of the objective before a trial stops.
        executor_arguments: extra keyword arguments for the executor.
        in_process: run trials in this process (clear_session + gc between them) instead of
            a fresh child process each.
    """

    def __init__(self, oracle, space, output_dir, steps_per_trial, tokenizer_path=None,
                 patience=None, executor_arguments=None, command=None, overwrite=False,
                 in_process=False):
        self.space = space
        self.steps_per_trial = steps_per_trial
        self.tokenizer_path = tokenizer_path
        self.patience = patience
        self.executor_arguments = executor_arguments or {}
        self.command = command
        self._reasons = {}
        self._child_usage = None
        self.in_process = in_process
        self.executor = load_executor(space.target)
        if patience and "callbacks" not in _argument_names(self.executor):
            logger.info("%s takes no callbacks: trials train their whole budget (no early "
                        "stopping)", TARGETS[space.target])
        super().__init__(oracle, directory=output_dir, project_name=SEARCH_DIR,
                         overwrite=overwrite)

    def trial_steps(self, hp):
        epochs = hp.values.get("tuner/epochs")
        if epochs is None:
            return self.steps_per_trial
        fraction = epochs / self.oracle.max_epochs
        return max(1, math.ceil(self.steps_per_trial * fraction))

    def run_trial(self, trial, *args, **kwargs):
        trial_dir = self.get_trial_dir(trial.trial_id)
        finished = self._finished_metrics(trial_dir)
        if finished is not None:
            # Killed after the trial's record was written and before the oracle saved the
            # trial as ended: the oracle hands it out again. Report it as it was; its
            # record (who ran it, time, memory) stays.
            return _reported_metrics(finished, self.oracle.objective.name)
        steps = self.trial_steps(trial.hyperparameters)
        values = self.space.trial_values(trial.hyperparameters)
        record = {"trial_id": trial.trial_id, "tuner_id": self.tuner_id, "pid": os.getpid(),
                  "steps": steps, "values": values, "started": time.time()}
        try:
            try:
                config = self.space.resolve(values, steps=steps)
            except ConfigError as e:
                raise keras_tuner.errors.FailedTrialError(_reason(e))
            metrics = self._run_executor(config, os.path.join(trial_dir, "model"))
            record["status"] = "COMPLETED"
            return _reported_metrics(metrics, self.oracle.objective.name)
        except keras_tuner.errors.FailedTrialError as e:
            record.update(status="FAILED", reason=str(e))
            raise
        except Exception as e:
            record.update(status="FAILED", reason=_reason(e), traceback=traceback.format_exc())
            raise
        finally:
            # Flat memory across trials: drop the model, its graphs and tf.data state.
            keras.backend.clear_session(free_memory=True)
            gc.collect()
            record.update(seconds=round(time.time() - record.pop("started"), 2),
                          **memory_usage())
            if self._child_usage:  # the trial's own process
                record["trial_peak_rss_mb"] = self._child_usage["peak_rss_mb"]
            self._child_usage = None
            artifacts.write_json(os.path.join(trial_dir, RUN_FILE), record)
            self._reasons[trial.trial_id] = record.get("reason")

    @staticmethod
    def _finished_metrics(trial_dir):
        """The metrics of a trial that completed before an interruption, else None."""
        record_path = os.path.join(trial_dir, RUN_FILE)
        if not (os.path.exists(record_path)
                and artifacts.read_json(record_path).get("status") == "COMPLETED"):
            return None
        return _completed_metrics(os.path.join(trial_dir, "model"))

    def on_trial_end(self, trial):
        # KerasTuner shows trial.message (a whole traceback); show the one-line reason
        # instead (the traceback stays in the trial's run.json).
        if self._reasons.get(trial.trial_id):
            trial.message = self._reasons[trial.trial_id]
        super().on_trial_end(trial)

    def _run_executor(self, config, model_dir):
        metrics = _completed_metrics(model_dir)  # finished before an interruption
        if metrics is not None:
            return metrics
        arguments = dict(
            tokenizer_path=self.tokenizer_path, patience=self.patience,
            objective=self.oracle.objective.name, direction=self.oracle.objective.direction,
            command=self.command, **self.executor_arguments)
        if self.in_process:
            with _trial_errors():
                metrics, usage = run_executor(self.space.target, config, model_dir,
                                              **arguments), {}
        else:
            metrics, usage = run_in_child(self.space.target, config, model_dir, arguments)
        self._child_usage = usage
        # The trial is finished: its resume checkpoints only take disk space now.
        shutil.rmtree(os.path.join(model_dir, "checkpoints"), ignore_errors=True)
        return metrics

    def load_model(self, trial):
        return artifacts.load_model_artifact(
            os.path.join(self.get_trial_dir(trial.trial_id), "model")).model

    def save_model(self, trial_id, model, step=0):
        """Trials save their own artifacts."""

    def search(self, *args, **kwargs):
        if distribute_utils.is_chief_oracle():
            self.save()
            serve_oracle(self.oracle)
            return
        # KerasTuner prints every failed trial's traceback; run.json keeps it instead.
        debug, keras_tuner_config.DEBUG = keras_tuner_config.DEBUG, False
        try:
            super().search(*args, **kwargs)
        finally:
            keras_tuner_config.DEBUG = debug



def _completed_metrics(model_dir):
    """The metrics of the complete model artifact in `model_dir`, else None."""
    if not artifacts.is_complete(model_dir):
        return None
    return artifacts.read_json(os.path.join(model_dir, artifacts.METRICS_FILE))


def run_executor(target, resolved, model_dir, tokenizer_path=None, patience=None,
                 objective="val_loss", direction="min", command=None, pretrained=None):
    """Runs one trial's training: `pretrain(config, ...)` or `finetune(options, ...)`.

    Returns the executor's metrics; its `ConfigError`s and other keras-llm errors propagate.
    """
    executor = load_executor(target)
    if target == "finetune":
        from keras_llm.training.finetune import EARLY_STOPPING_METRICS

        metric = objective[len("val_"):]
        if patience and metric in EARLY_STOPPING_METRICS[resolved.task]:
            resolved = dataclasses.replace(resolved, early_stopping_metric=metric,
                                           patience=patience)
        return executor(resolved, pretrained, model_dir, overwrite=True, command=command,
                        verbose=0)
    arguments = {"verbose": 0, "command": command, "tokenizer_path": tokenizer_path}
    if patience:
        arguments["callbacks"] = [keras.callbacks.EarlyStopping(
            monitor=objective, mode=direction, patience=patience)]
    accepted = _argument_names(executor)
    return executor(resolved, model_dir, **{name: value for name, value in arguments.items()
                                             if name in accepted and value is not None})


@contextlib.contextmanager
def _trial_errors():
    """keras-llm errors -> KerasTuner's: a bad combination fails the trial (e.g. a batch size
    the corpus is too small for); data or artifact problems fail every trial, so stop."""
    try:
        yield
    except ConfigError as e:
        raise keras_tuner.errors.FailedTrialError(_reason(e))
    except KerasLLMError as e:
        raise keras_tuner.errors.FatalError(str(e))


OUTCOME_FILE = ".outcome.json"


def run_in_child(target, resolved, model_dir, arguments):
    """`run_executor` in a fresh (spawned) process: whatever a trial leaves in memory (Keras
    and TensorFlow graphs, tf.data state, allocator fragmentation) goes with the process.
    Returns `(metrics, the child's memory usage)`."""
    import multiprocessing

    os.makedirs(model_dir, exist_ok=True)
    outcome_path = os.path.join(model_dir, OUTCOME_FILE)
    if os.path.exists(outcome_path):
        os.remove(outcome_path)
    process = multiprocessing.get_context("spawn").Process(
        target=_child_main,
        args=(target, resolved, model_dir, arguments, outcome_path, os.getpid()))
    process.start()
    process.join()
    if not os.path.exists(outcome_path):
        raise RuntimeError(f"the trial process exited with code {process.exitcode} "
                           f"(killed, or out of memory?)")
    outcome = artifacts.read_json(outcome_path)
    os.remove(outcome_path)
    if outcome["status"] == "failed":
        raise keras_tuner.errors.FailedTrialError(outcome["message"])
    if outcome["status"] == "fatal":
        raise keras_tuner.errors.FatalError(outcome["message"])
    if outcome["status"] == "error":
        logger.warning("trial process failed:\n%s", outcome["traceback"])
        raise RuntimeError(outcome["message"])
    return outcome["metrics"], outcome["memory"]


def _child_main(target, resolved, model_dir, arguments, outcome_path, parent_pid):
    exit_with_parent(parent_pid)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        outcome = {"status": "ok", "metrics": run_executor(target, resolved, model_dir,
                                                           **arguments)}
    except ConfigError as e:
        outcome = {"status": "failed", "message": _reason(e)}
    except KerasLLMError as e:
        outcome = {"status": "fatal", "message": str(e)}
    except Exception as e:  # noqa: BLE001  (reported to the search, which records it)
        outcome = {"status": "error", "message": _reason(e), "traceback": traceback.format_exc()}
    artifacts.write_json(outcome_path, {**outcome, "memory": memory_usage()})


def load_executor(target):
    """The function a trial of `target` runs (`pretrain`, `finetune`)."""
    module_name, _, name = TARGETS[target].partition(":")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"target {target}: {TARGETS[target]} is not available ({e})")


def _argument_names(function):
    import inspect

    return set(inspect.signature(function).parameters)


def _reason(error):
    return str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__


def _reported_metrics(metrics, objective):
    numbers = {key: float(value) for key, value in metrics.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)
               and math.isfinite(value)}
    if objective not in metrics:
        raise keras_tuner.errors.FatalError(
            f"objective {objective!r} is not a metric of this target; it logs "
            f"{', '.join(sorted(numbers))}")
    numbers[objective] = float(metrics[objective])  # NaN stays NaN: KerasTuner fails it
    return numbers


def memory_usage():
    """This process's resident memory now and at its peak, in MiB (Linux)."""
    usage = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        usage["rss_mb"] = round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError):
        pass
    return usage


def serve_oracle(oracle, poll_seconds=0.2):
    """Serves `oracle` to the workers until the search is over (the chief's whole job).

    KerasTuner's own `oracle_chief.start_server` does the same but checks for the end every
    20 s once a worker has been told to stop; this polls every `poll_seconds`.
    """
    from concurrent import futures

    import grpc
    from keras_tuner.src import protos
    from keras_tuner.src.distribute.oracle_chief import OracleServicer, exit_chief

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = OracleServicer(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    if not server.add_insecure_port(address):
        raise ArtifactError(f"cannot serve the search oracle on {address}")
    server.start()
    logger.info("chief: serving the search oracle on %s", address)
    try:
        while not (servicer.stop_triggered and exit_chief(oracle)):
            time.sleep(poll_seconds)
    finally:
        server.stop(grace=1)


def distributed_environment(role, tuner_id=None, oracle_ip="127.0.0.1", oracle_port=None):
    """The KERASTUNER_* variables for `--role chief|worker` (KerasTuner reads them)."""
    if role not in ("chief", "worker"):
        raise ConfigError(f"--role must be chief or worker; got {role!r}")
    if not oracle_port:
        raise ConfigError("--role needs --oracle-port (the chief's port, the same for all)")
    if role == "worker" and not tuner_id:
        raise ConfigError("--role worker needs --tuner-id (a name unique among the workers)")
    if role == "worker" and "chief" in tuner_id:
        raise ConfigError(f"--tuner-id {tuner_id!r}: a worker's id must not contain 'chief'")
    return {"KERASTUNER_TUNER_ID": "chief" if role == "chief" else tuner_id,
            "KERASTUNER_ORACLE_IP": oracle_ip, "KERASTUNER_ORACLE_PORT": str(oracle_port)}


def current_role():
    """chief, worker, or None (a search in one process), from the KERASTUNER_* variables."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return None
    return "chief" if "chief" in os.environ.get("KERASTUNER_TUNER_ID", "") else "worker"


# ----------------------------------------------------------------------------- the search

def tune(search_space, output_dir, tuner=None, max_trials=None, objective=None,
         direction=None, steps_per_trial=None, restart=False, seed=1337, patience=2,
         pretrained=None, data=None, hyperband_max_epochs=3, in_process=False, command=None,
         verbose=0):
    """Searches `search_space` with KerasTuner; writes the tuning artifact to `output_dir`.

    Rerunning with the same arguments resumes an interrupted search; `restart=True` starts
    over. With KERASTUNER_* set (see `distributed_environment`) this process is the chief
    (serves the oracle, then writes the results) or a worker (runs trials).

    Args:
        search_space: a `configs/tune-*.yaml` name, a path, or a `SearchSpace`.
        output_dir: where the search state, the trials and the results go.
        tuner: random, bayesian or hyperband (default: the space's, else random).
        max_trials: trials in the whole search (default: the space's, else 10).
        objective: the metric to optimize, any metric the executor reports (default: the
            space's, else val_loss); `direction` min or max (default: inferred).
        steps_per_trial: training steps per trial (default: the space's, else the base
            config's train.steps).
        seed: seed of the oracle's sampling.
        patience: evaluations without improvement before a trial stops early (None: never).
        pretrained: (finetune target) the pretrained model artifact.
        data: overrides the trials' data source.
        hyperband_max_epochs: Hyperband's budget levels (see `make_oracle`).
        in_process: run the trials in this process, with `clear_session` and `gc` between
            them, instead of a fresh process each (which keeps this process's memory flat
            whatever a trial leaves behind, for a few seconds of start-up per trial).
        command: recorded in metadata (default: sys.argv).
        verbose: KerasTuner's per-trial display (0 silent).

    Returns:
        The results dict written to `results.json` (None on a worker).
    """
    space = search_space if isinstance(search_space, SearchSpace) else \
        load_search_space(search_space)
    if data is not None:
        key = "finetune.data" if space.target == "finetune" else "data.source"
        space = dataclasses.replace(space, overrides={**space.overrides, key: data})
    settings = _settings(space, tuner, max_trials, objective, direction, steps_per_trial)
    executor_arguments = {}
    if space.target == "finetune":
        pretrained = pretrained or space.pretrained
        executor_arguments = _finetune_arguments(pretrained)
    role = current_role()
    if restart and role != "worker":
        _clear(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    if role != "worker":
        _check_same_search(output_dir, space, settings)
    tokenizer_path = None
    if space.shares_tokenizer and role != "chief":
        tokenizer_path = shared_tokenizer(space, output_dir)
    oracle = make_oracle(settings["tuner"], space, settings["objective"],
                         settings["direction"], settings["max_trials"], seed=seed,
                         hyperband_max_epochs=hyperband_max_epochs)
    search = SearchTuner(
        oracle, space, output_dir, settings["steps_per_trial"], tokenizer_path=tokenizer_path,
        patience=patience, executor_arguments=executor_arguments, in_process=in_process,
        command=list(command if command is not None else sys.argv))
    try:
        search.search(verbose=verbose)
    except keras_tuner.errors.FatalError as e:
        raise KerasLLMError(_reason(e))
    except RuntimeError as e:  # KerasTuner's "too many consecutive failures"
        raise KerasLLMError(f"search stopped: {str(e).splitlines()[0]}")
    if role == "worker":
        return None
    return write_results(output_dir, space, settings, command=command, pretrained=pretrained)


def _settings(space, tuner, max_trials, objective, direction, steps_per_trial):
    objective = objective or space.objective or "val_loss"
    settings = {
        "tuner": check_tuner(tuner or space.tuner or "random"),
        "max_trials": int(max_trials or space.max_trials or 10),
        "objective": objective,
        "direction": objective_direction(objective, direction or space.direction),
        "steps_per_trial": int(steps_per_trial or space.steps_per_trial or _base_budget(space)),
    }
    if settings["max_trials"] <= 0 or settings["steps_per_trial"] <= 0:
        raise ConfigError("--max-trials and --steps-per-trial must be > 0")
    return settings


def _base_budget(space):
    """A trial's default budget: the base's train.steps (pretrain) or epochs (finetune)."""
    resolved = space.resolve({})
    return resolved.epochs if space.target == "finetune" else resolved.train.steps


def _finetune_arguments(pretrained):
    if not pretrained:
        raise ConfigError("target finetune needs a pretrained model artifact (--pretrained or "
                          "`pretrained:` in the search space)")
    if not artifacts.is_complete(pretrained):
        raise ArtifactError(f"{pretrained}: not a finished keras-llm model artifact")
    return {"pretrained": pretrained}


def _clear(output_dir):
    for name in MANAGED:
        path = os.path.join(output_dir, name)
        if os.path.islink(path) or os.path.isfile(path):
            os.remove(path)
        elif os.path.isdir(path):
            shutil.rmtree(path)


def _check_same_search(output_dir, space, settings):
    """A rerun resumes only the same search (more trials are fine); else `--restart`."""
    path = os.path.join(output_dir, SEARCH_FILE)
    record = {"space": space.to_dict(), "parameter_keys": list(space.parameters),
              **{k: v for k, v in settings.items() if k != "max_trials"}}
    record = json.loads(json.dumps(record, default=str))
    if os.path.exists(path):
        saved = artifacts.read_json(path)
        differing = sorted(key for key in set(saved) | set(record)
                           if saved.get(key) != record.get(key))
        if differing:
            raise ConfigError(
                f"{output_dir} holds a different search (differs in {', '.join(differing)}); "
                f"pass --restart to start over or choose another --output-dir")
    elif os.path.isdir(os.path.join(output_dir, SEARCH_DIR)):
        raise ConfigError(f"{output_dir}/{SEARCH_DIR} exists but {SEARCH_FILE} does not; "
                          f"pass --restart to start over")
    else:
        artifacts.write_json(path, record)


@contextlib.contextmanager
def _locked(path):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def shared_tokenizer(space, output_dir):
    """Trains the search's tokenizer once (under a lock: workers share it); returns its dir."""
    from keras_llm.training.pretrain import prepare_data

    path = os.path.join(output_dir, TOKENIZER_DIR)
    with _locked(os.path.join(output_dir, ".tokenizer.lock")):
        if not os.path.isdir(path):
            *_, tokenizer = prepare_data(space.resolve({}))
            partial = path + f".partial-{os.getpid()}"
            tokenizer.save(partial)
            os.replace(partial, path)
    return path


# ----------------------------------------------------------------------------- results

def collect_trials(output_dir):
    """Every trial of the search in `output_dir` (running or finished), in id order."""
    from keras_tuner.src.engine.trial import Trial

    search_dir = os.path.join(output_dir, SEARCH_DIR)
    trials = []
    for name in sorted(os.listdir(search_dir)) if os.path.isdir(search_dir) else []:
        trial_file = os.path.join(search_dir, name, "trial.json")
        if not name.startswith("trial_") or not os.path.exists(trial_file):
            continue
        trial = Trial.load(trial_file)
        run_path = os.path.join(search_dir, name, RUN_FILE)
        run = artifacts.read_json(run_path) if os.path.exists(run_path) else {}
        metrics = {metric: trial.metrics.get_last_value(metric)
                   for metric in trial.metrics.metrics}
        values = {k: v for k, v in trial.hyperparameters.values.items()
                  if not k.startswith("tuner/") and trial.hyperparameters.is_active(k)}
        reason = run.get("reason") or (trial.message.strip().splitlines()[-1]
                                       if trial.message else None)
        trials.append({
            "trial_id": trial.trial_id, "status": trial.status, "score": trial.score,
            "values": values, "metrics": metrics,
            "steps": run.get("steps"), "tuner_id": run.get("tuner_id"),
            "seconds": run.get("seconds"), "rss_mb": run.get("rss_mb"),
            "peak_rss_mb": run.get("peak_rss_mb"),
            "reason": reason if trial.status != "COMPLETED" else None,
            "model_dir": os.path.join(search_dir, name, "model"),
        })
    return trials


def best_trial(trials, direction):
    done = [t for t in trials if t["status"] == "COMPLETED" and t["score"] is not None
            and math.isfinite(t["score"])]
    if not done:
        return None
    return (min if direction == "min" else max)(done, key=lambda t: t["score"])


def write_results(output_dir, space, settings, command=None, pretrained=None):
    """Writes results.csv/.json, best_config.yaml, best_model and metadata.json (last)."""
    trials = collect_trials(output_dir)
    best = best_trial(trials, settings["direction"])
    results = {
        "search_space": space.name, "base": space.base, "target": space.target,
        **settings, "best_trial": best["trial_id"] if best else None,
        "trials": [{k: v for k, v in t.items() if k != "model_dir"} for t in trials],
    }
    artifacts.write_json(os.path.join(output_dir, RESULTS_JSON), results)
    artifacts.atomic_write(os.path.join(output_dir, RESULTS_CSV),
                           results_csv(trials, list(space.parameters), settings["objective"]))
    if best is None:
        raise KerasLLMError(f"no trial completed ({len(trials)} failed); reasons are in "
                            f"{os.path.join(output_dir, RESULTS_CSV)}")
    best_config = space.resolve(best["values"])  # the base's budget, not the trial's
    header = (f"# {space.name}: best of {len(trials)} trials (trial {best['trial_id']}, "
              f"{settings['objective']} {best['score']:.4f})\n")
    if space.target == "finetune":  # the options of `keras-llm finetune`, by name
        values = dataclasses.asdict(best_config)
        header += (f"# keras-llm finetune --model {pretrained} --config "
                   f"{os.path.join(output_dir, BEST_CONFIG_FILE)}\n"
                   f"# (the same as: keras-llm finetune --model {pretrained} "
                   f"{finetune_flags(values)})\n")
        metadata_config = artifacts.read_json(os.path.join(
            best["model_dir"], artifacts.METADATA_FILE))["config"]
    else:
        best_config = dataclasses.replace(best_config, name=f"{best_config.name}-tuned")
        values = metadata_config = best_config.to_dict()
    artifacts.atomic_write(os.path.join(output_dir, BEST_CONFIG_FILE),
                           header + yaml.safe_dump(values, sort_keys=False))
    link = os.path.join(output_dir, BEST_MODEL_LINK)
    if os.path.islink(link) or os.path.exists(link):
        os.remove(link) if os.path.islink(link) else shutil.rmtree(link)
    os.symlink(os.path.relpath(best["model_dir"], output_dir), link)
    metadata = artifacts.make_metadata(
        ARTIFACT_TYPE, metadata_config, parent=pretrained, command=command,
        extra={"search": {"space": space.to_dict(), **settings},
               "best_trial": best["trial_id"], "best_objective": best["score"],
               "trials": len(trials)})
    artifacts.write_json(os.path.join(output_dir, artifacts.METADATA_FILE), metadata)
    return results


def finetune_flags(options):
    """The `keras-llm finetune` flags for the `FinetuneOptions` values that differ from the
    defaults."""
    from keras_llm.cli import main
    from keras_llm.training.finetune import FinetuneOptions

    flags = {p.name for p in main.commands["finetune"].params} if "finetune" in main.commands \
        else set(options)
    defaults = dataclasses.asdict(FinetuneOptions())

    def flag(key, value):
        name = key.replace("_", "-")
        if isinstance(value, bool):  # --xla / --no-xla
            return f"--{name}" if value else f"--no-{name}"
        return f"--{name} {value}"

    return " ".join(flag(key, value) for key, value in options.items()
                    if key in flags and value != defaults[key])


def results_csv(trials, parameter_keys, objective):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    columns = ["trial_id", "status", objective, *parameter_keys, "steps", "tuner_id",
               "seconds", "rss_mb", "reason"]
    writer.writerow(columns)
    for t in trials:
        writer.writerow([t["trial_id"], t["status"], t["metrics"].get(objective),
                         *[t["values"].get(k) for k in parameter_keys], t["steps"],
                         t["tuner_id"], t["seconds"], t["rss_mb"], t["reason"]])
    return out.getvalue()


def summary_table(output_dir):
    """The results of the search in `output_dir` as a text table, best trial marked `*`."""
    search_file = os.path.join(output_dir, SEARCH_FILE)
    if not os.path.exists(search_file):
        raise ArtifactError(f"{output_dir}: no search here ({SEARCH_FILE} is missing)")
    record = artifacts.read_json(search_file)
    objective, direction = record["objective"], record["direction"]
    keys = record.get("parameter_keys") or sorted(record["space"]["parameters"])
    trials = collect_trials(output_dir)
    best = best_trial(trials, direction)
    header = ["trial", "status", f"{objective} ({direction})", *keys, "steps", "seconds"]
    rows = []
    for t in trials:
        score = t["metrics"].get(objective)
        rows.append([
            t["trial_id"] + ("*" if best and t["trial_id"] == best["trial_id"] else ""),
            t["status"], "-" if score is None else f"{score:.4f}",
            *[_format_value(t["values"].get(k)) for k in keys],
            "-" if t["steps"] is None else str(t["steps"]),
            "-" if t["seconds"] is None else f"{t['seconds']:.1f}"])
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip()
             for row in [header] + rows]
    done = sum(t["status"] == "COMPLETED" for t in trials)
    lines.append(f"{len(trials)} trials ({done} completed) of {record['space']['name']} with "
                 f"{record['tuner']}; best: "
                 + (f"trial {best['trial_id']} {objective} {best['score']:.4f}" if best
                    else "none yet"))
    for t in trials:
        if t["reason"]:
            lines.append(f"trial {t['trial_id']} {t['status'].lower()}: {t['reason']}")
    return "\n".join(lines)


def _format_value(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
