"""Distribution of a run's CKKS key, at the coordinator: phases, deadlines, relays. Pure.

Theory of operation
-------------------
In homomorphic-encryption mode the sites share one CKKS secret key that the coordinator never
holds (``shared.privacy.homomorphic``: Cheon et al. 2017; the blob is sealed HPKE-Auth style,
RFC 9180). One :class:`HEKeySetup` is one attempt at making and spreading that key, set up
before round 1. The server adapter feeds it what the sites sent plus ``now`` and carries out
the actions it returns (send a message to a site, leave a site out, the key is ready, the
attempt failed); it does no I/O and reads no clock. Trust is as in secure aggregation: the
coordinator signs the list of the run's sites' Ed25519 keys, sites sign what they publish,
and sites check each other against that list, so a coordinator that swapped a key would be
caught by the sites.

Phases, each with a deadline of ``phase_s`` seconds and a defined outcome::

    collect  the signed HEKeyRequest went to every site; each answers with a signed, fresh
             X25519 key (HEPublicKey). Closes when all have, or at the deadline: the silent
             sites are left out; a silent key site, or fewer than 2 sites, fails the attempt.
             The key site gets the answered keys (HEKeyDirectory).
    seal     the key site makes the CKKS key and sends one signed HESealedKey per other
             site; each is checked (signature, the key site's published X25519 key, one
             public context for all) and relayed unchanged at once. Closes when every
             recipient's has come, or at the deadline: recipients without one are left out;
             none at all fails the attempt.
    ack      each recipient opens its key and acknowledges the public context's digest and
             the key's id (HEKeyAck; may come while ``seal`` is still open). Closes when all
             have, or at the deadline: the others are left out. Ready when at least 2 sites
             (the key site counts as holding the key) hold it, else the attempt fails. A
             public context holds the parameters only, so the sites prove they hold one and
             the same key by its id (``homomorphic.key_id``, a digest that reveals nothing of
             it): every sealed key must name the same id, and every ack must repeat it.

What the coordinator sees: X25519 public keys, sealed blobs it cannot open, and the public
context (parameters only, no secret or public key), which is all that adding ciphertexts needs.
A refused message raises :class:`~shared.errors.HEKeyRejected` with a stable code and changes
nothing. A failed attempt is retried by the caller with a new attempt id: every signature
covers it, so no message of one attempt is of use in another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from shared.crypto.signing import sign, verify
from shared.errors import CryptoError, HEKeyRejected, HomomorphicError, LocalProtocolError
from shared.protocol import signed
from shared.protocol.messages import (
    HEKeyAck,
    HEKeyDirectory,
    HEKeyRequest,
    HEPublicKey,
    HESealedKey,
    Message,
)

__all__ = ["Failed", "HEKeyAction", "HEKeySetup", "LeftOut", "Ready", "Send"]


@dataclass(frozen=True, slots=True)
class Send:
    site: str
    message: Message


@dataclass(frozen=True, slots=True)
class LeftOut:
    """``site`` will not hold this attempt's key (it missed a phase)."""

    site: str
    reason: str


@dataclass(frozen=True, slots=True)
class Ready:
    """The attempt's outcome: the public context to add ciphertexts with, and the sites that
    hold the secret context (the key site included), sorted."""

    public_context: bytes
    sites: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Failed:
    reason: str


HEKeyAction = Send | LeftOut | Ready | Failed


