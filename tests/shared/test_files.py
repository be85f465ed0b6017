"""shared.files: a rewritten file reuses a spare's pages; a recycled file becomes the spare."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.files import DIRECT_SLICE, open_recycled, recycle, write_direct


def test_a_file_is_written_in_the_spare_and_truncated_by_the_caller(tmp_path: Path) -> None:
    spare, out = tmp_path / "spare", tmp_path / "out.tmp"
    spare.write_bytes(b"x" * 10_000)
    inode = spare.stat().st_ino
    with open_recycled(out, spare) as fh:
        fh.write(b"new bytes")
        fh.truncate()
    assert not spare.exists()
    assert out.stat().st_ino == inode  # the spare's file, not a new one
    assert out.read_bytes() == b"new bytes"


def test_without_a_spare_the_file_is_new_and_an_old_one_is_emptied(tmp_path: Path) -> None:
    out = tmp_path / "out.tmp"
    out.write_bytes(b"a crashed write left this")
    with open_recycled(out, tmp_path / "no-spare") as fh:
        fh.write(b"ok")
    assert out.read_bytes() == b"ok"
    with open_recycled(out, None) as fh:
        fh.write(b"again")
    assert out.read_bytes() == b"again"


def test_recycle_keeps_the_file_as_the_spare_or_deletes_it(tmp_path: Path) -> None:
    used, spare = tmp_path / "used", tmp_path / "spare"
    used.write_bytes(b"accepted")
    recycle(used, spare)
    assert not used.exists() and spare.read_bytes() == b"accepted"
    used.write_bytes(b"next")
    recycle(used, spare)  # the spare is replaced: one is kept
    assert spare.read_bytes() == b"next"
    used.write_bytes(b"no folder for it")
    recycle(used, tmp_path / "missing" / "spare")
    assert not used.exists()  # deleted, as before spares
    recycle(tmp_path / "gone", spare)  # nothing to keep: no error
    assert spare.read_bytes() == b"next"


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 5000, DIRECT_SLICE, DIRECT_SLICE * 2 + 7])
def test_a_direct_write_holds_exactly_the_bytes(tmp_path: Path, size: int) -> None:
    """Whole slices, a padded last one cut back to size, an empty file."""
    data = os.urandom(size)
    path = tmp_path / "blob"
    assert write_direct(path, data)
    assert path.read_bytes() == data


def test_a_direct_write_never_replaces_a_file(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"kept")
    with pytest.raises(FileExistsError):
        write_direct(path, b"other")
    assert path.read_bytes() == b"kept"


def test_without_direct_io_nothing_is_written_and_the_caller_is_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    path = tmp_path / "blob"
    assert write_direct(path, b"data") is False
    assert not path.exists()
