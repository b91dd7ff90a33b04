"""Errors a user can cause. The CLI prints their message alone and exits with code 2."""

import errno

#: OS errors that the machine causes (full disk, permissions, read-only or missing quota): the CLI shows them as
#: one line naming the path, and no reader mistakes them for a damaged file
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT})


def shown(text) -> str:
    """A user's value as a message shows it: as typed when printable, else quoted with its escapes (a newline or
    another control character would break the one-line error)."""
    text = str(text)
    return text if text.isprintable() else repr(text)


class InputError(Exception):
    """Bad input, bad option or a run directory that cannot be used. The message names the file and the problem."""


class MissingDependencyError(InputError):
    """A feature asked for an optional package that is not installed."""
