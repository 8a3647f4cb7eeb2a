"""Errors that reach the user as one line and a non-zero exit."""


class ConfigError(Exception):
    """Bad input: the message names the key and the fix; no traceback is shown."""
