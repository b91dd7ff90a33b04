"""The registered input formats: how each is recognised (``detect``) and opened (``open``).

Formats are tried in registration order and the first whose ``detect`` says yes opens the input, as
anndata's IO registry maps an encoding to its reader. A location that no format recognises is an
:class:`InputError` that lists the registered formats.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import InputError
from .base import InputReader
from .location import Location


@dataclass(frozen=True)
class Format:
    """One input format.

    Attributes
    ----------
    name
        Names the format in messages and in :func:`unregister`.
    expected
        What a user should give for it (e.g. ``'.h5ad'``), for the unknown-format error.
    detect
        ``detect(location) -> bool``: whether the :class:`Location` (a local path or fsspec URL that
        exists) is in this format. Only looks: names, a directory listing, the first bytes.
    open
        ``open(location, *, orientation, label_key, block_rows, tmp_dir) -> InputReader``. Errors about
        the file raised inside become :class:`InputError` naming it. ``orientation`` only matters to
        formats whose axes the file does not fix (CSV/TSV); the others ignore it.
    """

    name: str
    expected: str
    detect: Callable[[Location], bool]
    open: Callable[..., InputReader]


_FORMATS: dict[str, Format] = {}  # in registration order, which is the order of detection


def register(fmt: Format) -> Format:
    """Add a format, tried after those registered before it. Its name must be new."""
    if fmt.name in _FORMATS:
        raise ValueError(f"input format {fmt.name!r} is already registered")
    _FORMATS[fmt.name] = fmt
    return fmt


def unregister(name: str) -> Format:
    """Remove a registered format by name and return it."""
    if name not in _FORMATS:
        raise KeyError(f"no input format {name!r} is registered (registered: {', '.join(_FORMATS)})")
    return _FORMATS.pop(name)


def registered_formats() -> tuple[Format, ...]:
    """The registered formats, in the order they are tried."""
    return tuple(_FORMATS.values())


def detect_format(loc: Location) -> Format:
    """The first registered format whose ``detect`` recognises ``loc``; none is an :class:`InputError`."""
    for fmt in _FORMATS.values():
        if fmt.detect(loc):
            return fmt
    registered = ", ".join(f"{fmt.name} ({fmt.expected})" for fmt in _FORMATS.values())
    what = ": a directory that no registered format reads" if loc.isdir() else ""
    raise InputError(f"{loc.text}: unknown input format{what}; the registered formats are {registered}")
