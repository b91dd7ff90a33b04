"""The run store: a run directory holding an AnnData-layout Zarr v3 group and its bookkeeping.

Layout of ``RUN_DIR``::

    adata.zarr/      AnnData on-disk layout (anndata.read_zarr opens it): X, obs, var, layers/, obsm/,
                     obsp/, varm/, uns/scgnn
    work.zarr/       working arrays (ingested input, per-iteration reconstructions, model weights)
    staging/<stage>/ what a running stage writes; moved into place when the stage commits
    manifest.json    finished stages with the hash of their config chain; the single source of truth
    integrity.json   every kept file's size, time, owning stage and checksum (:mod:`scgnn_scale.integrity`)
    run.log          the log of every invocation
    report/          the run report, index.html (:mod:`scgnn_scale.report`), redrawn at the end of every run

A stage writes only through :meth:`RunStore.staging`. Its outputs become visible (renamed into
``adata.zarr`` / ``work.zarr``) and the stage is recorded in the manifest only when it ends without
error, so a run killed at any moment leaves either the old or the new outputs plus a manifest that
says which stages to redo. This module knows zarr and anndata's element I/O; it knows no torch.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .atomic import write_json
from .errors import InputError
from .paths import ObjectPath, as_path, remove_tree, replace_tree, written_locally

FORMAT_VERSION = 1
_DICT_GROUPS = ("layers", "obsm", "obsp", "varm", "varp", "uns")
_TOP_KEYS = ("X", "obs", "var", "raw", "work", *_DICT_GROUPS)

warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)


def compressors(level: int, cname: str = "zstd"):
    """The store's codecs: Blosc zstd with byte shuffle at ``level`` (bench/bench_codec.py chose level 1);
    ``cname='lz4'`` (level 5) for the intermediate arrays under ``work/`` (``store.work_codec``). Every chunk
    then ends in the CRC-32C of its compressed bytes, so a damaged chunk is an error on read, never a
    wrong number, and ``scgnn-scale verify`` checks it without decoding."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    return [BloscCodec(cname=cname, clevel=5 if cname == "lz4" else level, shuffle="shuffle"), Crc32cCodec()]


WORK_PREFIX = "work/"
#: entries per chunk of the 1-D arrays of a sparse (CSR) matrix in the store (work/input, raw/X)
CSR_CHUNK = 1 << 20


def _anndata_io():
    import anndata

    anndata.settings.zarr_write_format = 3
    from anndata.io import read_elem, write_elem

    return read_elem, write_elem


