"""The site's study index: patients, studies, series and instances in SQLite (sqlite-utils).

Data minimisation (PS3.15 Annex E, basic profile, as the guide): the index keeps only what
import, labelling and splitting need. No patient names, birth dates, addresses, physicians or
dates are stored; PatientID and AccessionNumber are replaced by keyed pseudonyms
(HMAC-SHA256 with a secret that never leaves the site), so labels keyed by either can still be
matched by hashing the CSV's values with the same key. UIDs are kept: they identify objects,
not people, and labels and re-imports need them; they stay on this machine like the files.

Writes are one transaction per batch (``record_batch``), so an interrupted import leaves a
consistent index and the next import picks up the files it had not reached.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import uuid
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import sqlite_utils

from shared.sqlite import open_database, transaction


@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceRecord:
    """One indexed image object: where it is, what it is, never who it shows."""

    sop_uid: str
    path: str  # absolute
    size: int
    mtime_ns: int
    sop_class_uid: str
    patient_key: str  # pseudonym of PatientID
    study_uid: str
    series_uid: str
    accession_key: str  # pseudonym of AccessionNumber ("" when absent)
    modality: str
    body_part: str
    manufacturer: str
    model: str
    rows: int
    columns: int
    frames: int
    pixel_spacing: str  # "row\\col" in mm, as in the header ("" when absent)
    bits_stored: int
    photometric: str
    transfer_syntax: str


@dataclass(frozen=True, slots=True)
class Rejection:
    path: str
    code: str  # stable: data.not_dicom, data.truncated, data.no_pixels, ...
    reason: str  # plain language, no patient data


@dataclass(frozen=True, slots=True)
class KnownFile:
    size: int
    mtime_ns: int
    sop_uid: str | None  # None: rejected last time


_INSTANCE_COLUMNS = {f.name: f.type for f in fields(InstanceRecord)}
_SQL_TYPES = {"str": str, "int": int}
_UPSERT_INSTANCE = (
    f"insert into instances ({', '.join(_INSTANCE_COLUMNS)})"
    f" values ({', '.join('?' * len(_INSTANCE_COLUMNS))}) on conflict (sop_uid) do update set "
    + ", ".join(f"{c} = excluded.{c}" for c in _INSTANCE_COLUMNS if c != "sop_uid")
)


def load_or_create_secret(path: Path) -> bytes:
    """The site's pseudonymisation key: 32 random bytes in a 0600 file, made once."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(32)
    # Written whole under a private name, then linked into place: two threads (or processes)
    # opening a new site at once agree on one key, and no reader ever sees half a key.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(secret)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return path.read_bytes()  # another opener made it first: use theirs
    finally:
        tmp.unlink(missing_ok=True)
    return secret


def keyed_pseudonym(secret: bytes, value: str, kind: str) -> str:
    """HMAC-SHA256 pseudonym of an identifier, 128 bits in hex; "" stays ""."""
    if not value:
        return ""
    mac = hmac.new(secret, f"{kind}\x00{value.strip()}".encode(), hashlib.sha256)
    return mac.hexdigest()[:32]


