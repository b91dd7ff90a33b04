"""Where a run directory lives: a local path (:class:`pathlib.Path`) or an fsspec URL (:class:`ObjectPath`).

``--out`` may be ``s3://bucket/prefix``, ``gs://``, ``az://``, ``memory://`` or any URL fsspec can write;
``file://`` and plain paths are local directories, handled exactly as before. An :class:`ObjectPath` has
the few :class:`~pathlib.Path` methods the run store uses, so most code takes either. What an object store
lacks is done here, in one place, each function keeping today's local behaviour for a ``Path``:

* no rename: :func:`replace_tree` copies then deletes (metadata copied last and deleted first, so a kill
  at any point leaves either a whole source or none; the manifest is the commit point, see ``store``);
* no partial write: :func:`atomic_path` writes a local temporary file and uploads it in one PUT;
* no append: :class:`LogMirror` keeps ``run.log`` locally and uploads it at the end of every stage;
* no ``mtime_ns``: :meth:`ObjectPath.stat` gives the store's ETag (else its time) as the file's version.

Credentials and endpoints are never passed through this module: the store library's own chain finds them
(``AWS_*`` variables, ``~/.aws``, instance roles, ``GOOGLE_APPLICATION_CREDENTIALS``, ...), and other
storage options come from fsspec's configuration (``FSSPEC_S3_ENDPOINT_URL``, ``~/.config/fsspec/``), so a
URL alone opens the store in any process, a Dask worker's included, and nothing secret is ever stored.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

from .errors import InputError, MissingDependencyError

#: what fsspec's backend for a URL scheme needs: the 'remote' extra's packages, else the one named
_BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp and requests",
             "https": "aiohttp and requests"}
_OTHER_BACKENDS = {"az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}


def is_url(text) -> bool:
    return isinstance(text, str) and "://" in text and not text.startswith("file://")


def as_path(place) -> Path | ObjectPath:
    """A local :class:`Path` for a path or ``file://`` URL, an :class:`ObjectPath` for any other URL."""
    if isinstance(place, ObjectPath | Path):
        return place
    text = os.fspath(place)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    if is_url(text):
        return ObjectPath(text)
    return Path(text)


def _filesystem(url: str):
    import fsspec

    scheme = url.split("://", 1)[0].lower()
    if _USERINFO.search(url) or "?" in url or "#" in url:
        raise InputError(f"{redact(url)}: a run directory's URL names the bucket and prefix only; credentials and "
                         "options come from the store's own chain (environment, ~/.aws, fsspec's configuration), "
                         "never from the URL")
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as exc:
        if scheme in _BACKENDS:
            how = f"{_BACKENDS[scheme]}; install it with pip install -e \".[remote]\""
        else:
            package = _OTHER_BACKENDS.get(scheme) or (getattr(exc, "name", None) or "fsspec's backend for it")
            how = f"{package}; install it with pip install {package}"
        raise MissingDependencyError(f"{redact(url)}: a run directory at {scheme}:// needs {how}") from None
    except ValueError:
        raise InputError(f"{redact(url)}: unknown URL scheme {scheme}:// (not a path, nor a URL fsspec can write: "
                         "s3, gs, az, file, ...)") from None
    return fs, path.rstrip("/")


def store_error(where, exc: BaseException, doing: str) -> InputError:
    """One line for what an object store said: no bucket, no credentials, access denied, anything else."""
    name = type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc) else name
    parts = [p for p in str(where).split("://", 1)[-1].split("/") if p]
    if "NoCredentials" in name or "credentials" in text.lower():
        why = ("no credentials found (give them as the store's library reads them: AWS_ACCESS_KEY_ID and "
               "AWS_SECRET_ACCESS_KEY, ~/.aws, an instance role; GOOGLE_APPLICATION_CREDENTIALS; ...)")
    elif isinstance(exc, FileNotFoundError) or "NoSuchBucket" in text:
        why = f"the bucket {parts[0] if parts else where} does not exist"
    elif isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        why = f"access denied ({text})"
    else:
        why = f"{name}: {text}"
    return InputError(redact(f"{where}: cannot {doing}: {why}"))


