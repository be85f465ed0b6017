"""The coordinator's securely aggregated round (``coordinator.secagg_round``), sans I/O, driven
by real sites (``site_client.core.secagg_site``) with every message through the wire codec."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from coordinator.secagg_round import Failed, LeftOut, SecAggRound, Send, Unmasked
from shared.crypto.keys import generate_signing_key, public_key_b64
from shared.errors import SecAggMessageRejected
from shared.plan import demo_plan
from shared.protocol.codec import decode, encode
from shared.protocol.messages import (
    MaskedUpdateOffer,
    Message,
    SecAggKeys,
    SecAggShares,
    SecAggUnmask,
)
from shared.protocol.transfer import make_offer
from site_client.core.secagg_site import SiteSecAgg

SITES = ("site-a", "site-b", "site-c")
LAYOUT = {"w": ((4, 3), "float32"), "b": ((3,), "float32")}
PLAN = demo_plan(
    rounds=2, secure_aggregation=True, weighting="uniform", max_update_norm=10.0, quorum=2
)
RUN = "run-1"


def wire(msg: Message) -> Any:
    return decode(encode(msg))


class Federation:
    def __init__(self, now: float = 0.0) -> None:
        self.keys = {s: generate_signing_key() for s in SITES}
        self.coordinator = generate_signing_key()
        self.round = SecAggRound(
            run_id=RUN,
            round=1,
            attempt="a1",
            sites=SITES,
            site_keys={s: public_key_b64(k) for s, k in self.keys.items()},
            signing_key=self.coordinator,
            layout=LAYOUT,
            plan=PLAN,
            now=now,
            phase_s=10.0,
        )
        setup = wire(self.round.setup)
        self.sites = {
            s: SiteSecAgg(
                setup,
                PLAN.to_dict(),
                site_id=s,
                signing_key=self.keys[s],
                coordinator_key=public_key_b64(self.coordinator),
            )
            for s in SITES
        }
        rng = np.random.default_rng(7)
        self.updates = {
            s: {
                "w": rng.normal(0, 0.5, (4, 3)).astype(np.float32),
                "b": rng.normal(0, 0.5, 3).astype(np.float32),
            }
            for s in SITES
        }

    def deliver(self, actions: list[Any], now: float, skip: set[str] = frozenset()) -> list[Any]:
        """Carry the coordinator's Send actions to the sites; return the rest."""
        rest = []
        for action in actions:
            if not isinstance(action, Send):
                rest.append(action)
                continue
            if action.site in skip:
                continue
            site, msg = self.sites[action.site], wire(action.message)
            if isinstance(msg, SecAggKeys):
                rest += self.deliver(
                    self.round.receive(action.site, wire(site.share(msg)), now), now, skip
                )
            elif isinstance(msg, SecAggShares):
                site.take_shares(msg)
            elif isinstance(msg, SecAggUnmask):
                rest += self.deliver(
                    self.round.receive(action.site, wire(site.unmask(msg)), now), now, skip
                )
        return rest

    def mask(self, site: str) -> None:
        masked, data = self.sites[site].mask(self.sites[site].protect(self.updates[site]))
        offer = make_offer("s-" + site, data, 1 << 20)
        msg = MaskedUpdateOffer(
            run_id=RUN,
            round=1,
            masked=masked,
            update=offer.body(),
            num_samples=10,
            train_loss=0.5,
        )
        self.round.masked_offer(site, wire(msg))
        self.round.masked_received(site, data)

    def keys_and_shares(self, now: float = 1.0, skip: set[str] = frozenset()) -> list[Any]:
        out: list[Any] = []
        for s in SITES:
            if s not in skip:
                out += self.deliver(
                    self.round.receive(s, wire(self.sites[s].advertise()), now), now, skip
                )
        return out


def test_the_unmasked_mean_equals_the_plain_mean_within_quantisation_error() -> None:
    fed = Federation()
    assert fed.keys_and_shares() == []
    assert fed.round.phase == "mask"
    for s in SITES:
        fed.mask(s)
    (done,) = fed.deliver(fed.round.close_masking(2.0), 2.0)
    assert isinstance(done, Unmasked) and done.survivors == SITES and done.dropped == ()
    bound = fed.round.config.quantiser.error_bound(3, stochastic=False)
    for name in LAYOUT:
        plain = np.mean([fed.updates[s][name] for s in SITES], axis=0)
        assert np.max(np.abs(done.mean[name] - plain)) <= bound + 1e-6
    assert done.num_samples == 30 and done.train_loss == pytest.approx(0.5)


