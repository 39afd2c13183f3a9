"""Errors shared by the package: user-facing ones carry one clear line."""


class UsageError(Exception):
    """Bad user input (file, flag, preset): the CLI prints the message and exits with status 2."""


class TraceError(UsageError):
    """A routing trace is missing or malformed; the message names the file, the array and the problem."""