class SiteIndex:
    def __init__(self, path: Path, secret: bytes) -> None:
        self.path = path
        self._secret = secret
        self.db = open_database(path, durable=False, what="study index", create_folder=True)
        self._migrate()

    def close(self) -> None:
        self.db.conn.close()

    def table(self, name: str) -> sqlite_utils.db.Table:
        return self.db.table(name)

    def transaction(self) -> AbstractContextManager[None]:
        return transaction(self.db, "study index")

    def pseudonym(self, value: str, kind: str) -> str:
        """Keyed pseudonym of an identifier (``kind``: "patient", "accession"); "" stays ""."""
        return keyed_pseudonym(self._secret, value, kind)

    @property
    def pseudonym_key(self) -> bytes:
        """For the importer's worker processes on this machine; never sent anywhere."""
        return self._secret

    def _migrate(self) -> None:
        with self.transaction():
            self.table("meta").create({"key": str, "value": str}, pk="key", if_not_exists=True)
            self.table("patients").create(
                {"patient_key": str}, pk="patient_key", if_not_exists=True
            )
            self.table("studies").create(
                {"study_uid": str, "patient_key": str, "accession_key": str},
                pk="study_uid",
                if_not_exists=True,
            )
            self.table("series").create(
                {
                    "series_uid": str,
                    "study_uid": str,
                    "modality": str,
                    "body_part": str,
                    "manufacturer": str,
                    "model": str,
                },
                pk="series_uid",
                if_not_exists=True,
            )
            self.table("instances").create(
                {
                    k: _SQL_TYPES[v if isinstance(v, str) else v.__name__]
                    for k, v in _INSTANCE_COLUMNS.items()
                },
                pk="sop_uid",
                if_not_exists=True,
            )
            self.table("instances").create_index(["path"], unique=True, if_not_exists=True)
            self.table("instances").create_index(["study_uid"], if_not_exists=True)
            self.table("instances").create_index(["patient_key"], if_not_exists=True)
            self.table("rejections").create(
                {
                    "path": str,
                    "size": int,
                    "mtime_ns": int,
                    "code": str,
                    "reason": str,
                    "run_id": str,
                },
                pk="path",
                if_not_exists=True,
            )
            self.table("import_runs").create(
                {
                    "run_id": str,
                    "root": str,
                    "started_at": float,
                    "finished_at": float,
                    "status": str,
                    "counts": str,
                },
                pk="run_id",
                if_not_exists=True,
            )
            # Labels at study level, one row per (study, label column): see labels.py.
            self.table("labels").create(
                {"study_uid": str, "label_name": str, "value": str, "source": str},
                pk=("study_uid", "label_name"),
                if_not_exists=True,
            )
            self.table("labels").create_index(["label_name"], if_not_exists=True)
            self.table("meta").upsert({"key": "schema_version", "value": "1"}, pk="key")

    # -- import ----------------------------------------------------------------------------

    def known_files(self) -> dict[str, KnownFile]:
        """Every path seen before, indexed or rejected, with the size and mtime then."""
        execute = self.db.conn.execute  # plain tuples: this runs on every re-import
        known = {
            path: KnownFile(size, mtime, sop)
            for path, size, mtime, sop in execute(
                "select path, size, mtime_ns, sop_uid from instances"
            )
        }
        for path, size, mtime in execute("select path, size, mtime_ns from rejections"):
            known.setdefault(path, KnownFile(size, mtime, None))
        return known

    def start_run(self, root: str, now: float) -> str:
        run_id = uuid.uuid4().hex[:12]
        with self.transaction():
            self.table("import_runs").insert(
                {
                    "run_id": run_id,
                    "root": root,
                    "started_at": now,
                    "finished_at": None,
                    "status": "running",
                    "counts": "{}",
                }
            )
        return run_id

    def finish_run(self, run_id: str, status: str, counts: dict[str, int], now: float) -> None:
        with self.transaction():
            self.table("import_runs").update(
                run_id, {"finished_at": now, "status": status, "counts": json.dumps(counts)}
            )

    def record_batch(
        self,
        records: Iterable[InstanceRecord],
        rejections: Iterable[tuple[Rejection, int, int]],
        run_id: str,
    ) -> None:
        """One transaction: index ``records``, note ``rejections`` (with size, mtime_ns).

        A path that moves from rejected to indexed (or back) leaves the other table.
        """
        records = list(records)
        rejections = list(rejections)
        # Plain executemany upserts: sqlite-utils' upsert_all costs ~40 us a row (two
        # statements per row), more than reading the file's header does.
        ex = self.db.conn.executemany
        with self.transaction():
            if records:
                paths = [r.path for r in records]
                self._delete_paths("rejections", paths)
                # a file replaced by another object at the same path: drop the old row
                self._delete_paths("instances", paths)
                ex(
                    "insert into patients (patient_key) values (?) on conflict do nothing",
                    [(key,) for key in {r.patient_key: None for r in records}],
                )
                ex(
                    "insert into studies (study_uid, patient_key, accession_key) values (?, ?, ?)"
                    " on conflict (study_uid) do update set patient_key = excluded.patient_key,"
                    " accession_key = excluded.accession_key",
                    # one row per study and series: a CT series repeats them in every file
                    list(
                        {
                            r.study_uid: (r.study_uid, r.patient_key, r.accession_key)
                            for r in records
                        }.values()
                    ),
                )
                ex(
                    "insert into series (series_uid, study_uid, modality, body_part,"
                    " manufacturer, model) values (?, ?, ?, ?, ?, ?) on conflict (series_uid)"
                    " do update set study_uid = excluded.study_uid, modality = excluded.modality,"
                    " body_part = excluded.body_part, manufacturer = excluded.manufacturer,"
                    " model = excluded.model",
                    list(
                        {
                            r.series_uid: (
                                r.series_uid,
                                r.study_uid,
                                r.modality,
                                r.body_part,
                                r.manufacturer,
                                r.model,
                            )
                            for r in records
                        }.values()
                    ),
                )
                ex(_UPSERT_INSTANCE, [[getattr(r, c) for c in _INSTANCE_COLUMNS] for r in records])
            if rejections:
                paths = [rej.path for rej, _, _ in rejections]
                self._delete_paths("instances", paths)
                ex(
                    "insert or replace into rejections (path, size, mtime_ns, code, reason, run_id)"
                    " values (?, ?, ?, ?, ?, ?)",
                    [
                        (rej.path, size, mtime, rej.code, rej.reason, run_id)
                        for rej, size, mtime in rejections
                    ],
                )

    def forget_missing(self, paths: Iterable[str]) -> int:
        """Drop files that no longer exist on disk; returns how many."""
        paths = list(paths)
        with self.transaction():
            self._delete_paths("instances", paths)
            self._delete_paths("rejections", paths)
        return len(paths)

    def _delete_paths(self, table: str, paths: list[str]) -> None:
        for i in range(0, len(paths), 500):
            part = paths[i : i + 500]
            marks = ",".join("?" * len(part))
            self.db.execute(f"delete from {table} where path in ({marks})", part)

    # -- queries ---------------------------------------------------------------------------

    def instances(self, where: str | None = None, args: Any = None) -> Iterator[InstanceRecord]:
        for row in self.table("instances").rows_where(where, args, order_by="study_uid, sop_uid"):
            yield InstanceRecord(**row)

    def instance(self, sop_uid: str) -> InstanceRecord | None:
        rows = list(self.table("instances").rows_where("sop_uid = ?", [sop_uid]))
        return InstanceRecord(**rows[0]) if rows else None

    def rejections(self) -> list[Rejection]:
        return [
            Rejection(r["path"], r["code"], r["reason"])
            for r in self.table("rejections").rows_where(order_by="path")
        ]

    def count(self, table: str) -> int:
        return int(self.table(table).count)

    def check_consistency(self) -> list[str]:
        """Problems that would mean a half-written import (should always be empty)."""
        problems = []
        q = self.db.execute
        orphans = q(
            "select count(*) from instances i left join studies s "
            "on i.study_uid = s.study_uid where s.study_uid is null"
        ).fetchone()[0]
        if orphans:
            problems.append(f"{orphans} instances without their study")
        both = q(
            "select count(*) from instances i join rejections r on i.path = r.path"
        ).fetchone()[0]
        if both:
            problems.append(f"{both} paths both indexed and rejected")
        bad = q(
            "select count(*) from studies s left join patients p "
            "on s.patient_key = p.patient_key where p.patient_key is null"
        ).fetchone()[0]
        if bad:
            problems.append(f"{bad} studies without their patient")
        return problems
