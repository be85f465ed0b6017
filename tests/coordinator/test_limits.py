"""The coordinator's limits on peers, with plain numbers for time (``coordinator.limits``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.limits import (
    ConnectionBudget,
    IdentityGuard,
    KeyedBuckets,
    LimitError,
    MessageRate,
    PeerLimits,
    Rate,
    TokenBucket,
    UploadSlots,
    Verdict,
)

# --- rates and buckets --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("per_s", "burst", "match"),
    [
        (0, 1, "positive number per second, not 0"),
        (-1, 1, "positive number per second"),
        (float("inf"), 1, "positive number per second"),
        (float("nan"), 1, "positive number per second"),
        (1, 0.5, "burst must be at least 1, not 0.5"),
        (1, float("inf"), "burst must be at least 1"),
    ],
)
def test_impossible_rates_are_refused(per_s: float, burst: float, match: str) -> None:
    with pytest.raises(LimitError, match=match) as info:
        Rate(per_s, burst)
    assert info.value.code == "config.limits"


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    bucket = TokenBucket(Rate(per_s=2, burst=3), now=100.0)

    assert [bucket.try_take(100.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.try_take(100.4)  # 0.8 tokens so far
    assert bucket.try_take(100.5)  # one token after half a second at 2/s
    assert not bucket.try_take(100.5)
    assert bucket.available(200.0) == 3  # never more than the burst


def test_a_refused_take_takes_nothing() -> None:
    bucket = TokenBucket(Rate(per_s=1, burst=5), now=0.0)
    assert not bucket.try_take(0.0, cost=6)
    assert bucket.available(0.0) == 5


def test_a_clock_stepping_back_refills_nothing() -> None:
    bucket = TokenBucket(Rate(per_s=1, burst=2), now=50.0)
    assert bucket.try_take(50.0) and bucket.try_take(50.0)

    assert not bucket.try_take(10.0)  # the wall clock was set back 40 s
    assert bucket.available(50.5) == 0.5  # and time is counted from the latest reading


def test_wait_goes_into_debt_and_says_for_how_long() -> None:
    bucket = TokenBucket(Rate(per_s=10, burst=2), now=0.0)

    waits = [bucket.wait(0.0) for _ in range(5)]

    assert waits == pytest.approx([0.0, 0.0, 0.1, 0.2, 0.3])
    assert bucket.full_at() == pytest.approx(0.5)  # 3 in debt + 2 to fill, at 10/s
    assert bucket.wait(0.3) == pytest.approx(0.1)  # the debt is paid back at the rate


@given(
    gaps=st.lists(st.floats(0, 2, allow_nan=False), min_size=1, max_size=60),
    per_s=st.floats(0.5, 50),
    burst=st.integers(1, 20),
)
@settings(max_examples=100, deadline=None)
def test_a_bucket_never_allows_more_than_its_burst_plus_its_rate(
    gaps: list[float], per_s: float, burst: int
) -> None:
    """In any window of T seconds at most ``burst + per_s * T`` takes succeed."""
    bucket = TokenBucket(Rate(per_s, burst), now=0.0)
    now, taken = 0.0, []
    for gap in gaps:
        now += gap
        if bucket.try_take(now):
            taken.append(now)
    for i, start in enumerate(taken):
        for j in range(i, len(taken)):
            assert j - i + 1 <= burst + per_s * (taken[j] - start) + 1e-6


# --- message rate -------------------------------------------------------------------------


def test_a_sender_within_the_rate_never_waits() -> None:
    meter = MessageRate(Rate(per_s=100, burst=10), now=0.0)
    verdicts = [meter.admit(i * 0.01) for i in range(1000)]  # exactly the rate, 10 s long
    assert all(v.allowed and v.wait_s == 0 for v in verdicts)


def test_a_fast_sender_is_slowed_and_a_flood_is_cut_off() -> None:
    meter = MessageRate(Rate(per_s=100, burst=10), now=0.0, max_wait_s=1.0)

    verdicts = [meter.admit(0.0) for _ in range(120)]

    assert all(v.allowed and v.wait_s == 0 for v in verdicts[:10])
    slowed = verdicts[10:110]  # waits grow by 1/rate: back-pressure, not refusal
    assert all(v.allowed for v in slowed)
    assert [round(v.wait_s, 3) for v in slowed[:3]] == [0.01, 0.02, 0.03]
    assert slowed[-1].wait_s == pytest.approx(1.0)
    flood = verdicts[110]
    assert not flood.allowed
    assert (flood.code, flood.reason) == (
        "protocol.rate",
        "too many messages; disconnecting (the site reconnects by itself)",
    )
    # Until it pauses, the sender is still flooding; once its bucket has refilled, it is
    # welcome again (a refused message did not deepen the debt).
    assert not meter.admit(1.0).allowed
    assert meter.admit(3.0) == Verdict(True)


def adapter(meter: MessageRate, frames: int, jitter: Callable[[int], float]) -> list[Verdict]:
    """What the server does with a sender that never stops: read one frame, admit it, sleep
    the wait it was given (plus the event loop's ``jitter``), read the next."""
    now, verdicts = 0.0, []
    for n in range(frames):
        verdict = meter.admit(now)
        verdicts.append(verdict)
        if not verdict.allowed:
            break
        now += verdict.wait_s + jitter(n)
    return verdicts


@pytest.mark.parametrize(
    "jitter",
    [
        lambda n: 0.0,
        lambda n: 0.0002,  # every sleep a little late
        lambda n: 0.02 if n % 50 == 0 else 0.0,  # now and then two messages' worth late
    ],
    ids=["exact", "late", "hiccups"],
)
def test_a_flood_read_one_frame_at_a_time_is_cut_off(jitter: Callable[[int], float]) -> None:
    """The server's sleep pays the debt back before it reads the next frame, so the debt
    never grows; the flood is seen by how long the sender has been held back."""
    meter = MessageRate(Rate(per_s=100, burst=10), now=0.0, max_wait_s=1.0)

    verdicts = adapter(meter, 10_000, jitter)

    *served, cut = verdicts
    assert all(v.allowed for v in served) and all(v.wait_s < 0.011 for v in served)
    assert (cut.allowed, cut.code) == (False, "protocol.rate")
    # The burst, then about one second at the rate: never before, not much after.
    assert 10 + 100 * 0.8 <= len(served) <= 10 + 100 * 1.05


def test_a_sender_that_pauses_is_never_cut_off() -> None:
    """Bursts of 60 messages at once against 100 per second with a burst of 10, each
    followed by a pause of half a second: slowed in every burst, never disconnected."""
    meter = MessageRate(Rate(per_s=100, burst=10), now=0.0, max_wait_s=1.0)
    now = 0.0
    for _ in range(20):
        for _ in range(60):
            verdict = meter.admit(now)
            assert verdict.allowed
            now += verdict.wait_s
        now += 0.5
    assert meter.admit(now) == Verdict(True)


def test_free_frames_cost_nothing() -> None:
    meter = MessageRate(Rate(per_s=1, burst=1), now=0.0, max_wait_s=0.0)
    assert all(meter.admit(0.0, cost=0) == Verdict(True) for _ in range(10_000))
    assert meter.admit(0.0).allowed and not meter.admit(0.0).allowed


def test_a_negative_max_wait_is_refused() -> None:
    with pytest.raises(LimitError, match="max_wait_s must be >= 0"):
        MessageRate(Rate(1, 1), 0.0, max_wait_s=-1)


# --- keyed buckets: bounded memory --------------------------------------------------------


def test_keyed_buckets_keep_at_most_max_keys() -> None:
    buckets = KeyedBuckets(Rate(per_s=1, burst=2), max_keys=3)
    for peer in ("a", "b", "c"):
        assert buckets.bucket(peer, 0.0).try_take(0.0)
    buckets.bucket("a", 0.0)  # a is now the most recently used

    buckets.bucket("d", 0.5)  # none has refilled yet: the least recently used (b) goes

    assert len(buckets) == 3
    assert buckets.peek("b", 0.5) == 2  # forgotten: a full bucket again
    assert buckets.peek("a", 0.5) == pytest.approx(1.5)
    buckets.bucket("c", 0.5).try_take(0.5)
    buckets.bucket("e", 5.0)  # a, c and d have all refilled by now: they go first
    assert len(buckets) == 1


def test_keyed_buckets_need_room_for_a_key() -> None:
    with pytest.raises(LimitError, match="max_keys must be at least 1, not 0"):
        KeyedBuckets(Rate(1, 1), max_keys=0)


# --- failed identity attempts -------------------------------------------------------------


def test_failed_attempts_from_one_peer_are_throttled() -> None:
    guard = IdentityGuard(per_peer=Rate(per_s=1 / 60, burst=10), overall=Rate(1, 1000))
    for n in range(10):
        assert guard.check("203.0.113.9", float(n)).allowed
        guard.failed("203.0.113.9", float(n))

    verdict = guard.check("203.0.113.9", 10.0)

    assert not verdict.allowed and verdict.code == "identity.throttled"
    assert "wait a while and try again" in verdict.reason
    assert verdict.retry_after == pytest.approx(60 - 10, abs=1)  # one token per minute
    assert guard.check("198.51.100.7", 10.0).allowed  # other hospitals are not affected
    assert guard.check("203.0.113.9", 70.0).allowed  # a minute on: one more try


def test_successes_cost_nothing() -> None:
    guard = IdentityGuard(per_peer=Rate(per_s=1 / 60, burst=10), overall=Rate(1, 30))
    # A consortium enrolling 500 sites from one address, all at once, all succeeding.
    assert all(guard.check("127.0.0.1", 0.0).allowed for _ in range(500))


def test_failures_from_many_peers_throttle_everyone() -> None:
    guard = IdentityGuard(per_peer=Rate(per_s=1 / 60, burst=10), overall=Rate(per_s=1, burst=30))
    for n in range(30):  # a guesser spreading attempts over 30 addresses
        guard.failed(f"10.0.0.{n}", 0.0)

    verdict = guard.check("192.0.2.1", 0.0)

    assert not verdict.allowed and verdict.retry_after == pytest.approx(1.0)
    assert guard.check("192.0.2.1", 1.0).allowed


def test_the_guard_remembers_a_bounded_number_of_peers() -> None:
    guard = IdentityGuard(
        per_peer=Rate(per_s=1 / 60, burst=1), overall=Rate(1000, 1e6), max_peers=50
    )
    for n in range(10_000):
        guard.failed(f"peer-{n}", 0.0)
    assert len(guard._peers) == 50


# --- connections that have not identified -------------------------------------------------


def test_pending_connections_are_capped_per_peer_and_overall() -> None:
    budget = ConnectionBudget(max_pending=4, max_pending_per_peer=2, identify_within_s=30)

    assert budget.admit("c1", "10.0.0.1", 0.0).allowed
    assert budget.admit("c2", "10.0.0.1", 0.0).allowed
    third = budget.admit("c3", "10.0.0.1", 0.0)
    assert not third.allowed and third.code == "net.busy"
    assert "from your address" in third.reason
    assert budget.admit("c4", "10.0.0.2", 0.0).allowed
    assert budget.admit("c5", "10.0.0.3", 0.0).allowed
    full = budget.admit("c6", "10.0.0.4", 0.0)
    assert not full.allowed and "too many connections waiting" in full.reason
    assert full.retry_after == 30

    budget.identified("c1")  # welcomed: no longer pending
    assert (budget.pending, budget.pending_from("10.0.0.1")) == (3, 1)
    assert budget.admit("c3", "10.0.0.1", 1.0).allowed
    assert budget.admit("c3", "10.0.0.1", 2.0).allowed  # the same connection again: no-op
    assert budget.pending == 4


def test_connections_that_do_not_identify_in_time_are_overdue() -> None:
    budget = ConnectionBudget(identify_within_s=10)
    budget.admit("late", "p", 0.0)
    budget.admit("later", "p", 2.0)
    budget.admit("ok", "p", 3.0)
    budget.identified("ok")

    assert budget.next_deadline() == 10.0
    assert budget.overdue(9.9) == []
    assert budget.overdue(12.0) == ["late", "later"]  # oldest first
    assert budget.overdue(12.0) == ["late", "later"]  # until the adapter reports them closed
    budget.closed("late")
    budget.closed("later")
    budget.closed("never-admitted")  # harmless
    assert (budget.pending, budget.next_deadline(), budget.pending_from("p")) == (0, None, 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_pending": 0}, "at least one connection"),
        ({"max_pending_per_peer": 0}, "at least one connection"),
        ({"identify_within_s": 0}, "identify_within_s must be > 0"),
    ],
)
def test_impossible_budgets_are_refused(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(LimitError, match=match):
        ConnectionBudget(**kwargs)  # type: ignore[arg-type]


# --- uploads ------------------------------------------------------------------------------


def test_uploads_beyond_the_cap_wait_their_turn() -> None:
    slots = UploadSlots(max_total=2, max_per_site=1)

    assert slots.request("site-a", "u-1").allowed
    assert slots.request("site-b", "u-2").allowed
    queued = slots.request("site-c", "u-3")
    assert not queued.allowed and queued.code == "update.queued"
    assert "accepted in turn" in queued.reason
    assert slots.request("site-d", "u-4").code == "update.queued"
    assert slots.request("site-c", "u-3").code == "update.queued"  # asked again: same place
    assert (slots.active, slots.waiting) == (2, 2)

    assert slots.release("site-b", "u-2") == [("site-c", "u-3")]  # first come, first served
    assert slots.request("site-c", "u-3").allowed  # now it holds a slot
    assert slots.release("site-d", "u-4") == []  # gave up while waiting (its link closed)
    assert slots.release("site-d", "u-4") == []  # twice: harmless
    assert slots.release("site-a", "u-1") == []
    assert (slots.active, slots.waiting) == (1, 0)
    assert slots.request("site-e", "u-5").allowed  # a free slot and no queue: at once


def test_a_site_gets_one_upload_at_a_time() -> None:
    slots = UploadSlots(max_total=1, max_per_site=1)
    assert slots.request("site-a", "u-1").allowed
    assert slots.request("site-a", "u-1").allowed  # the same upload resumed on a new link

    second = slots.request("site-a", "u-2")

    assert not second.allowed and second.code == "update.busy"
    assert "already has 1 upload(s) in progress" in second.reason
    assert slots.request("site-b", "u-3").code == "update.queued"
    assert slots.request("site-b", "u-4").code == "update.busy"  # waiting counts too
    assert slots.release("site-a", "u-1") == [("site-b", "u-3")]
    assert slots.request("site-a", "u-2").code == "update.queued"


@given(
    steps=st.lists(
        st.tuples(st.booleans(), st.integers(0, 5), st.integers(0, 2)), min_size=1, max_size=80
    ),
    max_total=st.integers(1, 4),
)
@settings(max_examples=100, deadline=None)
def test_never_more_than_the_cap_and_every_waiting_upload_starts_in_order(
    steps: list[tuple[bool, int, int]], max_total: int
) -> None:
    """Random requests and releases: the cap holds, a slot never stays free while someone
    waits, and the queue is served in the order of the requests."""
    slots = UploadSlots(max_total=max_total, max_per_site=1)
    held: set[tuple[str, str]] = set()
    queue: list[tuple[str, str]] = []
    for is_request, site, transfer in steps:
        key = (f"site-{site}", f"u-{transfer}")
        if is_request:
            verdict = slots.request(*key)
            if verdict.allowed:
                held.add(key)
            elif verdict.code == "update.queued" and key not in queue:
                queue.append(key)
        else:
            granted = slots.release(*key)
            held.discard(key)
            if key in queue:
                queue.remove(key)
            assert granted == queue[: len(granted)]
            del queue[: len(granted)]
            held.update(granted)
        assert len(held) == slots.active <= max_total
        assert len(queue) == slots.waiting
        assert not queue or slots.active == max_total
        sites = [k[0] for k in held] + [k[0] for k in queue]
        assert len(sites) == len(set(sites))  # one upload per site, started or waiting


def test_impossible_upload_limits_are_refused() -> None:
    with pytest.raises(LimitError, match="at least one upload"):
        UploadSlots(max_total=0)


# --- the settings together ------------------------------------------------------------------


def test_peer_limits_build_every_limit_with_their_settings() -> None:
    limits = PeerLimits(max_pending=7, max_uploads=3, max_uploads_per_site=2)
    assert limits.connection_budget().max_pending == 7
    slots = limits.upload_slots()
    assert (slots.max_total, slots.max_per_site) == (3, 2)
    assert [slots.request(f"s{n}", "u").allowed for n in range(4)] == [True, True, True, False]
    assert limits.message_meter(0.0).max_wait_s == limits.max_message_wait_s
    assert limits.identity_guard(0.0).check("p", 0.0).allowed


def test_the_defaults_let_200_sites_behind_one_address_connect_at_once() -> None:
    """The scale benchmark's situation: every site on loopback, all connecting together."""
    limits = PeerLimits()
    budget, guard = limits.connection_budget(), limits.identity_guard(0.0)
    assert all(budget.admit(f"ws-{n}", "127.0.0.1", 0.0).allowed for n in range(200))
    assert all(guard.check("127.0.0.1", 0.0).allowed for _ in range(200))
    meter = limits.message_meter(0.0)
    # One round's chatter of a site (auth, 64 chunk acks, offer, 64 chunks) needs no wait.
    assert all(meter.admit(0.0).wait_s == 0 for _ in range(200))
