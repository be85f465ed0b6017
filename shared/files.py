"""Writing files so that a crash or power cut leaves each one either absent or complete.

Both sides need it before they acknowledge anything: the coordinator for model and update
blobs, the site for objects pushed from its PACS.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import mmap
import os
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO


def write_durably(path: Path, parts: Sequence[bytes | memoryview]) -> None:
    """Temporary file in the same folder, fsync, atomic rename, fsync the folder (and its
    parent when the folder is new). Raises ``OSError``; callers turn it into their error."""
    new_dir = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem[:40]}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            for part in parts:
                fh.write(part)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    if new_dir:
        fsync_dir(path.parent.parent)


def map_file(path: Path) -> memoryview | bytes:
    """A file's bytes, read-only, mapped rather than copied: a payload of tens of MB that is
    only sent on (an update in the site's outbox) costs no copy of its own and no fresh
    memory. On POSIX the mapping stays valid after the file is renamed or deleted, for as long
    as the view is referenced; Windows refuses to rename or delete a mapped file, so there the
    bytes are read. Raises ``OSError``."""
    with open(path, "rb") as fh:
        if os.name == "nt" or os.fstat(fh.fileno()).st_size == 0:
            return fh.read()  # an empty file cannot be mapped either
        return memoryview(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` of ``fd`` to the disk
    now, without waiting for it (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; nothing
    elsewhere). Why: a file written piece by piece and fsynced at the end otherwise goes to
    the disk all at once inside that fsync, which an acknowledgement waits for, and while the
    journal commit it starts waits for those tens of MB, writers of other files on the file
    system stall too. It guarantees nothing: the fsync still makes the file durable."""
    call = _sync_file_range()
    if call is not None and length > 0:
        call(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE; failure only means no head start


def drop_cached(fd: int) -> None:
    """Let the kernel drop the cached pages of a file whose bytes are on the disk (fsynced)
    and that nobody reads back soon (``posix_fadvise(DONTNEED)``; nothing where it does not
    exist). Why: a coordinator keeps every update and model it receives, tens of MB a round;
    cached, they make the page cache grow by as much every round, and on a virtual machine
    memory the kernel takes for the first time costs several times what reused pages cost
    (measured: 200 MB written to new files, 0.05 s when earlier files' pages are freed, 0.48 s
    when they stay cached). Dropped, their pages are reused by the next round's writes."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


DIRECT_ALIGN = 4096  # offsets, lengths and the buffer's address, for any logical block size
DIRECT_SLICE = 4 << 20
_bounce = threading.local()


def write_direct(path: Path, data: bytes | memoryview) -> bool:
    """Write ``data`` to the new file ``path`` past the page cache (Linux ``O_DIRECT``) and
    fsync it; ``False``, with nothing left behind, where the system or the file system takes
    no direct writes: the caller then writes it the usual way. Why: a blob written once and
    rarely read again (a round's model) otherwise goes through fresh page-cache pages, and on
    a virtual machine memory the kernel takes for the first time costs several times what
    reused memory costs, more in some rounds than in others (measured: the same 20 MB model
    written in 8 or in 56 ms). Written directly, it costs a copy into one aligned buffer that
    each thread keeps, and the disk's time. Raises ``OSError`` for a failed write."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | flag, 0o644)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # a file system without direct I/O (tmpfs)
            return False
        raise
    try:
        _write_aligned(fd, memoryview(data).cast("B"))
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        if exc.errno == errno.EINVAL:  # the device wants another alignment
            return False
        raise
    os.close(fd)
    return True


def _write_aligned(fd: int, view: memoryview) -> None:
    buf = getattr(_bounce, "buf", None)
    if buf is None:
        buf = _bounce.buf = mmap.mmap(-1, DIRECT_SLICE)  # anonymous: page-aligned
    for lo in range(0, len(view), DIRECT_SLICE):
        piece = view[lo : lo + DIRECT_SLICE]
        size = len(piece)
        padded = -(-size // DIRECT_ALIGN) * DIRECT_ALIGN
        buf[:size] = piece
        buf[size:padded] = bytes(padded - size)
        with memoryview(buf) as whole:
            if os.write(fd, whole[:padded]) != padded:
                raise OSError(errno.EIO, "a direct write was cut short")
    if len(view) % DIRECT_ALIGN:
        os.ftruncate(fd, len(view))  # the last slice's padding


def open_recycled(path: Path, spare: Path | None) -> BinaryIO:
    """Open ``path`` to be written from its start, in the file ``spare`` (moved to ``path``)
    if there is one; the caller truncates at its end (``fh.truncate()``). Why: a file
    rewritten every round (a site's update) otherwise takes fresh page-cache pages each time,
    and on a virtual machine memory the kernel takes for the first time costs several times
    what reused pages cost; written over the last one's cached pages, it costs its copy
    only (``benchmarks/round_overhead``: the sites' processor time a round fell by 7 %).
    Nothing is durable here: ``path`` may hold the spare's old bytes after the written ones
    until the caller's truncate, so write it under a temporary name and rename it after."""
    if spare is not None:
        with contextlib.suppress(OSError):  # no spare (the first round), or not movable
            os.replace(spare, path)
            return open(path, "r+b")
    return open(path, "wb")


def recycle(path: Path, spare: Path) -> None:
    """Keep a file that is no longer needed as the ``spare`` of :func:`open_recycled`
    instead of deleting it; deleted if it cannot be moved."""
    try:
        os.replace(path, spare)
    except OSError:  # gone already, or no folder for the spare
        path.unlink(missing_ok=True)


@functools.cache
def _sync_file_range() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (POSIX: fsync the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
