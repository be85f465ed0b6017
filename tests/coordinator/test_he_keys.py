"""The coordinator's CKKS key distribution (``coordinator.he_keys``), sans I/O, driven by real
sites (``site_client.core.he_keys_site``) with every message through the wire codec."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from coordinator.he_keys import Failed, HEKeySetup, LeftOut, Ready, Send
from shared.crypto.keys import b64url_encode, generate_signing_key, public_key_b64
from shared.crypto.signing import sign
from shared.errors import HEKeyRejected, HomomorphicError
from shared.privacy.homomorphic import (
    aggregate_encrypted,
    decrypt_update,
    encrypt_update,
    public_context,
)
from shared.protocol import signed
from shared.protocol.codec import decode, encode
from shared.protocol.messages import (
    HEKeyAck,
    HEKeyDirectory,
    HEKeyRequest,
    HEPublicKey,
    HESealedKey,
    Message,
)
from site_client.core.he_keys_site import SiteHEKeys

SITES = ("site-a", "site-b", "site-c")
RUN = "run-1"
PHASE_S = 10.0


def wire(msg: Message) -> Any:
    return decode(encode(msg))


class World:
    """A coordinator and three sites; ``drop(site, message)`` makes a site ignore a message."""

    def __init__(
        self,
        *,
        sites: tuple[str, ...] = SITES,
        key_site: str = "site-a",
        drop: Callable[[str, Message], bool] = lambda site, msg: False,
    ) -> None:
        self.ids = {s: generate_signing_key() for s in sites}
        coordinator_key = generate_signing_key()
        self.setup = HEKeySetup(
            run_id=RUN,
            attempt="a1",
            site_keys={s: public_key_b64(k) for s, k in self.ids.items()},
            key_site=key_site,
            signing_key=coordinator_key,
            phase_s=PHASE_S,
            now=0.0,
        )
        self.sites = {
            s: SiteHEKeys(site_id=s, signing_key=k, coordinator_key=public_key_b64(coordinator_key))
            for s, k in self.ids.items()
        }
        self.drop = drop
        self.received: list[Message] = []  # everything the coordinator was given
        self.outcome: list[Any] = []  # what it decided (left out, ready, failed)
        self.sent: list[Send] = []

    def to_coordinator(self, site: str, msg: Message, now: float) -> list[Any]:
        msg = wire(msg)
        self.received.append(msg)
        if isinstance(msg, HEPublicKey):
            return self.setup.on_public_key(site, msg, now)
        if isinstance(msg, HESealedKey):
            return self.setup.on_sealed_key(site, msg, now)
        assert isinstance(msg, HEKeyAck)
        return self.setup.on_ack(site, msg, now)

    def run(self, actions: list[Any], now: float = 1.0) -> None:
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            if not isinstance(action, Send):
                self.outcome.append(action)
                continue
            self.sent.append(action)
            if self.drop(action.site, action.message):
                continue
            site, msg = self.sites[action.site], wire(action.message)
            replies: list[Message]
            if isinstance(msg, HEKeyRequest):
                replies = [site.on_request(msg)]
            elif isinstance(msg, HEKeyDirectory):
                replies = list(site.on_directory(msg))
            else:
                replies = [site.on_sealed_key(msg)]
            for reply in replies:
                queue += self.to_coordinator(action.site, reply, now)


@pytest.fixture(scope="module")
def done() -> World:
    world = World()
    world.run(world.setup.start())
    return world


def test_three_sites_end_with_one_key_that_the_coordinator_cannot_use(done: World) -> None:
    (ready,) = done.outcome
    assert isinstance(ready, Ready) and ready.sites == SITES
    secrets = {s: site.secret_context for s, site in done.sites.items()}
    assert secrets["site-a"] is not None and len(set(secrets.values())) == 1
    assert ready.public_context == public_context(secrets["site-b"])  # type: ignore[arg-type]
    assert done.setup.next_deadline() is None

    # Sites b and c encrypt, the coordinator adds, site a decrypts the hand-checkable sum.
    b = encrypt_update(secrets["site-b"], np.array([1.0, 2.0, 3.0]))  # type: ignore[arg-type]
    c = encrypt_update(secrets["site-c"], np.array([0.5, -1.0, 4.0]))  # type: ignore[arg-type]
    total = aggregate_encrypted(ready.public_context, [b, c])
    assert np.allclose(decrypt_update(secrets["site-a"], total), [1.5, 1.0, 7.0], atol=1e-4)  # type: ignore[arg-type]
    with pytest.raises(HomomorphicError, match="no secret key") as info:
        decrypt_update(ready.public_context, total)
    assert info.value.code == "privacy.he.secret_key"


def _windows(secret: bytes) -> list[bytes]:
    """32-byte pieces from all over the secret context past its parameters."""
    step = len(secret) // 64
    return [secret[i : i + 32] for i in range(len(secret) // 8, len(secret) - 32, step)]


def _held_bytes(value: Any, seen: set[int] | None = None) -> list[bytes]:
    """Every bytes value (and every message's frame) reachable from ``value``."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return []
    seen.add(id(value))
    if isinstance(value, bytes | bytearray):
        return [bytes(value)]
    if isinstance(value, Message):
        return [encode(value)]
    if isinstance(value, dict):
        return [b for v in [*value.keys(), *value.values()] for b in _held_bytes(v, seen)]
    if isinstance(value, list | tuple | set | frozenset):
        return [b for v in value for b in _held_bytes(v, seen)]
    if dataclasses.is_dataclass(value) or hasattr(value, "__dict__"):
        fields = vars(value) if hasattr(value, "__dict__") else dataclasses.asdict(value)  # type: ignore[arg-type]
        return [b for v in fields.values() for b in _held_bytes(v, seen)]
    return []


def test_the_coordinator_never_sees_the_secret(done: World) -> None:
    secret = done.sites["site-b"].secret_context
    assert secret is not None and len(secret) > 100_000
    pieces = _windows(secret)
    assert len(pieces) > 50
    frames = [encode(m) for m in done.received]
    held = _held_bytes(done.setup) + _held_bytes(done.outcome)
    assert sum(isinstance(m, HESealedKey) for m in done.received) == 2  # the blobs did pass
    for blob in frames + held:
        assert secret not in blob
        assert not any(piece in blob for piece in pieces)


def test_sealed_keys_are_relayed_unchanged(done: World) -> None:
    relayed = [a for a in done.sent if isinstance(a.message, HESealedKey)]
    assert sorted(a.site for a in relayed) == ["site-b", "site-c"]
    got = {m.recipient: m for m in done.received if isinstance(m, HESealedKey)}
    for action in relayed:
        assert isinstance(action.message, HESealedKey)
        assert action.message == got[action.site] and action.message.recipient == action.site


def test_only_the_key_site_gets_the_directory(done: World) -> None:
    (directory,) = [a for a in done.sent if isinstance(a.message, HEKeyDirectory)]
    assert directory.site == "site-a"
    assert isinstance(directory.message, HEKeyDirectory)
    assert [k.site_id for k in directory.message.public_keys()] == list(SITES)


# -- deadlines ---------------------------------------------------------------------------


def silent(site: str, kind: type[Message]) -> Callable[[str, Message], bool]:
    return lambda s, m: s == site and isinstance(m, kind)


def test_a_silent_site_is_left_out_and_the_others_complete() -> None:
    world = World(drop=silent("site-c", HEKeyRequest))
    world.run(world.setup.start())
    assert world.outcome == [] and world.setup.next_deadline() == PHASE_S
    assert world.setup.tick(PHASE_S - 0.1) == []
    world.run(world.setup.tick(PHASE_S))
    left, ready = world.outcome
    assert left == LeftOut("site-c", "did not send its X25519 key in time")
    assert isinstance(ready, Ready) and ready.sites == ("site-a", "site-b")
    assert world.sites["site-c"].secret_context is None
    assert world.sites["site-a"].secret_context == world.sites["site-b"].secret_context


def test_a_silent_key_site_fails_the_attempt() -> None:
    world = World(drop=silent("site-a", HEKeyRequest))
    world.run(world.setup.start())
    actions = world.setup.tick(PHASE_S)
    assert actions == [
        Failed(
            "the CKKS key could not be distributed: the key site site-a did not send its X25519 key"
        )
    ]
    assert world.setup.next_deadline() is None and world.setup.tick(99.0) == []


def test_a_key_site_that_seals_nothing_fails_the_attempt() -> None:
    world = World(drop=silent("site-a", HEKeyDirectory))
    world.run(world.setup.start())
    assert world.setup.phase == "seal" and world.setup.next_deadline() == 1.0 + PHASE_S
    (failed,) = world.setup.tick(1.0 + PHASE_S)
    assert isinstance(failed, Failed) and "sent no sealed keys" in failed.reason


def test_fewer_than_two_sites_fail_the_attempt() -> None:
    world = World(drop=lambda s, m: s != "site-a" and isinstance(m, HEKeyRequest))
    world.run(world.setup.start())
    (failed,) = world.setup.tick(PHASE_S)
    assert isinstance(failed, Failed) and "fewer than 2 sites" in failed.reason


def test_a_site_that_does_not_acknowledge_is_left_out() -> None:
    world = World(drop=silent("site-c", HESealedKey))
    world.run(world.setup.start())
    assert world.outcome == [] and world.setup.phase == "ack"
    world.run(world.setup.tick(1.0 + PHASE_S))
    assert world.outcome == [
        LeftOut("site-c", "did not acknowledge the key in time"),
        Ready(world.outcome[1].public_context, ("site-a", "site-b")),
    ]


def test_the_key_site_alone_holding_the_key_fails_the_attempt() -> None:
    world = World(sites=("site-a", "site-b"), drop=silent("site-b", HESealedKey))
    world.run(world.setup.start())
    left, failed = world.setup.tick(1.0 + PHASE_S)
    assert left == LeftOut("site-b", "did not acknowledge the key in time")
    assert isinstance(failed, Failed) and "no site but the key site" in failed.reason


def test_a_setup_needs_two_sites_and_a_key_site_among_them() -> None:
    key = public_key_b64(generate_signing_key())
    common: dict[str, Any] = {
        "run_id": RUN,
        "attempt": "a1",
        "signing_key": generate_signing_key(),
        "now": 0.0,
    }
    with pytest.raises(HomomorphicError, match="at least 2 sites") as info:
        HEKeySetup(site_keys={"a": key}, key_site="a", phase_s=1.0, **common)
    assert info.value.code == "privacy.he.bad_parameter"
    with pytest.raises(HomomorphicError, match="'z' is not one"):
        HEKeySetup(site_keys={"a": key, "b": key}, key_site="z", phase_s=1.0, **common)


# -- refusals: each raises HEKeyRejected with its code and changes nothing ---------------


@contextlib.contextmanager
def rejected(code: str, match: str) -> Iterator[None]:
    with pytest.raises(HEKeyRejected, match=match) as info:
        yield
    assert info.value.code == code


def started() -> tuple[World, dict[str, HEPublicKey]]:
    """A world whose sites have answered the request, but whose answers were not yet given."""
    world = World()
    keys = {}
    for action in world.setup.start():
        assert isinstance(action, Send)
        keys[action.site] = world.sites[action.site].on_request(wire(action.message))
    return world, keys


def state(setup: HEKeySetup) -> tuple[Any, ...]:
    return (setup.phase, dict(setup.keys), set(setup.sealed), set(setup.acked), setup.done)


def test_a_replayed_public_key_is_refused() -> None:
    world, keys = started()
    world.setup.on_public_key("site-b", keys["site-b"], 1.0)
    before = state(world.setup)
    with rejected("privacy.he.key_replayed", "second X25519 key"):
        world.setup.on_public_key("site-b", keys["site-b"], 1.0)
    assert state(world.setup) == before


def test_public_keys_of_another_attempt_another_site_or_forged_are_refused() -> None:
    world, keys = started()
    before = state(world.setup)
    other = dataclasses.replace(keys["site-b"], attempt="a0")
    with rejected("privacy.he.key_replayed", "attempt 'a0'"):
        world.setup.on_public_key("site-b", other, 1.0)
    with rejected("privacy.he.key_replayed", "run 'run-2'"):
        world.setup.on_public_key(
            "site-b", dataclasses.replace(keys["site-b"], run_id="run-2"), 1.0
        )
    with rejected("privacy.he.key_forged", "in the name of site-b"):
        world.setup.on_public_key("site-c", keys["site-b"], 1.0)
    swapped = dataclasses.replace(keys["site-b"], public_key=keys["site-c"].public_key)
    with rejected("privacy.he.key_forged", "does not match"):
        world.setup.on_public_key("site-b", swapped, 1.0)
    with rejected("privacy.he.key_unexpected", "not taking part"):
        world.setup.on_public_key(
            "site-x", dataclasses.replace(keys["site-b"], site_id="site-x"), 1.0
        )
    assert state(world.setup) == before


def test_an_unusable_x25519_key_is_refused() -> None:
    world, _ = started()
    zero = b64url_encode(bytes(32))  # a low-order point: no shared secret
    fields = signed.he_public_key_fields(
        run_id=RUN, attempt="a1", site_id="site-b", public_key=zero
    )
    msg = HEPublicKey(**fields, signature=sign(world.ids["site-b"], signed.HE_PUBLIC_KEY, fields))
    with rejected("privacy.he.key_unusable", "cannot be used"):
        world.setup.on_public_key("site-b", msg, 1.0)
    assert world.setup.keys == {}


def sealing() -> tuple[World, list[HESealedKey]]:
    """A world in the seal phase with the key site's sealed keys in hand, not yet given."""
    world, keys = started()
    directory = None
    for site in SITES:
        for action in world.setup.on_public_key(site, keys[site], 1.0):
            assert isinstance(action, Send)
            directory = action.message
    assert isinstance(directory, HEKeyDirectory)
    return world, world.sites["site-a"].on_directory(wire(directory))


def test_sealed_keys_that_are_forged_misdirected_or_replayed_are_refused() -> None:
    world, (for_b, for_c) = sealing()
    before = state(world.setup)
    flipped = bytearray(for_b.payload)
    flipped[-1] ^= 1
    with rejected("privacy.he.key_forged", "he.sealed_key signature"):
        world.setup.on_sealed_key("site-a", dataclasses.replace(for_b, payload=bytes(flipped)), 2.0)
    with rejected("privacy.he.key_unexpected", "not the key site"):
        world.setup.on_sealed_key("site-b", for_c, 2.0)
    with rejected("privacy.he.key_unexpected", "site-x, which is not waiting"):
        world.setup.on_sealed_key("site-a", dataclasses.replace(for_b, recipient="site-x"), 2.0)
    assert state(world.setup) == before
    assert world.setup.on_sealed_key("site-a", for_b, 2.0) == [Send("site-b", for_b)]
    with rejected("privacy.he.key_replayed", "second sealed key for site-b"):
        world.setup.on_sealed_key("site-a", for_b, 2.0)


def test_sealed_keys_with_another_context_or_exchange_key_are_refused() -> None:
    world, (for_b, for_c) = sealing()
    world.setup.on_sealed_key("site-a", for_b, 2.0)
    key_a = world.ids["site-a"]

    def resigned(msg: HESealedKey, **changes: Any) -> HESealedKey:
        msg = dataclasses.replace(msg, **changes)
        fields = msg.signed_fields()
        return dataclasses.replace(msg, signature=sign(key_a, signed.HE_SEALED_KEY, fields))

    other_context = resigned(for_c, public_context=b64url_encode(b"another context"))
    with rejected("privacy.he.key_mismatch", "different public contexts"):
        world.setup.on_sealed_key("site-a", other_context, 2.0)
    other_x = b64url_encode(X25519PrivateKey.generate().public_key().public_bytes_raw())
    with rejected("privacy.he.key_mismatch", "another X25519 key than it published"):
        world.setup.on_sealed_key("site-a", resigned(for_c, key_site_public=other_x), 2.0)
    # A key site that seals one key for site-b and another for site-c splits the federation.
    with rejected("privacy.he.key_mismatch", "different keys for different sites"):
        world.setup.on_sealed_key("site-a", resigned(for_c, key_id="e" * 64), 2.0)
    assert world.setup.sealed == {"site-b"}


def test_acks_that_are_early_forged_replayed_or_for_another_context_are_refused() -> None:
    world, (for_b, for_c) = sealing()
    ack_b = world.sites["site-b"].on_sealed_key(wire(for_b))
    with rejected("privacy.he.key_unexpected", "a key it was not sent"):
        world.setup.on_ack("site-b", ack_b, 2.0)  # its sealed key was not relayed yet
    world.setup.on_sealed_key("site-a", for_b, 2.0)
    world.setup.on_sealed_key("site-a", for_c, 2.0)
    with rejected("privacy.he.key_forged", "in the name of site-b"):
        world.setup.on_ack("site-c", ack_b, 3.0)
    with rejected("privacy.he.key_forged", "does not match"):
        world.setup.on_ack(
            "site-b", dataclasses.replace(ack_b, public_context_sha256="0" * 64), 3.0
        )
    fields = signed.he_key_ack_fields(
        run_id=RUN,
        attempt="a1",
        site_id="site-b",
        public_context_sha256="0" * 64,
        key_id=ack_b.key_id,
    )
    wrong = HEKeyAck(**fields, signature=sign(world.ids["site-b"], signed.HE_KEY_ACK, fields))
    with rejected("privacy.he.key_mismatch", "another public context"):
        world.setup.on_ack("site-b", wrong, 3.0)
    fields = signed.he_key_ack_fields(
        run_id=RUN,
        attempt="a1",
        site_id="site-b",
        public_context_sha256=ack_b.public_context_sha256,
        key_id="d" * 64,
    )
    other_key = HEKeyAck(**fields, signature=sign(world.ids["site-b"], signed.HE_KEY_ACK, fields))
    with rejected("privacy.he.key_mismatch", "another key than the one sealed"):
        world.setup.on_ack("site-b", other_key, 3.0)
    assert world.setup.acked == set()
    assert world.setup.on_ack("site-b", ack_b, 3.0) == []
    with rejected("privacy.he.key_replayed", "acknowledged the key twice"):
        world.setup.on_ack("site-b", ack_b, 3.0)
    ack_c = world.sites["site-c"].on_sealed_key(wire(for_c))
    (ready,) = world.setup.on_ack("site-c", ack_c, 3.0)
    assert isinstance(ready, Ready) and ready.sites == SITES
    with rejected("privacy.he.key_replayed", "stale or replayed"):
        world.setup.on_ack("site-c", ack_c, 3.0)


def test_a_late_public_key_is_refused_after_collection_closed() -> None:
    world, keys = started()
    world.setup.on_public_key("site-a", keys["site-a"], 1.0)
    world.setup.on_public_key("site-b", keys["site-b"], 1.0)
    world.setup.tick(PHASE_S)
    with rejected("privacy.he.key_unexpected", "after key collection closed"):
        world.setup.on_public_key("site-c", keys["site-c"], PHASE_S + 1)
    assert "site-c" not in world.setup.keys
