"""Message dataclasses: one per message type, validated on construction.

Theory of operation: every message is a frozen dataclass whose field types are its schema.
The codec builds messages only through ``from_body``, which checks that the body has exactly
the declared keys with the declared JSON types; ``__post_init__`` then checks meaning (hex
digests, non-negative counts). An invalid message therefore cannot exist. Messages that carry
bytes (``Chunk``) declare a ``payload: bytes`` field, which travels as the frame's binary
part rather than inside the JSON.

Connection flow (site S, coordinator C)::

    C -> S  Challenge(nonce)
    S -> C  Enrol(token, public key, signature)   first time, with an invitation token
         or Authenticate(site_id, signature)      afterwards
    C -> S  Welcome(site_id, coordinator key)     or ErrorMessage(fatal) and close
    C -> S  RoundInvite(run, round, plan, model offer, signatures)
    S -> C  TransferAccept(model transfer, next_index)    resume: index of first missing chunk
    C -> S  Chunk(...) x n                     S -> C  ChunkAck(next_index) per chunk
    S -> C  UpdateOffer(run, round, update offer, num_samples, signature)
    C -> S  TransferAccept(update transfer, next_index)
    S -> C  Chunk(...) x n                     C -> S  ChunkAck(next_index) per chunk
    C -> S  UpdateAccepted(run, round, digest)    only once the update is on disk
    (a plan with secure_aggregation, instead of UpdateOffer: SecAggSetup after the invite,
    SecAggKeys and SecAggShares each way, MaskedUpdateOffer + chunks, UpdateAccepted once
    summed, then SecAggUnmask and SecAggUnmaskResponse; see docs/protocol.md)
    (homomorphic encryption, once per run before round 1: C -> S HEKeyRequest, S -> C
    HEPublicKey, C -> key site HEKeyDirectory, key site -> C -> S HESealedKey, S -> C
    HEKeyAck; see coordinator/he_keys.py)
    C -> S  RunFinished(run, final model digest, final model offer)
    S -> C  ValidationReport(metrics of the final model on the site's held-out data)
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, get_type_hints

from shared.crypto.keys import b64url_decode
from shared.data_summary import check_summary
from shared.errors import RemoteProtocolError, TesseraError

# fullmatch, not match with "$": "$" also matches before a trailing newline.
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
MESSAGE_TYPES: dict[str, type[Message]] = {}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise RemoteProtocolError(message, code="protocol.schema")


def _hex64(value: str, name: str) -> None:
    _check(bool(_HEX64.fullmatch(value)), f"{name} must be a lower-case hex SHA-256 digest")


def _ident(value: str, name: str) -> None:
    _check(bool(_ID.fullmatch(value)), f"{name} must be 1-128 characters of [A-Za-z0-9_.:-]")


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """Base class. ``TYPE`` is the wire name; subclasses register themselves."""

    TYPE: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super(Message, cls).__init_subclass__(**kwargs)
        if cls.TYPE:
            MESSAGE_TYPES[cls.TYPE] = cls

    def body(self) -> dict[str, Any]:
        """JSON body: every field except the binary payload."""
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "payload"
        }

    @property
    def payload_bytes(self) -> bytes:
        return b""

    @classmethod
    def from_body(cls, body: dict[str, Any], payload: bytes) -> Message:
        hints = _schema(cls)
        expected = set(hints) - {"payload"}
        keys = set(body)
        _check(
            keys == expected,
            f"{cls.TYPE}: fields {_names(sorted(keys ^ expected))} are missing or not allowed",
        )
        for name in expected:
            _check(_matches(body[name], hints[name]), f"{cls.TYPE}.{name} has the wrong type")
        if "payload" in hints:
            return cls(**body, payload=payload)  # type: ignore[call-arg]
        _check(not payload, f"{cls.TYPE} carries no binary payload")
        return cls(**body)


def _names(names: list[str], limit: int = 5) -> str:
    """A bounded list of field names: the peer chooses them, and errors echo them back."""
    shown = str([name[:40] for name in names[:limit]])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


_SCHEMAS: dict[type, dict[str, Any]] = {}


def _schema(cls: type) -> dict[str, Any]:
    if cls not in _SCHEMAS:
        hints = get_type_hints(cls)
        _SCHEMAS[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return _SCHEMAS[cls]


def _matches(value: Any, hint: Any) -> bool:
    """True if a decoded JSON value has the declared type (bool is not an int here)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        try:
            return math.isfinite(value)
        except OverflowError:  # an int too large for a float
            return False
    if hint is str:
        return isinstance(value, str)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if origin is list:
        (arm,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, arm) for v in value)
    return False


# --- connection set-up ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Challenge(Message):
    TYPE: ClassVar[str] = "challenge"
    nonce: str  # base64 of 32 random bytes; signed by the site with the certificate pin
    federation: str

    def __post_init__(self) -> None:
        _check(16 <= len(self.nonce) <= 128, "challenge.nonce has the wrong length")


