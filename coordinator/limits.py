"""Limits on what peers may cost the coordinator: message rate, unidentified connections,
concurrent uploads, and failed identity attempts (invitation tokens). Pure.

Theory of operation: the server adapter asks these objects before it spends anything on a
peer and tells them what happened; they answer with a verdict and never do I/O or read a
clock (every method that needs time takes ``now``, in seconds, from the adapter's clock), so
every rule is unit-tested with plain numbers, like ``coordinator.engine``. Memory is bounded
whatever peers do: keyed state is capped and the oldest entries are forgotten first.

- ``MessageRate``: one connection's messages per second, through a ``TokenBucket``: a fast
  sender is slowed, one that stays above its rate is disconnected. Transfer frames have their
  own bound (``PeerLimits.free_chunk_bytes``): bytes of an accepted transfer, not messages.
- ``TokenBucket``: the classic token bucket (the meter of RFC 2697, section 3, with one
  bucket): ``rate`` tokens per second up to ``burst``. ``wait`` reserves tokens even into
  debt and says how long to wait, for back-pressure (a fast sender is slowed, not dropped);
  ``try_take`` only takes what is there, for refusals.
- ``IdentityGuard``: throttles *failed* enrolments and authentications per peer address and
  overall (NIST SP 800-63B, section 5.2.2, "Rate Limiting (Throttling)"). Tokens carry 256
  random bits, so guessing one is hopeless anyway; the guard keeps a guesser from costing a
  database transaction and a signature check per attempt. Successes cost nothing, so a
  consortium enrolling hundreds of sites from one address is never slowed.
- ``ConnectionBudget``: connections that have not identified yet (no ``Welcome``) are
  capped, overall and per peer address, and each must identify within a deadline, so a flood
  of idle or slow connections (the "slowloris" pattern) cannot exhaust sockets or memory.
- ``UploadSlots``: how many update uploads may be in flight at once (each holds an open
  partial file on the coordinator's disk), the others queued in turn, and at most one per
  site.

``PeerLimits`` gathers every setting with its default and builds the objects. The frame size
limit is not here: websockets enforces it (``max_size``, close code 1009) from
``shared.protocol.codec.Limits.max_frame_bytes``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from shared.errors import TesseraError


class LimitError(TesseraError):
    """A limit was configured with impossible values."""

    code = "config.limits"


@dataclass(frozen=True, slots=True)
class Rate:
    """``per_s`` tokens per second, at most ``burst`` saved up."""

    per_s: float
    burst: float

    def __post_init__(self) -> None:
        if not (self.per_s > 0 and math.isfinite(self.per_s)):
            raise LimitError(f"a rate must be a positive number per second, not {self.per_s}")
        if not (self.burst >= 1 and math.isfinite(self.burst)):
            raise LimitError(f"a burst must be at least 1, not {self.burst}")


class TokenBucket:
    """One token bucket, full at ``now``."""

    def __init__(self, rate: Rate, now: float) -> None:
        self.rate = rate
        self.tokens = rate.burst
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:  # a clock that steps back refills nothing
            self.tokens = min(self.rate.burst, self.tokens + (now - self.updated) * self.rate.per_s)
            self.updated = now

    def available(self, now: float) -> float:
        self._refill(now)
        return self.tokens

    def try_take(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if they are there; else take nothing and say no."""
        self._refill(now)
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False

    def wait(self, now: float, cost: float = 1.0) -> float:
        """Take ``cost`` tokens, into debt if need be; seconds to wait before acting (0: act
        now). The debt is paid back at ``rate`` before the next caller may act."""
        self._refill(now)
        self.tokens -= cost
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate.per_s

    def full_at(self) -> float:
        """When the bucket is full again if nothing more is taken."""
        return self.updated + max(0.0, self.rate.burst - self.tokens) / self.rate.per_s


