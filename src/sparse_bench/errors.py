"""Errors that reach the user as one line and a non-zero exit."""


class ConfigError(Exception):
    """Bad input: the message names the key and the fix; no traceback is shown (exit status 2)."""


class RunFailed(Exception):
    """A run that started and could not go on (e.g. a non-finite loss): one line, exit status 1.

    The run folder keeps its last good checkpoint and gets a results.json with ``status: failed``.
    """
