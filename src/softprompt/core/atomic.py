"""The one atomic write: a temp file in the target's folder, fsync, ``os.replace``, fsync the folder.

Why: a crash or a full disk must never leave half a prompt, checkpoint, adapter or results file
under the real name, and a rename only survives a power cut once the folder itself is synced.
Every file the package writes for keeps goes through :func:`write_atomic` (or, where the temp
file is checked before it is committed, :func:`write_temp` then :func:`commit`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

__all__ = ["commit", "file_lock", "fsync_dir", "remove_tree", "write_atomic", "write_bytes", "write_json", "write_safetensors",
           "write_temp", "write_text"]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename in ``path`` durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_temp(folder: str | os.PathLike[str], write: Callable[[Path], None] | bytes, *, prefix: str) -> Path:
    """A synced temp file ``<prefix>*.tmp`` in ``folder`` holding ``write``'s output (bytes, or a
    function given the temp path); removed again if writing fails."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    tmp = Path(name)
    try:
        if isinstance(write, (bytes, bytearray, memoryview)):
            with os.fdopen(fd, "wb") as fh:
                fh.write(write)
                fh.flush()
                os.fsync(fh.fileno())
        else:
            os.close(fd)
            write(tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def commit(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Move a temp file from :func:`write_temp` onto ``path`` (the commit point) and sync the folder."""
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def write_atomic(path: str | os.PathLike[str], write: Callable[[Path], None] | bytes, *,
                 mode: int | None = None, prefix: str | None = None) -> None:
    """Write ``path`` atomically: ``write`` (bytes, or a function given a temp path in the same
    folder) fills a temp file that replaces ``path`` only once complete and synced.  ``mode``
    sets the permissions (a temp file starts as 0600)."""
    path = Path(path)
    tmp = write_temp(path.parent, write, prefix=prefix if prefix is not None else f".{path.name}.")
    try:
        if mode is not None:
            os.chmod(tmp, mode)
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike[str], data: bytes, **kw: Any) -> None:
    write_atomic(path, data, **kw)


def write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8", **kw: Any) -> None:
    write_atomic(path, text.encode(encoding), **kw)


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = None, default: Any = None,
               **kw: Any) -> None:
    write_text(path, json.dumps(obj, indent=indent, default=default), **kw)


def write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None, **kw: Any) -> None:
    """``tensors`` (torch) as a safetensors file, byte-identical to ``safetensors.torch.save_file``."""
    from safetensors.torch import save_file

    write_atomic(path, lambda tmp: save_file(dict(tensors), str(tmp), metadata=None if metadata is None else dict(metadata)),
                 **kw)


@contextlib.contextmanager
def file_lock(path: Path, *, what: str) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path``; yields whether a lock is really held.

    The kernel drops the lock when the holder dies (even by SIGKILL), so a crashed
    holder can never wedge later ones.  On systems without ``flock`` we yield
    False and rely on the atomic rename alone.
    """
    if fcntl is None:  # pragma: no cover - Windows
        yield False
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process that holds %s (%s) ...", path, what)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # e.g. ENOLCK on some network file systems
            logger.warning("cannot lock %s (%s); going on without a lock", path, exc)
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Delete ``path`` by first renaming it aside, so nobody sees it half-deleted."""
    if not path.exists():
        return
    trash = path.with_name(f".{path.name}.old-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.replace(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)
