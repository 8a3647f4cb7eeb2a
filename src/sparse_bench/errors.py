"""Errors that reach the user as one line and a non-zero exit."""


class ConfigError(Exception):
    """Bad input: the message names the key and the fix; no traceback is shown (exit status 2)."""


class MissingInput(ConfigError):
    """A value an experiment leaves to the user (``${sb.required:...}``) that was not given; `key`
    names it (provenance composes such a row with the run's own value for it)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGUSR1 (a cluster's scheduler stopping a job, or warning it of its time limit;
    the message is the signal's name), handled as Ctrl-C is: the run stops where it is, keeps its
    last finished epoch's checkpoint, and the same command resumes it (exit 128 + the signal's
    number: 143, 138)."""


class RunFailed(Exception):
    """A run that started and could not go on (e.g. a non-finite loss): one line, exit status 1.

    The run folder keeps its last good checkpoint and gets a results.json with ``status: failed``.
    """
