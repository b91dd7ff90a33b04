"""What a run directory on an object store needs besides paths (:mod:`scgnn_scale.paths`): the checks of
``--out`` and the lock that keeps a second run off the same prefix.

The lock is a **lease**: ``RUN_DIR/.lock`` holds the holder's name, a random token, the length of its lease
(:data:`LEASE_SECONDS`, or the environment's ``SCGNN_LEASE_SECONDS``) and the time of its last heartbeat,
rewritten every sixth of the lease while the run lives. A lease not renewed for its length is stale and may
be taken, as is one whose holder is a dead process on this host (a
killed run is resumed at once on the machine it ran on; a pre-empted VM's successor waits out the lease).
Conditional writes (S3's ``If-None-Match``, GCS's generation match) would close the last race, two runs
starting within the same second, but each store spells them differently and fsspec exposes none of them;
the lease works on every fsspec store, and after writing it a starting run reads it back and backs off
when another run's token is there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time

from .errors import InputError
from .paths import ObjectPath, redact, store_error

log = logging.getLogger("scgnn_scale")

LEASE_SECONDS = 90.0
#: how long a starting run waits before reading its lease back (another writer's PUT lands by then)
SETTLE_SECONDS = 0.5


def check_out_prefix(root: ObjectPath, lock_name: str) -> None:
    """``--out`` on an object store: absent, empty or a run (as for a directory); the store answers here,
    so a missing bucket or missing credentials is one line before anything is written."""
    try:
        names = [p.name for p in root.iterdir()] if root.is_dir() else []
        if not names and root.is_file():
            raise InputError(f"{root}: --out is an object, not a prefix (a run directory)")
    except InputError:
        raise
    except FileNotFoundError:
        names = []
        if root.parts and not root.fs.exists(root.parts[0]):
            raise store_error(root, FileNotFoundError(root.parts[0]), "use it as --out") from None
    except Exception as exc:  # the store library's own errors (botocore, aiohttp) have no common base
        raise store_error(root, exc, "use it as --out") from None
    if any(n != lock_name for n in names) and "manifest.json" not in names:
        raise InputError(f"{root}: --out is a non-empty prefix that is not a scgnn-scale run; choose another")


def _read(lock: ObjectPath) -> dict | None:
    try:
        return json.loads(lock.read_bytes())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return {}  # half-written by another store client: treated as stale


def _alive_here(entry: dict) -> bool:
    if entry.get("host") != socket.gethostname():
        return True  # another machine's process: only its heartbeat tells
    try:
        os.kill(int(entry.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def lease_seconds() -> float:
    """How long this process's lease lasts unrenewed: ``SCGNN_LEASE_SECONDS`` (e.g. shorter, so that a
    pre-empted VM's successor starts sooner), else :data:`LEASE_SECONDS`."""
    try:
        return max(float(os.environ.get("SCGNN_LEASE_SECONDS", LEASE_SECONDS)), 1.0)
    except ValueError:
        raise InputError(f"SCGNN_LEASE_SECONDS={os.environ['SCGNN_LEASE_SECONDS']!r}: not a number of seconds") from None


def _live(entry: dict | None) -> bool:
    if not entry:
        return False
    age = time.time() - float(entry.get("heartbeat", 0))
    return age < float(entry.get("lease_s", LEASE_SECONDS)) and _alive_here(entry)


def lease_holder(lock: ObjectPath) -> str | None:
    """Who holds the lease now (``"pid N on HOST"``), or None when it is free or stale."""
    try:
        entry = _read(lock)
    except Exception:
        return None
    return entry.get("holder", "another process") if _live(entry) else None


@contextlib.contextmanager
def lease(lock: ObjectPath):
    """Hold the lease at ``lock`` for the life of the block, renewing it in a background thread."""
    root = lock.parent
    seconds = lease_seconds()
    mine = {"holder": f"pid {os.getpid()} on {socket.gethostname()}", "host": socket.gethostname(),
            "pid": os.getpid(), "token": secrets.token_hex(8), "lease_s": seconds}

    def write() -> None:
        lock.write_bytes(json.dumps({**mine, "heartbeat": time.time()}).encode())

    def refuse(entry: dict) -> InputError:
        return InputError(f"{root}: another scgnn-scale run is using this directory "
                          f"({entry.get('holder', 'another process')}); wait for it to end (or its lease of "
                          f"{float(entry.get('lease_s', LEASE_SECONDS)):g} s to lapse) or choose another --out")

    try:
        entry = _read(lock)
        if _live(entry):
            raise refuse(entry)
        write()
        time.sleep(SETTLE_SECONDS)
        entry = _read(lock)
    except InputError:
        raise
    except Exception as exc:
        raise store_error(root, exc, "write the run's lease") from None
    if not entry or entry.get("token") != mine["token"]:
        raise refuse(entry or {})
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(seconds / 6):
            try:
                write()
            except Exception as exc:  # the next beat tries again; the lease lapses only after several
                log.warning("run lease not renewed (%s)", redact(f"{type(exc).__name__}: {exc}"))

    beat = threading.Thread(target=renew, name="scgnn-lease", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(Exception):
            if (_read(lock) or {}).get("token") == mine["token"]:
                lock.unlink(missing_ok=True)
