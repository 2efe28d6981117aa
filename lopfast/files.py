"""Writing files so that a reader never sees a torn one, and serialising writers across processes.

Every file lopfast writes (models, checkpoints, results, caches, reports) goes through
:func:`write_atomic`: the content goes to a temporary file beside the target, which then replaces
the target in one ``os.replace``. A crash, a full disk or a kill mid-write leaves the old file (or
none), never half of one. :func:`file_lock` serialises read-modify-write cycles of files that
several processes share (the dispatch cache, a teacher being trained once for many workers).

This module sits below everything else in lopfast: it imports nothing from the package.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import stat
import sys
from typing import Any, BinaryIO, Callable, Iterator, TextIO, Union

__all__ = ["jsonable", "write_atomic", "write_bytes", "write_json", "write_text", "file_lock"]

PathLike = Union[str, "os.PathLike[str]"]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def write_atomic(path: PathLike, write: Callable[[Union[BinaryIO, TextIO]], Any], *, text: bool = False,
                 what: str = "file", make_dirs: bool = False) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then move it into place atomically.

    ``text`` opens the temporary file in text mode (UTF-8), else binary. ``what`` names the kind of
    file in error messages ("model file", "checkpoint"). ``make_dirs`` creates missing parent
    folders; otherwise a missing folder is an error naming it. A symlink is written through (the
    link stays, its target gets the new content), an existing file keeps its permission bits, and
    errors name the user's ``path``, never the temporary file. On any failure the temporary file
    is removed and the old file is left as it was.
    """
    path = os.fspath(path)
    target = os.path.realpath(path) if os.path.islink(path) else path
    if os.path.isdir(target):
        raise IsADirectoryError(21, f"cannot write {what}: is a directory", path)
    folder = os.path.dirname(os.path.abspath(target))
    if make_dirs:
        os.makedirs(folder, exist_ok=True)
    elif not os.path.isdir(folder):
        raise FileNotFoundError(2, f"no such directory {folder!r} to write the {what} in", path)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = None  # a new file: os.open's 0o666 minus the umask, as open() gives
    tmp = os.path.join(folder, f".{os.path.basename(target)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with (os.fdopen(fd, "w", encoding="utf-8", newline="") if text else os.fdopen(fd, "wb")) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the rename must not reach the disk before the data does
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno is not None:
            raise type(e)(e.errno, f"cannot write {what}: {e.strerror}", path) from None
        if isinstance(e, (OSError, RuntimeError)):  # torch's zip writer reports a full disk as a RuntimeError
            raise OSError(f"cannot write {what} {path!r}: {_first_line(e)}") from e
        raise


def write_bytes(path: PathLike, data: bytes, **kw) -> None:
    """:func:`write_atomic` of ``data``."""
    write_atomic(path, lambda f: f.write(data), **kw)


def write_text(path: PathLike, data: str, **kw) -> None:
    """:func:`write_atomic` of the string ``data`` (UTF-8)."""
    write_atomic(path, lambda f: f.write(data), text=True, **kw)


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values: dict keys as strings, tuples as lists, a non-finite float as its
    text ("nan", "inf"), a one-element torch tensor as its number, a callable as its name, anything
    else as its ``repr``."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    torch = sys.modules.get("torch")  # not imported here: this module sits below everything
    if torch is not None and isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if callable(obj):
        return getattr(obj, "__qualname__", None) or type(obj).__name__
    return repr(obj)


def write_json(path: PathLike, obj: Any, *, indent: int = 2, sort_keys: bool = False, default=float, **kw) -> None:
    """:func:`write_atomic` of ``obj`` as JSON (``default=float`` turns numpy/torch scalars into numbers)."""
    write_atomic(path, lambda f: json.dump(obj, f, indent=indent, sort_keys=sort_keys, default=default),
                 text=True, **kw)


@contextlib.contextmanager
def file_lock(path: PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) for the ``with`` block.

    Serialises writers across processes on one machine (``fcntl.flock``); where locks are not
    supported (another OS, some network file systems) it degrades to no lock: the writes stay
    atomic, only a concurrent update may be lost.
    """
    path = os.fspath(path)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # e.g. ENOLCK on a network file system
            pass
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
