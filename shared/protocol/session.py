"""Sans-I/O session state machines for both ends of a Tessera connection.

Theory of operation (after python-websockets and h11): a session is fed whole frames with
``receive_frame`` and queues decoded, state-checked ``events`` for its owner and encoded
frames to send (``data_to_send``). The owner (an asyncio or thread adapter) moves the bytes,
does the I/O the events ask for (check a token in the database, write a chunk to disk) and
calls back into the session (``accept_identity``, ``ack``). A session never raises on peer
input: a bad frame is answered with an ``ErrorMessage`` carrying a stable code and dropped,
and after ``max_strikes`` of them the session closes. Transitions::

    coordinator  AWAIT_IDENTITY --accept_identity--> ESTABLISHED --reject/strikes--> CLOSED
    site         AWAIT_CHALLENGE --challenge--> (enrol|authenticate) AWAIT_WELCOME
                 --welcome--> ESTABLISHED;   a fatal error from the peer --> CLOSED

Inbound chunked transfers are tracked here (``expect_transfer``): chunk order, sizes and the
whole-payload SHA-256 are checked before the owner sees the bytes.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from shared.errors import LocalProtocolError, RemoteProtocolError, TransferError
from shared.protocol.codec import DEFAULT_LIMITS, Limits, decode, encode
from shared.protocol.messages import (
    Authenticate,
    Challenge,
    CharterSignature,
    Chunk,
    ChunkAck,
    DataSummaryReport,
    Dispute,
    Enrol,
    ErrorMessage,
    GovernanceNotice,
    HeadRequest,
    HeadUpdate,
    HEKeyAck,
    HEKeyDirectory,
    HEKeyRequest,
    HEPublicKey,
    HESealedKey,
    MaskedUpdateOffer,
    Message,
    PlanDecision,
    ReleaseAcceptance,
    ReleaseNotice,
    RoundDecline,
    RoundInvite,
    RunFinished,
    SecAggKeys,
    SecAggSetup,
    SecAggShares,
    SecAggUnmask,
    SecAggUnmaskResponse,
    TransferAccept,
    TransferOffer,
    UpdateAccepted,
    UpdateOffer,
    ValidationReport,
    Welcome,
)
from shared.protocol.transfer import TransferReceiver, iter_chunks


class Phase(enum.Enum):
    AWAIT_CHALLENGE = "await_challenge"
    AWAIT_IDENTITY = "await_identity"
    AWAIT_WELCOME = "await_welcome"
    ESTABLISHED = "established"
    CLOSED = "closed"


# --- events -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A valid message the owner must act on (enrol, auth, invite, offer, ack...)."""

    message: Message


@dataclass(frozen=True, slots=True)
class ChunkReceived:
    """A checked chunk: store ``data`` durably, then call ``ack(transfer_id)`` (with the
    payload's digest after the last chunk of a transfer the owner hashes)."""

    transfer_id: str
    index: int
    data: bytes
    complete: bool


@dataclass(frozen=True, slots=True)
class TransferComplete:
    """Every chunk arrived and the whole payload's SHA-256 matched the offer."""

    offer: TransferOffer


@dataclass(frozen=True, slots=True)
class TransferFailed:
    transfer_id: str
    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class PeerViolation:
    """The peer broke the protocol; it was told so. For the local log."""

    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class Closed:
    code: str
    reason: str


Event = MessageReceived | ChunkReceived | TransferComplete | TransferFailed | PeerViolation | Closed


