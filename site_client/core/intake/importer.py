"""Folder and file import: every DICOM file becomes an indexed instance or a rejection.

Theory of operation:

1. Walk. ``import_folder`` lists the folder with ``os.scandir`` (sorted, so "the first of two
   copies" means the same file every time) and one ``stat`` per file. Nothing is opened yet,
   so the total is known within a second even for a large archive.
2. Compare. A path whose size and mtime_ns match what the index saw last time is *unchanged*
   and is not opened again. Paths under the folder that the index knows but the disk no longer
   has are forgotten (*removed*).
3. Read. Every other file is read by :func:`read_header`: ``pydicom.dcmread`` with
   ``stop_before_pixels`` (the header only) and ``specific_tags`` (only the elements the index
   keeps), then a few bytes at the pixel data element to learn whether the image is there and
   whole. It returns an :class:`InstanceRecord` (identifiers already pseudonymised) or a
   :class:`Rejection` with a stable code:

   ================================  ===========================================================
   ``data.not_dicom``                not a DICOM file (no "DICM" preamble and not parseable)
   ``data.truncated``                the file ends before its pixel data does (cut-off copy)
   ``data.no_pixels``                no image in it: SR, KO, PR, DICOMDIR, ... (PS3.3 A.35, ...)
   ``data.unsupported_transfer_syntax``  compressed in a way no installed decoder reads
   ``data.missing_tags``             no SOPInstanceUID, StudyInstanceUID or SeriesInstanceUID
   ``data.duplicate``                the same SOP Instance UID as a file imported before
   ``data.unreadable``               the file cannot be opened (permissions, I/O error)
   ================================  ===========================================================

4. Write. Results go to the index in batches (``SiteIndex.record_batch``, one transaction
   each). An import stopped at any moment (cancel, Ctrl-C, power cut) leaves a consistent
   index; the next import skips what was written and reads the rest.

Import never stops on a bad file: a file is indexed, unchanged or rejected. The only exception
that leaves this module is :class:`StorageError` (the index itself cannot be written), and
:class:`DataError` before anything starts when the folder does not exist (an unmounted share
must not look like a folder whose files were all deleted).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
)

from shared.errors import DataError, StorageError
from site_client.core.intake.index import (
    InstanceRecord,
    KnownFile,
    Rejection,
    SiteIndex,
    keyed_pseudonym,
)

__all__ = [
    "ImportProgress",
    "ImportReport",
    "import_files",
    "import_folder",
    "read_header",
]

logger = logging.getLogger(__name__)

#: ``pseudonym(value, kind)``: keyed pseudonym of PatientID ("patient") or AccessionNumber
#: ("accession"); :meth:`SiteIndex.pseudonym` in practice.
Pseudonymizer = Callable[[str, str], str]

# --- the header elements the index keeps (PS3.6 tags) ------------------------------------

_SOP_CLASS = 0x00080016
_SOP_INSTANCE = 0x00080018
_ACCESSION = 0x00080050
_MODALITY = 0x00080060
_MANUFACTURER = 0x00080070
_MODEL = 0x00081090
_BODY_PART = 0x00180015
_IMAGER_PIXEL_SPACING = 0x00181164
_PATIENT_ID = 0x00100020
_STUDY_UID = 0x0020000D
_SERIES_UID = 0x0020000E
_PHOTOMETRIC = 0x00280004
_FRAMES = 0x00280008
_ROWS = 0x00280010
_COLUMNS = 0x00280011
_PIXEL_SPACING = 0x00280030
_BITS_STORED = 0x00280101
_MEDIA_SOP_CLASS = 0x00020002
_TRANSFER_SYNTAX = 0x00020010

_HEADER_TAGS = [
    Tag(t)
    for t in (
        _SOP_CLASS,
        _SOP_INSTANCE,
        _ACCESSION,
        _MODALITY,
        _MANUFACTURER,
        _MODEL,
        _BODY_PART,
        _IMAGER_PIXEL_SPACING,
        _PATIENT_ID,
        _STUDY_UID,
        _SERIES_UID,
        _PHOTOMETRIC,
        _FRAMES,
        _ROWS,
        _COLUMNS,
        _PIXEL_SPACING,
        _BITS_STORED,
    )
]
# Pixel Data, Float Pixel Data, Double Float Pixel Data: where stop_before_pixels stops
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_LONG_VRS = frozenset({b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UT", b"UC"})
_ITEM = 0xFFFEE000
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF


# --- results ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImportProgress:
    """Where an import stands; ``files_total`` is known once the folder has been listed."""

    files_seen: int
    files_total: int
    indexed: int
    unchanged: int
    rejected: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportReport:
    """What one import did. ``rejections`` are this run's (an unchanged rejected file is
    counted as unchanged; ``SiteIndex.rejections()`` lists them all)."""

    run_id: str
    files_total: int
    indexed: int
    unchanged: int
    rejected: int
    removed: int
    cancelled: bool
    rejections: tuple[Rejection, ...] = field(default=())
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "files_total": self.files_total,
            "indexed": self.indexed,
            "unchanged": self.unchanged,
            "rejected": self.rejected,
            "removed": self.removed,
            "cancelled": self.cancelled,
            "seconds": round(self.seconds, 3),
            "rejections": [
                {"path": r.path, "code": r.code, "reason": r.reason} for r in self.rejections
            ],
        }

    def summary(self) -> str:
        """Plain-language lines for the command line and the app."""
        head = "Import cancelled" if self.cancelled else "Import finished"
        lines = [
            f"{head} in {self.seconds:.1f} s: {self.indexed} files indexed, "
            f"{self.unchanged} unchanged, {self.rejected} not usable, "
            f"{self.removed} no longer on disk."
        ]
        by_code: dict[str, int] = {}
        for r in self.rejections:
            by_code[r.code] = by_code.get(r.code, 0) + 1
        for code, n in sorted(by_code.items()):
            lines.append(f"  {n} x {code}: {_CODE_TEXT.get(code, code)}")
        if self.cancelled:
            lines.append("What was indexed is kept; run the import again to finish.")
        return "\n".join(lines)


_CODE_TEXT = {
    "data.not_dicom": "not DICOM files",
    "data.truncated": "cut-off files (copy them again)",
    "data.no_pixels": "no image inside (reports, key objects, presentation states, DICOMDIR)",
    "data.unsupported_transfer_syntax": "compressed in a format that cannot be decoded here",
    "data.missing_tags": "missing the study, series or instance identifiers",
    "data.duplicate": "second copies of images already imported",
    "data.unreadable": "cannot be opened (permissions or disk error)",
}


# --- one file -----------------------------------------------------------------------------


def read_header(
    path: str | os.PathLike[str], pseudonym: Pseudonymizer
) -> InstanceRecord | Rejection:
    """Read one file's header (never its pixels) into a record, or say why it is not usable.

    Never raises for a bad file: every problem becomes a :class:`Rejection` with a stable code
    and a plain reason without patient data (exception details go to the debug log only).
    """
    return _read_file(os.path.abspath(os.fspath(path)), pseudonym)


def _read_file(path: str, pseudonym: Pseudonymizer) -> InstanceRecord | Rejection:
    try:
        with open(path, "rb") as fh:
            return _read(fh, path, os.fstat(fh.fileno()), pseudonym)
    except OSError as exc:
        logger.debug("cannot open %s: %s", path, type(exc).__name__)
        return Rejection(
            path,
            "data.unreadable",
            f"The file cannot be opened ({type(exc).__name__}); check its permissions.",
        )
    except Exception as exc:  # adapter edge: a file pydicom chokes on is a rejection
        logger.debug("cannot parse %s: %s", path, type(exc).__name__)
        return Rejection(
            path, "data.not_dicom", f"Not a readable DICOM file ({type(exc).__name__})."
        )


def _read(
    fh: BinaryIO, path: str, st: os.stat_result, pseudonym: Pseudonymizer
) -> InstanceRecord | Rejection:
    forced = False
    try:
        ds = pydicom.dcmread(fh, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except InvalidDicomError:
        # No "DICM" preamble (PS3.10 7.1): old or raw datasets still parse; anything else
        # will lack the identifiers and is rejected below.
        fh.seek(0)
        forced = True
        try:
            ds = pydicom.dcmread(
                fh, stop_before_pixels=True, force=True, specific_tags=_HEADER_TAGS
            )
        except Exception as exc:
            logger.debug("not DICOM %s: %s", path, type(exc).__name__)
            return Rejection(path, "data.not_dicom", _NOT_DICOM)
    except (EOFError, OSError, ValueError, TypeError, KeyError, IndexError) as exc:
        # a preamble but a header that breaks off or is garbled
        logger.debug("bad header %s: %s", path, type(exc).__name__)
        if fh.tell() >= st.st_size:
            return Rejection(path, "data.truncated", _TRUNCATED)
        return Rejection(path, "data.not_dicom", "The DICOM header is damaged.")

    head = _Header(ds)
    text = head.text
    sop_uid, study_uid, series_uid = text(_SOP_INSTANCE), text(_STUDY_UID), text(_SERIES_UID)
    if forced and not (sop_uid or study_uid or series_uid):
        return Rejection(path, "data.not_dicom", _NOT_DICOM)

    meta = _Header(ds.file_meta) if ds.file_meta is not None else _Header(None)
    implicit, little = head.encoding()
    syntax = meta.text(_TRANSFER_SYNTAX)
    if not syntax:
        syntax = (
            ImplicitVRLittleEndian
            if implicit
            else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        )

    if syntax == DeflatedExplicitVRLittleEndian:
        pixels = _deflated_has_pixels(fh)
    else:
        pixels = _pixel_state(fh, st.st_size, little, implicit)
    sop_class = head.text(_SOP_CLASS) or meta.text(_MEDIA_SOP_CLASS)
    if pixels == "truncated":
        return Rejection(path, "data.truncated", _TRUNCATED)
    if pixels == "none":
        at_end = fh.tell() >= st.st_size
        if at_end and (head.short_value() or (head.text(_ROWS) and head.text(_COLUMNS))):
            # a value cut off, or an image header (Rows, Columns) with nothing after it
            return Rejection(path, "data.truncated", _TRUNCATED)
        return Rejection(path, "data.no_pixels", _no_pixels_reason(sop_class))

    missing = [
        name
        for value, name in zip(
            (sop_uid, study_uid, series_uid),
            ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"),
            strict=True,
        )
        if not value
    ]
    if missing:
        return Rejection(
            path,
            "data.missing_tags",
            f"The file has no {', '.join(missing)}, which the index needs to keep track of it.",
        )
    problem = _decoder_problem(syntax)
    if problem:
        return Rejection(path, "data.unsupported_transfer_syntax", problem)

    patient_id = text(_PATIENT_ID)
    return InstanceRecord(
        sop_uid=sop_uid,
        path=path,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        sop_class_uid=sop_class,
        # No PatientID: the study stands for its own patient (a split cannot do better).
        patient_key=pseudonym(patient_id, "patient")
        if patient_id
        else pseudonym(study_uid, "patient-of-study"),
        study_uid=study_uid,
        series_uid=series_uid,
        accession_key=pseudonym(text(_ACCESSION), "accession"),
        modality=text(_MODALITY),
        body_part=text(_BODY_PART),
        manufacturer=text(_MANUFACTURER),
        model=text(_MODEL),
        rows=head.us(_ROWS),
        columns=head.us(_COLUMNS),
        frames=_int(text(_FRAMES), 1),
        pixel_spacing=text(_PIXEL_SPACING) or text(_IMAGER_PIXEL_SPACING),
        bits_stored=head.us(_BITS_STORED),
        photometric=text(_PHOTOMETRIC),
        transfer_syntax=syntax,
    )


_NOT_DICOM = "Not a DICOM file."
_TRUNCATED = "The file is cut short (an incomplete copy). Copy it again from the source."


class _Header:
    """The elements read, by plain integer tag, with fast text and US accessors.

    Values stay pydicom's raw bytes until asked for, and plain ASCII (the common case) is
    decoded here, ~10x cheaper than pydicom's per-element conversion; anything else goes
    through pydicom so that the Specific Character Set (PS3.5 6.1) is honoured.
    """

    __slots__ = ("ds", "elems")

    def __init__(self, ds: pydicom.Dataset | None) -> None:
        self.ds = ds
        self.elems: dict[int, Any] = {} if ds is None else {int(t): e for t, e in ds.items()}

    def text(self, tag: int) -> str:
        elem = self.elems.get(tag)
        if elem is None:
            return ""
        value = elem.value
        if isinstance(value, bytes):
            if value.isascii():
                text = value.decode("ascii")
                if "\\" in text:
                    return "\\".join(part.strip(" \x00") for part in text.split("\\"))
                return text.strip(" \x00")
            assert self.ds is not None
            value = self.ds[tag].value
        if value is None:
            return ""
        if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            return "\\".join(str(v).strip(" \x00") for v in value)
        return str(value).strip(" \x00")

    def us(self, tag: int) -> int:
        """An unsigned short (US), 0 when absent or malformed."""
        elem = self.elems.get(tag)
        if elem is None:
            return 0
        value = elem.value
        if isinstance(value, bytes):
            if len(value) < 2:
                return 0
            order: Literal["little", "big"] = (
                "little" if getattr(elem, "is_little_endian", True) else "big"
            )
            return int.from_bytes(value[:2], order)
        try:
            return int(value[0] if isinstance(value, (list, tuple)) else value)
        except (TypeError, ValueError, IndexError):
            return 0

    def encoding(self) -> tuple[bool, bool]:
        """(implicit VR, little endian) as the elements were actually read: some files name
        one transfer syntax in their meta information and use another, which pydicom
        detects."""
        for elem in self.elems.values():
            if hasattr(elem, "is_implicit_VR"):
                return bool(elem.is_implicit_VR), bool(elem.is_little_endian)
        assert self.ds is not None
        implicit, little = self.ds.original_encoding
        return bool(implicit), little is not False

    def short_value(self) -> bool:
        """Whether a value ended early (pydicom keeps what it got at the end of a file)."""
        for elem in self.elems.values():
            value = getattr(elem, "value", None)
            if isinstance(value, bytes) and len(value) < getattr(elem, "length", 0):
                return True
        return False


def _int(text: str, default: int) -> int:
    try:
        return int(text.split("\\")[0]) if text else default
    except ValueError:
        return default


def _pixel_state(fh: BinaryIO, size: int, little: bool, implicit: bool) -> str:
    """One of "ok", "none" or "truncated": what follows where stop_before_pixels stopped.

    pydicom rewinds to the start of the pixel data element when it stops there (and reads to
    the end otherwise), so a few bytes here tell whether the image is present and whole: a
    defined length must fit in the file; encapsulated pixel data (PS3.5 A.4) must reach its
    sequence delimiter.
    """
    pos = fh.tell()
    if pos > size:  # an element's length ran past the end of the file
        return "truncated"
    head = fh.read(12)
    if len(head) < 8:
        return "none"
    endian: Literal["little", "big"] = "little" if little else "big"
    tag = int.from_bytes(head[0:2], endian) << 16 | int.from_bytes(head[2:4], endian)
    if tag not in _PIXEL_TAGS:
        return "none"
    if implicit:
        length, start = int.from_bytes(head[4:8], endian), 8
    elif head[4:6] in _LONG_VRS:
        if len(head) < 12:
            return "truncated"
        length, start = int.from_bytes(head[8:12], endian), 12
    else:
        length, start = int.from_bytes(head[6:8], endian), 8
    if length != _UNDEFINED:
        return "ok" if pos + start + length <= size else "truncated"
    # encapsulated: walk the fragment items (one or a few per frame) to the delimiter
    offset = pos + start
    fh.seek(offset)
    while True:
        item = fh.read(8)
        if len(item) < 8:
            return "truncated"
        item_tag = int.from_bytes(item[0:2], "little") << 16 | int.from_bytes(item[2:4], "little")
        item_len = int.from_bytes(item[4:8], "little")
        if item_tag == _SEQUENCE_DELIMITER:
            return "ok"
        if item_tag != _ITEM or item_len == _UNDEFINED:
            return "truncated"
        offset += 8 + item_len
        if offset > size:
            return "truncated"
        fh.seek(offset)


def _deflated_has_pixels(fh: BinaryIO) -> str:
    """Deflated datasets (PS3.5 A.5) are inflated in memory, so the file position says nothing;
    read this rare kind again in full."""
    fh.seek(0)
    ds = pydicom.dcmread(fh, specific_tags=[Tag(0x7FE00010), Tag(0x7FE00008), Tag(0x7FE00009)])
    return "ok" if any(t in ds for t in _PIXEL_TAGS) else "none"


def _no_pixels_reason(sop_class: str) -> str:
    if sop_class == MediaStorageDirectoryStorage:
        return "This is a DICOMDIR (the table of contents of a CD or folder), not an image."
    name = UID(sop_class).name if sop_class else ""
    if name and name != sop_class:
        return f"No image in this file: it is a {name} object."
    return "No image in this file (no Pixel Data element)."


_DECODER_CACHE: dict[str, str] = {}


def _decoder_problem(text: str) -> str:
    """Why no installed pixel data decoder reads transfer syntax ``text`` ("" when one does)."""
    problem = _DECODER_CACHE.get(text)
    if problem is None:
        syntax = UID(text)
        name = syntax.name if syntax.name != str(syntax) else f"transfer syntax {syntax}"
        try:
            available = get_decoder(syntax).is_available
        except (NotImplementedError, ValueError):
            available = False
        problem = (
            ""
            if available
            else f"The pixels are stored as {name}, which no installed decoder can read."
        )
        _DECODER_CACHE[text] = problem
    return problem


# --- many files ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _File:
    path: str
    size: int
    mtime_ns: int


def import_folder(
    index: SiteIndex,
    root: str | os.PathLike[str],
    *,
    progress: Callable[[ImportProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    batch_size: int = 200,
    clock: Callable[[], float] = time.time,
) -> ImportReport:
    """Import every file under ``root`` (recursively); see the module docstring.

    ``should_stop`` is asked before each file: when it says True the import ends with
    ``cancelled=True`` and what was written stays. ``progress`` is called once the folder is
    listed and after each batch.
    """
    top = os.path.abspath(os.fspath(root))
    if not os.path.isdir(top):
        raise DataError(
            f"The folder {top} does not exist or is not a folder (is the disk or share "
            "connected?).",
            code="data.folder_not_found",
        )
    started = clock()
    run_id = index.start_run(top, started)
    engine = _Engine(index, run_id, progress, should_stop, batch_size, clock, started)
    return engine.guard(lambda: engine.run_folder(top))


def import_files(
    index: SiteIndex,
    paths: Iterable[str | os.PathLike[str]],
    *,
    progress: Callable[[ImportProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    batch_size: int = 200,
    clock: Callable[[], float] = time.time,
) -> ImportReport:
    """Import the given files (the PACS receiver calls this for each received object).

    Unlike :func:`import_folder` nothing is removed: files not listed are not looked at.
    """
    listed = [os.path.abspath(os.fspath(p)) for p in paths]
    started = clock()
    root = os.path.commonpath(listed) if listed else ""
    run_id = index.start_run(root, started)
    engine = _Engine(index, run_id, progress, should_stop, batch_size, clock, started)
    return engine.guard(lambda: engine.run_files(listed))


class _Engine:
    """One import run: compare, read, batch, write, report."""

    def __init__(
        self,
        index: SiteIndex,
        run_id: str,
        progress: Callable[[ImportProgress], None] | None,
        should_stop: Callable[[], bool] | None,
        batch_size: int,
        clock: Callable[[], float],
        started: float,
    ) -> None:
        self.index = index
        self.run_id = run_id
        self.progress = progress
        self.should_stop = should_stop
        self.batch_size = max(1, batch_size)
        self.clock = clock
        self.started = started
        self.total = 0
        self.seen = 0
        self.indexed = 0
        self.unchanged = 0
        self.removed = 0
        self.cancelled = False
        self.rejections: list[Rejection] = []
        self.records: list[InstanceRecord] = []
        self.pending_rejections: list[tuple[Rejection, int, int]] = []
        self.known: dict[str, KnownFile] = {}
        self.sop_paths: dict[str, str] = {}  # SOP Instance UID -> the path that holds it
        self.freed = False  # an indexed path lost its SOP UID (deleted, replaced, rejected)
        self.lookup_sops_in_db = False
        self._pseudonyms: dict[tuple[str, str], str] = {}
        self.reported = -1  # files_seen at the last progress call

    def _pseudonym(self, value: str, kind: str) -> str:
        """``index.pseudonym``, remembered for the run: a series repeats its PatientID in
        every one of its (often hundreds of) files."""
        key = (value, kind)
        found = self._pseudonyms.get(key)
        if found is None:
            if len(self._pseudonyms) >= 50_000:
                self._pseudonyms.clear()
            found = self._pseudonyms[key] = self.index.pseudonym(value, kind)
        return found

    # -- drivers -------------------------------------------------------------------------

    def guard(self, work: Callable[[], None]) -> ImportReport:
        try:
            work()
        except BaseException:
            # Ctrl-C, a crash in a callback, a broken database: the batches written stay
            # (each was one transaction); mark the run and let the exception go on.
            with contextlib.suppress(StorageError):
                self.index.finish_run(self.run_id, "interrupted", self._counts(), self.clock())
            raise
        status = "cancelled" if self.cancelled else "done"
        self.index.finish_run(self.run_id, status, self._counts(), self.clock())
        return ImportReport(
            run_id=self.run_id,
            files_total=self.total,
            indexed=self.indexed,
            unchanged=self.unchanged,
            rejected=len(self.rejections),
            removed=self.removed,
            cancelled=self.cancelled,
            rejections=tuple(self.rejections),
            seconds=max(0.0, self.clock() - self.started),
        )

    def run_folder(self, top: str) -> None:
        files, unreadable_dirs = _walk(top)
        self.total = len(files) + len(unreadable_dirs)
        self.known = self.index.known_files()
        on_disk = {f.path for f in files}
        prefix = top if top.endswith(os.sep) else top + os.sep
        blind = tuple(d + os.sep for d in unreadable_dirs)  # not listed: not known to be gone
        missing = [
            p
            for p in self.known
            if p.startswith(prefix) and p not in on_disk and not (blind and p.startswith(blind))
        ]
        if missing:
            self.removed = self.index.forget_missing(missing)
            for p in missing:
                if self.known.pop(p).sop_uid:
                    self.freed = True
        self.sop_paths = {k.sop_uid: p for p, k in self.known.items() if k.sop_uid}
        for d in unreadable_dirs:
            self.rejections.append(
                Rejection(
                    d, "data.unreadable", "This folder cannot be listed; check its permissions."
                )
            )
        self._report()
        self._process(files)
        if not self.cancelled and self.freed:
            self._recheck_duplicates(files)
        self._flush()
        self._report()

    def run_files(self, paths: Sequence[str]) -> None:
        self.total = len(paths)
        self.lookup_sops_in_db = True
        self.known = _known_paths(self.index, paths)
        files = []
        for p in paths:
            try:
                st = os.stat(p)
            except OSError as exc:
                self.seen += 1
                self.rejections.append(
                    Rejection(
                        p,
                        "data.unreadable",
                        f"The file cannot be found or opened ({type(exc).__name__}).",
                    )
                )
                continue
            if not stat.S_ISREG(st.st_mode):
                self.seen += 1
                self.rejections.append(Rejection(p, "data.not_dicom", "Not a regular file."))
                continue
            files.append(_File(p, st.st_size, st.st_mtime_ns))
        self._report()
        self._process(files)
        self._flush()
        self._report()

    # -- the loop ------------------------------------------------------------------------

    def _process(self, files: Sequence[_File], *, force: bool = False) -> None:
        should_stop = self.should_stop
        known = self.known
        batch = self.batch_size

        def changed(f: _File) -> bool:
            k = known.get(f.path)
            return force or k is None or k.size != f.size or k.mtime_ns != f.mtime_ns

        flags = [changed(f) for f in files]
        to_read = [f.path for f, c in zip(files, flags, strict=True) if c]
        pool = _reader_pool(len(to_read), self.index.pseudonym_key)
        if pool is None:
            pseudonym = self._pseudonym
            results: Iterator[InstanceRecord | Rejection] = (
                _read_file(p, pseudonym) for p in to_read
            )
        else:  # headers parsed by worker processes, in order, while this one writes
            results = pool.imap(_read_in_worker, to_read, chunksize=_CHUNK)
        try:
            for f, is_changed in zip(files, flags, strict=True):
                if should_stop is not None and should_stop():
                    self.cancelled = True
                    return
                if is_changed:
                    self._take(f, known.get(f.path), next(results))
                else:
                    self.unchanged += 1
                self.seen += 1
                if self.seen % batch == 0:
                    self._flush()
                    self._report()
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()

    def _take(self, f: _File, k: KnownFile | None, result: InstanceRecord | Rejection) -> None:
        old_sop = k.sop_uid if k is not None else None
        kept = isinstance(result, InstanceRecord) and result.sop_uid == old_sop
        if old_sop and not kept and self.sop_paths.get(old_sop) == f.path:
            del self.sop_paths[old_sop]
            self.freed = True
        if isinstance(result, InstanceRecord):
            first = self._owner(result.sop_uid)
            if first is not None and first != f.path:
                result = Rejection(
                    f.path,
                    "data.duplicate",
                    f"The same image (SOP Instance UID) as {first}, which was imported first.",
                )
            else:
                self.sop_paths[result.sop_uid] = f.path
                self.records.append(result)
                self.indexed += 1
                return
        self.pending_rejections.append((result, f.size, f.mtime_ns))
        self.rejections.append(result)

    def _owner(self, sop_uid: str) -> str | None:
        owner = self.sop_paths.get(sop_uid)
        if owner is None and self.lookup_sops_in_db:
            row = self.index.db.execute(
                "select path from instances where sop_uid = ?", [sop_uid]
            ).fetchone()
            owner = row[0] if row else None
        return owner

    def _recheck_duplicates(self, files: Sequence[_File]) -> None:
        """A file rejected earlier as a second copy gets its chance when the first copy has
        gone (deleted, replaced) in this run."""
        dup_paths = {r.path for r in self.index.rejections() if r.code == "data.duplicate"}
        again = [
            f
            for f in files
            if f.path in dup_paths
            and (k := self.known.get(f.path)) is not None
            and (k.size, k.mtime_ns) == (f.size, f.mtime_ns)
        ]
        if not again:
            return
        # they were counted as unchanged in the first pass
        self.unchanged -= len(again)
        self.seen -= len(again)
        self._process(again, force=True)

    def _flush(self) -> None:
        if self.records or self.pending_rejections:
            self.index.record_batch(self.records, self.pending_rejections, self.run_id)
            self.records = []
            self.pending_rejections = []

    def _report(self) -> None:
        if self.progress is not None and self.seen != self.reported:
            self.reported = self.seen
            self.progress(
                ImportProgress(
                    files_seen=self.seen,
                    files_total=self.total,
                    indexed=self.indexed,
                    unchanged=self.unchanged,
                    rejected=len(self.rejections),
                )
            )

    def _counts(self) -> dict[str, int]:
        return {
            "files_total": self.total,
            "indexed": self.indexed,
            "unchanged": self.unchanged,
            "rejected": len(self.rejections),
            "removed": self.removed,
        }


# --- parallel header reading ----------------------------------------------------------------
#
# Parsing headers is pure Python (GIL-bound), so a large import reads them in worker
# processes: forked, so they start in milliseconds with everything imported, and only from a
# process with a single thread (forking a threaded process, such as the PACS receiver's, could
# copy a held lock). Results come back in file order, so duplicates and batches are decided
# exactly as in one process. The workers get the pseudonymisation key: same machine, never
# sent anywhere.

_PARALLEL_MIN = 256  # below this, starting workers costs more than it saves
_CHUNK = 32
_worker_pseudonym: Pseudonymizer | None = None


def _reader_pool(n: int, secret: bytes) -> Any:
    if n < _PARALLEL_MIN or threading.active_count() > 1 or not hasattr(os, "fork"):
        return None
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    if cpus < 2:
        return None
    ctx = multiprocessing.get_context("fork")
    return ctx.Pool(min(cpus, 4), initializer=_init_worker, initargs=(secret,))


def _init_worker(secret: bytes) -> None:
    global _worker_pseudonym
    _worker_pseudonym = functools.lru_cache(maxsize=50_000)(
        functools.partial(keyed_pseudonym, secret)
    )


def _read_in_worker(path: str) -> InstanceRecord | Rejection:
    assert _worker_pseudonym is not None
    return _read_file(path, _worker_pseudonym)


def _walk(top: str) -> tuple[list[_File], list[str]]:
    """Regular files under ``top`` in sorted order, and the folders that cannot be listed.

    Symbolic links to files are followed; links to folders are not (no loops)."""
    files: list[_File] = []
    unreadable: list[str] = []
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            unreadable.append(folder)
            continue
        subfolders = []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    subfolders.append(entry.path)
                elif entry.is_file():
                    st = entry.stat()
                    files.append(_File(entry.path, st.st_size, st.st_mtime_ns))
            except OSError:
                continue  # vanished or a broken link: nothing to import
        stack.extend(reversed(subfolders))
    # folders are visited depth-first, so the list is in path order within each folder
    return files, unreadable


def _known_paths(index: SiteIndex, paths: Sequence[str]) -> dict[str, KnownFile]:
    """``known_files()`` restricted to ``paths`` (a PACS push must not load the whole index)."""
    known: dict[str, KnownFile] = {}
    for i in range(0, len(paths), 500):
        part = list(paths[i : i + 500])
        marks = ",".join("?" * len(part))
        for path, size, mtime, sop in index.db.execute(
            f"select path, size, mtime_ns, sop_uid from instances where path in ({marks})", part
        ):
            known[path] = KnownFile(size, mtime, sop)
        for path, size, mtime in index.db.execute(
            f"select path, size, mtime_ns from rejections where path in ({marks})", part
        ):
            known.setdefault(path, KnownFile(size, mtime, None))
    return known