class KeyedBuckets:
    """One ``TokenBucket`` per key (a peer address), at most ``max_keys`` of them. When full,
    buckets that have refilled completely are dropped first (forgetting them changes
    nothing), then the least recently used."""

    def __init__(self, rate: Rate, max_keys: int = 10_000) -> None:
        if max_keys < 1:
            raise LimitError(f"max_keys must be at least 1, not {max_keys}")
        self.rate = rate
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def bucket(self, key: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            self._make_room(now)
            bucket = self._buckets[key] = TokenBucket(self.rate, now)
        else:
            self._buckets.move_to_end(key)
        return bucket

    def peek(self, key: str, now: float) -> float:
        """Tokens ``key`` has now (a key never seen has a full bucket)."""
        bucket = self._buckets.get(key)
        return self.rate.burst if bucket is None else bucket.available(now)

    def _make_room(self, now: float) -> None:
        if len(self._buckets) < self.max_keys:
            return
        for key in [k for k, b in self._buckets.items() if b.full_at() <= now]:
            del self._buckets[key]
        while len(self._buckets) >= self.max_keys:
            self._buckets.popitem(last=False)


@dataclass(frozen=True, slots=True)
class Verdict:
    """``allowed`` (after ``wait_s`` seconds of back-pressure, if any), or a refusal with a
    stable ``code``, a ``reason`` to send the peer (it says what to do next) and, where
    waiting helps, ``retry_after`` seconds."""

    allowed: bool
    code: str = ""
    reason: str = ""
    retry_after: float | None = None
    wait_s: float = 0.0


ALLOWED = Verdict(True)


class MessageRate:
    """One connection's message rate. Within its ``burst`` a sender goes as fast as it likes;
    above ``rate`` it is slowed (the adapter waits ``wait_s`` before it handles the message,
    so TCP pushes back on the sender meanwhile). A sender that keeps pushing against the limit
    for more than ``max_wait_s`` -- slowed all along, never pausing long enough for its bucket
    to refill a little -- is flooding and is disconnected.

    The episode is measured in elapsed time, not read off the bucket's debt: the adapter
    reads one frame at a time and sleeps before the next, which pays the debt back, so a
    flooder's debt never grows past one message and a debt rule alone would never fire.
    A pause is ``pause_s`` worth of tokens (or the whole burst, if smaller) found in the
    bucket: more than the event loop's scheduling jitter, which must not reset the episode.
    ``cost`` 0 (a chunk of an accepted transfer) is always allowed and never counted.
    """

    def __init__(
        self, rate: Rate, now: float, *, max_wait_s: float = 10.0, pause_s: float = 0.25
    ) -> None:
        if not max_wait_s >= 0:
            raise LimitError(f"max_wait_s must be >= 0, not {max_wait_s}")
        self.bucket = TokenBucket(rate, now)
        self.max_wait_s = max_wait_s
        self.pause_tokens = min(rate.burst, max(1.0, rate.per_s * pause_s))
        self.slowed_since: float | None = None  # when the current episode of waiting began

    def admit(self, now: float, cost: float = 1.0) -> Verdict:
        if cost <= 0:
            return ALLOWED
        if self.bucket.available(now) >= self.pause_tokens:
            self.slowed_since = None  # the sender paused: a new burst is fine
        wait = self.bucket.wait(now, cost)
        if wait > 0:
            if self.slowed_since is None:
                self.slowed_since = now
            if now + wait - self.slowed_since > self.max_wait_s:
                self.bucket.tokens += cost  # refused: not counted against the next message
                return Verdict(
                    False,
                    "protocol.rate",
                    "too many messages; disconnecting (the site reconnects by itself)",
                )
        return Verdict(True, wait_s=wait)


class IdentityGuard:
    """Throttle failed enrolments and authentications, per peer address and overall.

    Call ``check(peer, now)`` before looking at an ``Enrol`` or at an ``Authenticate`` that
    names no enrolled site, and ``failed(peer, now)`` when one is refused. Defaults: a peer may
    fail 10 times in a row, then once a minute; all peers together 30 times, then once a
    second.

    The sign-in of an enrolled site is neither checked nor counted here: sites behind one NAT
    share its address, and a guesser there (or one site with a wrong key) must not lock the
    others out. Such a sign-in costs one key lookup and one signature check, less than the
    TLS handshake before it; a signature cannot be guessed, and each connection gets one try.
    """

    def __init__(
        self,
        *,
        per_peer: Rate = Rate(per_s=1 / 60, burst=10),
        overall: Rate = Rate(per_s=1.0, burst=30),
        max_peers: int = 10_000,
        now: float = 0.0,
    ) -> None:
        self._peers = KeyedBuckets(per_peer, max_peers)
        self._overall = TokenBucket(overall, now)

    def check(self, peer: str, now: float) -> Verdict:
        waits = []
        if self._peers.peek(peer, now) < 1:
            waits.append(self._peers.bucket(peer, now))
        if self._overall.available(now) < 1:
            waits.append(self._overall)
        if not waits:
            return ALLOWED
        retry = max((1 - b.tokens) / b.rate.per_s for b in waits)
        return Verdict(
            False,
            "identity.throttled",
            "Too many failed enrolment or sign-in attempts; wait a while and try again. "
            "If your invitation code keeps failing, ask the consortium lead for a new one.",
            retry_after=retry,
        )

    def failed(self, peer: str, now: float) -> None:
        """An attempt from ``peer`` was refused (unknown, used or expired token, bad
        signature, unknown site)."""
        self._peers.bucket(peer, now).try_take(now)
        self._overall.try_take(now)


@dataclass(frozen=True, slots=True)
class _Pending:
    peer: str
    deadline: float


class ConnectionBudget:
    """Connections that have not identified yet: how many, from whom, for how long.

    ``admit`` when a connection opens (before the challenge is sent), keyed by anything
    hashable that names it (the websocket: the server's ``Connection`` dataclass compares by
    value and is not hashable); ``identified`` when it is welcomed; ``closed`` when it goes
    (always: identified or not). ``overdue(now)`` lists the connections to close for not
    identifying within ``identify_within_s``; ``next_deadline`` says when to ask again.
    """

    def __init__(
        self,
        *,
        max_pending: int = 512,
        max_pending_per_peer: int = 256,
        identify_within_s: float = 30.0,
    ) -> None:
        if max_pending < 1 or max_pending_per_peer < 1:
            raise LimitError("connection budgets must allow at least one connection")
        if not identify_within_s > 0:
            raise LimitError(f"identify_within_s must be > 0, not {identify_within_s}")
        self.max_pending = max_pending
        self.max_pending_per_peer = max_pending_per_peer
        self.identify_within_s = identify_within_s
        self._pending: dict[Hashable, _Pending] = {}
        self._per_peer: dict[str, int] = {}

    @property
    def pending(self) -> int:
        return len(self._pending)

    def pending_from(self, peer: str) -> int:
        return self._per_peer.get(peer, 0)

    def admit(self, conn: Hashable, peer: str, now: float) -> Verdict:
        if conn in self._pending:
            return ALLOWED
        if len(self._pending) >= self.max_pending:
            return Verdict(
                False,
                "net.busy",
                "The coordinator has too many connections waiting to sign in; try again shortly.",
                retry_after=self.identify_within_s,
            )
        if self._per_peer.get(peer, 0) >= self.max_pending_per_peer:
            return Verdict(
                False,
                "net.busy",
                "Too many connections from your address are waiting to sign in; try again shortly.",
                retry_after=self.identify_within_s,
            )
        self._pending[conn] = _Pending(peer, now + self.identify_within_s)
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        return ALLOWED

    def identified(self, conn: Hashable) -> None:
        self._forget(conn)

    def closed(self, conn: Hashable) -> None:
        self._forget(conn)

    def overdue(self, now: float) -> list[Hashable]:
        """Connections past their deadline, oldest first. They stay counted until
        ``closed``: the adapter closes them and reports back."""
        due = [
            (pending.deadline, order, conn)
            for order, (conn, pending) in enumerate(self._pending.items())
            if pending.deadline <= now
        ]
        return [conn for _, _, conn in sorted(due, key=lambda d: (d[0], d[1]))]

    def next_deadline(self) -> float | None:
        return min((p.deadline for p in self._pending.values()), default=None)

    def _forget(self, conn: Hashable) -> None:
        pending = self._pending.pop(conn, None)
        if pending is None:
            return
        left = self._per_peer[pending.peer] - 1
        if left:
            self._per_peer[pending.peer] = left
        else:
            del self._per_peer[pending.peer]


@dataclass(frozen=True, slots=True)
class PeerLimits:
    """Every limit's setting, with the defaults the coordinator runs with (``CoordinatorServer``
    takes one of these). Sized for hundreds of sites behind one address (a consortium's test
    bed, the scale benchmark): only failures and floods are throttled."""

    message_rate: Rate = Rate(per_s=200.0, burst=1000.0)
    max_message_wait_s: float = 10.0
    # A chunk of an accepted transfer carrying at least this many bytes (or its last) costs
    # no message: a big update in many chunks is bounded by its bytes (the offer's size,
    # checked against the model, and ``max_uploads``), not by the message rate. Smaller
    # chunks count as messages, so an offer of 1-byte chunks cannot flood for free.
    free_chunk_bytes: int = 64 * 1024
    identity_per_peer: Rate = Rate(per_s=1 / 60, burst=10)
    identity_overall: Rate = Rate(per_s=1.0, burst=30)
    max_pending: int = 512
    max_pending_per_peer: int = 256
    identify_within_s: float = 30.0
    max_uploads: int = 64
    max_uploads_per_site: int = 1
    # Before its Welcome a peer may only send Enrol, Authenticate or an error, each well under
    # 4 KiB; a larger frame is refused by websockets (close code 1009) before it is buffered.
    max_frame_before_identity: int = 64 * 1024

    def message_meter(self, now: float) -> MessageRate:
        return MessageRate(self.message_rate, now, max_wait_s=self.max_message_wait_s)

    def identity_guard(self, now: float) -> IdentityGuard:
        return IdentityGuard(
            per_peer=self.identity_per_peer, overall=self.identity_overall, now=now
        )

    def connection_budget(self) -> ConnectionBudget:
        return ConnectionBudget(
            max_pending=self.max_pending,
            max_pending_per_peer=self.max_pending_per_peer,
            identify_within_s=self.identify_within_s,
        )

    def upload_slots(self) -> UploadSlots:
        return UploadSlots(max_total=self.max_uploads, max_per_site=self.max_uploads_per_site)


class UploadSlots:
    """Update uploads in flight: at most ``max_total`` at once, the others wait their turn.

    ``request`` when an ``UpdateOffer`` has passed its checks, before the partial file is
    opened: the upload may start now, or it is queued (``update.queued``: hold the offer and
    send the ``TransferAccept`` later; the site simply waits for it, so a crowd of sites
    finishing together is served in turn rather than refused), or it is refused because the
    site already has ``max_per_site`` uploads started or waiting (``update.busy``: only a
    broken or hostile site does that; the same transfer offered again is not a second one).
    ``release`` when an upload completes, fails or its connection closes, queued or not; it
    returns the queued uploads that may start now, first come first served.
    """

    def __init__(self, *, max_total: int = 64, max_per_site: int = 1) -> None:
        if max_total < 1 or max_per_site < 1:
            raise LimitError("upload limits must allow at least one upload")
        self.max_total = max_total
        self.max_per_site = max_per_site
        self._held: dict[tuple[str, str], None] = {}
        self._waiting: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._per_site: dict[str, int] = {}  # held and waiting

    @property
    def active(self) -> int:
        return len(self._held)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def request(self, site_id: str, transfer_id: str) -> Verdict:
        key = (site_id, transfer_id)
        if key in self._held:
            return ALLOWED  # the same upload resumed
        if key in self._waiting:
            return _QUEUED
        if self._per_site.get(site_id, 0) >= self.max_per_site:
            return Verdict(
                False,
                "update.busy",
                f"This site already has {self.max_per_site} upload(s) in progress; finish "
                "or abandon it before offering another.",
            )
        self._per_site[site_id] = self._per_site.get(site_id, 0) + 1
        if len(self._held) < self.max_total and not self._waiting:
            self._held[key] = None
            return ALLOWED
        self._waiting[key] = None
        return _QUEUED

    def release(self, site_id: str, transfer_id: str) -> list[tuple[str, str]]:
        """Forget one upload (releasing twice, or something never requested, is harmless);
        returns the (site, transfer) pairs that may start now."""
        key = (site_id, transfer_id)
        if key in self._held:
            del self._held[key]
        elif key in self._waiting:
            del self._waiting[key]
        else:
            return []
        left = self._per_site[site_id] - 1
        if left:
            self._per_site[site_id] = left
        else:
            del self._per_site[site_id]
        granted = []
        while self._waiting and len(self._held) < self.max_total:
            start, _ = self._waiting.popitem(last=False)
            self._held[start] = None
            granted.append(start)
        return granted


_QUEUED = Verdict(
    False,
    "update.queued",
    "The coordinator is receiving other updates; this one will be accepted in turn.",
)
