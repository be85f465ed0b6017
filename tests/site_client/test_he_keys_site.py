"""A site's part in the CKKS key distribution (``site_client.core.he_keys_site``): what it
checks before it answers, seals or acknowledges. The coordinator is played by hand here, with
real signatures; ``tests/coordinator/test_he_keys.py`` runs both ends together."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from shared.crypto.keys import b64url_encode, generate_signing_key, public_key_b64
from shared.crypto.signing import sign
from shared.errors import HEKeyRejected
from shared.privacy.homomorphic import (
    CKKSParams,
    generate_context,
    key_id,
    public_context,
    seal_secret_context,
)
from shared.protocol import signed
from shared.protocol.codec import decode, encode
from shared.protocol.messages import HEKeyDirectory, HEKeyRequest, HEPublicKey, HESealedKey
from site_client.core.he_keys_site import SiteHEKeys

SITES = ("site-a", "site-b", "site-c")
RUN = "run-1"


def wire(msg: Any) -> Any:
    return decode(encode(msg))


@contextlib.contextmanager
def rejected(code: str, match: str) -> Iterator[None]:
    with pytest.raises(HEKeyRejected, match=match) as info:
        yield
    assert info.value.code == code


def request(
    signer: Ed25519PrivateKey, ids: dict[str, Ed25519PrivateKey], *, attempt: str = "a1"
) -> HEKeyRequest:
    fields = signed.he_key_request_fields(
        run_id=RUN,
        attempt=attempt,
        key_site="site-a",
        site_keys={s: public_key_b64(k) for s, k in ids.items()},
    )
    return HEKeyRequest(**fields, signature=sign(signer, signed.HE_KEY_REQUEST, fields))


class Sites:
    """Three sites that answered one request; site-a is the key site."""

    def __init__(self) -> None:
        self.coordinator = generate_signing_key()
        self.ids = {s: generate_signing_key() for s in SITES}
        self.request = request(self.coordinator, self.ids)
        self.sites = {
            s: SiteHEKeys(
                site_id=s, signing_key=k, coordinator_key=public_key_b64(self.coordinator)
            )
            for s, k in self.ids.items()
        }
        self.keys = {s: site.on_request(wire(self.request)) for s, site in self.sites.items()}

    def directory(self, **replace: HEPublicKey) -> HEKeyDirectory:
        keys = {**self.keys, **replace}
        return HEKeyDirectory(run_id=RUN, attempt="a1", keys=[k.body() for k in keys.values()])

    def sign_sealed(self, msg: HESealedKey, **changes: Any) -> HESealedKey:
        """``msg`` changed and signed again by the key site: what a dishonest key site sends."""
        msg = dataclasses.replace(msg, **changes)
        fields = msg.signed_fields()
        return dataclasses.replace(
            msg, signature=sign(self.ids["site-a"], signed.HE_SEALED_KEY, fields)
        )


@pytest.fixture(scope="module")
def sealed() -> tuple[Sites, dict[str, HESealedKey]]:
    world = Sites()
    out = world.sites["site-a"].on_directory(wire(world.directory()))
    return world, {m.recipient: m for m in out}


def other_parameters() -> str:
    """A public context that is not the default key's. A public context holds parameters
    only, so any key made with the same parameters has the same one: change the scale."""
    return b64url_encode(public_context(generate_context(CKKSParams(scale_bits=30))))


# -- the request -------------------------------------------------------------------------


def test_a_site_answers_a_signed_request_with_a_fresh_signed_key() -> None:
    world = Sites()
    b = world.keys["site-b"]
    site = world.sites["site-b"]
    assert (b.run_id, b.attempt, b.site_id) == (RUN, "a1", "site-b")
    assert site.exchange_key is not None
    assert b.public_key_bytes == site.exchange_key.public_key().public_bytes_raw()
    assert b.public_key != world.keys["site-c"].public_key
    assert site.secret_context is None and not site.is_key_site
    assert world.sites["site-a"].is_key_site
    with rejected("privacy.he.key_replayed", "second key request"):
        site.on_request(world.request)


def test_a_request_not_signed_by_the_pinned_coordinator_is_refused() -> None:
    world = Sites()
    site = SiteHEKeys(
        site_id="site-b",
        signing_key=world.ids["site-b"],
        coordinator_key=public_key_b64(world.coordinator),
    )
    forged = request(generate_signing_key(), world.ids)
    with rejected("privacy.he.key_forged", "not signed by the coordinator"):
        site.on_request(forged)
    altered = dataclasses.replace(world.request, key_site="site-b")
    with rejected("privacy.he.key_forged", "not signed by the coordinator"):
        site.on_request(altered)
    assert site.request is None and site.exchange_key is None
    site.on_request(world.request)  # nothing changed: the genuine request still works


def test_a_request_without_this_sites_own_key_is_refused() -> None:
    world = Sites()
    ids = {**world.ids, "site-b": generate_signing_key()}  # someone else's key under our name
    site = SiteHEKeys(
        site_id="site-b",
        signing_key=world.ids["site-b"],
        coordinator_key=public_key_b64(world.coordinator),
    )
    with rejected("privacy.he.key_mismatch", "its own identity key"):
        site.on_request(request(world.coordinator, ids))
    assert site.request is None


# -- the directory (key site) ------------------------------------------------------------


def test_the_key_site_seals_one_key_to_every_other_site(
    sealed: tuple[Sites, dict[str, HESealedKey]],
) -> None:
    world, out = sealed
    key_site = world.sites["site-a"]
    assert sorted(out) == ["site-b", "site-c"]
    assert key_site.secret_context is not None
    assert key_site.public_context == public_context(key_site.secret_context)
    for msg in out.values():
        assert msg.public_context_bytes == key_site.public_context
        assert key_site.exchange_key is not None
        assert msg.key_site_public_bytes == key_site.exchange_key.public_key().public_bytes_raw()
        assert key_site.secret_context not in msg.payload  # sealed, not in clear
    assert out["site-b"].payload != out["site-c"].payload


def test_a_directory_with_a_forged_site_key_is_refused_whole() -> None:
    world = Sites()
    key_site = world.sites["site-a"]
    mine = b64url_encode(X25519PrivateKey.generate().public_key().public_bytes_raw())
    swapped = dataclasses.replace(world.keys["site-c"], public_key=mine)  # keeps c's signature
    with rejected("privacy.he.key_forged", "site-c in the key directory is not signed"):
        key_site.on_directory(world.directory(**{"site-c": swapped}))
    fields = signed.he_public_key_fields(
        run_id=RUN, attempt="a1", site_id="site-c", public_key=mine
    )
    by_b = HEPublicKey(**fields, signature=sign(world.ids["site-b"], signed.HE_PUBLIC_KEY, fields))
    with rejected("privacy.he.key_forged", "site-c in the key directory is not signed"):
        key_site.on_directory(world.directory(**{"site-c": by_b}))
    assert key_site.secret_context is None
    assert len(key_site.on_directory(world.directory())) == 2  # nothing changed


def test_a_directory_is_refused_by_other_sites_and_for_another_attempt() -> None:
    world = Sites()
    with rejected("privacy.he.key_unexpected", "not the key site"):
        world.sites["site-b"].on_directory(world.directory())
    other = HEKeyDirectory(
        run_id="run-2",
        attempt="a1",
        keys=[dataclasses.replace(k, run_id="run-2").body() for k in world.keys.values()],
    )
    with rejected("privacy.he.key_replayed", "run 'run-2' attempt 'a1'"):
        world.sites["site-a"].on_directory(other)
    without_me = HEKeyDirectory(
        run_id=RUN, attempt="a1", keys=[world.keys["site-b"].body(), world.keys["site-c"].body()]
    )
    with rejected("privacy.he.key_mismatch", "this site's key and at least one other"):
        world.sites["site-a"].on_directory(without_me)
    assert world.sites["site-a"].secret_context is None


# -- the sealed key (other sites) --------------------------------------------------------


def test_a_site_opens_its_sealed_key_and_acknowledges_its_public_context() -> None:
    world = Sites()
    out = {m.recipient: m for m in world.sites["site-a"].on_directory(world.directory())}
    ack = world.sites["site-b"].on_sealed_key(wire(out["site-b"]))
    secret = world.sites["site-a"].secret_context
    assert secret is not None and world.sites["site-b"].secret_context == secret
    assert ack.site_id == "site-b" and (ack.run_id, ack.attempt) == (RUN, "a1")
    assert ack.public_context_sha256 == hashlib.sha256(public_context(secret)).hexdigest()
    # Every site acknowledges the same key id: the coordinator sees that one key is shared.
    assert ack.key_id == out["site-c"].key_id == key_id(secret)
    with rejected("privacy.he.key_replayed", "second sealed key"):
        world.sites["site-b"].on_sealed_key(out["site-b"])
    with rejected("privacy.he.key_unexpected", "sealed key for site-b came"):
        world.sites["site-c"].on_sealed_key(out["site-b"])
    with rejected("privacy.he.key_unexpected", "this site"):
        world.sites["site-a"].on_sealed_key(out["site-b"])


def test_an_altered_sealed_key_is_refused_and_nothing_is_acknowledged() -> None:
    world = Sites()
    out = {m.recipient: m for m in world.sites["site-a"].on_directory(world.directory())}
    site = world.sites["site-b"]
    flipped = bytearray(out["site-b"].payload)
    flipped[len(flipped) // 2] ^= 0x01
    with rejected("privacy.he.key_forged", "altered on the way"):
        site.on_sealed_key(dataclasses.replace(out["site-b"], payload=bytes(flipped)))
    with rejected("privacy.he.key_forged", "altered on the way"):
        site.on_sealed_key(dataclasses.replace(out["site-b"], public_context=other_parameters()))
    assert site.secret_context is None
    site.on_sealed_key(out["site-b"])  # nothing changed: the genuine one still opens
    assert site.secret_context == world.sites["site-a"].secret_context


def test_a_public_context_that_is_not_the_sealed_keys_is_refused() -> None:
    world = Sites()
    out = {m.recipient: m for m in world.sites["site-a"].on_directory(world.directory())}
    # A dishonest key site gives the coordinator other parameters than the key's, signed.
    lie = world.sign_sealed(out["site-b"], public_context=other_parameters())
    with rejected("privacy.he.key_mismatch", "not the sealed key's"):
        world.sites["site-b"].on_sealed_key(wire(lie))
    assert world.sites["site-b"].secret_context is None


def test_a_sealed_key_under_another_key_id_is_refused() -> None:
    world = Sites()
    out = {m.recipient: m for m in world.sites["site-a"].on_directory(world.directory())}
    # A key site that names one key but seals another (to split the sites) is caught.
    lie = world.sign_sealed(out["site-b"], key_id="c" * 64)
    with rejected("privacy.he.key_mismatch", "not the key its id names"):
        world.sites["site-b"].on_sealed_key(wire(lie))
    assert world.sites["site-b"].secret_context is None


def test_a_sealed_key_that_does_not_open_is_refused() -> None:
    world = Sites()
    out = {m.recipient: m for m in world.sites["site-a"].on_directory(world.directory())}
    secret = world.sites["site-a"].secret_context
    key_a = world.sites["site-a"].exchange_key
    b_pub = world.sites["site-b"].exchange_key
    assert secret is not None and key_a is not None and b_pub is not None
    # Sealed for another attempt (the AEAD binds run and attempt), then signed for this one.
    other_attempt = seal_secret_context(
        secret, sender=key_a, recipient=b_pub.public_key(), run_id=f"{RUN}:a0"
    )
    with rejected("privacy.he.key_rejected", "does not open"):
        world.sites["site-b"].on_sealed_key(world.sign_sealed(out["site-b"], payload=other_attempt))
    # Sealed to site c's key, addressed to site b.
    with rejected("privacy.he.key_rejected", "does not open"):
        world.sites["site-b"].on_sealed_key(
            world.sign_sealed(out["site-b"], payload=out["site-c"].payload)
        )
    assert world.sites["site-b"].secret_context is None


def test_messages_of_another_attempt_or_before_the_request_are_refused() -> None:
    world = Sites()
    out = {m.recipient: m for m in world.sites["site-a"].on_directory(world.directory())}
    other = world.sign_sealed(out["site-b"], attempt="a2")
    with rejected("privacy.he.key_replayed", "attempt 'a2' came during run 'run-1' attempt 'a1'"):
        world.sites["site-b"].on_sealed_key(other)
    newcomer = SiteHEKeys(
        site_id="site-b",
        signing_key=world.ids["site-b"],
        coordinator_key=public_key_b64(world.coordinator),
    )
    with rejected("privacy.he.key_unexpected", "before the key request"):
        newcomer.on_sealed_key(out["site-b"])
    assert world.sites["site-b"].secret_context is None
