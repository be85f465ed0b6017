"""This site's part in distributing a run's CKKS key: checks, its X25519 key, sealing. No I/O.

Theory of operation: the coordinator's signed ``HEKeyRequest`` opens an attempt (one
:class:`SiteHEKeys` per attempt; the participant makes a new one for a new request). This site
checks it against the pinned coordinator key and its own identity key, answers with a fresh
X25519 key signed by its Ed25519 key, and then, as the coordinator's ``coordinator.he_keys``
describes:

- the key site gets the directory of the sites' X25519 keys, checks every site's signature
  against the request's list, makes the CKKS context and seals it to each other site
  (``shared.privacy.homomorphic.seal_secret_context``, HPKE-Auth style: only that site can
  open it, and only as coming from this key site);
- every other site gets its sealed key (relayed by the coordinator), checks the key site's
  signature, opens it and checks that the public context the coordinator keeps is exactly the
  opened key's (parameters only: the coordinator would add ciphertexts under them), then
  acknowledges that context's digest.

A directory with one bad signature is refused whole, and nothing is sealed: the coordinator
relays keys the sites signed, so a bad one means the coordinator or the path altered it, and
the attempt should fail loudly (and be retried) rather than go on around a tampered site.
The AEAD's associated data is ``run_id:attempt``, so a blob is useless in any other attempt.
A refused message raises :class:`~shared.errors.HEKeyRejected` and changes nothing.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from shared.crypto.keys import b64url_encode
from shared.crypto.signing import sign, verify
from shared.errors import CryptoError, HEKeyRejected, HomomorphicError
from shared.privacy.homomorphic import (
    CKKSParams,
    generate_context,
    key_id,
    open_secret_context,
    public_context,
    seal_secret_context,
)
from shared.protocol import signed
from shared.protocol.messages import (
    HEKeyAck,
    HEKeyDirectory,
    HEKeyRequest,
    HEPublicKey,
    HESealedKey,
)

__all__ = ["SiteHEKeys"]


class SiteHEKeys:
    """One attempt at getting the run's CKKS key, at this site."""

    def __init__(
        self,
        *,
        site_id: str,
        signing_key: Ed25519PrivateKey,
        coordinator_key: str,
        params: CKKSParams | None = None,
    ) -> None:
        self.site_id = site_id
        self._signing_key = signing_key
        self._coordinator_key = coordinator_key
        self._params = params  # used only if this site is the key site
        self._own_key = b64url_encode(signing_key.public_key().public_bytes_raw())
        self.request: HEKeyRequest | None = None
        self._exchange_key: X25519PrivateKey | None = None
        self._secret: bytes | None = None
        self._public: bytes | None = None

    # -- what the caller may keep ------------------------------------------------------

    @property
    def exchange_key(self) -> X25519PrivateKey | None:
        """This attempt's X25519 private key (persisting it is the caller's business)."""
        return self._exchange_key

    @property
    def secret_context(self) -> bytes | None:
        """The run's secret CKKS context, once this site holds it; never send it anywhere."""
        return self._secret

    @property
    def public_context(self) -> bytes | None:
        return self._public

    @property
    def is_key_site(self) -> bool:
        return self.request is not None and self.request.key_site == self.site_id

    # -- inputs ------------------------------------------------------------------------

    def on_request(self, msg: HEKeyRequest) -> HEPublicKey:
        """Check the coordinator's request and answer with a fresh, signed X25519 key."""
        if self.request is not None:
            raise _rejected("A second key request came for this attempt", "replayed")
        try:
            verify(self._coordinator_key, signed.HE_KEY_REQUEST, msg.signed_fields(), msg.signature)
        except CryptoError as exc:
            raise _rejected(
                "The key request is not signed by the coordinator this site enrolled with",
                "forged",
            ) from exc
        if msg.site_keys.get(self.site_id) != self._own_key:
            raise _rejected(
                "The key request does not list this site with its own identity key", "mismatch"
            )
        exchange = X25519PrivateKey.generate()
        public_key = b64url_encode(exchange.public_key().public_bytes_raw())
        fields = signed.he_public_key_fields(
            run_id=msg.run_id, attempt=msg.attempt, site_id=self.site_id, public_key=public_key
        )
        self.request, self._exchange_key = msg, exchange
        return HEPublicKey(
            **fields, signature=sign(self._signing_key, signed.HE_PUBLIC_KEY, fields)
        )

    def on_directory(self, msg: HEKeyDirectory) -> list[HESealedKey]:
        """Key site only: make the CKKS key and seal it to every other site in ``msg``."""
        request, exchange = self._open_attempt(msg.run_id, msg.attempt, msg.TYPE)
        if not self.is_key_site:
            raise _rejected("A key directory came, but this site is not the key site", "unexpected")
        if self._secret is not None:
            raise _rejected("A second key directory came for this attempt", "replayed")
        own = b64url_encode(exchange.public_key().public_bytes_raw())
        keys = msg.public_keys()
        recipients: dict[str, X25519PublicKey] = {}
        for key in keys:
            identity = request.site_keys.get(key.site_id)
            if identity is None:
                raise _rejected(f"The key directory holds a key of {key.site_id}", "unexpected")
            try:
                verify(identity, signed.HE_PUBLIC_KEY, key.signed_fields(), key.signature)
            except CryptoError as exc:
                raise _rejected(
                    f"The X25519 key of {key.site_id} in the key directory is not signed by "
                    "that site; no key was sealed",
                    "forged",
                ) from exc
            if key.site_id == self.site_id:
                if key.public_key != own:
                    raise _rejected(
                        "The key directory holds another X25519 key for this site", "mismatch"
                    )
                continue
            recipient = X25519PublicKey.from_public_bytes(key.public_key_bytes)
            try:  # a low-order point gives no shared secret
                exchange.exchange(recipient)
            except ValueError as exc:
                raise _rejected(
                    f"The X25519 key of {key.site_id} cannot be used", "unusable"
                ) from exc
            recipients[key.site_id] = recipient
        if self.site_id not in {k.site_id for k in keys} or not recipients:
            raise _rejected(
                "The key directory must hold this site's key and at least one other", "mismatch"
            )
        secret = generate_context(self._params)
        public = public_context(secret)
        public_b64, public_sha, kid = b64url_encode(public), _sha256(public), key_id(secret)
        out: list[HESealedKey] = []
        for site, recipient in sorted(recipients.items()):
            blob = seal_secret_context(
                secret, sender=exchange, recipient=recipient, run_id=_aad(request)
            )
            fields = signed.he_sealed_key_fields(
                run_id=request.run_id,
                attempt=request.attempt,
                recipient=site,
                key_site_public=own,
                public_context_sha256=public_sha,
                key_id=kid,
                sealed_sha256=_sha256(blob),
            )
            out.append(
                HESealedKey(
                    run_id=request.run_id,
                    attempt=request.attempt,
                    recipient=site,
                    key_site_public=own,
                    public_context=public_b64,
                    key_id=kid,
                    signature=sign(self._signing_key, signed.HE_SEALED_KEY, fields),
                    payload=blob,
                )
            )
        self._secret, self._public = secret, public
        return out

    def on_sealed_key(self, msg: HESealedKey) -> HEKeyAck:
        """Check, open and acknowledge the key the key site sealed to this site."""
        request, exchange = self._open_attempt(msg.run_id, msg.attempt, msg.TYPE)
        if self.is_key_site or msg.recipient != self.site_id:
            raise _rejected(f"A sealed key for {msg.recipient} came to this site", "unexpected")
        if self._secret is not None:
            raise _rejected("A second sealed key came for this attempt", "replayed")
        public = msg.public_context_bytes
        try:
            verify(
                request.site_keys[request.key_site],
                signed.HE_SEALED_KEY,
                msg.signed_fields(),
                msg.signature,
            )
        except CryptoError as exc:
            raise _rejected(
                f"The sealed key is not signed by the key site {request.key_site}: it was "
                "altered on the way",
                "forged",
            ) from exc
        try:
            secret = open_secret_context(
                msg.payload,
                recipient=exchange,
                sender=X25519PublicKey.from_public_bytes(msg.key_site_public_bytes),
                run_id=_aad(request),
            )
        except HomomorphicError as exc:
            raise _rejected(f"The sealed key does not open ({exc.code})", "rejected") from exc
        if public_context(secret) != public:
            raise _rejected(
                "The public context the coordinator keeps is not the sealed key's", "mismatch"
            )
        if key_id(secret) != msg.key_id:
            raise _rejected("The sealed key is not the key its id names", "mismatch")
        self._secret, self._public = secret, public
        fields = signed.he_key_ack_fields(
            run_id=request.run_id,
            attempt=request.attempt,
            site_id=self.site_id,
            public_context_sha256=_sha256(public),
            key_id=msg.key_id,
        )
        return HEKeyAck(**fields, signature=sign(self._signing_key, signed.HE_KEY_ACK, fields))

    # -- helpers -----------------------------------------------------------------------

    def _open_attempt(
        self, run_id: str, attempt: str, what: str
    ) -> tuple[HEKeyRequest, X25519PrivateKey]:
        request, exchange = self.request, self._exchange_key
        if request is None or exchange is None:
            raise _rejected(f"A {what} came before the key request", "unexpected")
        if (run_id, attempt) != (request.run_id, request.attempt):
            raise _rejected(
                f"A {what} for run {run_id!r} attempt {attempt!r} came during run "
                f"{request.run_id!r} attempt {request.attempt!r}: stale or replayed",
                "replayed",
            )
        return request, exchange


def _aad(request: HEKeyRequest) -> str:
    """What the sealed blob is bound to: this run and this attempt."""
    return f"{request.run_id}:{request.attempt}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _rejected(what: str, kind: str) -> HEKeyRejected:
    return HEKeyRejected(
        f"{what}. It was not used and nothing was sent; if this keeps happening, tell the "
        "consortium lead.",
        code=f"privacy.he.key_{kind}",
    )
