"""Dropout-tolerant secure aggregation: the per-round maths, sans I/O.

Theory of operation
-------------------
Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS 2017 (section 4, the protocol of figure 4 with signatures). The coordinator learns the sum
of the surviving sites' updates and nothing else about any one of them, even when sites drop
out after the keys are shared. One :class:`SecAggSite` per site and one :class:`SecAggServer`
per round exchange these signed messages (the coordinator relays everything between sites)::

    0 advertise   site -> all      KeyAdvertisement: two fresh X25519 public keys per round,
                                   c (to encrypt shares) and s (to agree pairwise masks)
    1 share       site -> site     EncryptedShares: t-of-n Shamir shares of the site's mask
                                   key s_sk and of its self-mask seed b, AES-GCM encrypted
                                   under an X25519(c) key only the two sites know, plus a
                                   commitment to b
    2 mask        site -> server   MaskedInput (+ the masked vector):
                                   y_i = x_i + PRG(b_i) + sum_{j>i} PRG(s_ij)
                                         - sum_{j<i} PRG(s_ij)   (mod 2**bits)
    3 unmask      server -> site   UnmaskRequest (signed by the coordinator): who survived,
                                   who dropped after sharing
                  site -> server   UnmaskResponse: shares of b for survivors, of s_sk for
                                   the dropped; never both for one site

Pairwise masks cancel in the sum of the survivors except those shared with dropped sites;
the server rebuilds a dropped site's s_sk from ``threshold`` shares and removes exactly those.
Self-masks protect a survivor whose message was merely late: the server removes PRG(b_i) only
for survivors, and a site refuses any request that would give the server both b_i and s_sk_i.

Sites are ordered by id; ``x_i`` is the clipped, quantised update (``quantise.Quantiser``), so
all arithmetic is in Z_{2**bits} and cancellation is exact. Seeds come from HKDF-SHA256 (RFC
5869) over the X25519 secret (RFC 7748), bound to this round's configuration digest (run,
round, sites, threshold, length, quantiser) and the pair, so a key or message from another
round is useless here.

Every message is signed with the sender's Ed25519 identity (``shared.crypto.signing``, one
purpose per message type) over its fields, the configuration digest included. A message with
a bad signature, a ciphertext that does not decrypt, a share that disagrees, a reconstructed
key that does not match its advertised public key or a self-mask that does not match its
commitment raises :class:`~shared.errors.SecAggMessageRejected` (``privacy.secagg.forged``) or
:class:`~shared.errors.SecretSharingError`; one that was already received or belongs to
another round, run, site or configuration raises ``privacy.secagg.replayed``. The commitment
to b and the checks of rebuilt keys go beyond the paper's honest-but-curious model: with
exactly ``threshold`` shares a forged one would otherwise change the sum silently.

Threat model of this slice: sites may be malicious towards the protocol's messages
(forgeries, replays); the coordinator is honest but curious. The paper's consistency round
(every survivor signs the survivor list, against a server that tells different sites
different stories) is not implemented; a threshold above n/2 is enforced as the paper
requires for that setting.

The coordinator's running sum is one vector (streaming: it adds each masked input as it
arrives); nothing here does I/O, reads a clock or uses a global random generator.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.canonical import canonical_json
from shared.crypto.keys import b64url_decode, b64url_encode
from shared.crypto.signing import sign, signing_payload, verify
from shared.errors import (
    PrivacyParameterError,
    SecAggMessageRejected,
    SecretSharingError,
    SecureAggregationError,
    SignatureError,
    UpdateError,
)
from shared.privacy.prg import apply_masks
from shared.privacy.quantise import Quantiser
from shared.privacy.shamir import Share, reconstruct, split

__all__ = [
    "EncryptedShares",
    "KeyAdvertisement",
    "MaskedInput",
    "SecAggConfig",
    "SecAggServer",
    "SecAggSite",
    "UnmaskRequest",
    "UnmaskResponse",
    "masked_digest",
]

PublicKey = Ed25519PublicKey | str
_KDF_PREFIX = b"tessera/v1/secagg/"
_NONCE_BYTES = 12


# --- configuration -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SecAggConfig:
    """What every participant of one secure-aggregation round must agree on.

    ``sites`` are the sites invited to the round (stored sorted: the order defines the sign of
    each pairwise mask and each site's share position); ``threshold`` is how many must survive
    and answer for the sum to be recovered.
    """

    run_id: str
    round: int
    sites: tuple[str, ...]
    threshold: int
    vector_length: int
    quantiser: Quantiser

    def __post_init__(self) -> None:
        if not isinstance(self.run_id, str) or not self.run_id:
            raise PrivacyParameterError(
                "A secure-aggregation round needs the run's id.", code="privacy.bad_parameter"
            )
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            raise PrivacyParameterError(
                f"The round number must be a whole number >= 0, not {self.round!r}.",
                code="privacy.bad_parameter",
            )
        sites = tuple(self.sites)
        if not all(isinstance(s, str) and s for s in sites) or len(set(sites)) != len(sites):
            raise PrivacyParameterError(
                "Secure aggregation needs distinct, non-empty site ids.",
                code="privacy.bad_parameter",
            )
        object.__setattr__(self, "sites", tuple(sorted(sites)))
        n = len(sites)
        if n < 2:
            raise PrivacyParameterError(
                "Secure aggregation needs at least 2 sites: with one, the sum is its update.",
                code="privacy.bad_threshold",
            )
        if (
            isinstance(self.threshold, bool)
            or not isinstance(self.threshold, int)
            or not n // 2 + 1 <= self.threshold <= n
        ):
            raise PrivacyParameterError(
                f"With {n} sites the threshold must be from {n // 2 + 1} (a majority, so that "
                f"no two disjoint groups can each unmask) to {n}, not {self.threshold!r}.",
                code="privacy.bad_threshold",
            )
        if (
            isinstance(self.vector_length, bool)
            or not isinstance(self.vector_length, int)
            or self.vector_length < 1
        ):
            raise PrivacyParameterError(
                f"The update length must be a whole number >= 1, not {self.vector_length!r}.",
                code="privacy.bad_parameter",
            )
        if not isinstance(self.quantiser, Quantiser) or self.quantiser.max_sites < n:
            raise PrivacyParameterError(
                f"The quantiser must be built for at least the {n} sites of the round.",
                code="privacy.bad_parameter",
            )

    @property
    def digest(self) -> str:
        """Hex SHA-256 of everything above: every message and key is bound to it."""
        q = self.quantiser
        return hashlib.sha256(
            canonical_json(
                {
                    "run": self.run_id,
                    "round": self.round,
                    "sites": list(self.sites),
                    "threshold": self.threshold,
                    "length": self.vector_length,
                    "bits": q.bits,
                    "clip_norm": q.clip_norm,
                    "max_sites": q.max_sites,
                }
            )
        ).hexdigest()

    def position(self, site: str) -> int:
        """The site's Shamir x-coordinate (1-based index in ``sites``)."""
        return self.sites.index(site) + 1


def masked_digest(vector: np.ndarray) -> str:
    """Hex SHA-256 of a masked vector's little-endian bytes (what ``MaskedInput`` signs)."""
    arr = np.ascontiguousarray(vector)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return hashlib.sha256(arr.data.cast("B")).hexdigest()


# --- messages ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _Signed:
    """Fields common to every secure-aggregation message; ``signature`` covers the rest."""

    PURPOSE: ClassVar[str] = ""
    run_id: str
    round: int
    config_digest: str
    signature: str = ""

    def signed_fields(self) -> dict[str, Any]:
        fields = {}
        for f in dataclasses.fields(self):
            if f.name != "signature":
                fields[f.name] = _jsonable(getattr(self, f.name))
        return fields

    def signing_payload(self) -> bytes:
        """The canonical bytes the signature covers (``shared.crypto.signing`` format)."""
        return signing_payload(self.PURPOSE, self.signed_fields())

    def fields(self) -> dict[str, Any]:
        """Everything, signature included, as JSON-safe values (for a wire envelope)."""
        return {**self.signed_fields(), "signature": self.signature}


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Share):
        return value.to_fields()
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyAdvertisement(_Signed):
    PURPOSE: ClassVar[str] = "secagg.keys"
    site: str
    cipher_public: str  # X25519, URL-safe base64: encrypts shares
    mask_public: str  # X25519, URL-safe base64: agrees pairwise masks


