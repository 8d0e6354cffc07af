"""Errors that reach the user as one clean line (the CLI prints them without a traceback)."""


class KerasLLMError(Exception):
    """Base class: a problem the user can fix, described in one line."""


class ConfigError(KerasLLMError):
    """A config file or option has an unknown key or a bad value; the message names the key."""


class DataError(KerasLLMError):
    """Input data is missing, empty, undecodable or malformed; the message names file and line."""


class ArtifactError(KerasLLMError):
    """A model artifact directory is missing, incomplete or of the wrong kind."""