@dataclass(frozen=True, slots=True, kw_only=True)
class Enrol(Message):
    TYPE: ClassVar[str] = "enrol"
    token: str
    site_name: str
    public_key: str
    signature: str  # over ("enrol", {nonce, token, public_key, site_name})

    def __post_init__(self) -> None:
        _check(0 < len(self.token) <= 256, "enrol.token has the wrong length")
        _check(0 < len(self.site_name) <= 200, "enrol.site_name must be 1-200 characters")
        _check(0 < len(self.public_key) <= 128, "enrol.public_key has the wrong length")


@dataclass(frozen=True, slots=True, kw_only=True)
class Authenticate(Message):
    TYPE: ClassVar[str] = "authenticate"
    site_id: str
    signature: str  # over ("auth", {nonce, site_id, fingerprint})

    def __post_init__(self) -> None:
        _ident(self.site_id, "authenticate.site_id")


@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome(Message):
    TYPE: ClassVar[str] = "welcome"
    site_id: str
    site_name: str
    coordinator_key: str
    federation: str

    def __post_init__(self) -> None:
        _ident(self.site_id, "welcome.site_id")


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorMessage(Message):
    """An error the peer should know about. ``fatal`` means the sender closes next."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    ref: str | None = None  # type of the message this answers, if any
    fatal: bool = False

    def __post_init__(self) -> None:
        _check(0 < len(self.code) <= 64, "error.code has the wrong length")
        _check(len(self.message) <= 2000, "error.message is too long")


# --- chunked transfers ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferOffer(Message):
    """What a receiver needs to take a large payload in chunks and verify it whole.

    Embedded (as a dict) in RoundInvite and UpdateOffer rather than sent alone, so that an
    offer always travels with the reason for it.
    """

    TYPE: ClassVar[str] = "transfer_offer"
    transfer_id: str
    size: int
    sha256: str
    chunk_size: int

    def __post_init__(self) -> None:
        _ident(self.transfer_id, "transfer_id")
        _check(self.size >= 0, "transfer size must be >= 0")
        _check(self.chunk_size > 0, "chunk_size must be > 0")
        _hex64(self.sha256, "transfer sha256")

    @property
    def total_chunks(self) -> int:
        return max(1, -(-self.size // self.chunk_size))

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> TransferOffer:
        return typing.cast(TransferOffer, cls.from_body(value, b""))


# An offer is only ever embedded in another message, never a frame of its own.
del MESSAGE_TYPES[TransferOffer.TYPE]


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferAccept(Message):
    """Receiver says where to (re)start: the index of the first chunk it does not have."""

    TYPE: ClassVar[str] = "transfer_accept"
    transfer_id: str
    next_index: int

    def __post_init__(self) -> None:
        _ident(self.transfer_id, "transfer_id")
        _check(self.next_index >= 0, "next_index must be >= 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class Chunk(Message):
    TYPE: ClassVar[str] = "chunk"
    transfer_id: str
    index: int
    payload: bytes = b""

    def __post_init__(self) -> None:
        _ident(self.transfer_id, "transfer_id")
        _check(self.index >= 0, "chunk index must be >= 0")

    @property
    def payload_bytes(self) -> bytes:
        return self.payload


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkAck(Message):
    """The receiver has durably stored every chunk before ``next_index``."""

    TYPE: ClassVar[str] = "chunk_ack"
    transfer_id: str
    next_index: int

    def __post_init__(self) -> None:
        _ident(self.transfer_id, "transfer_id")
        _check(self.next_index >= 0, "next_index must be >= 0")


# --- rounds -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundInvite(Message):
    TYPE: ClassVar[str] = "round_invite"
    run_id: str
    round: int
    plan: dict[str, Any]
    plan_hash: str
    plan_signature: str  # coordinator, over ("plan", {plan_hash})
    model: dict[str, Any]  # a TransferOffer of the global model's safetensors bytes
    model_signature: str  # coordinator, over ("model", {run_id, round, plan_hash, sha256})
    deadline_s: float

    def __post_init__(self) -> None:
        _ident(self.run_id, "round_invite.run_id")
        _check(self.round >= 1, "round_invite.round must be >= 1")
        _hex64(self.plan_hash, "round_invite.plan_hash")
        TransferOffer.from_dict(self.model)
        _check(self.deadline_s > 0, "round_invite.deadline_s must be > 0")

    @property
    def model_offer(self) -> TransferOffer:
        return TransferOffer.from_dict(self.model)


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateOffer(Message):
    TYPE: ClassVar[str] = "update_offer"
    run_id: str
    round: int
    base_model: str  # sha256 of the global model the update was computed from
    update: dict[str, Any]  # a TransferOffer of the update's safetensors bytes
    num_samples: int
    train_loss: float
    signature: str  # site, over ("update", {run_id, round, site_id, plan_hash, base_model, ...})

    def __post_init__(self) -> None:
        _ident(self.run_id, "update_offer.run_id")
        _check(self.round >= 1, "update_offer.round must be >= 1")
        _hex64(self.base_model, "update_offer.base_model")
        TransferOffer.from_dict(self.update)
        _check(self.num_samples >= 1, "update_offer.num_samples must be >= 1")

    @property
    def update_offer(self) -> TransferOffer:
        return TransferOffer.from_dict(self.update)


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateAccepted(Message):
    TYPE: ClassVar[str] = "update_accepted"
    run_id: str
    round: int
    sha256: str

    def __post_init__(self) -> None:
        _ident(self.run_id, "update_accepted.run_id")
        _check(self.round >= 1, "update_accepted.round must be >= 1")
        _hex64(self.sha256, "update_accepted.sha256")


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundDecline(Message):
    """The site cannot take part in this round (no data, training failed, cancelled)."""

    TYPE: ClassVar[str] = "round_decline"
    run_id: str
    round: int
    code: str
    reason: str

    def __post_init__(self) -> None:
        _ident(self.run_id, "round_decline.run_id")
        _check(self.round >= 1, "round_decline.round must be >= 1")
        _check(0 < len(self.code) <= 64, "round_decline.code has the wrong length")
        _check(len(self.reason) <= 2000, "round_decline.reason is too long")


@dataclass(frozen=True, slots=True, kw_only=True)
class RunFinished(Message):
    """The run is over. ``model`` offers the final model (a ``TransferOffer``, ``{}`` if not
    offered) so each site can validate it on its own held-out data; the coordinator signs it
    (purpose ``model.final``)."""

    TYPE: ClassVar[str] = "run_finished"
    run_id: str
    rounds: int
    final_model: str
    plan_hash: str = ""
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    model_signature: str = ""

    def __post_init__(self) -> None:
        _ident(self.run_id, "run_finished.run_id")
        _check(self.rounds >= 0, "run_finished.rounds must be >= 0")
        _hex64(self.final_model, "run_finished.final_model")
        if self.model:
            _hex64(self.plan_hash, "run_finished.plan_hash")
            offer = TransferOffer.from_dict(self.model)
            _check(offer.sha256 == self.final_model, "run_finished.model is not the final model")

    @property
    def model_offer(self) -> TransferOffer | None:
        return TransferOffer.from_dict(self.model) if self.model else None


@dataclass(frozen=True, slots=True, kw_only=True)
class DataSummaryReport(Message):
    """A site's data summary, counts only (``shared.data_summary``); sent only if it allows."""

    TYPE: ClassVar[str] = "data_summary"
    summary: dict[str, Any]

    def __post_init__(self) -> None:
        check_summary(self.summary)