@dataclass(frozen=True, slots=True, kw_only=True)
class EncryptedShares(_Signed):
    PURPOSE: ClassVar[str] = "secagg.shares"
    sender: str
    recipient: str
    ciphertext: str  # URL-safe base64 of AES-GCM nonce || ciphertext
    self_mask_commitment: str  # hex SHA-256 binding the sender's self-mask seed


@dataclass(frozen=True, slots=True, kw_only=True)
class MaskedInput(_Signed):
    PURPOSE: ClassVar[str] = "secagg.masked"
    site: str
    digest: str  # masked_digest of the vector sent with it


@dataclass(frozen=True, slots=True, kw_only=True)
class UnmaskRequest(_Signed):
    PURPOSE: ClassVar[str] = "secagg.unmask-request"
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class UnmaskResponse(_Signed):
    PURPOSE: ClassVar[str] = "secagg.unmask"
    site: str
    self_mask_shares: tuple[tuple[str, Share], ...]  # (survivor, its b share held here)
    mask_key_shares: tuple[tuple[str, Share], ...]  # (dropped site, its s_sk share)


def _binding(config: SecAggConfig) -> dict[str, Any]:
    return {"run_id": config.run_id, "round": config.round, "config_digest": config.digest}


def _signed(message: _Signed, key: Ed25519PrivateKey) -> Any:
    return dataclasses.replace(
        message, signature=sign(key, message.PURPOSE, message.signed_fields())
    )


