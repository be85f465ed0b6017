"""Chunked transfers: offers, chunking, receiver checks, and resume after a reconnect."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import TransferError
from shared.protocol.codec import decode
from shared.protocol.messages import Chunk
from shared.protocol.transfer import ChunkFrames, TransferReceiver, iter_chunks, make_offer

MAX = 1 << 20


def payload(size: int) -> bytes:
    return bytes((i * 7 + 3) % 256 for i in range(size))


def receive_all(receiver: TransferReceiver, chunks: list[Chunk]) -> bytes:
    out = bytearray()
    for chunk in chunks:
        assert not receiver.complete
        receiver.receive(chunk)
        out += chunk.payload
    return bytes(out)


@pytest.mark.parametrize(
    ("size", "chunk_size", "count"),
    [(100, 10, 10), (101, 10, 11), (9, 10, 1), (10, 10, 1), (1, 1, 1), (0, 10, 1), (0, 1, 1)],
)
def test_whole_transfer(size: int, chunk_size: int, count: int) -> None:
    data = payload(size)
    offer = make_offer("model-1", data, chunk_size)
    assert offer.size == size
    assert offer.sha256 == hashlib.sha256(data).hexdigest()
    assert offer.total_chunks == count
    chunks = list(iter_chunks(offer, data))
    assert [c.index for c in chunks] == list(range(count))
    assert all(len(c.payload) <= chunk_size for c in chunks)
    receiver = TransferReceiver(offer, max_size=MAX)
    assert receiver.next_index == 0
    assert receive_all(receiver, chunks) == data
    assert receiver.complete
    assert receiver.received_bytes == size
    assert receiver.verify() == offer.sha256


def test_zero_size_payload_is_one_empty_chunk() -> None:
    offer = make_offer("empty", b"", 4)
    (chunk,) = iter_chunks(offer, b"")
    assert chunk.payload == b""
    receiver = TransferReceiver(offer, max_size=0)
    receiver.receive(chunk)
    assert receiver.verify() == hashlib.sha256(b"").hexdigest()


def test_tampered_byte_fails_verification() -> None:
    data = payload(50)
    offer = make_offer("t", data, 16)
    chunks = list(iter_chunks(offer, data))
    bad = bytearray(chunks[1].payload)
    bad[3] ^= 0x01
    chunks[1] = Chunk(transfer_id="t", index=1, payload=bytes(bad))
    receiver = TransferReceiver(offer, max_size=MAX)
    receive_all(receiver, chunks)
    assert receiver.complete
    with pytest.raises(TransferError, match="SHA-256 does not match") as info:
        receiver.verify()
    assert info.value.code == "protocol.hash_mismatch"


def test_verify_before_complete() -> None:
    offer = make_offer("t", payload(20), 10)
    with pytest.raises(TransferError, match="incomplete") as info:
        TransferReceiver(offer, max_size=MAX).verify()
    assert info.value.code == "protocol.transfer_size"


def expect_rejected(receiver: TransferReceiver, chunk: Chunk, code: str, match: str) -> None:
    before = (receiver.next_index, receiver._hash.hexdigest())
    with pytest.raises(TransferError, match=match) as info:
        receiver.receive(chunk)
    assert info.value.code == code
    assert (receiver.next_index, receiver._hash.hexdigest()) == before  # nothing changed


def test_out_of_order_duplicate_and_foreign_chunks() -> None:
    data = payload(30)
    offer = make_offer("t", data, 10)
    c0, c1, c2 = iter_chunks(offer, data)
    receiver = TransferReceiver(offer, max_size=MAX)
    expect_rejected(receiver, c1, "protocol.transfer_index", "expected chunk 0, got 1")
    receiver.receive(c0)
    expect_rejected(receiver, c0, "protocol.transfer_index", "expected chunk 1, got 0")
    expect_rejected(receiver, c2, "protocol.transfer_index", "expected chunk 1, got 2")
    foreign = Chunk(transfer_id="other", index=1, payload=c1.payload)
    expect_rejected(receiver, foreign, "protocol.transfer_index", "another transfer")
    receiver.receive(c1)
    receiver.receive(c2)
    expect_rejected(receiver, c2, "protocol.transfer_index", "after the transfer completed")
    late = Chunk(transfer_id="t", index=3, payload=b"")
    expect_rejected(receiver, late, "protocol.transfer_index", "after the transfer completed")
    assert receiver.verify() == offer.sha256


def test_wrong_chunk_sizes() -> None:
    data = payload(25)
    offer = make_offer("t", data, 10)
    c0, c1, c2 = iter_chunks(offer, data)
    receiver = TransferReceiver(offer, max_size=MAX)
    short = Chunk(transfer_id="t", index=0, payload=c0.payload[:-1])
    expect_rejected(receiver, short, "protocol.transfer_size", "has 9 bytes, expected 10")
    long = Chunk(transfer_id="t", index=0, payload=c0.payload + b"x")
    expect_rejected(receiver, long, "protocol.transfer_size", "has 11 bytes, expected 10")
    receiver.receive(c0)
    receiver.receive(c1)
    full = Chunk(transfer_id="t", index=2, payload=data[20:] + b"xxxxx")
    expect_rejected(receiver, full, "protocol.transfer_size", "has 10 bytes, expected 5")
    receiver.receive(c2)
    assert receiver.verify() == offer.sha256


def test_offer_beyond_max_size() -> None:
    offer = make_offer("t", payload(101), 10)
    with pytest.raises(TransferError, match="101 bytes exceeds the limit of 100") as info:
        TransferReceiver(offer, max_size=100)
    assert info.value.code == "protocol.too_large"
    TransferReceiver(offer, max_size=101)


def test_iter_chunks_checks_its_arguments() -> None:
    data = payload(30)
    offer = make_offer("t", data, 10)
    with pytest.raises(TransferError, match="does not match its offer") as info:
        list(iter_chunks(offer, data[:-1]))
    assert info.value.code == "protocol.transfer_size"
    with pytest.raises(TransferError, match=r"resume index 4 is outside 0\.\.3") as info:
        list(iter_chunks(offer, data, 4))
    assert info.value.code == "protocol.transfer_index"
    with pytest.raises(TransferError, match="resume index -1") as info:
        list(iter_chunks(offer, data, -1))
    assert info.value.code == "protocol.transfer_index"
    assert list(iter_chunks(offer, data, 3)) == []
    assert [c.index for c in iter_chunks(offer, memoryview(data), 1)] == [1, 2]


# --- resume -----------------------------------------------------------------------------


def resume(data: bytes, chunk_size: int, received: int, extra: int) -> None:
    """Receive ``received`` chunks, keep ``extra`` stray bytes of the next, reconnect."""
    offer = make_offer("model-7", data, chunk_size)
    first = TransferReceiver(offer, max_size=MAX)
    stored = bytearray()
    for chunk in iter_chunks(offer, data):
        if chunk.index == received:
            stored += chunk.payload[:extra]  # a partial write before the connection dropped
            break
        first.receive(chunk)
        stored += chunk.payload
    # Reconnect: a new receiver from what is on disk; the sender restarts where it says.
    second = TransferReceiver(offer, max_size=MAX, have=bytes(stored))
    if not data:
        expected = 0  # an empty payload's one empty chunk leaves no trace: it is re-sent
    elif len(stored) == len(data):
        expected = offer.total_chunks  # the "partial" write was the whole last chunk
    else:
        expected = received
    assert second.next_index == expected
    del stored[second.received_bytes :]  # the partial chunk is discarded
    for chunk in iter_chunks(offer, data, second.next_index):
        second.receive(chunk)
        stored += chunk.payload
    assert second.complete
    assert second.verify() == offer.sha256
    assert bytes(stored) == data


@pytest.mark.parametrize(
    ("size", "chunk_size", "received", "extra"),
    [
        (100, 10, 0, 0),
        (100, 10, 0, 5),
        (100, 10, 4, 0),
        (100, 10, 4, 9),
        (105, 10, 10, 3),  # the partial last chunk
        (100, 10, 10, 0),  # everything already held
        (0, 10, 0, 0),
        (1, 10, 0, 0),
    ],
)
def test_resume(size: int, chunk_size: int, received: int, extra: int) -> None:
    resume(payload(size), chunk_size, received, extra)


@given(
    data=st.binary(max_size=300),
    chunk_size=st.integers(1, 64),
    cut=st.data(),
)
@settings(max_examples=200, deadline=None)
def test_resume_property(data: bytes, chunk_size: int, cut: st.DataObject) -> None:
    total = make_offer("t", data, chunk_size).total_chunks
    received = cut.draw(st.integers(0, total))
    extra = cut.draw(st.integers(0, chunk_size - 1))
    resume(data, chunk_size, received, extra)


def test_resume_with_corrupt_prefix_fails_verification() -> None:
    data = payload(40)
    offer = make_offer("t", data, 10)
    have = bytearray(data[:20])
    have[0] ^= 0xFF  # the stored prefix was damaged on disk
    receiver = TransferReceiver(offer, max_size=MAX, have=bytes(have))
    assert receiver.next_index == 2
    for chunk in iter_chunks(offer, data, receiver.next_index):
        receiver.receive(chunk)
    with pytest.raises(TransferError, match="SHA-256 does not match") as info:
        receiver.verify()
    assert info.value.code == "protocol.hash_mismatch"


@pytest.mark.parametrize("size", [0, 5, 10])
def test_have_longer_than_the_offer(size: int) -> None:
    # Stray bytes beyond the offer's size must not push next_index past the last chunk.
    data = payload(size)
    offer = make_offer("t", data, 4)
    receiver = TransferReceiver(offer, max_size=MAX, have=data + b"junk" * 3)
    assert 0 <= receiver.next_index <= offer.total_chunks
    for chunk in iter_chunks(offer, data, receiver.next_index):
        receiver.receive(chunk)
    assert receiver.verify() == offer.sha256


def test_chunk_frames_are_made_once_and_decode_to_the_chunks() -> None:
    data = payload(95)
    offer = make_offer("m-1", data, 10)
    frames = ChunkFrames(offer, data)
    first = list(frames.from_index())
    # A second receiver, and one resuming at chunk 4, get the very same frame objects.
    assert all(a is b for a, b in zip(first, frames.from_index(), strict=True))
    assert all(a is b for a, b in zip(first[4:], frames.from_index(4), strict=True))
    chunks = [decode(f) for f in first]
    assert chunks == list(iter_chunks(offer, data))
    receiver = TransferReceiver(offer, max_size=MAX)
    assert receive_all(receiver, chunks) == data
    receiver.verify()
    assert list(frames.from_index(offer.total_chunks)) == []


def test_chunk_frames_check_the_payload_and_the_resume_index() -> None:
    data = payload(30)
    offer = make_offer("m-1", data, 10)
    with pytest.raises(TransferError) as size:
        ChunkFrames(offer, data[:-1])
    assert size.value.code == "protocol.transfer_size"
    with pytest.raises(TransferError) as index:
        list(ChunkFrames(offer, data).from_index(4))
    assert index.value.code == "protocol.transfer_index"
