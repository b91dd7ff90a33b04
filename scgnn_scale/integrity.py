"""What a run keeps, sealed at commit and checked before it is trusted again.

Every file of a finished stage's outputs (chunks, array metadata, saved models) is recorded in
``RUN_DIR/integrity.json`` with its size, its modification time and the stage that owns it; a file
whose content carries no checksum of its own also gets its CRC-32C. Array chunks written by this
package end in a CRC-32C of their bytes (zarr's ``crc32c`` codec, see :func:`store.compressors`),
so a chunk checks itself.

Two depths of checking:

* **quick** (every ``run`` that skips a stage, ``export``, ``evaluate``, ``read_run``): a ``stat`` per
  file. Missing or resized files are damaged; a file whose modification time moved is read and its
  checksum tested. Milliseconds per thousand files.
* **full** (``scgnn-scale verify``): every file's checksum, whatever its time says. Reads the whole store.

A damaged file names its array (the store key) and its chunk, and the stage that made it, which
``run`` then redoes with everything after it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import google_crc32c

from .atomic import write_json
from .paths import ObjectPath, listing, walk_files

RECORD_NAME = "integrity.json"
#: what the record covers, relative to the run directory
SEALED_ROOTS = ("adata.zarr", "work.zarr", "models")
#: derived, rewritten in place at the end of every run: never sealed
UNSEALED = ("adata.zarr/uns/scgnn",)


@dataclass(frozen=True)
class Damage:
    """One damaged file: ``array`` is its store key (``obsm/X_scgnn``), ``chunk`` its name in the array."""

    path: str
    array: str
    chunk: str
    problem: str
    owner: str

    def line(self) -> str:
        return f"{self.array} chunk {self.chunk} {self.problem} (made by {self.owner})"


def store_key(rel: str) -> tuple[str, str]:
    """(store key of the array or element, chunk name) of a sealed file's path relative to the run directory."""
    parts = rel.split("/")
    if parts[0] == "models":
        return rel, "file"
    base = "work/" if parts[0] == "work.zarr" else ""
    inner = parts[1:]
    i = _chunk_start(inner)
    if i is not None:
        return base + "/".join(inner[:i]), ".".join(inner[i + 1:]) or "c"
    return base + "/".join(inner[:-1]), inner[-1]


def _chunk_start(parts) -> int | None:
    """Index of the ``c`` of a zarr v3 chunk key (``ARRAY/c/i/j``: ``c`` then digits only), or None."""
    i = len(parts) - 1
    while i > 0 and parts[i].isdigit():
        i -= 1
    return i if parts[i] == "c" and i > 0 else None


def _crc_file(path: Path | ObjectPath) -> int:
    crc = 0
    with path.open("rb") as fh:
        while block := fh.read(1 << 24):
            crc = google_crc32c.extend(crc, block)
    return crc


def _self_checked(root: Path | ObjectPath, rel: str) -> bool:
    """Whether a chunk ends in its own CRC-32C: its array's codecs hold ``crc32c``."""
    parts = rel.split("/")
    i = _chunk_start(parts)
    return _array_has_crc(root / "/".join(parts[:i] if i is not None else parts[:-1]))


_CRC_ARRAYS: dict[str, bool] = {}


def _array_has_crc(array_dir: Path | ObjectPath) -> bool:
    if str(array_dir) not in _CRC_ARRAYS:
        try:
            meta = json.loads((array_dir / "zarr.json").read_text())
        except (OSError, ValueError):
            return False  # unknown: the record's own CRC is used instead
        _CRC_ARRAYS[str(array_dir)] = any(c.get("name") == "crc32c" for c in meta.get("codecs", []))
    return _CRC_ARRAYS[str(array_dir)]


def _chunk_crc_ok(path: Path | ObjectPath) -> bool:
    data = path.read_bytes()
    return len(data) >= 4 and google_crc32c.value(data[:-4]) == int.from_bytes(data[-4:], "little")


