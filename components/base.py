"""Component declarations, TFX-style: typed inputs, outputs and parameters, plus the name of
the executor function that does the work (which lives in `keras_llm/`, never here).

An artifact is a directory. The pipeline runner (`keras_llm.pipeline.runner`) calls an
executor with keyword arguments only:

    executor(**{input: artifact_dir}, **{output: fresh_empty_dir}, **{parameter: value})

so an executor is an ordinary keras-llm function whose argument names match the
declaration, e.g. `pretrain(config, output_dir)`. The executor is named by a
`"module:function"` string and imported only when the component runs, so declaring a
component never imports TensorFlow, and a missing executor is an error of that component
alone.

Example:

>>> shout = Component(
...     name="shout",
...     inputs={"text_dir": "example.Text"},
...     outputs={"output_dir": "example.Text"},
...     parameters=[Parameter("times", int, default=2, help="repetitions")],
...     executor="example.module:shout")
>>> shout.check_parameters({"times": 3}, where="pipeline.yaml")
{'times': 3}
"""
import dataclasses
import difflib
import importlib
import inspect
import typing

# `_coerce` is the one place YAML scalars are checked and converted; reused, not copied.
from keras_llm.config import Config, _coerce, load_config
from keras_llm.errors import ConfigError

# Artifact types: the `artifact_type` an executor writes into its metadata.json.
PRETRAINED_MODEL = "keras_llm.PretrainedModel"
FINETUNED_MODEL = "keras_llm.FinetunedModel"
TUNING_RESULT = "keras_llm.TuningResult"
EXPORTED_MODEL = "keras_llm.ExportedModel"

REQUIRED = object()
# Parameter types: Python scalars, containers, and CONFIG, a keras-llm config given as a
# name/path or as {base: NAME_OR_PATH, overrides: {dotted.key: value}}; the executor gets
# the validated `Config`, and the cache sees its resolved values (so editing the file
# behind a config name reruns the component).
CONFIG = "config"
PARAMETER_TYPES = (int, float, str, bool, list, dict, CONFIG)


@dataclasses.dataclass(frozen=True)
class Parameter:
    """A typed component parameter; `default=REQUIRED` makes it mandatory."""

    name: str
    type: typing.Any
    default: typing.Any = REQUIRED
    help: str = ""

    def __post_init__(self):
        if self.type not in PARAMETER_TYPES:
            raise TypeError(f"parameter {self.name}: type must be one of {PARAMETER_TYPES}")

    def check(self, value, where, key):
        """Returns `value` validated (ints made floats, configs made `Config`); errors read
        `"{where}: {key} must be ..."`."""
        if value is None and self.default is None:
            return None
        if self.type == CONFIG:
            return resolve_config(value, where, key)
        if self.type in (list, dict):
            if not isinstance(value, self.type):
                kind = "a list" if self.type is list else "a mapping"
                raise ConfigError(f"{where}: {key} must be {kind}, got {value!r}")
            return value
        return _coerce(value, self.type, where, key)


def resolve_config(value, where, key):
    """A CONFIG parameter's value -> validated `Config` (errors name the key)."""
    if isinstance(value, str):
        base, overrides = value, {}
    elif isinstance(value, dict) and "base" in value and set(value) <= {"base", "overrides"}:
        base, overrides = value["base"], value.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"{where}: {key}.overrides must be a mapping of dotted keys")
    else:
        raise ConfigError(f"{where}: {key} must be a config name/path or "
                          f"{{base: NAME, overrides: {{dotted.key: value}}}}, got {value!r}")
    try:
        return load_config(base, overrides=overrides)
    except ConfigError as e:
        raise ConfigError(f"{where}: {key}: {e}")


def parameter_to_json(value):
    """A parameter value as plain JSON data (for the metadata store and the cache key)."""
    return value.to_dict() if isinstance(value, Config) else value


@dataclasses.dataclass(frozen=True)
class Component:
    """A component declaration.

    Args:
        name: the component's name, used in pipeline configs (`component: pretrain`).
        inputs: input name -> accepted artifact type, or a tuple of accepted types.
        outputs: output name -> artifact type the executor writes.
        parameters: the typed `Parameter`s the executor takes.
        executor: `"module:function"`, imported when the component runs (a callable is
            accepted too, for tests and notebooks).
        description: one line for `keras-llm pipeline` listings.
    """

    name: str
    inputs: dict
    outputs: dict
    parameters: list
    executor: typing.Any
    description: str = ""

    def accepted_types(self, input_name):
        accepted = self.inputs[input_name]
        return (accepted,) if isinstance(accepted, str) else tuple(accepted)

    @property
    def executor_name(self):
        if isinstance(self.executor, str):
            return self.executor
        return f"{self.executor.__module__}:{self.executor.__qualname__}"

    def check_parameters(self, values, where, prefix="parameters"):
        """Validates a pipeline's `parameters` mapping; returns it complete, with defaults.

        Errors are one line: `"{where}: {prefix}.NAME must be an integer, got 'x'"`.
        """
        values = {} if values is None else values
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: {prefix} must be a mapping, got {values!r}")
        declared = {p.name: p for p in self.parameters}
        for key in values:
            if key not in declared:
                close = difflib.get_close_matches(key, declared, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{where}: unknown parameter {prefix}.{key} of component "
                                  f"{self.name!r}{hint}; it takes {', '.join(declared)}")
        checked = {}
        for name, parameter in declared.items():
            if name in values:
                checked[name] = parameter.check(values[name], where, f"{prefix}.{name}")
            elif parameter.default is REQUIRED:
                raise ConfigError(f"{where}: {prefix}.{name} is required by component "
                                  f"{self.name!r} ({parameter.help})")
            else:
                checked[name] = parameter.default
        return checked

    def resolve_executor(self, arguments):
        """Imports the executor and checks it accepts `arguments`; raises `ExecutorError`."""
        function = self.executor
        if isinstance(function, str):
            module_name, _, attribute = function.partition(":")
            try:
                function = getattr(importlib.import_module(module_name), attribute)
            except (ImportError, AttributeError) as e:
                raise ExecutorError(f"executor {self.executor} is not available ({e})")
        parameters = inspect.signature(function).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        unknown = [] if takes_any else [name for name in arguments if name not in parameters]
        missing = [name for name, p in parameters.items() if name not in arguments and
                   p.default is p.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if unknown or missing:
            problems = ([f"it takes no argument {', '.join(unknown)}"] if unknown else []) + \
                ([f"it requires {', '.join(missing)}"] if missing else [])
            raise ExecutorError(f"executor {self.executor_name} does not match the declaration "
                                f"of component {self.name!r}: {'; '.join(problems)}")
        return function


class ExecutorError(Exception):
    """A component's executor cannot be imported or called as declared."""