def _check_message(
    message: _Signed, kind: type[_Signed], config: SecAggConfig, key: PublicKey | None, who: str
) -> None:
    """Type, binding to this round, then signature; raises ``SecAggMessageRejected``."""
    if not isinstance(message, kind):
        raise SecAggMessageRejected(
            f"Expected a {kind.__name__}, got {type(message).__name__}.",
            code="privacy.secagg.unexpected",
        )
    if (message.run_id, message.round, message.config_digest) != (
        config.run_id,
        config.round,
        config.digest,
    ):
        raise SecAggMessageRejected(
            f"This {kind.__name__} from {who} belongs to another run, round or configuration "
            f"(run {message.run_id!r}, round {message.round!r}): a replay or a stale message. "
            "It was not used.",
            code="privacy.secagg.replayed",
            site=who,
        )
    if key is None:
        raise SecAggMessageRejected(
            f"{who!r} is not a participant of this round; its {kind.__name__} was not used.",
            code="privacy.secagg.unexpected",
            site=who,
        )
    try:
        verify(key, message.PURPOSE, message.signed_fields(), message.signature)
    except SignatureError as exc:
        raise SecAggMessageRejected(
            f"The {kind.__name__} from {who} is not signed by {who}'s key: forged or changed "
            "on the way. It was not used; if this keeps happening, tell the consortium lead.",
            code="privacy.secagg.forged",
            site=who,
        ) from exc


def _x25519_public(text: str, who: str) -> X25519PublicKey:
    raw = b64url_decode(text) if isinstance(text, str) else None
    if raw is None or len(raw) != 32:
        raise SecAggMessageRejected(
            f"The key advertised by {who} is not an X25519 public key; it was not used.",
            code="privacy.secagg.forged",
            site=who,
        )
    return X25519PublicKey.from_public_bytes(raw)


def _public_text(key: X25519PrivateKey) -> str:
    return b64url_encode(key.public_key().public_bytes_raw())


def _agree(private: X25519PrivateKey, public: X25519PublicKey, label: str, info: Any) -> bytes:
    """HKDF-SHA256 of the X25519 secret, bound to ``label`` and ``info``."""
    try:
        secret = private.exchange(public)
    except ValueError as exc:  # low-order point: the all-zero secret
        raise SecAggMessageRejected(
            "A peer's X25519 key is degenerate (a low-order point); it was not used.",
            code="privacy.secagg.forged",
        ) from exc
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=_KDF_PREFIX + label.encode("ascii") + b"\n" + canonical_json(info),
    )
    return hkdf.derive(secret)


def _pair_seed(
    config: SecAggConfig, private: X25519PrivateKey, public: X25519PublicKey, a: str, b: str
) -> bytes:
    return _agree(private, public, "mask", {"config": config.digest, "pair": sorted([a, b])})


def _commitment(config: SecAggConfig, site: str, seed: bytes) -> str:
    data = _KDF_PREFIX + b"self-mask\n" + canonical_json({"config": config.digest, "site": site})
    return hashlib.sha256(data + b"\n" + seed).hexdigest()


