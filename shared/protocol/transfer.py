"""Chunked transfer of large payloads, resumable at the last acknowledged chunk.

The sender announces a ``TransferOffer`` (id, size, SHA-256 of the whole, chunk size); the
receiver answers with the index of the first chunk it lacks (0 for a new transfer, more after
a reconnect) and the sender streams chunks from there. The receiver checks every chunk's index
and size as it comes and the whole payload's SHA-256 at the end; a receiver that resumes
re-hashes the prefix it already holds, so a resumed payload is verified exactly like a fresh
one. Pure: the adapter stores the bytes and decides when a chunk is durable.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import cast

from shared.errors import LocalProtocolError, TransferError
from shared.protocol.codec import encode
from shared.protocol.messages import Chunk, TransferOffer


def make_offer(
    transfer_id: str, data: bytes | memoryview, chunk_size: int, *, sha256: str | None = None
) -> TransferOffer:
    """The offer for ``data``. ``sha256``: the payload's digest when the caller already holds
    it (it hashed the bytes as it wrote or stored them), so a large payload is not hashed
    again; it is trusted here and checked by the receiver."""
    return TransferOffer(
        transfer_id=transfer_id,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest() if sha256 is None else sha256,
        chunk_size=chunk_size,
    )


def iter_chunks(
    offer: TransferOffer, data: bytes | memoryview, start: int = 0, *, copy: bool = True
) -> Iterator[Chunk]:
    """Chunks of ``data`` from index ``start`` (the receiver's ``next_index``). With
    ``copy=False`` each payload is a read-only view into ``data``, valid while ``data`` is:
    for a sender that encodes each chunk at once (``chunk_frames``)."""
    if len(data) != offer.size:
        raise TransferError("payload does not match its offer", code="protocol.transfer_size")
    _check_start(offer, start)
    view = memoryview(data)
    for index in range(start, offer.total_chunks):
        lo = index * offer.chunk_size
        piece = view[lo : lo + offer.chunk_size]
        yield Chunk(
            transfer_id=offer.transfer_id,
            index=index,
            payload=bytes(piece) if copy else cast(bytes, piece),
        )


class ChunkFrames:
    """The encoded chunk frames of one payload that goes to many receivers (the round's
    model to every site), each made once, when first sent, and then sent as they are: encoding
    copies a chunk into its frame, which would otherwise happen again for every receiver. A
    frame's message id is its transfer id and index, so the frames are the same for all."""

    def __init__(self, offer: TransferOffer, data: bytes | memoryview) -> None:
        if len(data) != offer.size:
            raise TransferError("payload does not match its offer", code="protocol.transfer_size")
        self.offer = offer
        self._view = memoryview(data)
        self._frames: list[bytes | None] = [None] * offer.total_chunks

    def from_index(self, start: int = 0) -> Iterator[bytes]:
        """The frames from ``start`` (the receiver's ``next_index``) on; raises
        ``TransferError`` for an index outside the payload, as :func:`iter_chunks`."""
        _check_start(self.offer, start)
        size, tid = self.offer.chunk_size, self.offer.transfer_id
        for index in range(start, len(self._frames)):
            frame = self._frames[index]
            if frame is None:
                piece = cast(bytes, self._view[index * size : (index + 1) * size])
                chunk = Chunk(transfer_id=tid, index=index, payload=piece)
                frame = self._frames[index] = encode(chunk, message_id=f"{tid}/{index}")
            yield frame


def chunk_frames(offer: TransferOffer, data: bytes | memoryview, start: int = 0) -> Iterator[bytes]:
    """The encoded chunk frames of ``data`` from ``start``, lazily: each payload is copied
    once, into its frame, rather than first into a chunk of its own (a model goes to every
    site, so a sender moves it many times a round)."""
    for chunk in iter_chunks(offer, data, start, copy=False):
        yield encode(chunk)


class TransferReceiver:
    """Checks the chunks of one inbound transfer; the caller keeps the bytes.

    ``owner_hashes``: the owner hashes the payload where it stores it (off the event loop,
    in the thread that writes each chunk) and passes the digest to ``verify``; the receiver
    still checks every chunk's order and size, and the digest against the offer."""

    def __init__(
        self,
        offer: TransferOffer,
        *,
        max_size: int,
        have: bytes | memoryview = b"",
        owner_hashes: bool = False,
    ):
        if offer.size > max_size:
            raise TransferError(
                f"offered payload of {offer.size} bytes exceeds the limit of {max_size}",
                code="protocol.too_large",
            )
        self.offer = offer
        held = min(len(have), offer.size)  # bytes beyond the offer are ignored
        if offer.size and held == offer.size:
            self.next_index = offer.total_chunks
        else:
            self.next_index = held // offer.chunk_size
        self.owner_hashes = owner_hashes and not self.complete  # a whole ``have`` is ours
        prefix = memoryview(have)[: self.received_bytes]
        self._hash = None if self.owner_hashes else hashlib.sha256(prefix)

    @property
    def received_bytes(self) -> int:
        return min(self.next_index * self.offer.chunk_size, self.offer.size)

    @property
    def complete(self) -> bool:
        return self.next_index == self.offer.total_chunks

    def receive(self, chunk: Chunk) -> None:
        """Accept the next chunk or raise ``TransferError``; nothing changes on error."""
        offer = self.offer
        if chunk.transfer_id != offer.transfer_id:
            raise TransferError("chunk for another transfer", code="protocol.transfer_index")
        if self.complete:
            raise TransferError(
                "chunk after the transfer completed", code="protocol.transfer_index"
            )
        if chunk.index != self.next_index:
            raise TransferError(
                f"expected chunk {self.next_index}, got {chunk.index}",
                code="protocol.transfer_index",
            )
        expected = min(offer.chunk_size, offer.size - self.received_bytes)
        if len(chunk.payload) != expected:
            raise TransferError(
                f"chunk {chunk.index} has {len(chunk.payload)} bytes, expected {expected}",
                code="protocol.transfer_size",
            )
        if self._hash is not None:
            self._hash.update(chunk.payload)
        self.next_index += 1

    def verify(self, sha256: str | None = None) -> str:
        """Check the whole payload's SHA-256 once complete; returns it. ``sha256``: the
        owner's digest of the payload, required when it hashes (``owner_hashes``)."""
        if not self.complete:
            raise TransferError("transfer is incomplete", code="protocol.transfer_size")
        if self._hash is None and sha256 is None:
            raise LocalProtocolError("the owner hashes this transfer: pass its digest")
        digest = self._hash.hexdigest() if self._hash is not None else sha256
        if digest != self.offer.sha256:
            raise TransferError(
                "payload SHA-256 does not match its offer; it was corrupted in transit",
                code="protocol.hash_mismatch",
            )
        return digest


def _check_start(offer: TransferOffer, start: int) -> None:
    if not 0 <= start <= offer.total_chunks:
        raise TransferError(
            f"resume index {start} is outside 0..{offer.total_chunks}",
            code="protocol.transfer_index",
        )