# --- governance and provenance ----------------------------------------------------------

_DECISIONS = ("approve", "refuse")
_METRIC_NAMES = ("auc", "accuracy", "sensitivity", "specificity", "loss", "n")


@dataclass(frozen=True, slots=True, kw_only=True)
class GovernanceNotice(Message):
    """What this site is asked to sign: the current charter (its text only if the site has not
    signed that version) and the plans of pending or running runs with the site's recorded
    decision on each. Sent after ``Welcome`` and whenever either changes."""

    TYPE: ClassVar[str] = "governance_notice"
    charter_version: int  # 0: no charter published
    charter_sha256: str  # "" when none
    charter_signature: str  # coordinator, over ("charter", {federation, version, sha256})
    charter_text: str  # "" when the site already signed this version
    charter_signed: bool  # the coordinator holds this site's signature on this version
    plans: list[dict[str, Any]]  # {plan, plan_hash, plan_signature, decision}

    def __post_init__(self) -> None:
        _check(self.charter_version >= 0, "governance_notice.charter_version must be >= 0")
        if self.charter_version:
            _hex64(self.charter_sha256, "governance_notice.charter_sha256")
        _check(len(self.plans) <= 64, "governance_notice.plans has too many plans")
        for item in self.plans:
            _check(
                isinstance(item, dict)
                and set(item) == {"plan", "plan_hash", "plan_signature", "decision"}
                and isinstance(item["plan"], dict)
                and isinstance(item["plan_signature"], str)
                and item["decision"] in ("pending", *_DECISIONS),
                "governance_notice.plans holds a malformed plan",
            )
            _hex64(item["plan_hash"], "governance_notice.plans.plan_hash")


@dataclass(frozen=True, slots=True, kw_only=True)
class CharterSignature(Message):
    """A person at the site accepted charter ``version``; the site key signs it."""

    TYPE: ClassVar[str] = "charter_signature"
    version: int
    sha256: str
    person: str
    signature: str  # site, over ("charter.accept", {federation, site_id, version, sha256, person})

    def __post_init__(self) -> None:
        _check(self.version >= 1, "charter_signature.version must be >= 1")
        _hex64(self.sha256, "charter_signature.sha256")
        _check(0 < len(self.person) <= 200, "charter_signature.person must be 1-200 characters")


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanDecision(Message):
    """A person at the site approved or refused a plan hash; a refusal carries its reason."""

    TYPE: ClassVar[str] = "plan_decision"
    plan_hash: str
    decision: str  # approve | refuse
    reason: str
    person: str
    signature: str  # site, over ("plan.decision", {federation, site_id, plan_hash, ...})

    def __post_init__(self) -> None:
        _hex64(self.plan_hash, "plan_decision.plan_hash")
        _check(self.decision in _DECISIONS, "plan_decision.decision must be approve or refuse")
        _check(len(self.reason) <= 2000, "plan_decision.reason is too long")
        _check(
            self.decision == "approve" or bool(self.reason.strip()),
            "plan_decision.reason is required for a refusal",
        )
        _check(0 < len(self.person) <= 200, "plan_decision.person must be 1-200 characters")


