"""t-of-n Shamir secret sharing."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import PrivacyParameterError, SecretSharingError
from shared.privacy.shamir import PRIME, Share, reconstruct, split

SECRET = bytes(range(100, 132))


def test_any_threshold_shares_recover_the_secret() -> None:
    shares = split(SECRET, threshold=3, count=5)
    assert [s.x for s in shares] == [1, 2, 3, 4, 5]
    for subset in itertools.combinations(shares, 3):
        assert reconstruct(subset) == SECRET
    assert reconstruct(shares) == SECRET  # extra shares are checked, not ignored


@settings(max_examples=40, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    count=st.integers(1, 12),
    data=st.data(),
)
def test_round_trip(secret: bytes, count: int, data: st.DataObject) -> None:
    threshold = data.draw(st.integers(1, count))
    shares = split(secret, threshold=threshold, count=count)
    subset = data.draw(st.lists(st.sampled_from(shares), min_size=threshold, unique=True))
    assert reconstruct(subset) == secret


def test_fewer_than_threshold_shares_is_an_error() -> None:
    shares = split(SECRET, threshold=4, count=6)
    with pytest.raises(SecretSharingError, match=r"Too few shares.*3 distinct shares, but 4") as e:
        reconstruct(shares[:3])
    assert e.value.code == "privacy.secagg.too_few_shares"
    with pytest.raises(SecretSharingError, match="Too few shares"):
        reconstruct([shares[0]] * 4)  # one share repeated is still one share
    with pytest.raises(SecretSharingError, match="Too few shares"):
        reconstruct([])


def test_a_forged_share_among_more_than_threshold_is_detected() -> None:
    shares = list(split(SECRET, threshold=3, count=5))
    shares[4] = Share(x=5, y=(shares[4].y + 1) % PRIME, threshold=3)
    with pytest.raises(SecretSharingError, match="share 5 is off the polynomial") as e:
        reconstruct(shares)
    assert e.value.code == "privacy.secagg.inconsistent_shares"


def test_conflicting_and_mixed_shares_are_errors() -> None:
    a = split(SECRET, threshold=2, count=3)
    b = split(SECRET, threshold=3, count=3)
    with pytest.raises(SecretSharingError, match="Two different shares claim position 1"):
        reconstruct([a[0], Share(x=1, y=a[0].y + 1, threshold=2), a[1]])
    with pytest.raises(SecretSharingError, match="come from different splits"):
        reconstruct([a[0], b[1], b[2]])
    with pytest.raises(SecretSharingError, match="out of range"):
        reconstruct([Share(x=1, y=PRIME, threshold=1)])
    with pytest.raises(SecretSharingError, match="value that no 32-byte secret has"):
        reconstruct([Share(x=1, y=2**300, threshold=1)])


def test_fields_round_trip_and_reject_garbage() -> None:
    share = split(SECRET, threshold=2, count=2)[1]
    assert Share.from_fields(share.to_fields()) == share
    for bad in (None, {"x": 1}, {"x": 1, "y": "0x1", "t": 1}, {"x": True, "y": "1", "t": 1}):
        with pytest.raises(SecretSharingError, match="share is malformed"):
            Share.from_fields(bad)


def test_seeded_randomness_is_reproducible_and_coefficients_are_used() -> None:
    def seeded(seed: int):
        rng = random.Random(seed)
        return lambda n: rng.randbytes(n)

    assert split(SECRET, threshold=3, count=4, randbytes=seeded(1)) == split(
        SECRET, threshold=3, count=4, randbytes=seeded(1)
    )
    assert split(SECRET, threshold=3, count=4, randbytes=seeded(1)) != split(
        SECRET, threshold=3, count=4, randbytes=seeded(2)
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": 0, "count": 3}, "A 0-of-3 split is impossible"),
        ({"threshold": 4, "count": 3}, "A 4-of-3 split is impossible"),
        ({"threshold": 2.0, "count": 3}, "threshold must be a whole number"),
    ],
)
def test_invalid_split(kwargs: dict, match: str) -> None:
    with pytest.raises(PrivacyParameterError, match=match):
        split(SECRET, **kwargs)


def test_only_32_byte_secrets() -> None:
    with pytest.raises(PrivacyParameterError, match="Only 32-byte secrets are shared"):
        split(b"short", threshold=1, count=1)
