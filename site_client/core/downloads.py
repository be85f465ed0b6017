"""What the site receives from the coordinator into a partial file: a round's model, the run's
final model, a release. Resumed from what the part file holds after a reconnect.

The bytes are hashed where they are written, in a worker thread (``store``), so a 20 MB model
does not hold the site's event loop for the SHA-256 of every megabyte; the session checks the
digest against the coordinator's offer with the last chunk's ``ack``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from shared.protocol.messages import TransferOffer
from shared.protocol.session import SiteSession


@dataclass
class Download:
    target: Any  # what the bytes are for: RoundInvite, RunFinished or a ReleaseDownload
    offer: TransferOffer
    fh: BinaryIO
    sha256: Any  # hashlib's running digest of the part file's bytes

    def store(self, data: bytes) -> None:
        """Append a checked chunk (in a worker thread: hashing and writing release the GIL)."""
        self.sha256.update(data)
        self.fh.write(data)
        self.fh.flush()

    def digest_if(self, complete: bool) -> str | None:
        """The payload's digest for the last chunk's ``ack``; nothing before."""
        return self.sha256.hexdigest() if complete else None


def open_download(session: SiteSession, target: Any, offer: TransferOffer, part: Path) -> Download:
    """Start receiving ``offer`` into ``part``, keeping the whole chunks it already holds.
    Raises ``TesseraError`` when the session refuses the offer (too large, bad chunk size).
    A part that already holds the whole payload completes at once (``TransferComplete``
    among the session's next events)."""
    have = part.read_bytes() if part.exists() else b""
    next_index = session.expect_transfer(offer, have, owner_hashes=True)
    keep = min(len(have), next_index * offer.chunk_size)
    fh = open(part, "r+b" if part.exists() else "wb")  # noqa: SIM115 (held across events)
    fh.truncate(keep)
    fh.seek(keep)
    return Download(target, offer, fh, hashlib.sha256(memoryview(have)[:keep]))
