"""PACS push: a DICOM C-STORE receiver (Storage SCP) that feeds the folder import.

Theory of operation
-------------------
The hospital's PACS (or a modality) is configured with this site's AE title, host and port and
pushes studies to it. ``PacsReceiver`` runs a pynetdicom association server in background
threads (one per association) and does three things:

1. **Who may send.** Only calling AE titles on the allow list are accepted; anyone else gets
   A-ASSOCIATE-RJ "calling AE title not recognised" (PS3.8 section 9.3.4). An empty allow list
   is refused at construction, because pynetdicom would take it to mean "accept everyone".
2. **Store, durably, as received.** Each C-STORE data set is written, with its file meta
   information (PS3.10 section 7.1) and *without* decompressing it, to
   ``inbox/<hash of StudyInstanceUID>/<SOPInstanceUID>.dcm``: a temporary file in the same
   folder, fsync, rename, fsync of the folder. Only then does the receiver answer Success
   (0x0000), so a PACS that saw Success may delete its copy. A local problem (disk full,
   permissions) answers 0xA700 "Refused: out of resources"; a data set we cannot read or place
   (no Study Instance UID, malformed SOP Instance UID) answers 0xC000 "Error: cannot
   understand" (PS3.4 Annex B.2.3). The peer never brings the receiver down: every handler
   catches everything and turns it into a status.
3. **Import, off the association thread.** Stored paths go on a queue; one worker thread
   imports them in batches through ``import_files``, the same path as folder import, so a
   pushed object is indexed, or rejected with a reason, exactly like one copied from a CD.
   A file stored but not yet imported when the process dies is picked up at the next
   ``start()``, which queues the whole inbox (the import skips files it already knows).

Transfer syntaxes (PS3.5 section 10): the uncompressed ones, deflate, and the compressed ones
the pixel decoding supports (JPEG baseline, extended and lossless, JPEG-LS, JPEG 2000, RLE), each
offered only when pydicom has a working decoder on this machine. A PACS that proposes something
else (MPEG, HTJ2K...) is expected to fall back to one of these for that object.

Logs hold no patient data: the SOP class, the transfer syntax, the calling AE title and a short
hash of the SOP Instance UID.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

from pydicom import uid
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.sop_class import Verification

from shared.errors import TesseraError
from shared.files import write_durably
from site_client.core.intake.importer import import_files

if TYPE_CHECKING:
    from pynetdicom.events import Event
    from pynetdicom.transport import ThreadedAssociationServer

    from site_client.core.config import SiteDir
    from site_client.core.intake.index import SiteIndex

log = logging.getLogger(__name__)

# C-STORE statuses, PS3.4 Annex B.2.3 and PS3.7 Annex C
STATUS_SUCCESS: Final = 0x0000
STATUS_OUT_OF_RESOURCES: Final = 0xA700
STATUS_CANNOT_UNDERSTAND: Final = 0xC000

_CANDIDATE_SYNTAXES: Final = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.RLELossless,
)

# PS3.5 section 9.1: digits and dots, no leading zero in a component, at most 64 characters
_UID_RE: Final = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
# PS3.5 Table 6.2-1 (AE): up to 16 characters, no backslash, no control characters
_AE_RE: Final = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")


class PacsReceiverError(TesseraError):
    """The receiver cannot be set up or cannot listen (bad AE title, port in use...)."""

    code = "pacs.error"


@dataclass(frozen=True, slots=True)
class PacsCounts:
    """What the receiver has done since it started, for the status bar."""

    received: int = 0  # objects stored in the inbox (answered Success)
    failed: int = 0  # C-STORE requests answered with a failure status
    refused: int = 0  # associations refused (calling AE title not on the allow list, ...)
    indexed: int = 0  # received objects the import indexed (or found unchanged)
    import_rejected: int = 0  # received objects the import rejected, with a reason
    pending: int = 0  # stored and waiting for the import


def accepted_transfer_syntaxes() -> list[str]:
    """The transfer syntaxes offered to a PACS: those pydicom can decode on this machine."""
    from pydicom.pixels import get_decoder

    accepted = []
    for ts in _CANDIDATE_SYNTAXES:
        try:
            available = get_decoder(ts).is_available
        except (NotImplementedError, ValueError):
            available = False
        if available:
            accepted.append(str(ts))
    return accepted


def short_hash(value: str) -> str:
    """A short, stable stand-in for a UID in logs."""
    return hashlib.sha256(value.encode()).hexdigest()[:10]


def inbox_path(inbox: Path, study_uid: str, sop_uid: str) -> Path:
    """Where a received object is kept: one folder per study, one file per instance."""
    return inbox / hashlib.sha256(study_uid.encode()).hexdigest()[:16] / f"{sop_uid}.dcm"


def _check_ae_title(value: str, what: str) -> str:
    title = value.strip()
    if not _AE_RE.fullmatch(title):
        raise PacsReceiverError(
            f"{what} {value!r} is not a valid DICOM AE title: use 1 to 16 letters, digits, "
            "spaces or punctuation other than a backslash (for example TESSERA).",
            code="pacs.config",
        )
    return title


_STOP: Final = object()


class PacsReceiver:
    """A C-STORE/C-ECHO receiver that stores pushed objects in ``inbox`` and imports them.

    ``open_index`` returns the study index to import into (called once, by ``start()``; the
    receiver closes it in ``stop()``). ``port=0`` picks a free port; ``port`` tells which.
    The default ``host`` is loopback so that nothing is exposed by accident; a PACS on
    another machine needs ``host="0.0.0.0"`` (what ``tessera-site pacs-listen`` uses).
    """

    def __init__(
        self,
        inbox: Path,
        open_index: Callable[[], SiteIndex],
        *,
        ae_title: str,
        port: int,
        allowed_aes: Sequence[str],
        host: str = "127.0.0.1",
        batch_seconds: float = 0.2,
        batch_size: int = 500,
    ) -> None:
        self.ae_title = _check_ae_title(ae_title, "The AE title")
        if isinstance(allowed_aes, str):
            allowed_aes = [allowed_aes]
        allowed = sorted({_check_ae_title(a, "The allowed AE title") for a in allowed_aes})
        if not allowed:
            raise PacsReceiverError(
                "Name at least one PACS AE title that may send images (--allow-ae PACS1): "
                "without an allow list anyone on the network could push data here.",
                code="pacs.config",
            )
        if not 0 <= port <= 65535:
            raise PacsReceiverError(
                f"Port {port} is not a TCP port: use a number from 1 to 65535 "
                "(104 or 11112 are usual for DICOM).",
                code="pacs.config",
            )
        self.allowed_aes = allowed
        self.inbox = inbox
        self.host = host
        self._requested_port = port
        self._open_index = open_index
        self._batch_seconds = batch_seconds
        self._batch_size = batch_size

        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._counts: dict[str, int] = dict.fromkeys(PacsCounts.__slots__, 0)
        self._queue: queue.Queue[Any] = queue.Queue()
        self._server: ThreadedAssociationServer | None = None
        self._worker: threading.Thread | None = None
        self._index: SiteIndex | None = None

        self._ae = AE(ae_title=self.ae_title)
        self._ae.require_calling_aet = allowed
        syntaxes = accepted_transfer_syntaxes()
        for context in AllStoragePresentationContexts:
            self._ae.add_supported_context(context.abstract_syntax, syntaxes)
        self._ae.add_supported_context(Verification)

    @classmethod
    def for_site(cls, site_dir: SiteDir, **kwargs: Any) -> PacsReceiver:
        """A receiver that stores in the site's PACS inbox and imports into its index."""
        return cls(site_dir.pacs_inbox, site_dir.open_index, **kwargs)

    # -- life cycle ------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        """The port listened on (the real one when constructed with ``port=0``)."""
        if self._server is not None:
            return int(self._server.server_address[1])
        return self._requested_port

    def start(self) -> None:
        """Listen in background threads; returns at once. Raises ``PacsReceiverError``."""
        if self._server is not None:
            return
        try:
            self.inbox.mkdir(parents=True, exist_ok=True)
            leftovers = self._tidy_inbox()
        except OSError as exc:
            raise PacsReceiverError(
                f"Cannot use the PACS inbox {self.inbox}: {exc.strerror}. Check that the "
                "site's data folder exists and is writable.",
                code="pacs.inbox",
            ) from exc
        self._index = self._open_index()
        self._worker = threading.Thread(target=self._import_loop, name="pacs-import", daemon=True)
        self._worker.start()
        if leftovers:
            log.info("importing %d object(s) left in the PACS inbox", len(leftovers))
            for path in leftovers:
                self._enqueue(path)
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        try:
            self._server = self._ae.start_server(
                (self.host, self._requested_port), block=False, evt_handlers=handlers
            )
        except OSError as exc:
            self._stop_worker()
            if exc.errno == errno.EADDRINUSE:
                raise PacsReceiverError(
                    f"Port {self._requested_port} on {self.host} is already in use, perhaps by "
                    "another DICOM receiver. Stop that program or choose another port "
                    "(--port), and give the PACS the same port.",
                    code="pacs.port_in_use",
                ) from exc
            raise PacsReceiverError(
                f"Cannot listen on {self.host}:{self._requested_port}: {exc.strerror or exc}. "
                "Check the address (--host) and port (--port); ports below 1024 need "
                "administrator rights.",
                code="pacs.listen",
            ) from exc
        log.info(
            "receiving DICOM as %s on %s:%d from %s",
            self.ae_title,
            self.host,
            self.port,
            ", ".join(self.allowed_aes),
        )

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop listening, let transfers under way finish (up to ``grace_seconds``), then
        import everything received before returning."""
        server, self._server = self._server, None
        if server is not None:
            active = server.active_associations
            server.shutdown()
            deadline = time.monotonic() + grace_seconds
            for assoc in active:
                if assoc.is_established:  # a transfer may be under way: let it finish
                    assoc.join(max(0.0, deadline - time.monotonic()))
                if assoc.is_alive():
                    assoc.abort()
                    assoc.join(1.0)
        self._stop_worker()

    def __enter__(self) -> PacsReceiver:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def counts(self) -> PacsCounts:
        with self._lock:
            return PacsCounts(**self._counts)

    def wait_imported(self, timeout: float) -> bool:
        """Block until every object received so far has been through the import."""
        with self._idle:
            return self._idle.wait_for(lambda: self._counts["pending"] == 0, timeout)

    # -- DICOM event handlers (association threads: never raise) ---------------------------

    def _on_echo(self, event: Event) -> int:
        log.debug("C-ECHO from %s", _calling_ae(event))
        return STATUS_SUCCESS

    def _on_rejected(self, event: Event) -> None:
        calling = _calling_ae(event)
        self._count("refused")
        if calling not in self.allowed_aes:
            log.warning(
                "refused a connection from AE title %r (%s): not on the allow list",
                calling,
                _peer_address(event),
            )
        else:
            log.warning("refused a connection from %s: too many at once", calling)

    def _on_store(self, event: Event) -> int | Dataset:
        calling = _calling_ae(event)
        try:
            request = event.request
            sop_uid = str(request.AffectedSOPInstanceUID or "").strip("\x00 ")
            sop_class = uid.UID(str(request.AffectedSOPClassUID or ""))
            if len(sop_uid) > 64 or not _UID_RE.fullmatch(sop_uid):
                return self._failure(
                    STATUS_CANNOT_UNDERSTAND, "Invalid Affected SOP Instance UID", calling
                )
            try:
                study_uid = str(event.dataset.get("StudyInstanceUID", "") or "").strip("\x00 ")
            except Exception:  # a data set pydicom cannot parse
                log.warning("unreadable data set %s from %s", short_hash(sop_uid), calling)
                return self._failure(STATUS_CANNOT_UNDERSTAND, "Data set cannot be read", calling)
            if not study_uid:
                return self._failure(
                    STATUS_CANNOT_UNDERSTAND, "Study Instance UID missing", calling
                )
            meta = event.file_meta
            meta.SourceApplicationEntityTitle = calling
            path = inbox_path(self.inbox, study_uid, sop_uid)
            write_durably(
                path,
                (b"\x00" * 128, b"DICM", encode_file_meta(meta), request.DataSet.getbuffer()),
            )
        except OSError as exc:
            log.error("cannot store a received object in %s: %s", self.inbox, exc.strerror)
            return self._failure(STATUS_OUT_OF_RESOURCES, "Storage failed at the receiver", calling)
        except Exception:
            log.exception("unexpected failure storing an object from %s", calling)
            return self._failure(STATUS_OUT_OF_RESOURCES, "Internal error at the receiver", calling)
        self._count("received")
        log.info(
            "received %s %s (%s) from %s",
            sop_class.name if sop_class.is_valid else "object",
            short_hash(sop_uid),
            meta.TransferSyntaxUID.name,
            calling,
        )
        self._enqueue(path)
        return STATUS_SUCCESS

    def _failure(self, status: int, comment: str, calling: str) -> Dataset:
        self._count("failed")
        log.warning("answered 0x%04X (%s) to %s", status, comment, calling)
        reply = Dataset()
        reply.Status = status
        reply.ErrorComment = comment[:64]
        return reply

    # -- import worker ---------------------------------------------------------------------

    def _enqueue(self, path: Path) -> None:
        with self._lock:
            if self._worker is None:
                return  # stopping: the file is safe in the inbox; the next start imports it
            self._counts["pending"] += 1
            self._queue.put(path)  # under the lock: never after the stop marker

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _stop_worker(self) -> None:
        with self._lock:
            worker, self._worker = self._worker, None
            if worker is not None:
                self._queue.put(_STOP)
        if worker is not None:
            worker.join()
        index, self._index = self._index, None
        if index is not None:
            index.close()

    def _import_loop(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is _STOP:
                break
            batch: list[Path] = [item]
            # a study arrives as a burst of objects: gather it into one import run
            deadline = time.monotonic() + self._batch_seconds
            while len(batch) < self._batch_size:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            self._import(batch)

    def _import(self, batch: list[Path]) -> None:
        unique = list(dict.fromkeys(batch))
        indexed = rejected = 0
        try:
            assert self._index is not None
            report = import_files(self._index, unique)
            rejected = len(report.rejections)
            indexed = len(unique) - rejected
            for rejection in report.rejections:
                log.warning(
                    "received object %s not imported: %s",
                    short_hash(Path(rejection.path).stem),
                    rejection.code,
                )
            log.info(
                "imported %d received object(s): %d indexed, %d unchanged, %d rejected",
                len(unique),
                report.indexed,
                report.unchanged,
                report.rejected,
            )
        except Exception:
            # the files stay in the inbox; the next start() imports them again
            log.exception("import of %d received object(s) failed", len(unique))
        finally:
            with self._idle:
                self._counts["indexed"] += indexed
                self._counts["import_rejected"] += rejected
                self._counts["pending"] -= len(batch)
                self._idle.notify_all()

    def _tidy_inbox(self) -> list[Path]:
        """Remove half-written files from a crash; return the objects to (re)import."""
        for part in self.inbox.rglob(".*.part"):
            with contextlib.suppress(OSError):
                part.unlink()
        return sorted(self.inbox.rglob("*.dcm"))


def _calling_ae(event: Event) -> str:
    try:
        return str(event.assoc.requestor.ae_title).strip()
    except Exception:
        return "?"


def _peer_address(event: Event) -> str:
    try:
        return str(event.assoc.requestor.address)
    except Exception:
        return "?"
