"""One-line errors for every `keras-llm` command (a module of its own: the command modules
need it, and `keras_llm.cli` imports the command modules)."""
import functools

import click


def handle_errors(command):
    """Turns keras-llm's own errors into one-line click errors: `ConfigError` is bad usage
    (exit code 2), any other `KerasLLMError` a runtime failure (exit code 1)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from keras_llm.errors import ConfigError, KerasLLMError

        try:
            return command(*args, **kwargs)
        except ConfigError as e:
            raise click.UsageError(str(e))
        except KerasLLMError as e:
            raise click.ClickException(str(e))

    return wrapper