def test_a_site_that_drops_after_sharing_is_recovered_from_the_survivors_shares() -> None:
    fed = Federation()
    fed.keys_and_shares()
    fed.mask("site-a")
    fed.mask("site-c")  # site-b shared its keys, then went away
    (done,) = fed.deliver(fed.round.close_masking(2.0), 2.0)
    assert isinstance(done, Unmasked)
    assert done.survivors == ("site-a", "site-c") and done.dropped == ("site-b",)
    plain = (fed.updates["site-a"]["w"] + fed.updates["site-c"]["w"]) / 2
    assert np.allclose(done.mean["w"], plain, atol=1e-5)


def test_a_site_that_misses_the_key_deadline_is_left_out() -> None:
    fed = Federation()
    assert fed.keys_and_shares(skip={"site-c"}) == []  # waiting for site-c's keys
    left = fed.deliver(fed.round.tick(10.0), 10.0)  # the advertise deadline
    assert left == [LeftOut("site-c", 1, "did not send its keys in time")]
    # The other two shared at once; they mask and unmask between themselves.
    assert fed.round.phase == "mask" and fed.round.shared == {"site-a", "site-b"}
    fed.mask("site-a")
    fed.mask("site-b")
    (done,) = fed.deliver(fed.round.close_masking(11.0), 11.0)
    assert isinstance(done, Unmasked) and done.survivors == ("site-a", "site-b")


def test_too_few_survivors_fails_the_attempt() -> None:
    fed = Federation()
    fed.keys_and_shares()
    fed.mask("site-a")
    (failed,) = fed.round.close_masking(2.0)
    assert isinstance(failed, Failed) and "secure aggregation failed" in failed.reason
    assert "Only 1 sites sent masked updates" in failed.reason


def test_forged_and_replayed_messages_are_rejected_with_codes() -> None:
    fed = Federation()
    ad = fed.sites["site-a"].advertise()
    fed.round.receive("site-a", ad, 0.5)
    with pytest.raises(SecAggMessageRejected, match="a second secagg_keys") as info:
        fed.round.receive("site-a", ad, 0.5)
    assert info.value.code == "privacy.secagg.replayed"
    # site-b's keys, sent on site-a's connection: forged
    with pytest.raises(SecAggMessageRejected, match="its own key advertisement") as info:
        fed.round.receive("site-a", fed.sites["site-b"].advertise(), 0.5)
    assert info.value.code == "privacy.secagg.forged"
    # a changed key under site-c's signature
    forged = dict(fed.sites["site-c"].advertise().advertisements[0])
    forged["mask_public"] = forged["cipher_public"]
    with pytest.raises(SecAggMessageRejected, match="not signed by") as info:
        fed.round.receive("site-c", SecAggKeys(run_id=RUN, round=1, advertisements=[forged]), 0.5)
    assert info.value.code == "privacy.secagg.forged"
    # a message of another round
    with pytest.raises(SecAggMessageRejected, match="stale or replayed") as info:
        fed.round.receive("site-c", dataclasses.replace(ad, round=2), 0.5)
    assert info.value.code == "privacy.secagg.replayed"


def test_a_masked_update_is_rejected_if_its_bytes_do_not_match_what_was_signed() -> None:
    fed = Federation()
    fed.keys_and_shares()
    site = fed.sites["site-a"]
    masked, data = site.mask(site.protect(fed.updates["site-a"]))
    offer = make_offer("s-x", data, 1 << 20)
    msg = MaskedUpdateOffer(
        run_id=RUN, round=1, masked=masked, update=offer.body(), num_samples=1, train_loss=0.0
    )
    fed.round.masked_offer("site-a", msg)
    tampered = bytes([data[0] ^ 1]) + data[1:]
    with pytest.raises(SecAggMessageRejected, match="does not match the digest") as info:
        fed.round.masked_received("site-a", tampered)
    assert info.value.code == "privacy.secagg.forged"
    with pytest.raises(SecAggMessageRejected, match="not offered"):  # a replay of the bytes
        fed.round.masked_received("site-a", data)


def test_a_site_refuses_a_setup_that_widens_the_quantiser_or_is_not_signed() -> None:
    fed = Federation()
    setup = fed.round.setup
    config = {**setup.config, "clip_norm": 1000.0}
    wider = dataclasses.replace(setup, config=config)
    coordinator = public_key_b64(fed.coordinator)
    args = {"site_id": "site-a", "signing_key": fed.keys["site-a"], "coordinator_key": coordinator}
    with pytest.raises(Exception, match="signature"):
        SiteSecAgg(wider, PLAN.to_dict(), **args)
    with pytest.raises(SecAggMessageRejected, match="does not match the approved plan"):
        SiteSecAgg(setup, {**PLAN.to_dict(), "max_update_norm": 1.0}, **args)