class Staging:
    """Where one stage writes. Each created element is moved into the store on commit."""

    def __init__(self, store: RunStore, stage: str):
        self.store = store
        self.stage = stage
        self.root = store.root / "staging" / stage
        if self.root.exists():
            remove_tree(self.root)  # left by a killed attempt
        self.root.mkdir(parents=True)
        self.group = zarr.open_group(str(self.root), mode="w", zarr_format=3)
        self.created: list[str] = []
        self.dropped: list[str] = []

    def _register(self, key: str) -> None:
        if key.split("/")[0] not in _TOP_KEYS:
            raise ValueError(f"store key {key!r} is outside the run layout")
        if key not in self.created:
            self.created.append(key)

    def path_of(self, key: str) -> str:
        """Filesystem path of a staged element, for Dask workers that open it themselves."""
        return str(self.root / key)

    def create_matrix(self, key: str, shape: tuple[int, ...], dtype, *, chunks: tuple[int, ...] | None = None,
                      fill_value=0) -> zarr.Array:
        """A chunked array (cells x genes by default chunking) marked as an AnnData dense array."""
        self._register(key)
        cfg = self.store.store_config
        if chunks is None:
            if len(shape) == 2:
                chunks = (min(cfg.chunk_rows, max(shape[0], 1)), min(cfg.chunk_genes, max(shape[1], 1)))
            else:
                chunks = (min(cfg.chunk_rows * 64, max(shape[0], 1)),) + tuple(shape[1:])
        arr = self.group.create_array(
            key, shape=shape, dtype=dtype, chunks=chunks, fill_value=fill_value,
            compressors=compressors(cfg.compression_level,
                                    cfg.work_codec if key.startswith(WORK_PREFIX) else "zstd"), overwrite=True,
        )
        arr.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        return arr

    def create_group(self, key: str) -> zarr.Group:
        """A plain group the stage fills as it likes (working data)."""
        self._register(key)
        return self.group.create_group(key, overwrite=True)

    def copy_array(self, key: str, src: zarr.Array) -> zarr.Array:
        """Stage a copy of the array ``src`` under ``key``: its files hard-linked where both lie on one local
        file system (no second copy on disk), else streamed in row blocks."""
        from .loader import iter_row_blocks

        linked = self._linked_copy(key, src)
        if linked is not None:
            return linked
        dst = self.create_matrix(key, tuple(src.shape), src.dtype)
        for a, b, block in iter_row_blocks(src, int(dst.chunks[0])):
            dst[a:b] = block
        return dst

    def _linked_copy(self, key: str, src: zarr.Array) -> zarr.Array | None:
        """``src`` staged under ``key`` as hard links to its files (metadata and chunks, so its codec too).

        Safe because a committed chunk is never written in place: zarr writes a new file and renames it over
        the old one, and a redone stage stages new arrays. So the published embeddings share their bytes with
        ``work/first_pass`` or ``work/iterated`` (at 10M cells the feature embedding alone is 5.1 GB before
        compression). None where links cannot be made (an object store, another file system): the caller copies.
        """
        from zarr.storage import LocalStore

        if not isinstance(self.root, Path) or not isinstance(src.store, LocalStore):
            return None
        source, target = Path(src.store.root) / src.path, self.root / key
        parent = key.rpartition("/")[0]
        if parent:
            self.group.require_group(parent)
        try:
            target.mkdir(parents=True)
            for path in sorted(source.rglob("*")):
                if path.is_dir():
                    (target / path.relative_to(source)).mkdir(parents=True, exist_ok=True)
                else:
                    os.link(path, target / path.relative_to(source))
        except OSError:  # links not allowed there, or another file system
            remove_tree(target)
            return None
        self._register(key)
        return zarr.open_array(str(target), mode="r", zarr_format=3)

    def write_elem(self, key: str, value: Any) -> None:
        """Write a small element (DataFrame, sparse matrix, dense array, dict) in AnnData encoding."""
        self._register(key)
        parent, _, name = key.rpartition("/")
        group = self.group.require_group(parent) if parent else self.group
        _write_elem(group, self.root / key, name, value,
                    dataset_kwargs={"compressors": compressors(self.store.store_config.compression_level)})

    def drop(self, key: str) -> None:
        """Remove ``key`` from the store on commit: an output this run of the stage does not make."""
        if key.split("/")[0] not in _TOP_KEYS:
            raise ValueError(f"store key {key!r} is outside the run layout")
        self.dropped.append(key)

    # reads that see this stage's own staged outputs first, then the committed store
    def open_array(self, key: str) -> zarr.Array:
        """The array staged under ``key`` by this stage, else the committed one."""
        if key in self.created:
            return zarr.open_array(self.path_of(key), mode="r", zarr_format=3)
        return self.store.open_array(key)

    def location_of(self, key: str) -> str:
        """Where the element ``key`` that :meth:`read_elem` would read lies, for another process to read it."""
        return self.path_of(key) if key in self.created else self.store.path_of(key)

    def read_elem(self, key: str) -> Any:
        """The element staged under ``key`` by this stage, else the committed one."""
        if key in self.created:
            read_elem, _ = _anndata_io()
            return read_elem(zarr.open(self.path_of(key), mode="r", zarr_format=3))
        return self.store.read_elem(key)

    def commit(self) -> None:
        for key in self.created:
            self.store._move_into_place(self.root / key, key)
        for key in self.dropped:
            self.store.delete(key)
        self.store._seal(self.created, owner=self.store.current_stage or self.stage)
        remove_tree(self.root)