class HEKeySetup:
    """The coordinator's side of one attempt at distributing a run's CKKS key."""

    def __init__(
        self,
        *,
        run_id: str,
        attempt: str,
        site_keys: Mapping[str, str],
        key_site: str,
        signing_key: Ed25519PrivateKey,
        phase_s: float,
        now: float,
    ) -> None:
        if key_site not in site_keys or len(site_keys) < 2 or not phase_s > 0:
            raise HomomorphicError(
                f"A CKKS key needs at least 2 sites, a key site among them ({key_site!r} is "
                f"{'' if key_site in site_keys else 'not '}one) and a phase time > 0.",
                code="privacy.he.bad_parameter",
            )
        self.run_id, self.attempt, self.key_site = run_id, attempt, key_site
        self.site_keys = dict(sorted(site_keys.items()))
        self.phase_s = phase_s
        fields = signed.he_key_request_fields(
            run_id=run_id, attempt=attempt, key_site=key_site, site_keys=self.site_keys
        )
        self.request = HEKeyRequest(
            **fields, signature=sign(signing_key, signed.HE_KEY_REQUEST, fields)
        )
        self.phase = "created"  # -> collect -> seal -> ack -> done
        self.deadline: float | None = now + phase_s
        self.keys: dict[str, HEPublicKey] = {}
        self.recipients: frozenset[str] = frozenset()  # the key site's recipients
        self.sealed: set[str] = set()  # recipients whose sealed key was relayed
        self.acked: set[str] = set()
        self.public_context: bytes | None = None
        self.key_id: str | None = None  # the key's id, the same in every sealed key
        self.done = False

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self.site_keys)

    def start(self) -> list[HEKeyAction]:
        """The signed request for every site; the collect deadline runs from ``now`` as
        given to the constructor."""
        if self.phase != "created":
            raise LocalProtocolError("an HE key setup starts once")
        self.phase = "collect"
        return [Send(s, self.request) for s in self.sites]

    # -- inputs ------------------------------------------------------------------------

    def on_public_key(self, site: str, msg: HEPublicKey, now: float) -> list[HEKeyAction]:
        self._check_envelope(site, msg)
        if site in self.keys:
            raise _rejected(site, "sent a second X25519 key in this attempt", "replayed")
        if self.phase != "collect":
            raise _rejected(site, "sent its X25519 key after key collection closed", "unexpected")
        if msg.site_id != site:
            raise _rejected(site, f"sent an X25519 key in the name of {msg.site_id}", "forged")
        self._verify(site, signed.HE_PUBLIC_KEY, msg.signed_fields(), msg.signature)
        try:  # a low-order point gives no shared secret: the key site could not seal to it
            X25519PrivateKey.generate().exchange(
                X25519PublicKey.from_public_bytes(msg.public_key_bytes)
            )
        except ValueError as exc:
            raise _rejected(site, "sent an X25519 key that cannot be used", "unusable") from exc
        self.keys[site] = msg
        return self.tick(now)

    def on_sealed_key(self, site: str, msg: HESealedKey, now: float) -> list[HEKeyAction]:
        """Check a sealed key from the key site and relay it, unchanged, to its recipient."""
        self._check_envelope(site, msg)
        if site != self.key_site:
            raise _rejected(site, "sent a sealed key but is not the key site", "unexpected")
        if msg.recipient in self.sealed:
            raise _rejected(site, f"sent a second sealed key for {msg.recipient}", "replayed")
        if self.phase != "seal" or msg.recipient not in self.recipients:
            raise _rejected(
                site,
                f"sent a sealed key for {msg.recipient}, which is not waiting for one",
                "unexpected",
            )
        context = msg.public_context_bytes
        self._verify(site, signed.HE_SEALED_KEY, msg.signed_fields(), msg.signature)
        if msg.key_site_public != self.keys[site].public_key:
            raise _rejected(
                site, "sealed a key with another X25519 key than it published", "mismatch"
            )
        if self.public_context is not None and context != self.public_context:
            raise _rejected(site, "sent sealed keys with different public contexts", "mismatch")
        if self.key_id is not None and msg.key_id != self.key_id:
            raise _rejected(site, "sealed different keys for different sites", "mismatch")
        self.public_context, self.key_id = context, msg.key_id
        self.sealed.add(msg.recipient)
        return [Send(msg.recipient, msg), *self.tick(now)]

    def on_ack(self, site: str, msg: HEKeyAck, now: float) -> list[HEKeyAction]:
        self._check_envelope(site, msg)
        if site in self.acked:
            raise _rejected(site, "acknowledged the key twice", "replayed")
        if site not in self.sealed or self.phase not in ("seal", "ack"):
            raise _rejected(site, "acknowledged a key it was not sent", "unexpected")
        if msg.site_id != site:
            raise _rejected(site, f"acknowledged the key in the name of {msg.site_id}", "forged")
        self._verify(site, signed.HE_KEY_ACK, msg.signed_fields(), msg.signature)
        assert self.public_context is not None  # set with the first relayed sealed key
        if msg.public_context_sha256 != _sha256(self.public_context):
            raise _rejected(site, "acknowledged another public context", "mismatch")
        if msg.key_id != self.key_id:
            raise _rejected(site, "acknowledged another key than the one sealed", "mismatch")
        self.acked.add(site)
        return self.tick(now)

    def tick(self, now: float) -> list[HEKeyAction]:
        """Close whatever phase is complete or past its deadline; call it at
        :meth:`next_deadline` as well as after every input."""
        if self.done or self.phase == "created":
            return []
        late = self.deadline is not None and now >= self.deadline
        out: list[HEKeyAction] = []
        if self.phase == "collect":
            if not (late or set(self.keys) == set(self.sites)):
                return []
            if self.key_site not in self.keys:
                return self._fail(f"the key site {self.key_site} did not send its X25519 key")
            if len(self.keys) < 2:
                return self._fail("fewer than 2 sites sent their X25519 keys in time")
            out += [
                LeftOut(s, "did not send its X25519 key in time")
                for s in self.sites
                if s not in self.keys
            ]
            directory = HEKeyDirectory(
                run_id=self.run_id,
                attempt=self.attempt,
                keys=[self.keys[s].body() for s in sorted(self.keys)],
            )
            out.append(Send(self.key_site, directory))
            self.recipients = frozenset(self.keys) - {self.key_site}
            self.phase, self.deadline, late = "seal", now + self.phase_s, False
        if self.phase == "seal":
            if not (late or self.sealed == self.recipients):
                return out
            if not self.sealed:
                return out + self._fail(f"the key site {self.key_site} sent no sealed keys")
            out += [
                LeftOut(s, "the key site sent no sealed key for it in time")
                for s in sorted(self.recipients - self.sealed)
            ]
            self.phase, self.deadline, late = "ack", now + self.phase_s, False
        if self.phase == "ack":
            if not (late or self.acked == self.sealed):
                return out
            out += [
                LeftOut(s, "did not acknowledge the key in time")
                for s in sorted(self.sealed - self.acked)
            ]
            if not self.acked:
                return out + self._fail("no site but the key site acknowledged the key")
            assert self.public_context is not None
            self.done, self.phase, self.deadline = True, "done", None
            out.append(Ready(self.public_context, tuple(sorted({self.key_site, *self.acked}))))
        return out

    def next_deadline(self) -> float | None:
        return None if self.done else self.deadline

    # -- helpers -----------------------------------------------------------------------

    def _check_envelope(self, site: str, msg: HEPublicKey | HESealedKey | HEKeyAck) -> None:
        if (msg.run_id, msg.attempt) != (self.run_id, self.attempt) or self.done:
            raise HEKeyRejected(
                f"A {msg.TYPE} from {site} for run {msg.run_id!r} attempt {msg.attempt!r} is "
                "not for the open CKKS key set-up: stale or replayed. It was not used.",
                code="privacy.he.key_replayed",
                site=site,
            )
        if site not in self.site_keys or self.phase == "created":
            raise _rejected(site, "is not taking part in this CKKS key set-up", "unexpected")

    def _verify(self, site: str, purpose: str, fields: dict[str, object], signature: str) -> None:
        try:
            verify(self.site_keys[site], purpose, fields, signature)
        except CryptoError as exc:
            raise _rejected(
                site, f"sent a {purpose} signature that does not match", "forged"
            ) from exc

    def _fail(self, reason: str) -> list[HEKeyAction]:
        self.done, self.phase, self.deadline = True, "done", None
        return [Failed(f"the CKKS key could not be distributed: {reason}")]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _rejected(site: str, what: str, kind: str) -> HEKeyRejected:
    return HEKeyRejected(
        f"{site} {what}; the message was not used.", code=f"privacy.he.key_{kind}", site=site
    )