class IntegrityRecord:
    """``RUN_DIR/integrity.json``: ``{relative path: [size, mtime_ns, owner, crc32c or null]}``.

    On an object store the second field is the object's version (its ETag, see
    :meth:`scgnn_scale.paths.ObjectPath.stat`), compared for equality just as a time is."""

    def __init__(self, root: Path | ObjectPath):
        self.root = root
        self.path = root / RECORD_NAME
        try:
            self.files: dict[str, list] = json.loads(self.path.read_text())["files"]
            self.present = True
        except (OSError, ValueError, KeyError, TypeError):
            self.files, self.present = {}, False  # a run made before sealing, or a lost record: nothing to check

    def save(self) -> None:
        write_json(self.path, {"format": 1, "files": self.files})
        self.present = True

    # -- sealing ---------------------------------------------------------------------------------
    def _entry(self, rel: str, owner: str, st=None) -> list:
        path = self.root / rel
        st = st or path.stat()
        meta = path.name == "zarr.json" or rel.startswith("models/")
        crc = None if not meta and _self_checked(self.root, rel) else _crc_file(path)
        return [st.st_size, st.st_mtime_ns, owner, crc]

    def seal(self, rel_dirs: Iterable[str], owner: str) -> int:
        """Record every file under ``rel_dirs`` (paths relative to the run directory) as ``owner``'s,
        forgetting files recorded there before. Returns the number of files sealed."""
        n = 0
        for rel_dir in rel_dirs:
            rel_dir = rel_dir.rstrip("/")
            self.forget(rel_dir)
            top = self.root / rel_dir
            if top.is_file():
                self.files[rel_dir] = self._entry(rel_dir, owner)
                n += 1
                continue
            listed = listing(top)  # an object store: sizes and ETags in one listing, not a request an object
            for inner in walk_files(top) if listed is None else listed:
                rel = f"{rel_dir}/{inner}"
                if not rel.startswith(UNSEALED):
                    self.files[rel] = self._entry(rel, owner, None if listed is None else listed[inner])
                    n += 1
        return n

    def refresh(self, rel: str) -> None:
        """Record again a file this package itself changed in place (a frame's column order), same owner."""
        if rel in self.files and (self.root / rel).is_file():
            self.files[rel] = self._entry(rel, self.files[rel][2])

    def forget(self, rel_dir: str) -> None:
        prefix = rel_dir.rstrip("/") + "/"
        for rel in [r for r in self.files if r == rel_dir or r.startswith(prefix)]:
            del self.files[rel]

    def rename(self, src_dir: str, dst_dir: str) -> None:
        self.forget(dst_dir)
        prefix = src_dir.rstrip("/") + "/"
        for rel in [r for r in self.files if r.startswith(prefix)]:
            self.files[dst_dir.rstrip("/") + "/" + rel[len(prefix):]] = self.files.pop(rel)

    def mark_damaged(self, damaged: list[Damage]) -> None:
        """Make the quick check read these files again (their recorded time is cleared), so the next run
        finds what a full check found, even in a file whose time was put back."""
        for d in damaged:
            if d.path in self.files:
                self.files[d.path][1] = 0
        if damaged:
            self.save()

    def accept_rechecked(self) -> None:
        """Keep the new times of files whose time moved but whose checksum held (a copied or restored run),
        so the next quick check reads them no more."""
        if getattr(self, "rechecked", None):
            for rel, mtime_ns in self.rechecked.items():
                self.files[rel][1] = mtime_ns
            self.rechecked = {}
            self.save()

    # -- checking --------------------------------------------------------------------------------
    def check(self, *, full: bool = False, owners: Iterable[str] | None = None,
              progress=None) -> tuple[list[Damage], dict]:
        """Damaged files, and what was checked: ``{"files", "bytes_read", "arrays"}``.

        ``owners`` limits the check to files of those stages. ``progress`` is called with each file's size.
        """
        wanted = set(owners) if owners is not None else None
        self.rechecked: dict[str, int] = {}
        damaged, read, arrays, n = [], 0, set(), 0
        listed = listing(self.root) if self.files else None  # an object store: one listing, not a request a file
        for rel, (size, mtime_ns, owner, crc) in self.files.items():
            if wanted is not None and owner not in wanted:
                continue
            n += 1
            key, chunk = store_key(rel)
            arrays.add(key)
            path = self.root / rel
            problem = None
            try:
                st = path.stat() if listed is None else listed[rel]
            except (FileNotFoundError, KeyError):
                problem = "is missing"
            else:
                if st.st_size != size:
                    problem = f"has {st.st_size} bytes instead of {size} (truncated or replaced)"
                elif full or st.st_mtime_ns != mtime_ns:
                    read += size
                    ok = _crc_file(path) == crc if crc is not None else _chunk_crc_ok(path)
                    if not ok:
                        problem = "fails its checksum (changed after it was written)"
                    elif st.st_mtime_ns != mtime_ns:
                        self.rechecked[rel] = st.st_mtime_ns  # a copied run: :meth:`accept_rechecked` saves the time
            if progress is not None:
                progress(size)
            if problem:
                damaged.append(Damage(rel, key, chunk, problem, owner))
        return damaged, {"files": n, "bytes_read": read, "arrays": len(arrays)}