def _write_elem(group: zarr.Group, where, name: str, value: Any, **kwargs) -> None:
    """anndata's ``write_elem(group, name, value)``; on an object store written into a local scratch group and
    uploaded under ``where`` (the element's own path) in one batch."""
    _, write_elem = _anndata_io()
    if not isinstance(where, ObjectPath):
        write_elem(group, name, value, **kwargs)
        return
    with written_locally(where) as local:
        write_elem(zarr.open_group(str(local.parent), mode="a", zarr_format=3), local.name, value, **kwargs)


_DICT_ENCODING = {"encoding-type": "dict", "encoding-version": "0.1.0"}
_SCALAR_ENCODING = {"encoding-type": "numeric-scalar", "encoding-version": "0.2.0"}
_STRING_ENCODING = {"encoding-type": "string", "encoding-version": "0.2.0"}


def _write_nested(group, name: str, value: Any) -> None:
    """``write_elem`` of a nested dict whose dicts, strings and numbers are written by zarr directly, in
    anndata's encoding (the same files byte for byte: tests/test_summary.py), at half the CPU of anndata's
    dispatch per leaf; anything else (lists, arrays, tables) goes through anndata."""
    if isinstance(value, dict):
        sub = group.create_group(name, attributes=_DICT_ENCODING)
        for key, item in value.items():
            _write_nested(sub, key, item)
    elif isinstance(value, str):
        group.create_array(name, shape=(), dtype=str, attributes=_STRING_ENCODING)[()] = value
    elif isinstance(value, (bool, int, float, np.bool_, np.integer, np.floating)):
        scalar = np.asarray(value)
        group.create_array(name, shape=(), dtype=scalar.dtype, attributes=_SCALAR_ENCODING)[()] = scalar
    else:
        _, write_elem = _anndata_io()
        write_elem(group, name, value)


def _write_small_elem(where, value: Any) -> None:
    """An element of many small arrays (the run summary: about 380 leaves) encoded in memory, then its
    files written in one pass under ``where`` (a directory, or an object store's prefix): zarr's round
    trip through its event loop for every file of every leaf cost 2.5 CPU-s of a 28 CPU-s run on disk,
    1.1 in memory through anndata's ``write_elem``, 0.4-0.5 through :func:`_write_nested`."""
    files: dict = {}
    _write_nested(zarr.open_group(zarr.storage.MemoryStore(store_dict=files), mode="w", zarr_format=3), "element",
                  value)

    def write_files(target: Path) -> None:
        for key, buffer in files.items():
            if key.startswith("element/"):
                path = target / key[len("element/"):]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(buffer.to_bytes())

    if isinstance(where, ObjectPath):
        with written_locally(where) as local:
            write_files(local)
    else:
        write_files(Path(where))


def _summary_text(value: Any) -> str:
    """What a summary's non-JSON leaves (tables, arrays, numpy scalars) contribute to its digest."""
    return value.to_json() if hasattr(value, "to_json") else str(getattr(value, "tolist", lambda: value)())


LOCK_NAME = ".lock"


def check_out_dir(root: Path | ObjectPath) -> None:
    """``--out`` must be absent, an empty directory or a run directory: nothing else is ever written into."""
    root = as_path(root)
    if isinstance(root, ObjectPath):
        from .object_store import check_out_prefix

        return check_out_prefix(root, LOCK_NAME)
    if root.exists() and not root.is_dir():
        raise InputError(f"{root}: --out exists and is not a directory")
    if (root.is_dir() and any(p.name != LOCK_NAME for p in root.iterdir())
            and not (root / "manifest.json").is_file()):
        raise InputError(f"{root}: --out is a non-empty directory that is not a scgnn-scale run; choose another")