def _guarded(method):
    """Let a missing file be FileNotFoundError, as for a Path; say any other error of the store in one line
    (the store library's errors, botocore's say, have no common base)."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        self.fs.invalidate_cache(self.path)  # another client (zarr's) may have written it since it was listed
        try:
            return method(self, *args, **kwargs)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError, InputError):
            raise
        except Exception as exc:
            raise store_error(self, exc, "write" if method.__name__ in ("write_bytes", "unlink") else "read") from None

    return wrapper


class ObjectPath:
    """A file or prefix on an object store, named by its URL, with the :class:`Path` methods the run uses."""

    def __init__(self, url: str, fs=None, path: str | None = None):
        if fs is None:
            fs, path = _filesystem(url)
        self.fs, self.path = fs, path
        self.protocol = url.split("://", 1)[0]
        self.url = f"{self.protocol}://{path.lstrip('/')}" if self.protocol != "memory" else f"memory://{path}"

    # -- names -----------------------------------------------------------------------------------
    def __truediv__(self, name) -> ObjectPath:
        name = str(name).strip("/")
        return ObjectPath(f"{self.url}/{name}", self.fs, f"{self.path}/{name}")

    def __str__(self) -> str:
        return self.url

    __repr__ = __str__

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectPath) and other.url == self.url

    def __lt__(self, other) -> bool:
        return self.url < other.url

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> ObjectPath:
        head = self.path.rsplit("/", 1)[0]
        return ObjectPath(f"{self.url.rsplit('/', 1)[0]}", self.fs, head)

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p for p in self.path.split("/") if p)

    def absolute(self) -> ObjectPath:
        return self

    resolve = absolute

    def with_name(self, name: str) -> ObjectPath:
        return self.parent / name

    def relative_to(self, other: ObjectPath) -> str:
        return self.path[len(other.path):].lstrip("/")

    # -- queries ---------------------------------------------------------------------------------
    @_guarded
    def exists(self) -> bool:
        return self.fs.exists(self.path)

    @_guarded
    def is_file(self) -> bool:
        return self.fs.isfile(self.path)

    @_guarded
    def is_dir(self) -> bool:
        return self.fs.isdir(self.path)

    @_guarded
    def iterdir(self):
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False)]
        return iter([self / name for name in names if name])

    def glob(self, pattern: str):
        return [self / name for name in sorted(p.name for p in self.iterdir()) if fnmatch.fnmatch(name, pattern)]

    def rglob(self, pattern: str):
        return [self / f[len(self.path):] for f in self.fs.find(self.path) if fnmatch.fnmatch(f.rsplit("/", 1)[-1], pattern)]

    @_guarded
    def stat(self):
        """``st_size``, and as ``st_mtime_ns`` the object's version: its ETag, else its time (never a clock)."""
        return _stat_of(self.fs.info(self.path))

    # -- content ---------------------------------------------------------------------------------
    @_guarded
    def open(self, mode: str = "rb", **kwargs):
        return self.fs.open(self.path, mode, **kwargs)

    @_guarded
    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        try:
            return self.read_bytes().decode(encoding, errors)
        except FileNotFoundError:
            raise FileNotFoundError(2, "No such file", self.url) from None

    @_guarded
    def write_bytes(self, data: bytes) -> None:
        self.fs.pipe_file(self.path, data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Prefixes need no creating; a missing bucket shows at the first write."""

    @_guarded
    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmdir(self) -> None:
        if any(True for _ in self.iterdir()):
            raise OSError(f"{self.url}: not empty")


def _stat_of(info: dict):
    version = next((str(info[k]) for k in ("ETag", "etag", "md5Hash", "generation", "LastModified",
                                           "last_modified", "mtime", "created") if info.get(k) is not None), "")
    return SimpleNamespace(st_size=int(info.get("size") or 0), st_mtime_ns=version.strip('"'))


def listing(top: Path | ObjectPath) -> dict[str, SimpleNamespace] | None:
    """Every file under an :class:`ObjectPath` with its stat, by path relative to ``top``, in one listing
    (one request per thousand objects, where a ``stat`` each would be one request per file); None for a local
    directory, whose files are stat'ed one by one as before."""
    if isinstance(top, Path):
        return None
    top.fs.invalidate_cache(top.path)
    found = top.fs.find(top.path, detail=True)
    return {name[len(top.path):].lstrip("/"): _stat_of(info) for name, info in found.items()}


def walk_files(top: Path | ObjectPath) -> list[str]:
    """Paths of the files under the directory ``top``, relative to it, ``/``-separated."""
    if isinstance(top, Path):
        return [os.path.relpath(os.path.join(d, n), top).replace(os.sep, "/") for d, _, names in os.walk(top)
                for n in names]
    return [f[len(top.path):].lstrip("/") for f in top.fs.find(top.path)]


def remove_tree(path: Path | ObjectPath) -> None:
    """Remove a directory (or file) and everything in it; nothing there is fine."""
    if isinstance(path, Path):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        return
    files = path.fs.find(path.path)
    if files:
        # metadata first: a kill half-way leaves chunks without an array, never an array missing chunks
        files.sort(key=lambda f: (not f.endswith("zarr.json"), f))
        path.fs.rm(files)


def replace_tree(src: Path | ObjectPath, dst: Path | ObjectPath) -> None:
    """Put ``src`` where ``dst`` is, replacing it: a rename on disk; on an object store a server-side copy
    (metadata last) then the removal of ``src`` (metadata first), so repeating it after a kill finishes it."""
    if isinstance(src, Path):
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        return
    remove_tree(dst)
    if src.fs.isfile(src.path):
        src.fs.copy(src.path, dst.path)
    else:
        rels = walk_files(src)
        for batch in ([r for r in rels if not r.endswith("zarr.json")], [r for r in rels if r.endswith("zarr.json")]):
            if batch:
                src.fs.copy([f"{src.path}/{r}" for r in batch], [f"{dst.path}/{r}" for r in batch])
    remove_tree(src)


def upload_tree(local: Path, target: ObjectPath) -> None:
    """Put every file under the local directory ``local`` under ``target``, concurrently, metadata last."""
    rels = walk_files(local)
    for batch in ([r for r in rels if not r.endswith("zarr.json")], [r for r in rels if r.endswith("zarr.json")]):
        if batch:
            target.fs.put([str(local / r) for r in batch], [f"{target.path}/{r}" for r in batch])


@contextlib.contextmanager
def written_locally(target: ObjectPath):
    """A local scratch directory (``<private temporary directory>/element``) whose files are uploaded under
    ``target`` in one concurrent batch: for elements of many small arrays (a summary, a data frame), a request
    each and in turn would take minutes."""
    tmp = Path(tempfile.mkdtemp(prefix="scgnn-put-"))
    try:
        yield tmp / "element"
        upload_tree(tmp / "element", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | Path | ObjectPath):
    """Yield a temporary local path; on success its content replaces ``path`` whole: a flushed rename beside
    ``path`` on disk, one upload on an object store (readers see the old object or the new, never half).
    On an error the temporary file is removed and ``path`` is untouched."""
    path = as_path(path)
    if isinstance(path, ObjectPath):
        fd, name = tempfile.mkstemp(suffix="-" + path.name)
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            path.fs.put_file(str(tmp), path.path)
        finally:
            tmp.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class LogMirror:
    """``run.log`` as a local file the log handler appends to; for a run on an object store, a local copy
    seeded with the stored log and uploaded by :meth:`sync` (the store has no append)."""

    def __init__(self, path: Path | ObjectPath):
        self.target = path
        if isinstance(path, Path):
            self.local = path
            return
        fd, name = tempfile.mkstemp(prefix="scgnn-run-", suffix=".log")
        os.close(fd)
        self.local = Path(name)
        with contextlib.suppress(FileNotFoundError):
            self.local.write_bytes(path.read_bytes())

    def sync(self) -> None:
        if isinstance(self.target, ObjectPath):
            self.target.fs.put_file(str(self.local), self.target.path)

    def close(self) -> None:
        if isinstance(self.target, ObjectPath):
            self.sync()
            self.local.unlink(missing_ok=True)


# -- secrets in what is shown or kept --------------------------------------------------------------
_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://)[^/\s@'\"]+@")
_QUERY = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^\s?#'\"]*)\?[^\s'\"]+")


def redact(text: str) -> str:
    """``text`` with every URL's user and password and its query string (where signed URLs and SAS tokens
    carry their secrets) replaced by ``***``."""
    return _QUERY.sub(r"\1?***", _USERINFO.sub(r"\1***@", str(text)))
