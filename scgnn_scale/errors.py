"""Errors a user can cause. The CLI prints their message alone and exits with code 2."""


class InputError(Exception):
    """Bad input, bad option or a run directory that cannot be used. The message names the file and the problem."""


class MissingDependencyError(InputError):
    """A feature asked for an optional package that is not installed."""