class _Session:
    allowed: dict[Phase, tuple[type[Message], ...]] = {}

    def __init__(self, phase: Phase, limits: Limits, max_strikes: int, max_transfer: int):
        self.phase = phase
        self.limits = limits
        self.max_strikes = max_strikes
        self.max_transfer = max_transfer
        self.strikes = 0
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self._inbound: dict[str, TransferReceiver] = {}

    # -- the four verbs ------------------------------------------------------------------

    def receive_frame(self, data: bytes | bytearray | memoryview | str) -> None:
        if self.phase is Phase.CLOSED:
            return
        if isinstance(data, str):
            self._violation("protocol.malformed", "text frames are not allowed", None)
            return
        try:
            message = decode(data, self.limits)
        except RemoteProtocolError as exc:
            self._violation(exc.code, exc.message, None)
            return
        if not isinstance(message, self.allowed.get(self.phase, ())):
            self._violation(
                "protocol.unexpected",
                f"{message.TYPE} is not expected now ({self.phase.value})",
                message.TYPE,
            )
            return
        if isinstance(message, ErrorMessage) and message.fatal:
            self._close(message.code, message.message)
            self._events.append(MessageReceived(message))
            return
        if isinstance(message, Chunk):
            self._receive_chunk(message)
            return
        self._on_message(message)

    def events_received(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def send(self, message: Message) -> None:
        if self.phase is not Phase.CLOSED:
            self._out.append(encode(message))

    def data_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    # -- transfers -----------------------------------------------------------------------

    def expect_transfer(
        self, offer: TransferOffer, have: bytes | memoryview = b"", *, owner_hashes: bool = False
    ) -> int:
        """Start (or resume) receiving ``offer``; sends TransferAccept. Returns next index.

        ``owner_hashes``: the owner hashes the payload as it stores each chunk (off the event
        loop: a large payload's SHA-256 would otherwise hold the loop a millisecond a
        megabyte) and passes the digest with the last ``ack``; the transfer completes (or
        fails) there. Otherwise the session hashes and completes on the last chunk."""
        try:
            if offer.chunk_size > self.limits.max_payload_bytes:
                # Every chunk would be refused by the codec as too large.
                raise TransferError(
                    f"chunk size {offer.chunk_size} exceeds the limit of "
                    f"{self.limits.max_payload_bytes} bytes",
                    code="protocol.too_large",
                )
            receiver = TransferReceiver(
                offer, max_size=self.max_transfer, have=have, owner_hashes=owner_hashes
            )
        except TransferError as exc:
            self.send(ErrorMessage(code=exc.code, message=exc.message, ref="transfer_accept"))
            raise
        self._inbound[offer.transfer_id] = receiver
        self.send(TransferAccept(transfer_id=offer.transfer_id, next_index=receiver.next_index))
        if receiver.complete:
            self._finish_transfer(receiver)
        return receiver.next_index

    def ack(self, transfer_id: str, *, sha256: str | None = None) -> None:
        """The owner has stored every chunk received so far for this transfer. ``sha256``:
        with the last chunk of a transfer the owner hashes, its digest of the payload; the
        transfer's ``TransferComplete`` or ``TransferFailed`` is among the next events."""
        receiver = self._inbound.get(transfer_id)
        if receiver is None:
            return
        if receiver.complete:
            del self._inbound[transfer_id]
            # A payload that fails its digest is not acknowledged (as when the session hashes).
            if receiver.owner_hashes and not self._finish_transfer(receiver, sha256):
                return
        self.send(ChunkAck(transfer_id=transfer_id, next_index=receiver.next_index))

    def abandon_transfer(self, transfer_id: str) -> None:
        self._inbound.pop(transfer_id, None)

    def send_transfer(self, offer: TransferOffer, data: bytes | memoryview, start: int) -> None:
        for chunk in iter_chunks(offer, data, start):
            self.send(chunk)

    def chunks(self, offer: TransferOffer, data: bytes | memoryview, start: int) -> Iterable[bytes]:
        """Encoded chunk frames, lazily, for adapters that stream big payloads."""
        for chunk in iter_chunks(offer, data, start):
            yield encode(chunk)

    def close(self, code: str, reason: str) -> None:
        self.send(ErrorMessage(code=code, message=reason, fatal=True))
        self._close(code, reason)

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    # -- internals -----------------------------------------------------------------------

    def _on_message(self, message: Message) -> None:
        self._events.append(MessageReceived(message))

    def _receive_chunk(self, chunk: Chunk) -> None:
        receiver = self._inbound.get(chunk.transfer_id)
        if receiver is None:
            self._violation("protocol.transfer_index", "chunk for no open transfer", "chunk")
            return
        try:
            receiver.receive(chunk)
        except TransferError as exc:
            del self._inbound[chunk.transfer_id]
            self._violation(exc.code, exc.message, "chunk")
            self._events.append(TransferFailed(chunk.transfer_id, exc.code, exc.message))
            return
        self._events.append(
            ChunkReceived(chunk.transfer_id, chunk.index, chunk.payload, receiver.complete)
        )
        if receiver.complete and not receiver.owner_hashes:
            self._finish_transfer(receiver)

    def _finish_transfer(self, receiver: TransferReceiver, sha256: str | None = None) -> bool:
        try:
            receiver.verify(sha256)
        except TransferError as exc:
            self._inbound.pop(receiver.offer.transfer_id, None)
            self._violation(exc.code, exc.message, "chunk")
            self._events.append(TransferFailed(receiver.offer.transfer_id, exc.code, exc.message))
            return False
        self._events.append(TransferComplete(receiver.offer))
        return True

    def _violation(self, code: str, reason: str, ref: str | None) -> None:
        reason = reason[:2000]  # ErrorMessage's bound: a reason may quote the peer's input
        self.strikes += 1
        self._events.append(PeerViolation(code, reason))
        if self.strikes >= self.max_strikes:
            self.close("protocol.too_many_errors", "too many invalid messages; disconnecting")
        else:
            self.send(ErrorMessage(code=code, message=reason, ref=ref))

    def _close(self, code: str, reason: str) -> None:
        if self.phase is not Phase.CLOSED:
            self.phase = Phase.CLOSED
            self._inbound.clear()
            self._events.append(Closed(code, reason))


class CoordinatorSession(_Session):
    """The coordinator's end of one site connection."""

    allowed = {
        # ErrorMessage in every phase: a site may give up (fatal error) before it is welcomed.
        Phase.AWAIT_IDENTITY: (Enrol, Authenticate, ErrorMessage),
        Phase.AWAIT_WELCOME: (ErrorMessage,),
        Phase.ESTABLISHED: (
            TransferAccept,
            ChunkAck,
            Chunk,
            UpdateOffer,
            RoundDecline,
            DataSummaryReport,
            CharterSignature,
            PlanDecision,
            ValidationReport,
            HeadRequest,
            Dispute,
            ReleaseAcceptance,
            SecAggKeys,
            SecAggShares,
            MaskedUpdateOffer,
            SecAggUnmaskResponse,
            HEPublicKey,
            HESealedKey,
            HEKeyAck,
            ErrorMessage,
        ),
    }

    def __init__(
        self,
        *,
        nonce: str,
        federation: str,
        limits: Limits = DEFAULT_LIMITS,
        max_strikes: int = 5,
        max_transfer: int = 1 << 31,
    ) -> None:
        super().__init__(Phase.AWAIT_IDENTITY, limits, max_strikes, max_transfer)
        self.nonce = nonce
        self.site_id: str | None = None
        self.send(Challenge(nonce=nonce, federation=federation))

    def _on_message(self, message: Message) -> None:
        if isinstance(message, Enrol | Authenticate):
            # One identity attempt per connection: a second one waits for our verdict.
            self.phase = Phase.AWAIT_WELCOME
        super()._on_message(message)

    def accept_identity(
        self, *, site_id: str, site_name: str, coordinator_key: str, federation: str
    ) -> None:
        if self.phase is Phase.CLOSED:
            return  # closed while the owner checked the identity: nothing to welcome
        if self.phase is not Phase.AWAIT_WELCOME:
            raise LocalProtocolError("accept an identity only after the site sent one")
        self.site_id = site_id
        self.phase = Phase.ESTABLISHED
        self.send(
            Welcome(
                site_id=site_id,
                site_name=site_name,
                coordinator_key=coordinator_key,
                federation=federation,
            )
        )

    def reject(self, code: str, reason: str) -> None:
        self.close(code, reason)


class SiteSession(_Session):
    """The site's end of its one outbound connection."""

    allowed = {
        Phase.AWAIT_CHALLENGE: (Challenge, ErrorMessage),
        Phase.AWAIT_WELCOME: (Welcome, ErrorMessage),
        Phase.ESTABLISHED: (
            RoundInvite,
            TransferAccept,
            ChunkAck,
            Chunk,
            UpdateAccepted,
            RunFinished,
            GovernanceNotice,
            HeadUpdate,
            ReleaseNotice,
            SecAggSetup,
            SecAggKeys,
            SecAggShares,
            SecAggUnmask,
            HEKeyRequest,
            HEKeyDirectory,
            HESealedKey,
            ErrorMessage,
        ),
    }

    def __init__(
        self,
        *,
        limits: Limits = DEFAULT_LIMITS,
        max_strikes: int = 5,
        max_transfer: int = 1 << 31,
    ) -> None:
        super().__init__(Phase.AWAIT_CHALLENGE, limits, max_strikes, max_transfer)
        self.nonce: str | None = None
        self.site_id: str | None = None

    def _on_message(self, message: Message) -> None:
        if isinstance(message, Challenge):
            self.nonce = message.nonce
        elif isinstance(message, Welcome):
            self.site_id = message.site_id
            self.phase = Phase.ESTABLISHED
        super()._on_message(message)

    def enrol(self, *, token: str, site_name: str, public_key: str, signature: str) -> None:
        self._identify(
            Enrol(token=token, site_name=site_name, public_key=public_key, signature=signature)
        )

    def authenticate(self, *, site_id: str, signature: str) -> None:
        self._identify(Authenticate(site_id=site_id, signature=signature))

    def _identify(self, message: Message) -> None:
        if self.phase is not Phase.AWAIT_CHALLENGE or self.nonce is None:
            raise LocalProtocolError("identify only once, after the challenge")
        self.phase = Phase.AWAIT_WELCOME
        self.send(message)