@dataclass(frozen=True, slots=True, kw_only=True)
class ValidationReport(Message):
    """The site's evaluation of a global model on its own held-out split: metrics only."""

    TYPE: ClassVar[str] = "validation_report"
    run_id: str
    round: int  # the round that produced the model (0: the initial model)
    model: str  # sha256 of the model evaluated
    metrics: dict[str, Any]
    signature: str  # site, over ("validation", {run_id, round, site_id, model, metrics})

    def __post_init__(self) -> None:
        _ident(self.run_id, "validation_report.run_id")
        _check(self.round >= 0, "validation_report.round must be >= 0")
        _hex64(self.model, "validation_report.model")
        _check(
            set(self.metrics) == set(_METRIC_NAMES),
            f"validation_report.metrics must be exactly {', '.join(_METRIC_NAMES)}",
        )
        for name in _METRIC_NAMES[:-1]:  # null: undefined here (e.g. AUC with one class)
            _check(
                _matches(self.metrics[name], float | None),
                f"validation_report.{name} must be a finite number or null",
            )
        _check(
            _matches(self.metrics["n"], int) and self.metrics["n"] >= 1,
            "validation_report.n must be a count >= 1",
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class HeadRequest(Message):
    """The site asks for the latest signed tree head, a consistency proof from the last head it
    saw (``known_size``, 0 if none) and inclusion proofs for its own updates."""

    TYPE: ClassVar[str] = "head_request"
    known_size: int
    updates: list[dict[str, Any]]  # {run_id, round}

    def __post_init__(self) -> None:
        _check(self.known_size >= 0, "head_request.known_size must be >= 0")
        _check(len(self.updates) <= 256, "head_request.updates asks for too many proofs")
        for item in self.updates:
            _check(
                isinstance(item, dict)
                and set(item) == {"run_id", "round"}
                and isinstance(item["run_id"], str)
                and _matches(item["round"], int),
                "head_request.updates holds a malformed reference",
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class HeadUpdate(Message):
    """The latest signed tree head with the proofs a ``HeadRequest`` asked for (hex hashes).
    ``known_size`` is the size the consistency proof starts from (the request's, at most the
    head's): a site with several requests in flight tells which answer fits the head it holds."""

    TYPE: ClassVar[str] = "head_update"
    head: dict[str, Any]  # TreeHead.to_dict()
    known_size: int
    consistency: list[str]
    inclusions: list[dict[str, Any]]  # {entry: LogEntry.to_dict(), proof: [hex]}

    def __post_init__(self) -> None:
        _check(self.known_size >= 0, "head_update.known_size must be >= 0")
        _check(len(self.consistency) <= 128, "head_update.consistency is too long")
        _check(len(self.inclusions) <= 256, "head_update.inclusions has too many proofs")
        for item in self.inclusions:
            _check(
                isinstance(item, dict)
                and set(item) == {"entry", "proof"}
                and isinstance(item["entry"], dict)
                and _matches(item["proof"], list[str])
                and len(item["proof"]) <= 128,
                "head_update.inclusions holds a malformed proof",
            )
        for value in [*self.consistency, *(h for i in self.inclusions for h in i["proof"])]:
            _hex64(value, "head_update proof hash")


_DISPUTE_SUBJECTS = ("round", "release", "contribution")


@dataclass(frozen=True, slots=True, kw_only=True)
class Dispute(Message):
    """A site disputes a round, a release or its recorded contribution, with a reason; signed
    by the site. ``dispute_id`` is chosen by the site, so sending it again is harmless."""

    TYPE: ClassVar[str] = "dispute"
    dispute_id: str
    subject: str  # round | release | contribution
    run_id: str
    round: int  # the round disputed (0 when the subject is not a round)
    release: str  # the release version disputed ("" when the subject is not a release)
    reason: str
    person: str
    signature: str  # site, over ("dispute", {federation, site_id, dispute_id, subject, ...})

    def __post_init__(self) -> None:
        _ident(self.dispute_id, "dispute.dispute_id")
        _check(
            self.subject in _DISPUTE_SUBJECTS,
            "dispute.subject must be round, release or contribution",
        )
        _ident(self.run_id, "dispute.run_id")
        _check(self.round >= 0, "dispute.round must be >= 0")
        _check(self.subject != "round" or self.round >= 1, "dispute.round is required")
        _check(self.subject != "release" or bool(self.release), "dispute.release is required")
        _check(len(self.release) <= 32, "dispute.release is too long")
        _check(
            len(self.reason.strip()) > 0 and len(self.reason) <= 2000,
            "dispute.reason must be 1-2000 characters",
        )
        _check(0 < len(self.person) <= 200, "dispute.person must be 1-200 characters")


# --- releases ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseNotice(Message):
    """The releases this site may receive (only runs its updates went into), each with an
    offer of the release packed as one payload (``shared.releases.pack_release``). Sent after
    ``Welcome`` when any release exists, and whenever one is published. Not signed: the site
    checks the unpacked release itself (``verify_release``) with the pinned coordinator key."""

    TYPE: ClassVar[str] = "release_notice"
    releases: list[dict[str, Any]]  # {version, run_id, offer: TransferOffer body}

    def __post_init__(self) -> None:
        _check(len(self.releases) <= 64, "release_notice.releases has too many releases")
        for item in self.releases:
            _check(
                isinstance(item, dict)
                and set(item) == {"version", "run_id", "offer"}
                and isinstance(item["version"], str)
                and isinstance(item["run_id"], str)
                and isinstance(item["offer"], dict),
                "release_notice.releases holds a malformed release",
            )
            _check(
                bool(_RELEASE_VERSION.fullmatch(item["version"])),
                "release_notice version must be MAJOR.MINOR",
            )
            _ident(item["run_id"], "release_notice.run_id")
            TransferOffer.from_dict(item["offer"])

    def offers(self) -> list[tuple[str, str, TransferOffer]]:
        return [
            (r["version"], r["run_id"], TransferOffer.from_dict(r["offer"])) for r in self.releases
        ]


_RELEASE_VERSION = re.compile(r"(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})")


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseAcceptance(Message):
    """A site's verdict on a release it received and verified: the metrics of the plan's
    acceptance validation on its own held-out data (metrics only; ``{}`` when it has none),
    whether it accepts the release and, for a refusal, why; signed by the site."""

    TYPE: ClassVar[str] = "release_acceptance"
    version: str
    run_id: str
    weights_sha256: str  # the release's weights file, as verified at the site
    accepted: bool
    metrics: dict[str, Any]
    reason: str
    person: str
    signature: str  # site, over ("release.acceptance", release_acceptance_fields(...))

    def __post_init__(self) -> None:
        _check(
            bool(_RELEASE_VERSION.fullmatch(self.version)),
            "release_acceptance.version must be MAJOR.MINOR",
        )
        _ident(self.run_id, "release_acceptance.run_id")
        _hex64(self.weights_sha256, "release_acceptance.weights_sha256")
        if self.metrics:
            _check(
                set(self.metrics) == set(_METRIC_NAMES),
                f"release_acceptance.metrics must be exactly {', '.join(_METRIC_NAMES)}",
            )
            for name in _METRIC_NAMES[:-1]:
                _check(
                    _matches(self.metrics[name], float | None),
                    f"release_acceptance.{name} must be a finite number or null",
                )
            _check(
                _matches(self.metrics["n"], int) and self.metrics["n"] >= 1,
                "release_acceptance.n must be a count >= 1",
            )
        _check(len(self.reason) <= 2000, "release_acceptance.reason is too long")
        _check(
            self.accepted or bool(self.reason.strip()),
            "release_acceptance.reason is required for a refusal",
        )
        _check(0 < len(self.person) <= 200, "release_acceptance.person must be 1-200 characters")


# --- secure aggregation -----------------------------------------------------------------
# The signed messages of ``shared.privacy.secagg`` (Bonawitz et al., CCS 2017) travel inside
# these envelopes as their JSON fields; the coordinator relays keys and shares between sites.
# Each envelope rebuilds its secagg messages on construction, so a malformed one cannot exist;
# their signatures and their binding to the round are checked by ``SecAggSite`` and
# ``SecAggServer``, which hold the keys.

_SECAGG_MAX_SITES = 256


def _secagg_message(kind: type[Any], fields: Any, name: str) -> Any:
    """Rebuild one ``shared.privacy.secagg`` message from its JSON fields, or raise
    ``RemoteProtocolError`` (``protocol.schema``)."""
    from shared.privacy.shamir import Share

    names = [f.name for f in dataclasses.fields(kind)]
    _check(isinstance(fields, dict) and set(fields) == set(names), f"{name} is malformed")
    values: dict[str, Any] = {}
    for key in names:
        value = fields[key]
        if key == "round":
            _check(_matches(value, int) and value >= 0, f"{name}.round must be >= 0")
        elif key in ("survivors", "dropped"):
            _check(
                _matches(value, list[str]) and len(value) <= _SECAGG_MAX_SITES,
                f"{name}.{key} must be a list of site ids",
            )
            value = tuple(value)
        elif key in ("self_mask_shares", "mask_key_shares"):
            _check(
                isinstance(value, list)
                and len(value) <= _SECAGG_MAX_SITES
                and all(
                    isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in value
                ),
                f"{name}.{key} must be a list of [site, share] pairs",
            )
            try:
                value = tuple((p[0], Share.from_fields(p[1])) for p in value)
            except TesseraError as exc:
                raise RemoteProtocolError(f"{name}.{key}: {exc}", code="protocol.schema") from exc
        else:
            _check(isinstance(value, str) and len(value) <= 4096, f"{name}.{key} is malformed")
        values[key] = value
    return kind(**values)


def _secagg_envelope(run_id: str, rnd: int, name: str) -> None:
    _ident(run_id, f"{name}.run_id")
    _check(rnd >= 1, f"{name}.round must be >= 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class SecAggSetup(Message):
    """Coordinator -> site: this round is securely aggregated, with this configuration
    (``shared.privacy.secagg.SecAggConfig`` fields; its ``run_id`` is the run's id and the
    attempt's, so an attempt's messages are useless in the next) and the identity keys of
    the round's sites, signed by the coordinator (purpose ``secagg.setup``)."""

    TYPE: ClassVar[str] = "secagg_setup"
    run_id: str
    round: int
    config: dict[str, Any]  # run_id, round, sites, threshold, vector_length, bits, ...
    site_keys: dict[str, Any]  # site id -> Ed25519 public key (URL-safe base64)
    signature: str

    def __post_init__(self) -> None:
        _secagg_envelope(self.run_id, self.round, "secagg_setup")
        self.secagg_config()
        _check(
            len(self.site_keys) <= _SECAGG_MAX_SITES
            and all(isinstance(v, str) and 0 < len(v) <= 128 for v in self.site_keys.values()),
            "secagg_setup.site_keys is malformed",
        )

    def signed_fields(self) -> dict[str, Any]:
        return {k: v for k, v in self.body().items() if k != "signature"}

    def secagg_config(self) -> Any:
        """The round's ``SecAggConfig``."""
        from shared.privacy.quantise import Quantiser
        from shared.privacy.secagg import SecAggConfig

        c = self.config
        keys = {"run_id", "round", "sites", "threshold", "vector_length", "bits", "clip_norm"}
        _check(set(c) == keys | {"max_sites"}, "secagg_setup.config has the wrong fields")
        _check(
            _matches(c["sites"], list[str]) and len(c["sites"]) <= _SECAGG_MAX_SITES,
            "secagg_setup.config.sites must be a list of site ids",
        )
        for key in ("round", "threshold", "vector_length", "bits", "max_sites"):
            _check(_matches(c[key], int), f"secagg_setup.config.{key} must be an integer")
        _check(_matches(c["clip_norm"], float), "secagg_setup.config.clip_norm must be a number")
        _check(isinstance(c["run_id"], str), "secagg_setup.config.run_id must be text")
        try:
            return SecAggConfig(
                run_id=c["run_id"],
                round=c["round"],
                sites=tuple(c["sites"]),
                threshold=c["threshold"],
                vector_length=c["vector_length"],
                quantiser=Quantiser(
                    clip_norm=float(c["clip_norm"]), max_sites=c["max_sites"], bits=c["bits"]
                ),
            )
        except TesseraError as exc:
            raise RemoteProtocolError(
                f"secagg_setup.config: {exc}", code="protocol.schema"
            ) from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class SecAggKeys(Message):
    """Site -> coordinator: its ``KeyAdvertisement`` (a list of one); coordinator -> site:
    every site's, once key collection closes."""

    TYPE: ClassVar[str] = "secagg_keys"
    run_id: str
    round: int
    advertisements: list[dict[str, Any]]

    def __post_init__(self) -> None:
        _secagg_envelope(self.run_id, self.round, "secagg_keys")
        _check(len(self.advertisements) <= _SECAGG_MAX_SITES, "secagg_keys has too many keys")
        self.to_secagg()

    def to_secagg(self) -> tuple[Any, ...]:
        from shared.privacy.secagg import KeyAdvertisement

        return tuple(
            _secagg_message(KeyAdvertisement, a, "secagg_keys.advertisement")
            for a in self.advertisements
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SecAggShares(Message):
    """Site -> coordinator: the ``EncryptedShares`` it dealt, one per other site;
    coordinator -> site: the shares dealt to it, once share collection closes."""

    TYPE: ClassVar[str] = "secagg_shares"
    run_id: str
    round: int
    shares: list[dict[str, Any]]

    def __post_init__(self) -> None:
        _secagg_envelope(self.run_id, self.round, "secagg_shares")
        _check(len(self.shares) <= _SECAGG_MAX_SITES, "secagg_shares has too many shares")
        self.to_secagg()

    def to_secagg(self) -> tuple[Any, ...]:
        from shared.privacy.secagg import EncryptedShares

        return tuple(
            _secagg_message(EncryptedShares, s, "secagg_shares.share") for s in self.shares
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class MaskedUpdateOffer(Message):
    """Site -> coordinator: a masked update (the round's ring vector, little-endian, sent as
    a chunked transfer like an update) with its signed ``MaskedInput`` (which signs the
    vector's digest), the number of samples and the training loss (a mean over the site's
    batches: a count and a scalar, not the update)."""

    TYPE: ClassVar[str] = "masked_update_offer"
    run_id: str
    round: int
    masked: dict[str, Any]
    update: dict[str, Any]  # a TransferOffer of the masked vector's bytes
    num_samples: int
    train_loss: float

    def __post_init__(self) -> None:
        _secagg_envelope(self.run_id, self.round, "masked_update_offer")
        TransferOffer.from_dict(self.update)
        _check(self.num_samples >= 1, "masked_update_offer.num_samples must be >= 1")
        self.to_secagg()

    def to_secagg(self) -> Any:
        from shared.privacy.secagg import MaskedInput

        return _secagg_message(MaskedInput, self.masked, "masked_update_offer.masked")

    @property
    def update_offer(self) -> TransferOffer:
        return TransferOffer.from_dict(self.update)


@dataclass(frozen=True, slots=True, kw_only=True)
class SecAggUnmask(Message):
    """Coordinator -> surviving site: the signed ``UnmaskRequest`` (who survived, who
    dropped after sharing)."""

    TYPE: ClassVar[str] = "secagg_unmask"
    run_id: str
    round: int
    request: dict[str, Any]

    def __post_init__(self) -> None:
        _secagg_envelope(self.run_id, self.round, "secagg_unmask")
        self.to_secagg()

    def to_secagg(self) -> Any:
        from shared.privacy.secagg import UnmaskRequest

        return _secagg_message(UnmaskRequest, self.request, "secagg_unmask.request")


@dataclass(frozen=True, slots=True, kw_only=True)
class SecAggUnmaskResponse(Message):
    """Site -> coordinator: its signed ``UnmaskResponse`` (its shares for the survivors'
    self-masks and the dropped sites' mask keys, never both for one site)."""

    TYPE: ClassVar[str] = "secagg_unmask_response"
    run_id: str
    round: int
    response: dict[str, Any]

    def __post_init__(self) -> None:
        _secagg_envelope(self.run_id, self.round, "secagg_unmask_response")
        self.to_secagg()

    def to_secagg(self) -> Any:
        from shared.privacy.secagg import UnmaskResponse

        return _secagg_message(UnmaskResponse, self.response, "secagg_unmask_response.response")


# --- homomorphic-encryption key distribution --------------------------------------------
# One CKKS key per run (``shared.privacy.homomorphic``), made by one site and sealed to each
# other site; the coordinator relays what the sites sign and never holds the secret. Every
# message names the run and the attempt, and signatures cover both, so nothing of one attempt
# is of use in another. The state machines (``coordinator.he_keys``,
# ``site_client.core.he_keys_site``) check signatures; these classes check shape and size.

_HE_MAX_SITES = 256
_HE_MAX_SIGNATURE = 128
_HE_MAX_PUBLIC_CONTEXT = 4096  # base64 chars: a public context is ~100 bytes, a secret ~550 KB
# A sealed secret context is ~550 KB at degree 8192 and ~3.4 MB at 32768: one frame's
# payload (``shared.protocol.codec.Limits.max_payload_bytes``, which codec.py cannot share
# with this module without a cycle).
_HE_MAX_SEALED = 4 * 1024 * 1024


def _he_envelope(run_id: str, attempt: str, name: str) -> None:
    _ident(run_id, f"{name}.run_id")
    _ident(attempt, f"{name}.attempt")


def _he_signature(signature: str, name: str) -> None:
    _check(0 < len(signature) <= _HE_MAX_SIGNATURE, f"{name}.signature has the wrong length")


def _key32(value: Any, name: str) -> bytes:
    """A 32-byte key (Ed25519 or X25519) in URL-safe base64 without padding."""
    raw = b64url_decode(value) if isinstance(value, str) else None
    _check(raw is not None and len(raw) == 32, f"{name} must be a 32-byte key in base64url")
    assert raw is not None
    return raw


@dataclass(frozen=True, slots=True, kw_only=True)
class HEKeyRequest(Message):
    """Coordinator -> each of the run's sites: make an X25519 key for this attempt. Lists the
    sites' Ed25519 identity keys (which sites check each other's signatures against) and the
    site that makes the CKKS key; signed by the coordinator (purpose ``he.key_request``)."""

    TYPE: ClassVar[str] = "he_key_request"
    run_id: str
    attempt: str
    key_site: str
    site_keys: dict[str, Any]  # site id -> Ed25519 public key (URL-safe base64)
    signature: str

    def __post_init__(self) -> None:
        _he_envelope(self.run_id, self.attempt, "he_key_request")
        _check(
            2 <= len(self.site_keys) <= _HE_MAX_SITES,
            f"he_key_request.site_keys must list 2-{_HE_MAX_SITES} sites",
        )
        for site, key in self.site_keys.items():
            _ident(site, "he_key_request site id")
            _key32(key, "he_key_request.site_keys key")
        _check(self.key_site in self.site_keys, "he_key_request.key_site must be one of the sites")
        _he_signature(self.signature, "he_key_request")

    def signed_fields(self) -> dict[str, Any]:
        """What the coordinator signed (``signed.he_key_request_fields``)."""
        from shared.protocol import signed

        return signed.he_key_request_fields(
            run_id=self.run_id,
            attempt=self.attempt,
            key_site=self.key_site,
            site_keys=self.site_keys,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class HEPublicKey(Message):
    """Site -> coordinator: its fresh X25519 key for this attempt (raw, URL-safe base64),
    signed by the site (purpose ``he.public_key``). The coordinator hands the set to the key
    site in an ``HEKeyDirectory``."""

    TYPE: ClassVar[str] = "he_public_key"
    run_id: str
    attempt: str
    site_id: str
    public_key: str
    signature: str

    def __post_init__(self) -> None:
        _he_envelope(self.run_id, self.attempt, "he_public_key")
        _ident(self.site_id, "he_public_key.site_id")
        _key32(self.public_key, "he_public_key.public_key")
        _he_signature(self.signature, "he_public_key")

    @property
    def public_key_bytes(self) -> bytes:
        return _key32(self.public_key, "he_public_key.public_key")

    def signed_fields(self) -> dict[str, Any]:
        """What the site signed (``signed.he_public_key_fields``)."""
        from shared.protocol import signed

        return signed.he_public_key_fields(
            run_id=self.run_id,
            attempt=self.attempt,
            site_id=self.site_id,
            public_key=self.public_key,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class HEKeyDirectory(Message):
    """Coordinator -> key site: the ``HEPublicKey`` bodies of the sites that answered, as the
    sites signed them (the coordinator cannot alter one unseen), the key site's own included."""

    TYPE: ClassVar[str] = "he_key_directory"
    run_id: str
    attempt: str
    keys: list[dict[str, Any]]

    def __post_init__(self) -> None:
        _he_envelope(self.run_id, self.attempt, "he_key_directory")
        _check(
            0 < len(self.keys) <= _HE_MAX_SITES,
            f"he_key_directory.keys must hold 1-{_HE_MAX_SITES} keys",
        )
        keys = self.public_keys()
        _check(
            len({k.site_id for k in keys}) == len(keys),
            "he_key_directory.keys names a site twice",
        )
        _check(
            all((k.run_id, k.attempt) == (self.run_id, self.attempt) for k in keys),
            "he_key_directory.keys holds a key of another run or attempt",
        )

    def public_keys(self) -> tuple[HEPublicKey, ...]:
        out = []
        for entry in self.keys:
            _check(isinstance(entry, dict), "he_key_directory.keys holds a malformed key")
            out.append(typing.cast(HEPublicKey, HEPublicKey.from_body(entry, b"")))
        return tuple(out)


@dataclass(frozen=True, slots=True, kw_only=True)
class HESealedKey(Message):
    """Key site -> coordinator -> ``recipient``, relayed unchanged: the secret CKKS context
    sealed to the recipient (``payload``, the blob of ``seal_secret_context``), the key site's
    X25519 key that opens it, and the public context (parameters only, base64url) that the
    coordinator keeps, and the key's id (``homomorphic.key_id``), the same in every sealed
    key of the attempt. Signed by the key site (purpose ``he.sealed_key``) over digests."""

    TYPE: ClassVar[str] = "he_sealed_key"
    run_id: str
    attempt: str
    recipient: str
    key_site_public: str
    public_context: str
    key_id: str
    signature: str
    payload: bytes = b""

    def __post_init__(self) -> None:
        _he_envelope(self.run_id, self.attempt, "he_sealed_key")
        _ident(self.recipient, "he_sealed_key.recipient")
        _key32(self.key_site_public, "he_sealed_key.key_site_public")
        _check(
            len(self.public_context) <= _HE_MAX_PUBLIC_CONTEXT
            and bool(b64url_decode(self.public_context)),
            "he_sealed_key.public_context must be base64url of at most "
            f"{_HE_MAX_PUBLIC_CONTEXT} characters",
        )
        _hex64(self.key_id, "he_sealed_key.key_id")
        _he_signature(self.signature, "he_sealed_key")
        _check(
            isinstance(self.payload, bytes | bytearray | memoryview)
            and 0 < len(self.payload) <= _HE_MAX_SEALED,
            f"he_sealed_key.payload must hold 1 to {_HE_MAX_SEALED} bytes",
        )
        # The codec hands a view of the frame; the blob is opened and hashed as bytes.
        object.__setattr__(self, "payload", bytes(self.payload))

    @property
    def payload_bytes(self) -> bytes:
        return self.payload

    @property
    def public_context_bytes(self) -> bytes:
        raw = b64url_decode(self.public_context)
        assert raw is not None  # checked on construction
        return raw

    @property
    def key_site_public_bytes(self) -> bytes:
        return _key32(self.key_site_public, "he_sealed_key.key_site_public")

    def signed_fields(self) -> dict[str, Any]:
        """What the key site signed: digests of the public context and of the blob."""
        from shared.protocol import signed

        return signed.he_sealed_key_fields(
            run_id=self.run_id,
            attempt=self.attempt,
            recipient=self.recipient,
            key_site_public=self.key_site_public,
            public_context_sha256=hashlib.sha256(self.public_context_bytes).hexdigest(),
            key_id=self.key_id,
            sealed_sha256=hashlib.sha256(self.payload).hexdigest(),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class HEKeyAck(Message):
    """Site -> coordinator: it opened the key and holds the secret context whose public
    context has this SHA-256 and whose id is ``key_id``; signed by the site (purpose
    ``he.key_ack``). Equal ids at every site show they all hold the one key."""

    TYPE: ClassVar[str] = "he_key_ack"
    run_id: str
    attempt: str
    site_id: str
    public_context_sha256: str
    key_id: str
    signature: str

    def __post_init__(self) -> None:
        _he_envelope(self.run_id, self.attempt, "he_key_ack")
        _ident(self.site_id, "he_key_ack.site_id")
        _hex64(self.public_context_sha256, "he_key_ack.public_context_sha256")
        _hex64(self.key_id, "he_key_ack.key_id")
        _he_signature(self.signature, "he_key_ack")

    def signed_fields(self) -> dict[str, Any]:
        """What the site signed (``signed.he_key_ack_fields``)."""
        from shared.protocol import signed

        return signed.he_key_ack_fields(
            run_id=self.run_id,
            attempt=self.attempt,
            site_id=self.site_id,
            public_context_sha256=self.public_context_sha256,
            key_id=self.key_id,
        )