@contextlib.contextmanager
def run_lock(root: str | Path):
    """Hold ``RUN_DIR/.lock`` for the life of a run: a second run on the same directory is refused.

    An advisory ``flock``: the kernel releases it when the holding process ends, however it ends, so a
    killed run never leaves a stale lock behind. The file names the holder for the refusal's message.
    """
    import fcntl
    import socket

    root = as_path(root)
    check_out_dir(root)
    if isinstance(root, ObjectPath):
        from .object_store import lease

        with lease(root / LOCK_NAME):
            yield
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
        fh = open(root / LOCK_NAME, "a+")
    except OSError as exc:
        raise InputError(f"{root}: cannot create the run directory ({exc.strerror or exc})") from None
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise InputError(f"{root}: another scgnn-scale run is using this directory ({holder}); wait for it "
                             "to end or choose another --out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
        fh.flush()
        yield
    finally:
        fh.close()  # closing releases the lock


def lock_holder(root: str | Path) -> str | None:
    """Who holds ``RUN_DIR/.lock`` now (``"pid N on HOST"``), or None when no run is using the directory.

    Tries a shared, non-blocking ``flock`` and releases it at once: it fails only while a run holds its
    exclusive lock, and takes nothing a run would wait for (a run starting in that instant is refused as
    if another run held the directory; the window is a few microseconds).
    """
    import fcntl

    root = as_path(root)
    if isinstance(root, ObjectPath):
        from .object_store import lease_holder

        return lease_holder(root / LOCK_NAME)
    try:
        fh = open(Path(root) / LOCK_NAME)
    except FileNotFoundError:
        return None
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return fh.read().strip() or "another process"
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return None


class RunStore:
    """One run directory. Open with :meth:`open` (existing) or :meth:`create` (new or resumed)."""

    def __init__(self, root: str | Path, store_config=None):
        self.root = as_path(root).absolute()  # Dask workers get paths from it, and their working directory differs
        self.adata_path = self.root / "adata.zarr"
        self.work_path = self.root / "work.zarr"
        self.manifest_path = self.root / "manifest.json"
        self.log_path = self.root / "run.log"
        self._manifest: dict | None = None
        self._integrity = None
        #: the pipeline stage now running: what its stagings commit is sealed as that stage's
        self.current_stage: str | None = None
        if store_config is None:
            from .config import config_from_dict

            store_config = config_from_dict(self.manifest.get("config", {})).store
        self.store_config = store_config

    # -- creation and identity -------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | Path, *, identity: dict, config, overwrite: bool = False) -> RunStore:
        """Open ``root`` for this input and config, creating it if needed.

        An existing run of a different input or config is refused unless ``overwrite``; then the
        stages whose config chain still matches are kept and the rest is redone.
        """
        root = as_path(root)
        check_out_dir(root)
        store = cls(root, store_config=config.store)
        if store.manifest_path.is_file():
            old = store.manifest
            if old.get("format") != FORMAT_VERSION:
                raise InputError(f"{root}: run store format {old.get('format')} is not supported "
                                 f"(this version reads {FORMAT_VERSION})")
            # a run that finished no stage (e.g. one that stopped at a bad input) holds nothing to lose
            replaceable = overwrite or not old.get("stages")
            if old.get("identity") != identity:
                if not replaceable:
                    raise InputError(
                        f"{root}: holds a run of another input or config; pass --overwrite to replace it "
                        "or choose another --out")
                old["identity"] = identity
            if old.get("config", {}).get("store") != config.to_dict()["store"]:
                if not replaceable:
                    raise InputError(f"{root}: holds a run with another store layout; pass --overwrite")
                old["stages"] = {}  # chunking changed: nothing can be reused
            old["config"] = config.to_dict()
            store._save_manifest()
        else:
            root.mkdir(parents=True, exist_ok=True)
            from . import __version__

            store._manifest = {"format": FORMAT_VERSION, "package_version": __version__, "identity": identity,
                               "config": config.to_dict(), "stages": {}, "checkpoints": {}}
            store._save_manifest()
        store._init_layout()
        return store

    @staticmethod
    def read_manifest(root: str | Path) -> dict | None:
        """The manifest of ``root`` without opening the run (None when absent or unreadable)."""
        try:
            return json.loads((as_path(root) / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    @classmethod
    def open(cls, root: str | Path, *, check: bool = True) -> RunStore:
        """An existing run, to read. ``check``: refuse it when a kept file is damaged (the quick check)."""
        root = as_path(root)
        if not (root / "manifest.json").is_file():
            raise InputError(f"{root}: not a scgnn-scale run directory (no manifest.json)")
        store = cls(root)
        if store.manifest.get("format") != FORMAT_VERSION:
            raise InputError(f"{root}: run store format {store.manifest.get('format')} is not supported")
        if check:
            store.refuse_if_damaged()
        return store

    def _init_layout(self) -> None:
        root = zarr.open_group(str(self.adata_path), mode="a", zarr_format=3)
        root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0",
                           "scgnn-scale-format": FORMAT_VERSION})
        for name in _DICT_GROUPS:
            g = root.require_group(name)
            g.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        zarr.open_group(str(self.work_path), mode="a", zarr_format=3)

    # -- manifest --------------------------------------------------------------------------------
    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            try:
                self._manifest = json.loads(self.manifest_path.read_text())
            except FileNotFoundError:
                self._manifest = {}
            except json.JSONDecodeError as exc:
                raise InputError(f"{self.manifest_path}: corrupt manifest ({exc})") from None
        return self._manifest

    def _save_manifest(self) -> None:
        write_json(self.manifest_path, self.manifest)

    def stage_done(self, stage: str, chain_hash: str) -> bool:
        entry = self.manifest["stages"].get(stage)
        return bool(entry) and entry.get("hash") == chain_hash

    def stage_info(self, stage: str) -> dict:
        return self.manifest["stages"].get(stage, {}).get("info", {})

    def record_stage(self, stage: str, chain_hash: str, seconds: float, info: dict) -> None:
        self._seal_models(stage)
        self.manifest["stages"][stage] = {
            "hash": chain_hash, "seconds": round(seconds, 3), "info": info,
            "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        self.manifest.get("checkpoints", {}).pop(stage, None)
        self._save_manifest()

    def forget_stages(self, stages: list[str]) -> None:
        for s in stages:
            self.manifest["stages"].pop(s, None)
        self._save_manifest()

    def record_input(self, record: dict | None) -> None:
        """The input's hash, sizes and times (:func:`scgnn_scale.fingerprint.input_record`)."""
        if record is not None and self.manifest.get("input") != record:
            self.manifest["input"] = record
            self._save_manifest()

    def record_published(self, record: dict) -> None:
        """What each published key was copied from (see :mod:`scgnn_scale.results`)."""
        self.manifest["published"] = record
        self._save_manifest()

    def load_checkpoint(self, stage: str, chain_hash: str) -> dict | None:
        """State a long stage saved part-way (e.g. finished iterations), if it matches this config."""
        entry = self.manifest.setdefault("checkpoints", {}).get(stage)
        if entry and entry.get("hash") == chain_hash:
            return entry["state"]
        return None

    def save_checkpoint(self, stage: str, chain_hash: str, state: dict) -> None:
        self.manifest.setdefault("checkpoints", {})[stage] = {"hash": chain_hash, "state": state}
        self._save_manifest()

    # -- writing ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def staging(self, stage: str):
        """Write a stage's outputs; they are moved into place only if the block ends without error."""
        st = Staging(self, stage)
        yield st
        st.commit()

    def _base_for(self, key: str) -> tuple[Path, str]:
        if key.startswith(WORK_PREFIX):
            return self.work_path, key[len(WORK_PREFIX):]
        return self.adata_path, key

    def _move_into_place(self, src: Path | ObjectPath, key: str) -> None:
        base, rel = self._base_for(key)
        replace_tree(src, base / rel)
        parts = rel.split("/")
        if len(parts) == 2 and parts[0] in ("obs", "var"):
            self._add_column_to_frame(parts[0], parts[1])

    def _add_column_to_frame(self, frame: str, column: str) -> None:
        g = zarr.open_group(str(self.adata_path / frame), mode="r+", zarr_format=3)
        order = list(g.attrs.get("column-order", []))
        if column not in order:
            g.attrs["column-order"] = order + [column]
            self.integrity.refresh(f"adata.zarr/{frame}/zarr.json")

    # -- integrity -------------------------------------------------------------------------------
    @property
    def integrity(self):
        """The record of what the run keeps (:class:`scgnn_scale.integrity.IntegrityRecord`)."""
        if self._integrity is None:
            from .integrity import IntegrityRecord

            self._integrity = IntegrityRecord(self.root)
        return self._integrity

    def _rel(self, key: str) -> str:
        """A store key's path relative to the run directory."""
        base, rel = self._base_for(key)
        return f"{base.name}/{rel}"

    def _seal(self, keys: list[str], owner: str) -> None:
        """Record the files of committed ``keys`` as ``owner``'s; saved before the manifest names the stage."""
        self.integrity.seal([self._rel(k) for k in keys], owner)
        self.integrity.save()

    def _seal_models(self, stage: str) -> None:
        """Seal the models a stage saved (new or rewritten files); forget those a stage removed."""
        record = self.integrity
        models = self.root / "models"
        for rel in [r for r in record.files if r.startswith("models/")]:
            if not (self.root / rel).exists():
                record.forget(rel)
        if models.is_dir():
            for path in sorted(models.iterdir()):
                rel = f"models/{path.name}"
                st = path.stat()
                if path.is_file() and record.files.get(rel, [None, None])[:2] != [st.st_size, st.st_mtime_ns]:
                    record.seal([rel], stage)
        record.save()

    def check_integrity(self, *, full: bool = False, owners=None, progress=None):
        """Damaged files of what the run keeps: see :meth:`IntegrityRecord.check`."""
        return self.integrity.check(full=full, owners=owners, progress=progress)

    def refuse_if_damaged(self) -> None:
        """The quick check before results are read: one line naming the first damaged array and chunk."""
        damaged, _ = self.check_integrity()
        if damaged:
            more = f"; {len(damaged) - 1} more damaged file(s), 'scgnn-scale verify' lists them" if len(damaged) > 1 else ""
            raise InputError(f"{self.root}: {damaged[0].line()}{more}; rerun the same 'scgnn-scale run' command to "
                             "redo what is damaged")

    def delete(self, key: str) -> None:
        """Remove a working element that is no longer needed (e.g. an old iteration's reconstruction)."""
        base, rel = self._base_for(key)
        path = base / rel
        parts = rel.split("/")
        if len(parts) == 2 and parts[0] in ("obs", "var") and base == self.adata_path and path.exists():
            g = zarr.open_group(str(self.adata_path / parts[0]), mode="r+", zarr_format=3)
            g.attrs["column-order"] = [c for c in g.attrs.get("column-order", []) if c != parts[1]]
            self.integrity.refresh(f"adata.zarr/{parts[0]}/zarr.json")
        if path.exists():
            remove_tree(path)
        if self.integrity.files:
            self.integrity.forget(self._rel(key))
            self.integrity.save()

    def move(self, src_key: str, dst_key: str) -> bool:
        """Rename a working element to another key (replacing it): no copy, as both lie in one store.

        Safe to repeat after a kill: the source goes only with the rename, so a second call finishes
        the move and a call after a finished move does nothing. Returns whether anything moved.
        """
        if not (src_key.startswith(WORK_PREFIX) and dst_key.startswith(WORK_PREFIX)):
            raise ValueError(f"move is for working elements (work/...): {src_key!r} -> {dst_key!r}")
        src = as_path(self.path_of(src_key))
        if not src.exists():
            return False
        self._move_into_place(src, dst_key)
        self.integrity.rename(self._rel(src_key), self._rel(dst_key))
        self.integrity.save()
        return True

    # -- model files -----------------------------------------------------------------------------
    def model_path(self, name: str) -> Path | ObjectPath:
        """Where the model ``name`` (e.g. 'feature_ae') is saved: ``RUN_DIR/models/<name>.pt``."""
        return self.root / "models" / f"{name}.pt"

    def model_paths(self, pattern: str) -> list[Path | ObjectPath]:
        """Saved models whose name matches the glob ``pattern``."""
        return sorted((self.root / "models").glob(f"{pattern}.pt"))

    def remove_model(self, name: str) -> None:
        self.model_path(name).unlink(missing_ok=True)
        self.integrity.forget(f"models/{name}.pt")

    def remove_empty_staging(self) -> None:
        """Remove ``staging/`` when no stage left anything there (a killed stage's leftovers stay until redone)."""
        staging = self.root / "staging"
        with contextlib.suppress(OSError):
            staging.rmdir()

    # -- reading ---------------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        base, rel = self._base_for(key)
        return (base / rel / "zarr.json").is_file()

    def path_of(self, key: str) -> str:
        base, rel = self._base_for(key)
        return str(base / rel)

    def open_array(self, key: str, mode: str = "r") -> zarr.Array:
        if not self.has(key):
            raise InputError(f"{self.root}: the run has no '{key}' yet (run the stage that makes it first)")
        return zarr.open_array(self.path_of(key), mode=mode, zarr_format=3)

    def open_group(self, key: str, mode: str = "r") -> zarr.Group:
        if not self.has(key):
            raise InputError(f"{self.root}: the run has no '{key}' yet (run the stage that makes it first)")
        return zarr.open_group(self.path_of(key), mode=mode, zarr_format=3)

    @staticmethod
    def read_elem_at(path: str) -> Any:
        """Read the AnnData-encoded element at ``path`` (another process's :meth:`Staging.location_of`)."""
        read_elem, _ = _anndata_io()
        return read_elem(zarr.open(path, mode="r", zarr_format=3))

    def read_elem(self, key: str) -> Any:
        """Read a small element (DataFrame, sparse matrix, array, dict) written in AnnData encoding."""
        read_elem, _ = _anndata_io()
        if not self.has(key):
            raise InputError(f"{self.root}: the run has no '{key}' yet (run the stage that makes it first)")
        # opened by its own path: working keys sit in folders without group metadata
        return read_elem(zarr.open(self.path_of(key), mode="r", zarr_format=3))

    def read_raw(self, *, lazy: bool = True) -> dict | None:
        """The run's ``raw`` (input counts of every input gene for the run's cells) as the pieces
        ``anndata.AnnData(raw=...)`` takes: ``{"X": ..., "var": DataFrame, "varm": {}}``; None when the
        run has none (``preprocess.keep_counts`` off).

        ``X`` is a Dask array of scipy CSR blocks of ``store.chunk_rows`` cells when ``lazy``, else a
        scipy CSR matrix (read whole).
        """
        if not (self.adata_path / "raw" / "X" / "zarr.json").is_file():
            return None
        read_elem, _ = _anndata_io()
        raw = zarr.open_group(str(self.adata_path / "raw"), mode="r", zarr_format=3)
        if lazy:
            from anndata.experimental import read_elem_lazy

            X = read_elem_lazy(raw["X"], chunks=(self.store_config.chunk_rows, -1))
        else:
            X = read_elem(raw["X"])
        varm = {k: read_elem(raw["varm"][k]) for k in raw["varm"].keys()} if "varm" in raw else {}
        return {"X": X, "var": read_elem(raw["var"]), "varm": varm}

    def write_uns_summary(self, summary: dict) -> None:
        """Rewrite ``uns/scgnn`` (config, stage results, timings, versions): derived, so written in place,
        and only when it changed (a few hundred small arrays: seconds, on every rerun otherwise)."""
        import hashlib

        digest = hashlib.sha256(json.dumps(summary, sort_keys=True, default=_summary_text).encode()).hexdigest()
        if self.manifest.get("uns_digest") == digest and self.has("uns/scgnn"):
            return
        uns = zarr.open_group(str(self.adata_path / "uns"), mode="a", zarr_format=3)
        if "scgnn" in uns:
            del uns["scgnn"]
        _write_small_elem(self.adata_path / "uns" / "scgnn", summary)
        self.manifest["uns_digest"] = digest
        self._save_manifest()

    @property
    def n_obs(self) -> int:
        return int(self.open_array("X").shape[0])
