"""The round engine, driven with plain numbers for ``now`` (no clock, no I/O)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.engine import (
    Aggregate,
    FinishRun,
    InviteSite,
    OpenRound,
    RetryRound,
    RoundEngine,
)

DEADLINE = 100.0
RETRY = 5.0


def make(**overrides) -> RoundEngine:
    settings_ = {
        "rounds": 3,
        "quorum": 2,
        "min_sites": 3,
        "deadline_s": DEADLINE,
        "retry_delay_s": RETRY,
    }
    settings_.update(overrides)
    return RoundEngine(**settings_)


def online(engine: RoundEngine, *sites: str, now: float = 0.0) -> list:
    actions: list = []
    for site in sites:
        actions += engine.site_online(site, now)
    return actions


def invited(actions: list) -> list[str]:
    return [a.site_id for a in actions if isinstance(a, InviteSite)]


# -- opening -------------------------------------------------------------------------------


def test_no_round_below_min_sites():
    engine = make()
    assert online(engine, "a", "b") == []
    assert engine.tick(1000.0) == []
    assert engine.open is None
    assert engine.next_deadline() is None


def test_round_opens_at_max_of_quorum_and_min_sites():
    # quorum above min_sites: the quorum is what counts
    engine = make(quorum=3, min_sites=1)
    assert online(engine, "a", "b") == []
    actions = online(engine, "c", now=10.0)
    assert actions[0] == OpenRound(1, ("a", "b", "c"), 10.0 + DEADLINE)


def test_opening_selects_all_online_sites_and_invites_each():
    engine = make()
    online(engine, "b", "a")
    actions = engine.site_online("c", 7.0)
    assert actions == [
        OpenRound(1, ("a", "b", "c"), 7.0 + DEADLINE),
        InviteSite("a", 1),
        InviteSite("b", 1),
        InviteSite("c", 1),
    ]
    assert engine.next_deadline() == 7.0 + DEADLINE


def test_site_going_offline_before_opening_is_not_counted():
    engine = make()
    online(engine, "a", "b")
    assert engine.site_offline("b", 1.0) == []
    assert engine.site_online("c", 2.0) == []
    assert engine.open is None


# -- closing -------------------------------------------------------------------------------


def test_closes_early_when_every_selected_site_answered():
    engine = make()
    online(engine, "a", "b", "c")
    assert engine.update_stored("c", 1, 1.0) == []
    assert engine.site_declined("b", 1, 2.0) == []
    assert engine.update_stored("a", 1, 3.0) == [Aggregate(1, ("a", "c"))]
    # while aggregating nothing else happens, and there is no deadline to wake up for
    assert engine.tick(DEADLINE + 50) == []
    assert engine.next_deadline() is None


def test_all_answered_below_quorum_retries_at_once():
    engine = make()
    online(engine, "a", "b", "c")
    engine.update_stored("a", 1, 1.0)
    engine.site_declined("b", 1, 2.0)
    actions = engine.site_declined("c", 1, 3.0)
    assert len(actions) == 1
    assert isinstance(actions[0], RetryRound)
    assert actions[0].round == 1


def test_deadline_with_quorum_aggregates_despite_offline_site():
    engine = make()
    online(engine, "a", "b", "c")
    assert engine.site_offline("c", 5.0) == []  # does not answer, but is not waited for
    engine.update_stored("a", 1, 10.0)
    assert engine.update_stored("b", 1, 20.0) == []  # c has not answered yet
    assert engine.tick(DEADLINE - 0.001) == []
    assert engine.tick(DEADLINE) == [Aggregate(1, ("a", "b"))]


def test_deadline_below_quorum_retries_after_delay_and_keeps_stored_updates():
    engine = make()
    online(engine, "a", "b", "c")
    engine.update_stored("a", 1, 10.0)
    actions = engine.tick(DEADLINE)
    assert actions == [
        RetryRound(1, "1 of the quorum of 2 sites reported before the deadline"),
    ]
    assert engine.open is None
    assert engine.next_deadline() == DEADLINE + RETRY
    # no new attempt before the retry delay, whatever happens
    assert engine.tick(DEADLINE + RETRY - 0.001) == []
    assert engine.site_online("d", DEADLINE + 1) == []
    # the new attempt keeps a's stored update: a is selected but not invited again
    actions = engine.tick(DEADLINE + RETRY)
    assert actions[0] == OpenRound(1, ("a", "b", "c", "d"), DEADLINE + RETRY + DEADLINE)
    assert invited(actions) == ["b", "c", "d"]
    assert engine.open is not None and engine.open.reported == {"a"}
    # one more update reaches the quorum together with the kept one
    engine.site_declined("c", 1, DEADLINE + 10)
    engine.site_declined("d", 1, DEADLINE + 11)
    assert engine.update_stored("b", 1, DEADLINE + 12) == [Aggregate(1, ("a", "b"))]


def test_site_coming_online_during_open_round_is_added_and_invited():
    engine = make()
    online(engine, "a", "b", "c")
    assert engine.site_online("d", 3.0) == [InviteSite("d", 1)]
    assert engine.open is not None and "d" in engine.open.selected
    # d must now answer too before the round closes early
    for site in ("a", "b", "c"):
        engine.update_stored(site, 1, 4.0)
    assert engine.open.aggregating is False
    assert engine.site_declined("d", 1, 5.0) == [Aggregate(1, ("a", "b", "c"))]


def test_reconnecting_site_that_already_reported_is_not_invited_again():
    engine = make()
    online(engine, "a", "b", "c")
    engine.update_stored("a", 1, 1.0)
    engine.site_offline("a", 2.0)
    assert engine.site_online("a", 3.0) == []


def test_updates_and_declines_for_the_wrong_round_are_ignored():
    engine = make()
    online(engine, "a", "b", "c")
    assert engine.update_stored("a", 2, 1.0) == []
    assert engine.update_stored("b", 0, 1.0) == []
    assert engine.site_declined("c", 2, 1.0) == []
    assert engine.open is not None
    assert engine.open.reported == set()
    assert engine.open.declined == set()
    # before any round is open, updates are ignored as well
    fresh = make()
    assert fresh.update_stored("a", 1, 1.0) == []


# -- after aggregation ---------------------------------------------------------------------


def _aggregate_round(engine: RoundEngine, rnd: int, now: float) -> None:
    engine.update_stored("a", rnd, now)
    engine.update_stored("b", rnd, now)
    assert engine.update_stored("c", rnd, now) == [Aggregate(rnd, ("a", "b", "c"))]


def test_commit_moves_to_next_round_and_finishes_after_last():
    engine = make(rounds=2)
    online(engine, "a", "b", "c")
    _aggregate_round(engine, 1, 10.0)
    actions = engine.aggregate_committed(1, 11.0)
    assert actions[0] == OpenRound(2, ("a", "b", "c"), 11.0 + DEADLINE)
    assert invited(actions) == ["a", "b", "c"]
    assert engine.current_round == 2
    _aggregate_round(engine, 2, 20.0)
    assert engine.aggregate_committed(2, 21.0) == [FinishRun(2)]
    assert engine.finished
    # quiet from now on
    assert engine.tick(1e9) == []
    assert engine.site_online("z", 1e9) == []
    assert engine.site_offline("a", 1e9) == []
    assert engine.update_stored("a", 2, 1e9) == []
    assert engine.update_stored("a", 3, 1e9) == []
    assert engine.aggregate_committed(2, 1e9) == []
    assert engine.next_deadline() is None


def test_commit_of_a_round_not_being_aggregated_is_ignored():
    engine = make()
    online(engine, "a", "b", "c")
    assert engine.aggregate_committed(2, 1.0) == []
    assert engine.current_round == 1


def test_commit_waits_for_min_sites_before_the_next_round():
    engine = make()
    online(engine, "a", "b", "c")
    _aggregate_round(engine, 1, 10.0)
    engine.site_offline("c", 11.0)
    assert engine.aggregate_committed(1, 12.0) == []
    assert engine.current_round == 2
    assert engine.next_deadline() is None
    assert engine.site_online("c", 13.0)[0] == OpenRound(2, ("a", "b", "c"), 13.0 + DEADLINE)


def test_aggregate_failed_retries_the_round_after_the_delay():
    engine = make()
    online(engine, "a", "b", "c")
    _aggregate_round(engine, 1, 10.0)
    assert engine.aggregate_failed(1, "disk full", 11.0) == [RetryRound(1, "disk full")]
    assert engine.aggregate_failed(1, "again", 11.0) == []  # nothing open any more
    assert engine.next_deadline() == 11.0 + RETRY
    assert engine.tick(11.0 + RETRY - 0.001) == []
    actions = engine.tick(11.0 + RETRY)
    assert actions[0].round == 1 and isinstance(actions[0], OpenRound)


def test_aggregate_failed_keeps_the_updates_already_stored():
    """The server answers a re-sent update that is already stored with UpdateAccepted and
    does not feed it to the engine again, so the engine must remember it itself."""
    engine = make()
    online(engine, "a", "b", "c")
    _aggregate_round(engine, 1, 10.0)
    engine.aggregate_failed(1, "disk full", 11.0)
    actions = engine.tick(11.0 + RETRY)
    assert invited(actions) == []
    assert actions[-1] == Aggregate(1, ("a", "b", "c"))


def test_without_carried_updates_a_failed_attempt_invites_every_site_again():
    """Secure aggregation keeps no update: a retried attempt needs fresh masked updates from
    every site, so none counts as already reported."""
    engine = make(carry_updates=False)
    online(engine, "a", "b", "c")
    _aggregate_round(engine, 1, 10.0)
    engine.aggregate_failed(1, "too few survivors", 11.0)
    actions = engine.tick(11.0 + RETRY)
    assert invited(actions) == ["a", "b", "c"]
    assert not any(isinstance(a, Aggregate) for a in actions)


# -- restart -------------------------------------------------------------------------------


def test_restart_resumes_with_stored_updates():
    engine = make(current_round=2, reported={"a"})
    online(engine, "a", "b")
    actions = engine.site_online("c", 50.0)
    assert actions[0] == OpenRound(2, ("a", "b", "c"), 50.0 + DEADLINE)
    assert invited(actions) == ["b", "c"]
    assert engine.open is not None and engine.open.reported == {"a"}
    assert engine.site_declined("c", 2, 51.0) == []
    assert engine.update_stored("b", 2, 52.0) == [Aggregate(2, ("a", "b"))]


def test_restart_with_every_update_stored_aggregates_at_once():
    engine = make(current_round=2, reported={"a", "b", "c"})
    online(engine, "a", "b")
    actions = engine.site_online("c", 50.0)
    assert actions == [
        OpenRound(2, ("a", "b", "c"), 50.0 + DEADLINE),
        Aggregate(2, ("a", "b", "c")),
    ]


def test_restart_of_a_finished_run_stays_quiet():
    engine = make(finished=True)
    assert online(engine, "a", "b", "c") == []
    assert engine.tick(1e9) == []


# -- next_deadline ------------------------------------------------------------------------


def test_next_deadline_values():
    engine = make()
    assert engine.next_deadline() is None  # nothing to wait for
    online(engine, "a", "b", "c", now=3.0)
    assert engine.next_deadline() == 3.0 + DEADLINE
    engine.site_online("d", 40.0)  # joining does not move the deadline
    assert engine.next_deadline() == 3.0 + DEADLINE
    engine.tick(3.0 + DEADLINE)  # nobody reported: retry
    assert engine.next_deadline() == 3.0 + DEADLINE + RETRY


def test_next_deadline_is_none_once_the_retry_delay_is_over_without_sites():
    """A retry delay that has passed is nothing to wake up for; the server sleeps until
    ``next_deadline()``, so a stale time in the past would make it spin."""
    engine = make()
    online(engine, "a", "b", "c")
    engine.tick(DEADLINE)  # retry
    engine.site_offline("c", DEADLINE + 1)
    assert engine.tick(DEADLINE + RETRY) == []
    assert engine.next_deadline() is None
    # and after a later successful round as well
    engine.site_online("c", 200.0)
    _aggregate_round(engine, 1, 210.0)
    engine.site_offline("c", 211.0)
    assert engine.aggregate_committed(1, 212.0) == []
    assert engine.next_deadline() is None


# -- property ------------------------------------------------------------------------------

SITES = ["a", "b", "c", "d"]

events = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["online", "offline"]), st.sampled_from(SITES)),
        st.tuples(
            st.sampled_from(["update", "decline"]),
            st.sampled_from(SITES),
            st.integers(min_value=-1, max_value=1),  # round offset from the current one
        ),
        st.tuples(st.just("tick"), st.floats(min_value=0, max_value=2 * DEADLINE)),
        st.tuples(st.sampled_from(["commit", "fail"])),
    ),
    min_size=20,
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(
    events=events,
    quorum=st.integers(min_value=1, max_value=3),
    min_sites=st.integers(min_value=1, max_value=4),
    rounds=st.integers(min_value=1, max_value=4),
)
def test_engine_invariants(events, quorum, min_sites, rounds):
    engine = make(rounds=rounds, quorum=quorum, min_sites=min_sites)
    now = 0.0
    pending: int | None = None  # the round being aggregated by the "adapter"
    committed: list[int] = []
    # Updates on disk, per round. Like the server, the model adapter reports each update
    # to the engine once: a re-sent update that is already stored is not reported again.
    stored: dict[int, set[str]] = {}
    finished = False

    def check(actions: list) -> None:
        nonlocal pending, finished
        assert not finished or actions == [], "actions after FinishRun"
        for action in actions:
            if isinstance(action, Aggregate):
                assert len(action.sites) >= quorum
                assert action.sites == tuple(sorted(set(action.sites)))
                assert set(action.sites) <= stored.get(action.round, set())
                assert pending is None, "a second Aggregate while one is pending"
                assert action.round not in committed, "a round aggregated twice"
                assert action.round == len(committed) + 1, "rounds go up by one"
                pending = action.round
            elif isinstance(action, OpenRound):
                assert action.round == len(committed) + 1
            elif isinstance(action, InviteSite):
                assert action.round == len(committed) + 1
                assert action.site_id not in stored.get(action.round, set())
            elif isinstance(action, FinishRun):
                assert committed == list(range(1, rounds + 1))
                finished = True

    for event in events:
        kind = event[0]
        if kind == "online":
            check(engine.site_online(event[1], now))
        elif kind == "offline":
            check(engine.site_offline(event[1], now))
        elif kind in ("update", "decline"):
            rnd = engine.current_round + event[2]
            if kind == "update" and event[1] not in stored.get(rnd, set()):
                state = engine.open
                if state is not None and state.round == rnd and not state.aggregating:
                    stored.setdefault(rnd, set()).add(event[1])
                elif state is None and rnd == engine.current_round and not engine.finished:
                    # the server stores an update for the current round even before the round
                    # (re)opens, e.g. right after a coordinator restart
                    stored.setdefault(rnd, set()).add(event[1])
                check(engine.update_stored(event[1], rnd, now))
            elif kind == "decline":
                check(engine.site_declined(event[1], rnd, now))
        elif kind == "tick":
            now += event[1]
            check(engine.tick(now))
        elif kind == "commit" and pending is not None:
            rnd, pending = pending, None
            committed.append(rnd)
            check(engine.aggregate_committed(rnd, now))
        elif kind == "fail" and pending is not None:
            rnd, pending = pending, None
            actions = engine.aggregate_failed(rnd, "disk", now)
            assert actions == [RetryRound(rnd, "disk")]
            check(actions)
        if engine.open is not None and not engine.open.aggregating:
            # the engine counts every stored update of its round
            assert engine.open.reported == stored.get(engine.open.round, set())
        deadline = engine.next_deadline()  # never a time already past: the server would spin
        assert deadline is None or engine.open is not None or deadline > now
    assert committed == list(range(1, len(committed) + 1))


def test_an_update_stored_before_the_round_reopens_counts_when_it_opens():
    """After a restart a site may offer the update it trained offline before enough sites are
    back for the round to open: it must count, not be lost (found by the e2e restart test)."""
    engine = make(rounds=3, quorum=2, min_sites=2, current_round=2)
    assert engine.site_online("a", 0.0) == []  # one site: round 2 cannot open yet
    assert engine.update_stored("a", 2, 0.1) == []  # stored at once by the server
    actions = engine.site_online("b", 0.2)
    assert OpenRound(2, ("a", "b"), 0.2 + DEADLINE) in actions
    assert InviteSite("b", 2) in actions and InviteSite("a", 2) not in actions
    assert engine.update_stored("b", 2, 0.3) == [Aggregate(2, ("a", "b"))]
