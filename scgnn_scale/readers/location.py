"""Where an input lives: a local path or an fsspec URL, with the few operations the readers need."""

from __future__ import annotations

import io
import os
from contextlib import contextmanager

from ..errors import InputError, MissingDependencyError

#: what fsspec's backend for a URL scheme needs (all in the 'remote' extra)
_REMOTE_PACKAGES = {"http": "aiohttp and requests", "https": "aiohttp and requests", "s3": "s3fs", "s3a": "s3fs",
                    "gs": "gcsfs", "gcs": "gcsfs"}


class Location:
    """A local path or an fsspec URL, with the few operations the readers need.

    Whether it is a directory, and what a directory holds, is asked once: format detection asks it of
    every registered format in turn.
    """

    def __init__(self, text: str):
        self.text = text.rstrip("/") if len(text) > 1 else text
        self.is_url = "://" in text
        self._isdir: bool | None = None
        self._listing: list[str] | None = None
        if self.is_url:
            import fsspec

            scheme = self.text.split("://", 1)[0].rsplit("::", 1)[-1].lower()
            try:
                self.fs, self.fspath = fsspec.core.url_to_fs(self.text)
            except ImportError as exc:  # fsspec's backend for the scheme lacks its packages
                needs = _REMOTE_PACKAGES.get(scheme)
                if needs:
                    raise MissingDependencyError(f"{self.text}: reading {scheme}:// inputs needs {needs}; install "
                                                 "them with pip install -e \".[remote]\"") from None
                raise MissingDependencyError(f"{self.text}: reading {scheme}:// inputs needs a package that is "
                                             f"not installed ({str(exc).splitlines()[0] if str(exc) else exc!r})"
                                             ) from None
            except ValueError as exc:  # 'Protocol not known: ...'
                raise InputError(f"{self.text}: unknown URL scheme {scheme}:// (not a path, nor a URL that fsspec "
                                 "can read: file, http(s), s3, gs, ...)") from exc
        else:
            self.fs, self.fspath = None, self.text

    @property
    def name(self) -> str:
        return self.fspath.rstrip("/").rsplit("/", 1)[-1]

    def exists(self) -> bool:
        return self.fs.exists(self.fspath) if self.is_url else os.path.exists(self.fspath)

    def isdir(self) -> bool:
        if self._isdir is None:
            self._isdir = self.fs.isdir(self.fspath) if self.is_url else os.path.isdir(self.fspath)
        return self._isdir

    def listdir(self) -> list[str]:
        if self._listing is None:
            if self.is_url:
                self._listing = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.fspath, detail=False)]
            else:
                self._listing = os.listdir(self.fspath)
        return list(self._listing)

    def holds(self, *names: str) -> bool:
        """Whether this is a directory that holds any of ``names``."""
        return self.isdir() and not set(names).isdisjoint(self.listdir())

    def child(self, name: str) -> Location:
        return Location(f"{self.text}/{name}")

    def parent(self) -> Location:
        return Location(self.text.rsplit("/", 1)[0] if "/" in self.text else ".")

    def open_binary(self):
        if self.is_url:
            return self.fs.open(self.fspath, "rb")
        return open(self.fspath, "rb")

    @contextmanager
    def open_text(self):
        """Text stream, transparently gunzipped when the name ends with .gz; closes every layer."""
        import gzip

        raw = self.open_binary()
        layers = [raw]
        try:
            stream = raw
            if self.text.lower().endswith(".gz"):
                stream = gzip.GzipFile(fileobj=raw, mode="rb")  # does not close raw itself
                layers.append(stream)
            text = io.TextIOWrapper(stream, encoding="utf-8", newline="")
            layers.append(text)
            yield text
        finally:
            for layer in reversed(layers):
                layer.close()

    def head(self, n: int) -> bytes:
        with self.open_binary() as fh:
            return fh.read(n)
