"""Typed errors. The CLI maps :class:`UsageError` to exit code 2 and :class:`EsmmError` to 1."""


class EsmmError(Exception):
    """A runtime failure with a message meant for the user (no traceback needed)."""


class UsageError(EsmmError):
    """Bad command-line usage or configuration (CLI exit code 2)."""


class ConfigError(UsageError):
    """A configuration file or override is invalid."""


class DataError(EsmmError):
    """Input data is malformed: the message names the file, column or line."""


class ArgumentError(UsageError, TypeError):
    """A Python API argument of the wrong type or form (also a :class:`TypeError`)."""
