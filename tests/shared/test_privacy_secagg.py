"""Secure aggregation (Bonawitz et al., CCS 2017): sums, dropouts, secrecy, forgeries, replays.

Every round here runs the real site and server classes against each other in memory, with real
X25519, AES-GCM, Ed25519 and AES-CTR; nothing of ours is mocked.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from shared.crypto.keys import generate_signing_key
from shared.crypto.signing import sign
from shared.errors import (
    PrivacyParameterError,
    SecAggMessageRejected,
    SecretSharingError,
    SecureAggregationError,
    UpdateError,
)
from shared.privacy.quantise import Quantiser
from shared.privacy.secagg import (
    KeyAdvertisement,
    MaskedInput,
    SecAggConfig,
    SecAggServer,
    SecAggSite,
    UnmaskRequest,
    masked_digest,
)
from shared.privacy.shamir import Share

LENGTH = 4000
SITES = tuple(f"site-{c}" for c in "abcde")
KEYS = {s: generate_signing_key() for s in (*SITES, "site-x")}
PUBLIC = {s: k.public_key() for s, k in KEYS.items()}
COORDINATOR = generate_signing_key()


def _config(round_: int = 1, sites: tuple[str, ...] = SITES, threshold: int = 3) -> SecAggConfig:
    return SecAggConfig(
        run_id="run-1",
        round=round_,
        sites=sites,
        threshold=threshold,
        vector_length=LENGTH,
        quantiser=Quantiser(clip_norm=5.0, max_sites=len(sites)),
    )


def _resign(message, site: str):
    """What a malicious site can do: change its own message and sign it again."""
    return dataclasses.replace(
        message, signature=sign(KEYS[site], message.PURPOSE, message.signed_fields())
    )


class Round:
    """One round in memory: a server and a site object per site, driven step by step."""

    def __init__(self, config: SecAggConfig | None = None, seed: int = 0) -> None:
        self.config = config or _config()
        rng = random.Random(seed)
        self.server = SecAggServer(self.config, signing_key=COORDINATOR, site_keys=PUBLIC)
        self.sites = {
            s: SecAggSite(
                self.config,
                site=s,
                signing_key=KEYS[s],
                site_keys=PUBLIC,
                coordinator_key=COORDINATOR.public_key(),
                randbytes=rng.randbytes,
            )
            for s in self.config.sites
        }
        data = np.random.default_rng(seed)
        self.updates = {
            s: (data.normal(size=LENGTH) * 0.03).astype(np.float32) for s in self.config.sites
        }
        self.masked: dict[str, tuple[MaskedInput, np.ndarray]] = {}

    def advertise(self, skip: set[str] = frozenset()) -> tuple[KeyAdvertisement, ...]:
        for s, site in self.sites.items():
            if s not in skip:
                self.server.receive_advertisement(site.advertise())
        return self.server.advertisements()

    def share(self, skip: set[str] = frozenset()) -> None:
        ads = self.advertise()
        for s in (a.site for a in ads):
            shares = self.sites[s].share(ads)
            if s not in skip:
                self.server.receive_shares(shares)

    def mask(self, skip: set[str] = frozenset()) -> None:
        for s in self.server.sharing:
            msg, vec = self.sites[s].mask(self.updates[s], self.server.shares_for(s))
            self.masked[s] = (msg, vec)
            if s not in skip:
                self.server.receive_masked_input(msg, vec)

    def unmask(self, skip: set[str] = frozenset()) -> np.ndarray:
        request = self.server.unmask_request()
        for s in request.survivors:
            if s not in skip:
                self.server.receive_unmask_response(self.sites[s].unmask(request))
        return self.server.aggregate()

    def run(
        self,
        *,
        before_sharing: set[str] = frozenset(),
        after_sharing: set[str] = frozenset(),
        silent_at_unmask: set[str] = frozenset(),
    ) -> np.ndarray:
        self.share(skip=before_sharing)
        self.mask(skip=after_sharing)
        return self.unmask(skip=silent_at_unmask)

    def plain_sum(self, sites) -> np.ndarray:
        return np.sum([self.updates[s].astype(np.float64) for s in sites], axis=0)


def _assert_close_to_plain(r: Round, result: np.ndarray, survivors) -> None:
    bound = r.config.quantiser.error_bound(len(survivors), stochastic=False)
    assert np.max(np.abs(result - r.plain_sum(survivors))) <= bound * 1.0001
    assert r.server.survivors == tuple(sorted(survivors))


# --- sums and dropouts ------------------------------------------------------------------------


def test_secure_sum_equals_plain_sum_within_quantisation_error() -> None:
    r = Round()
    _assert_close_to_plain(r, r.run(), SITES)


@pytest.mark.parametrize(
    "dropped",
    [{"site-a"}, {"site-e"}, {"site-a", "site-e"}, {"site-b", "site-d"}, {"site-c", "site-d"}],
)
def test_up_to_n_minus_t_sites_dropping_after_sharing_are_recovered(dropped: set[str]) -> None:
    r = Round(seed=len(dropped))
    result = r.run(after_sharing=dropped)
    _assert_close_to_plain(r, result, set(SITES) - dropped)
    assert r.server.unmask_request().dropped == tuple(sorted(dropped))


def test_a_site_dropping_before_sharing_is_left_out() -> None:
    r = Round()
    result = r.run(before_sharing={"site-b"}, after_sharing={"site-d"})
    _assert_close_to_plain(r, result, {"site-a", "site-c", "site-e"})
    assert r.server.sharing == ("site-a", "site-c", "site-d", "site-e")


def test_survivors_silent_at_unmasking_are_tolerated_down_to_the_threshold() -> None:
    r = Round(config=_config(sites=(*SITES, "site-x"), threshold=4))
    result = r.run(after_sharing={"site-a"}, silent_at_unmask={"site-c"})
    _assert_close_to_plain(r, result, {"site-b", "site-c", "site-d", "site-e", "site-x"})


def test_too_many_dropouts_stop_the_round_with_a_clear_error() -> None:
    r = Round()
    r.share()
    r.mask(skip={"site-a", "site-b", "site-c"})
    with pytest.raises(SecureAggregationError, match="Only 2 sites sent masked updates") as e:
        r.server.unmask_request()
    assert e.value.code == "privacy.secagg.too_few_sites"


def test_fewer_than_threshold_unmasking_answers_is_an_error() -> None:
    r = Round()
    r.share()
    r.mask(skip={"site-e"})
    with pytest.raises(SecretSharingError, match="Only 2 survivors answered") as e:
        r.unmask(skip={"site-a", "site-b"})
    assert e.value.code == "privacy.secagg.too_few_shares"


def test_too_few_advertisements_stop_the_round() -> None:
    r = Round()
    with pytest.raises(SecureAggregationError, match="Only 2 sites advertised keys"):
        r.advertise(skip={"site-a", "site-b", "site-c"})


# --- what the coordinator sees ----------------------------------------------------------------


def test_a_masked_update_reveals_nothing_obvious_about_the_input() -> None:
    r = Round()
    r.share()
    r.mask()
    q = r.config.quantiser
    for s in SITES:
        masked = r.masked[s][1]
        encoded = q.quantise(r.updates[s]).view(np.int32).astype(np.float64)
        as_float = masked.view(np.int32).astype(np.float64)
        # Uncorrelated with the input, spread over the whole ring.
        assert abs(np.corrcoef(encoded, as_float)[0, 1]) < 0.08
        assert (masked / 2**32).mean() == pytest.approx(0.5, abs=0.03)
        assert np.mean(q.dequantise(masked, 1) == q.dequantise(q.quantise(r.updates[s]), 1)) < 0.01
    # Nor does the sum of a strict subset of the masked updates reveal their plain sum.
    partial = r.masked["site-a"][1] + r.masked["site-b"][1]
    plain = q.quantise(r.updates["site-a"]) + q.quantise(r.updates["site-b"])
    corr = np.corrcoef(partial.view(np.int32), plain.view(np.int32))[0, 1]
    assert abs(corr) < 0.08


def test_the_same_update_is_masked_differently_every_round() -> None:
    one, two = Round(config=_config(round_=1), seed=5), Round(config=_config(round_=2), seed=5)
    for r in (one, two):
        r.share()
        r.mask()
    np.testing.assert_array_equal(one.updates["site-a"], two.updates["site-a"])
    assert np.mean(one.masked["site-a"][1] == two.masked["site-a"][1]) < 0.01


def test_a_site_refuses_to_reveal_both_masks_of_one_site() -> None:
    r = Round()
    r.share()
    r.mask()
    unsafe = UnmaskRequest(
        run_id="run-1",
        round=1,
        config_digest=r.config.digest,
        survivors=SITES,
        dropped=("site-b",),
    )
    unsafe = dataclasses.replace(
        unsafe, signature=sign(COORDINATOR, unsafe.PURPOSE, unsafe.signed_fields())
    )
    with pytest.raises(SecAggMessageRejected, match="both masks of site-b") as e:
        r.sites["site-a"].unmask(unsafe)
    assert e.value.code == "privacy.secagg.unsafe_request"
    short = dataclasses.replace(unsafe, survivors=("site-a", "site-c"), dropped=("site-b",))
    short = dataclasses.replace(
        short, signature=sign(COORDINATOR, short.PURPOSE, short.signed_fields())
    )
    with pytest.raises(SecAggMessageRejected, match="does not match the sites that shared"):
        r.sites["site-a"].unmask(short)


# --- forged messages --------------------------------------------------------------------------


def test_forged_key_advertisement_is_rejected() -> None:
    r = Round()
    ad = r.sites["site-a"].advertise()
    stolen = dataclasses.replace(ad, mask_public=r.sites["site-b"].advertise().mask_public)
    with pytest.raises(SecAggMessageRejected, match="not signed by site-a's key") as e:
        r.server.receive_advertisement(stolen)
    assert e.value.code == "privacy.secagg.forged"
    impostor = dataclasses.replace(
        ad, signature=sign(KEYS["site-c"], ad.PURPOSE, ad.signed_fields())
    )
    with pytest.raises(SecAggMessageRejected, match="not signed by site-a's key"):
        r.server.receive_advertisement(impostor)
    r.server.receive_advertisement(ad)  # the genuine one is still accepted


def test_site_rejects_a_key_list_that_swaps_its_own_keys() -> None:
    r = Round()
    ads = list(r.advertise())
    other = Round(seed=9)
    ads[0] = other.sites["site-a"].advertise()  # signed by site-a, but not this round's keys
    with pytest.raises(SecAggMessageRejected, match="does not carry this site's own keys"):
        r.sites["site-a"].share(ads)


def test_tampered_or_resigned_garbage_shares_are_rejected() -> None:
    r = Round()
    ads = r.advertise()
    for s in SITES:
        r.server.receive_shares(r.sites[s].share(ads))
    to_b = r.server.shares_for("site-b")
    flipped = dataclasses.replace(to_b[0], ciphertext=to_b[0].ciphertext[:-4] + "AAAA")
    with pytest.raises(SecAggMessageRejected, match="not signed by site-a's key"):
        r.sites["site-b"].mask(r.updates["site-b"], [flipped, *to_b[1:]])
    # A malicious sender can sign garbage, but it does not decrypt under the pair's key.
    garbage = _resign(flipped, "site-a")
    with pytest.raises(SecAggMessageRejected, match="cannot be opened") as e:
        r.sites["site-b"].mask(r.updates["site-b"], [garbage, *to_b[1:]])
    assert e.value.code == "privacy.secagg.forged"


def test_masked_update_changed_after_signing_is_rejected() -> None:
    r = Round()
    r.share()
    msg, vec = r.sites["site-a"].mask(r.updates["site-a"], r.server.shares_for("site-a"))
    changed = vec.copy()
    changed[0] += 1
    with pytest.raises(SecAggMessageRejected, match="does not match the digest it signed"):
        r.server.receive_masked_input(msg, changed)
    with pytest.raises(UpdateError, match="must be 4000 values of uint32"):
        r.server.receive_masked_input(msg, vec.astype(np.uint64))
    r.server.receive_masked_input(msg, vec)
    assert msg.digest == masked_digest(vec)


def test_a_forged_share_at_unmasking_is_detected_not_summed() -> None:
    r = Round()
    r.share()
    r.mask()
    request = r.server.unmask_request()
    for s in ("site-a", "site-b"):
        r.server.receive_unmask_response(r.sites[s].unmask(request))
    honest = r.sites["site-c"].unmask(request)
    owner, share = honest.self_mask_shares[0]
    bad = Share(x=share.x, y=share.y + 1, threshold=share.threshold)
    forged = _resign(
        dataclasses.replace(honest, self_mask_shares=((owner, bad), *honest.self_mask_shares[1:])),
        "site-c",
    )
    r.server.receive_unmask_response(forged)  # signed by site-c: only the maths can tell
    with pytest.raises(SecretSharingError, match="does not match its commitment") as e:
        r.server.aggregate()
    assert e.value.code == "privacy.secagg.inconsistent_shares"


def test_a_forged_mask_key_share_for_a_dropped_site_is_detected() -> None:
    r = Round()
    r.share()
    r.mask(skip={"site-e"})
    request = r.server.unmask_request()
    for s in ("site-a", "site-b"):
        r.server.receive_unmask_response(r.sites[s].unmask(request))
    honest = r.sites["site-c"].unmask(request)
    ((owner, share),) = honest.mask_key_shares
    bad = Share(x=share.x, y=share.y ^ 1, threshold=share.threshold)
    r.server.receive_unmask_response(
        _resign(dataclasses.replace(honest, mask_key_shares=((owner, bad),)), "site-c")
    )
    with pytest.raises(SecretSharingError, match="does not match the key it advertised"):
        r.server.aggregate()


def test_an_answer_claiming_another_sites_share_position_is_rejected() -> None:
    r = Round()
    r.share()
    r.mask()
    request = r.server.unmask_request()
    a = r.sites["site-a"].unmask(request)
    shifted = tuple((o, Share(x=2, y=s.y, threshold=s.threshold)) for o, s in a.self_mask_shares)
    with pytest.raises(SecAggMessageRejected, match="does not hold exactly its own shares"):
        r.server.receive_unmask_response(
            _resign(dataclasses.replace(a, self_mask_shares=shifted), "site-a")
        )


def test_unmask_request_not_signed_by_the_coordinator_is_rejected() -> None:
    r = Round()
    r.share()
    r.mask()
    request = r.server.unmask_request()
    forged = dataclasses.replace(
        request, signature=sign(KEYS["site-b"], request.PURPOSE, request.signed_fields())
    )
    with pytest.raises(SecAggMessageRejected, match="not signed by the coordinator's key"):
        r.sites["site-a"].unmask(forged)


# --- replayed messages ------------------------------------------------------------------------


def test_replayed_messages_are_rejected() -> None:
    r = Round()
    ad = r.sites["site-a"].advertise()
    r.server.receive_advertisement(ad)
    with pytest.raises(SecAggMessageRejected, match="second key advertisement from site-a") as e:
        r.server.receive_advertisement(ad)
    assert e.value.code == "privacy.secagg.replayed"
    for s in SITES[1:]:
        r.server.receive_advertisement(r.sites[s].advertise())
    ads = r.server.advertisements()
    shares = {s: r.sites[s].share(ads) for s in SITES}
    for s in SITES:
        r.server.receive_shares(shares[s])
    with pytest.raises(SecAggMessageRejected, match="second shares from site-a"):
        r.server.receive_shares(shares["site-a"])
    to_b = r.server.shares_for("site-b")
    with pytest.raises(SecAggMessageRejected, match="addressed to 'site-b' were delivered"):
        r.sites["site-c"].mask(r.updates["site-c"], to_b)
    with pytest.raises(SecAggMessageRejected, match="arrived twice"):
        r.sites["site-b"].mask(r.updates["site-b"], [*to_b, to_b[0]])
    r.mask()
    msg, vec = r.masked["site-a"]
    with pytest.raises(SecAggMessageRejected, match="second masked update from site-a"):
        r.server.receive_masked_input(msg, vec)
    request = r.server.unmask_request()
    answer = r.sites["site-a"].unmask(request)
    r.server.receive_unmask_response(answer)
    with pytest.raises(SecAggMessageRejected, match="second unmasking answer from site-a"):
        r.server.receive_unmask_response(answer)
    with pytest.raises(SecAggMessageRejected, match="already answered an unmasking request"):
        r.sites["site-a"].unmask(request)


def test_messages_from_another_round_are_rejected() -> None:
    old = Round(config=_config(round_=1))
    old.share()
    old.mask()
    new = Round(config=_config(round_=2))
    with pytest.raises(SecAggMessageRejected, match="belongs to another run, round") as e:
        new.server.receive_advertisement(old.server.advertisements()[0])
    assert e.value.code == "privacy.secagg.replayed"
    new.share()
    msg, vec = old.masked["site-a"]
    with pytest.raises(SecAggMessageRejected, match="belongs to another run, round"):
        new.server.receive_masked_input(msg, vec)
    with pytest.raises(SecAggMessageRejected, match="belongs to another run, round"):
        new.sites["site-a"].mask(new.updates["site-a"], old.server.shares_for("site-a"))


def test_late_and_unknown_senders_are_rejected() -> None:
    r = Round()
    r.share()
    r.mask()
    r.server.unmask_request()
    late = Round()
    with pytest.raises(SecAggMessageRejected, match="arrived while the round is in stage"):
        r.server.receive_advertisement(late.sites["site-a"].advertise())
    fresh = Round()
    ad = dataclasses.replace(fresh.sites["site-a"].advertise(), site="site-x")
    with pytest.raises(SecAggMessageRejected, match="'site-x' is not a participant") as e:
        fresh.server.receive_advertisement(_resign(ad, "site-x"))
    assert e.value.code == "privacy.secagg.unexpected"


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": 2}, "threshold must be from 3 \\(a majority"),
        ({"threshold": 6}, "threshold must be from 3"),
        ({"sites": ("a",), "threshold": 1}, "at least 2 sites"),
        ({"sites": ("a", "a", "b"), "threshold": 2}, "distinct, non-empty site ids"),
        ({"vector_length": 0}, "update length must be a whole number >= 1"),
        ({"quantiser": Quantiser(clip_norm=1.0, max_sites=2)}, "at least the 5 sites"),
        ({"round": -1}, "round number must be a whole number >= 0"),
    ],
)
def test_invalid_config(kwargs: dict, match: str) -> None:
    args = {
        "run_id": "r",
        "round": 0,
        "sites": SITES,
        "threshold": 3,
        "vector_length": 10,
        "quantiser": Quantiser(clip_norm=1.0, max_sites=5),
        **kwargs,
    }
    with pytest.raises(PrivacyParameterError, match=match):
        SecAggConfig(**args)


def test_config_sorts_sites_and_binds_everything_in_its_digest() -> None:
    a = _config()
    b = SecAggConfig(
        run_id="run-1",
        round=1,
        sites=tuple(reversed(SITES)),
        threshold=3,
        vector_length=LENGTH,
        quantiser=Quantiser(clip_norm=5.0, max_sites=5),
    )
    assert a.sites == SITES and a.digest == b.digest
    assert _config(round_=2).digest != a.digest
    assert dataclasses.replace(a, threshold=4).digest != a.digest


def test_site_wrong_update_length_and_out_of_order_calls() -> None:
    r = Round()
    with pytest.raises(SecureAggregationError, match="step 'mask' called in stage 'new'"):
        r.sites["site-a"].mask(r.updates["site-a"], [])
    r.share()
    with pytest.raises(UpdateError, match="updates of 4000 values; this one has 3"):
        r.sites["site-a"].mask(np.zeros(3, np.float32), r.server.shares_for("site-a"))