def _too_few(what: str, have: int, need: int) -> SecureAggregationError:
    return SecureAggregationError(
        f"Only {have} sites {what}, but this round needs {need} to stay private and "
        "recoverable. The round cannot complete securely; it should be retried.",
        code="privacy.secagg.too_few_sites",
        have=have,
        need=need,
    )


def _out_of_order(step: str, stage: str) -> SecureAggregationError:
    return SecureAggregationError(
        f"Secure aggregation step {step!r} called in stage {stage!r}. This is a bug in "
        "Tessera; please report it.",
        code="privacy.secagg.out_of_order",
    )


# --- site ----------------------------------------------------------------------------------


class SecAggSite:
    """One site's side of one round: ``advertise`` -> ``share`` -> ``mask`` -> ``unmask``.

    ``site_keys`` maps every site of the round to its Ed25519 identity key (as enrolled);
    ``coordinator_key`` checks the unmasking request. ``randbytes`` is the CSPRNG (tests pass
    a seeded one). The site forgets its mask key and self-mask seed as soon as it has masked.
    """

    def __init__(
        self,
        config: SecAggConfig,
        *,
        site: str,
        signing_key: Ed25519PrivateKey,
        site_keys: Mapping[str, PublicKey],
        coordinator_key: PublicKey,
        randbytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if site not in config.sites:
            raise PrivacyParameterError(
                f"Site {site!r} is not one of this round's sites.", code="privacy.bad_parameter"
            )
        self.config = config
        self.site = site
        self._signing_key = signing_key
        self._site_keys = dict(site_keys)
        self._coordinator_key = coordinator_key
        self._randbytes = randbytes
        self._stage = "new"
        self._cipher_sk = X25519PrivateKey.from_private_bytes(randbytes(32))
        self._mask_sk: X25519PrivateKey | None = X25519PrivateKey.from_private_bytes(randbytes(32))
        self._self_seed: bytes | None = None
        self._peers: dict[str, tuple[X25519PublicKey, X25519PublicKey]] = {}
        self._held: dict[str, tuple[Share, Share]] = {}  # owner -> (s_sk share, b share)
        self._sharing: tuple[str, ...] = ()

    def advertise(self) -> KeyAdvertisement:
        if self._stage != "new" or self._mask_sk is None:
            raise _out_of_order("advertise", self._stage)
        self._stage = "advertised"
        return _signed(
            KeyAdvertisement(
                **_binding(self.config),
                site=self.site,
                cipher_public=_public_text(self._cipher_sk),
                mask_public=_public_text(self._mask_sk),
            ),
            self._signing_key,
        )

    def share(self, advertisements: Sequence[KeyAdvertisement]) -> tuple[EncryptedShares, ...]:
        """Check everyone's keys; deal shares of our mask key and self-mask seed to them."""
        if self._stage != "advertised" or self._mask_sk is None:
            raise _out_of_order("share", self._stage)
        peers: dict[str, tuple[X25519PublicKey, X25519PublicKey]] = {}
        for ad in advertisements:
            who = getattr(ad, "site", "?")
            _check_message(ad, KeyAdvertisement, self.config, self._site_keys.get(who), who)
            if who not in self.config.sites:
                raise SecAggMessageRejected(
                    f"{who!r} is not a site of this round.", code="privacy.secagg.unexpected"
                )
            if who in peers:
                raise SecAggMessageRejected(
                    f"Two key advertisements from {who}: a replay. The round cannot go on "
                    "with this list.",
                    code="privacy.secagg.replayed",
                    site=who,
                )
            peers[who] = (
                _x25519_public(ad.cipher_public, who),
                _x25519_public(ad.mask_public, who),
            )
        mine = peers.get(self.site)
        if mine is None or (
            mine[0].public_bytes_raw() != self._cipher_sk.public_key().public_bytes_raw()
            or mine[1].public_bytes_raw() != self._mask_sk.public_key().public_bytes_raw()
        ):
            raise SecAggMessageRejected(
                "The key list for this round does not carry this site's own keys as it sent "
                "them. Nothing was shared.",
                code="privacy.secagg.forged",
            )
        if len(peers) < self.config.threshold:
            raise _too_few("advertised keys", len(peers), self.config.threshold)
        self._peers = peers
        seed = self._randbytes(32)
        self._self_seed = seed
        commitment = _commitment(self.config, self.site, seed)
        n, t = len(self.config.sites), self.config.threshold
        key_shares = split(
            self._mask_sk.private_bytes_raw(), threshold=t, count=n, randbytes=self._randbytes
        )
        seed_shares = split(seed, threshold=t, count=n, randbytes=self._randbytes)
        out = []
        for peer in sorted(peers):
            x = self.config.position(peer)
            pair = (key_shares[x - 1], seed_shares[x - 1])
            if peer == self.site:
                self._held[peer] = pair
                continue
            msg = EncryptedShares(
                **_binding(self.config),
                sender=self.site,
                recipient=peer,
                ciphertext="",
                self_mask_commitment=commitment,
            )
            key = self._share_key(peer, sender=self.site, recipient=peer)
            plaintext = canonical_json(
                {"mask_key": pair[0].to_fields(), "self_mask": pair[1].to_fields()}
            )
            nonce = self._randbytes(_NONCE_BYTES)
            sealed = nonce + AESGCM(key).encrypt(nonce, plaintext, msg.signing_payload())
            out.append(
                _signed(
                    dataclasses.replace(msg, ciphertext=b64url_encode(sealed)), self._signing_key
                )
            )
        self._stage = "shared"
        return tuple(out)

    def _share_key(self, peer: str, *, sender: str, recipient: str) -> bytes:
        info = {"config": self.config.digest, "from": sender, "to": recipient}
        return _agree(self._cipher_sk, self._peers[peer][0], "share", info)

    def mask(
        self,
        update: np.ndarray,
        shares: Sequence[EncryptedShares],
        *,
        rng: np.random.Generator | None = None,
    ) -> tuple[MaskedInput, np.ndarray]:
        """Take in the shares dealt to us; return the signed message and the masked vector.

        The senders of ``shares`` (and we) are the round's sharing set: masks are agreed with
        exactly them. ``rng`` selects stochastic rounding (see ``Quantiser.quantise``).
        """
        if self._stage != "shared" or self._mask_sk is None or self._self_seed is None:
            raise _out_of_order("mask", self._stage)
        commitments: dict[str, str] = {}
        for msg in shares:
            who = getattr(msg, "sender", "?")
            _check_message(msg, EncryptedShares, self.config, self._site_keys.get(who), who)
            if msg.recipient != self.site or who not in self._peers or who == self.site:
                raise SecAggMessageRejected(
                    f"Shares from {who} addressed to {msg.recipient!r} were delivered to "
                    f"{self.site}: a replay or misrouting. They were not used.",
                    code="privacy.secagg.replayed",
                    site=who,
                )
            if who in commitments:
                raise SecAggMessageRejected(
                    f"Shares from {who} arrived twice: a replay. The copy was not used.",
                    code="privacy.secagg.replayed",
                    site=who,
                )
            self._held[who] = self._open_shares(msg)
            commitments[who] = msg.self_mask_commitment
        sharing = sorted({*commitments, self.site})
        if len(sharing) < self.config.threshold:
            raise _too_few("shared their keys", len(sharing), self.config.threshold)
        vector = np.asarray(update)
        if vector.size != self.config.vector_length:
            raise UpdateError(
                f"This round aggregates updates of {self.config.vector_length} values; this "
                f"one has {vector.size}.",
                code="update.shape",
            )
        masked = self.config.quantiser.quantise(vector, rng)
        add: list[bytes] = [self._self_seed]
        subtract: list[bytes] = []
        for peer in sharing:
            if peer == self.site:
                continue
            seed = _pair_seed(self.config, self._mask_sk, self._peers[peer][1], self.site, peer)
            (add if peer > self.site else subtract).append(seed)
        apply_masks(masked, add=add, subtract=subtract)
        # Forward secrecy for this round: only the shares we hold for others remain.
        self._mask_sk, self._self_seed = None, None
        self._sharing = tuple(sharing)
        self._stage = "masked"
        out = MaskedInput(**_binding(self.config), site=self.site, digest=masked_digest(masked))
        return _signed(out, self._signing_key), masked

    def _open_shares(self, msg: EncryptedShares) -> tuple[Share, Share]:
        who = msg.sender
        sealed = b64url_decode(msg.ciphertext)
        unsigned = dataclasses.replace(msg, ciphertext="", signature="")
        try:
            if sealed is None or len(sealed) <= _NONCE_BYTES:
                raise InvalidTag
            key = self._share_key(who, sender=who, recipient=self.site)
            plain = AESGCM(key).decrypt(
                sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], unsigned.signing_payload()
            )
            fields = json.loads(plain)
            pair = (Share.from_fields(fields["mask_key"]), Share.from_fields(fields["self_mask"]))
        except (InvalidTag, ValueError, KeyError, TypeError, SecretSharingError) as exc:
            raise SecAggMessageRejected(
                f"The shares from {who} cannot be opened with the keys of this round: forged "
                "or corrupted. They were not used.",
                code="privacy.secagg.forged",
                site=who,
            ) from exc
        x = self.config.position(self.site)
        if any(s.x != x or s.threshold != self.config.threshold for s in pair):
            raise SecAggMessageRejected(
                f"The shares from {who} are not this site's shares of a "
                f"{self.config.threshold}-of-{len(self.config.sites)} split; not used.",
                code="privacy.secagg.forged",
                site=who,
            )
        return pair

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Reveal the shares the coordinator needs, after checking the request is safe."""
        if self._stage == "done":
            raise SecAggMessageRejected(
                "This site already answered an unmasking request for this round; a second "
                "one is a replay and gets no shares.",
                code="privacy.secagg.replayed",
            )
        if self._stage != "masked":
            raise _out_of_order("unmask", self._stage)
        _check_message(
            request, UnmaskRequest, self.config, self._coordinator_key, "the coordinator"
        )
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            both = ", ".join(sorted(survivors & dropped))
            raise SecAggMessageRejected(
                f"The coordinator asked for both masks of {both}: that would reveal their "
                "updates. Refused; tell the consortium lead.",
                code="privacy.secagg.unsafe_request",
            )
        if survivors | dropped != set(self._sharing) or self.site not in survivors:
            raise SecAggMessageRejected(
                "The coordinator's list of survivors and dropped sites does not match the "
                "sites that shared keys with this site. Refused; tell the consortium lead.",
                code="privacy.secagg.unsafe_request",
            )
        if len(survivors) < self.config.threshold:
            raise SecAggMessageRejected(
                f"Only {len(survivors)} sites survived, fewer than the threshold "
                f"{self.config.threshold}: unmasking now would expose too much. Refused.",
                code="privacy.secagg.unsafe_request",
            )
        self._stage = "done"
        response = UnmaskResponse(
            **_binding(self.config),
            site=self.site,
            self_mask_shares=tuple((s, self._held[s][1]) for s in sorted(survivors)),
            mask_key_shares=tuple((s, self._held[s][0]) for s in sorted(dropped)),
        )
        self._held.clear()
        return _signed(response, self._signing_key)


# --- coordinator ---------------------------------------------------------------------------


class SecAggServer:
    """The coordinator's side of one round: relays keys and shares, sums, unmasks.

    Feed it the sites' messages as they arrive; it raises ``SecAggMessageRejected`` for any
    message it must not use (and changes nothing then), so the caller can drop the message and
    carry on. Memory is one ring vector whatever the number of sites.
    """

    def __init__(
        self,
        config: SecAggConfig,
        *,
        signing_key: Ed25519PrivateKey,
        site_keys: Mapping[str, PublicKey],
    ) -> None:
        self.config = config
        self._signing_key = signing_key
        self._site_keys = {s: k for s, k in site_keys.items() if s in config.sites}
        self._stage = "advertise"
        self._ads: dict[str, KeyAdvertisement] = {}
        self._shares: dict[str, tuple[EncryptedShares, ...]] = {}
        self._commitments: dict[str, str] = {}
        self._masked: set[str] = set()
        self._responses: dict[str, UnmaskResponse] = {}
        self._sum: np.ndarray | None = None
        self._request: UnmaskRequest | None = None

    # stage 0
    def receive_advertisement(self, ad: KeyAdvertisement) -> None:
        who = getattr(ad, "site", "?")
        _check_message(ad, KeyAdvertisement, self.config, self._site_keys.get(who), who)
        self._expect("advertise", "key advertisement", who)
        if who in self._ads:
            raise self._duplicate("key advertisement", who)
        _x25519_public(ad.cipher_public, who)
        _x25519_public(ad.mask_public, who)
        self._ads[who] = ad

    def advertisements(self) -> tuple[KeyAdvertisement, ...]:
        """Close key collection; the list every site gets (needs ``threshold`` sites)."""
        if self._stage == "advertise":
            if len(self._ads) < self.config.threshold:
                raise _too_few("advertised keys", len(self._ads), self.config.threshold)
            self._stage = "share"
        return tuple(self._ads[s] for s in sorted(self._ads))

    # stage 1
    def receive_shares(self, messages: Sequence[EncryptedShares]) -> None:
        """All the encrypted shares one site dealt, one per other advertised site."""
        senders = {getattr(m, "sender", "?") for m in messages}
        who = next(iter(senders)) if len(senders) == 1 else "?"
        for m in messages:
            sender = getattr(m, "sender", "?")
            _check_message(m, EncryptedShares, self.config, self._site_keys.get(sender), sender)
        self._expect("share", "shares", who)
        if len(senders) != 1 or who not in self._ads:
            raise SecAggMessageRejected(
                "A batch of shares must come from one site that advertised keys in this round.",
                code="privacy.secagg.unexpected",
            )
        if who in self._shares:
            raise self._duplicate("shares", who)
        recipients = [m.recipient for m in messages]
        if sorted(recipients) != sorted(set(self._ads) - {who}):
            raise SecAggMessageRejected(
                f"{who} must deal exactly one share to each other site in the key list; "
                "its shares were not used.",
                code="privacy.secagg.unexpected",
                site=who,
            )
        if len({m.self_mask_commitment for m in messages}) != 1:
            raise SecAggMessageRejected(
                f"{who} committed to different self-masks in its shares: forged. Not used.",
                code="privacy.secagg.forged",
                site=who,
            )
        self._shares[who] = tuple(messages)
        self._commitments[who] = messages[0].self_mask_commitment

    @property
    def sharing(self) -> tuple[str, ...]:
        return tuple(sorted(self._shares))

    def shares_for(self, site: str) -> tuple[EncryptedShares, ...]:
        """Close share collection; the shares dealt to ``site`` by every sharing site."""
        if self._stage not in ("share", "mask"):
            raise _out_of_order("shares_for", self._stage)
        if len(self._shares) < self.config.threshold:
            raise _too_few("shared their keys", len(self._shares), self.config.threshold)
        if site not in self._shares:
            raise SecAggMessageRejected(
                f"{site} did not share its keys in time and is left out of this round.",
                code="privacy.secagg.unexpected",
                site=site,
            )
        self._stage = "mask"
        return tuple(m for s in self.sharing for m in self._shares[s] if m.recipient == site)

    # stage 2
    def receive_masked_input(self, message: MaskedInput, vector: np.ndarray) -> None:
        """Check one site's masked update and add it to the running sum."""
        who = getattr(message, "site", "?")
        _check_message(message, MaskedInput, self.config, self._site_keys.get(who), who)
        self._expect("mask", "masked update", who)
        if who not in self._shares:
            raise SecAggMessageRejected(
                f"{who} did not share its keys in this round; its masked update cannot be "
                "unmasked and was not used.",
                code="privacy.secagg.unexpected",
                site=who,
            )
        if who in self._masked:
            raise self._duplicate("masked update", who)
        q = self.config.quantiser
        if (
            not isinstance(vector, np.ndarray)
            or vector.dtype != q.dtype
            or vector.shape != (self.config.vector_length,)
        ):
            raise UpdateError(
                f"A masked update must be {self.config.vector_length} values of "
                f"{np.dtype(q.dtype).name}; the one from {who} is not. It was not used.",
                code="update.shape",
                site=who,
            )
        if masked_digest(vector) != message.digest:
            raise SecAggMessageRejected(
                f"The masked update from {who} does not match the digest it signed: changed "
                "on the way. It was not used.",
                code="privacy.secagg.forged",
                site=who,
            )
        if self._sum is None:
            self._sum = np.zeros(self.config.vector_length, dtype=q.dtype)
        np.add(self._sum, vector, out=self._sum)
        self._masked.add(who)

    # stage 3
    def unmask_request(self) -> UnmaskRequest:
        """Close masked-input collection; the signed request for every survivor."""
        if self._request is not None:
            return self._request
        if self._stage != "mask":
            raise _out_of_order("unmask_request", self._stage)
        if len(self._masked) < self.config.threshold:
            raise _too_few("sent masked updates", len(self._masked), self.config.threshold)
        self._stage = "unmask"
        request = UnmaskRequest(
            **_binding(self.config),
            survivors=tuple(sorted(self._masked)),
            dropped=tuple(sorted(set(self._shares) - self._masked)),
        )
        self._request = _signed(request, self._signing_key)
        return self._request

    @property
    def survivors(self) -> tuple[str, ...]:
        return tuple(sorted(self._masked))

    def receive_unmask_response(self, response: UnmaskResponse) -> None:
        who = getattr(response, "site", "?")
        _check_message(response, UnmaskResponse, self.config, self._site_keys.get(who), who)
        self._expect("unmask", "unmasking answer", who)
        assert self._request is not None
        if who not in self._masked:
            raise SecAggMessageRejected(
                f"{who} is not a survivor of this round; its answer was not used.",
                code="privacy.secagg.unexpected",
                site=who,
            )
        if who in self._responses:
            raise self._duplicate("unmasking answer", who)
        x = self.config.position(who)
        got_b = [s for s, _ in response.self_mask_shares]
        got_k = [s for s, _ in response.mask_key_shares]
        shares = [sh for _, sh in (*response.self_mask_shares, *response.mask_key_shares)]
        if (
            got_b != list(self._request.survivors)
            or got_k != list(self._request.dropped)
            or any(not isinstance(sh, Share) or sh.x != x for sh in shares)
        ):
            raise SecAggMessageRejected(
                f"The answer from {who} does not hold exactly its own shares for the sites "
                "asked for; it was not used.",
                code="privacy.secagg.forged",
                site=who,
            )
        self._responses[who] = response

    def finish(self) -> np.ndarray:
        """The survivors' sum in Z_{2**bits}: masks removed, dropped sites' pairs undone."""
        if self._stage != "unmask" or self._sum is None or self._request is None:
            raise _out_of_order("finish", self._stage)
        if len(self._responses) < self.config.threshold:
            raise SecretSharingError(
                f"Only {len(self._responses)} survivors answered the unmasking request, but "
                f"{self.config.threshold} are needed to remove the masks. Wait for more "
                "answers, or retry the round.",
                code="privacy.secagg.too_few_shares",
                have=len(self._responses),
                need=self.config.threshold,
            )
        add: list[bytes] = []
        subtract: list[bytes] = []
        for survivor in self._request.survivors:
            seed = reconstruct(dict(r.self_mask_shares)[survivor] for r in self._responses.values())
            if _commitment(self.config, survivor, seed) != self._commitments[survivor]:
                raise SecretSharingError(
                    f"The self-mask rebuilt for {survivor} does not match its commitment: "
                    "an unmasking answer carried a forged share. The sum was not released.",
                    code="privacy.secagg.inconsistent_shares",
                    site=survivor,
                )
            subtract.append(seed)
        for gone in self._request.dropped:
            raw = reconstruct(dict(r.mask_key_shares)[gone] for r in self._responses.values())
            key = X25519PrivateKey.from_private_bytes(raw)
            if _public_text(key) != self._ads[gone].mask_public:
                raise SecretSharingError(
                    f"The mask key rebuilt for {gone} does not match the key it advertised: "
                    "an unmasking answer carried a forged share. The sum was not released.",
                    code="privacy.secagg.inconsistent_shares",
                    site=gone,
                )
            for survivor in self._request.survivors:
                peer = _x25519_public(self._ads[survivor].mask_public, survivor)
                seed = _pair_seed(self.config, key, peer, gone, survivor)
                # The survivor added PRG(s) when the dropped site sorts after it.
                (subtract if gone > survivor else add).append(seed)
        total, self._sum = self._sum, None
        apply_masks(total, add=add, subtract=subtract)
        self._stage = "done"
        return total

    def aggregate(self) -> np.ndarray:
        """The survivors' float64 sum (of their clipped updates), within quantisation error."""
        n = len(self._masked)
        return self.config.quantiser.dequantise(self.finish(), n)

    # helpers
    def _expect(self, stage: str, what: str, who: str) -> None:
        if self._stage != stage:
            raise SecAggMessageRejected(
                f"A {what} from {who} arrived while the round is in stage {self._stage!r}: "
                "too late or out of order. It was not used.",
                code="privacy.secagg.unexpected",
                site=who,
            )

    @staticmethod
    def _duplicate(what: str, who: str) -> SecAggMessageRejected:
        return SecAggMessageRejected(
            f"A second {what} from {who} in this round: a replay. It was not used.",
            code="privacy.secagg.replayed",
            site=who,
        )
