"""SQLite as both sides use it: WAL journal, explicit transactions, our error on failure.

``durable=True`` (the coordinator's federation state) syncs every commit (``synchronous=FULL``)
because an acknowledgement promises the data is on disk; ``durable=False`` (the site's study
index, rebuilt from the files if need be) uses ``NORMAL``, which in WAL mode still leaves the
database consistent after a crash, only possibly missing the last commits.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils

from shared.errors import StorageError


def open_database(
    path: Path, *, durable: bool, what: str = "database", create_folder: bool = False
) -> sqlite_utils.Database:
    """Open (creating the file if needed); the folder too only with ``create_folder``."""
    try:
        if create_folder:
            path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        conn.execute("PRAGMA busy_timeout=10000")
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open the {what} {path}: {exc}", code="storage.open") from exc
    return sqlite_utils.Database(conn)


@contextmanager
def transaction(db: sqlite_utils.Database, what: str = "database") -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... commit, or roll back and raise ``StorageError``."""
    try:
        with db.conn:
            db.conn.execute("BEGIN IMMEDIATE")
            yield
    except sqlite3.Error as exc:
        raise StorageError(f"{what} write failed: {exc}", code="storage.write") from exc
