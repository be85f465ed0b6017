"""Tessera's wire protocol: messages, codec, chunked transfers and sans-I/O sessions.

Nothing in this package touches a socket, a clock or a file: adapters in ``coordinator`` and
``site_client`` move the bytes and pass ``now`` in.
"""

from shared.protocol.codec import PROTOCOL_VERSION, Limits, decode, encode
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
    Message,
    PlanDecision,
    RoundDecline,
    RoundInvite,
    RunFinished,
    TransferAccept,
    TransferOffer,
    UpdateAccepted,
    UpdateOffer,
    ValidationReport,
    Welcome,
)

__all__ = [
    "PROTOCOL_VERSION",
    "Authenticate",
    "Challenge",
    "CharterSignature",
    "Chunk",
    "ChunkAck",
    "DataSummaryReport",
    "Dispute",
    "Enrol",
    "ErrorMessage",
    "GovernanceNotice",
    "HeadRequest",
    "HeadUpdate",
    "Limits",
    "Message",
    "PlanDecision",
    "RoundDecline",
    "RoundInvite",
    "RunFinished",
    "TransferAccept",
    "TransferOffer",
    "UpdateAccepted",
    "UpdateOffer",
    "ValidationReport",
    "Welcome",
    "decode",
    "encode",
]
