"""The round engine: which sites train, when a round closes, when a run ends. Pure.

Theory of operation: the engine holds the state of one run's current round and is driven by
the server adapter with what happened (a site came online or went away, an update was
stored, a site declined, time passed) plus ``now``. It answers with actions for the adapter to
carry out (persist and invite, aggregate, retry, finish). It never does I/O and never reads a
clock, so every decision is unit-tested with plain numbers.

Rules (DESIGN.md, issue 2):

- A round opens when at least ``max(quorum, min_sites)`` eligible sites are online; every
  online site is selected. A site that comes online while the round is open and has not
  reported is added and invited (a restarted site resumes).
- The round closes as soon as every selected site has answered (update or decline) or the
  deadline passes. With at least ``quorum`` updates it is aggregated; otherwise it is retried:
  a new attempt, after ``retry_delay_s``, with a fresh deadline that keeps the updates
  already stored.
- After the last round's aggregate is committed the run is finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class InviteSite:
    site_id: str
    round: int


@dataclass(frozen=True, slots=True)
class OpenRound:
    round: int
    selected: tuple[str, ...]
    deadline: float


@dataclass(frozen=True, slots=True)
class Aggregate:
    round: int
    sites: tuple[str, ...]  # sites whose stored updates go into the aggregate


@dataclass(frozen=True, slots=True)
class RetryRound:
    round: int
    reason: str


@dataclass(frozen=True, slots=True)
class FinishRun:
    rounds: int


Action = InviteSite | OpenRound | Aggregate | RetryRound | FinishRun


@dataclass(slots=True)
class RoundState:
    round: int
    selected: set[str]
    deadline: float
    reported: set[str] = field(default_factory=set)
    declined: set[str] = field(default_factory=set)
    aggregating: bool = False


class RoundEngine:
    def __init__(
        self,
        *,
        rounds: int,
        quorum: int,
        min_sites: int,
        deadline_s: float,
        retry_delay_s: float = 5.0,
        current_round: int = 1,
        reported: set[str] | None = None,
        finished: bool = False,
        carry_updates: bool = True,
    ) -> None:
        self.rounds = rounds
        self.quorum = quorum
        self.min_sites = max(min_sites, quorum)
        self.deadline_s = deadline_s
        self.retry_delay_s = retry_delay_s
        self._not_before = float("-inf")  # after a failed attempt, wait before the next
        self.current_round = current_round
        self.finished = finished
        # Secure aggregation keeps no update, and a retried attempt needs fresh masks from
        # every site: nothing is carried into the next attempt then.
        self.carry_updates = carry_updates
        self.online: set[str] = set()
        self.open: RoundState | None = None
        # Updates already on disk for the current round (after a restart) count as reported.
        self._carried = set(reported or ())

    # -- inputs --------------------------------------------------------------------------

    def site_online(self, site_id: str, now: float) -> list[Action]:
        self.online.add(site_id)
        state = self.open
        if state is not None and not state.aggregating and site_id not in state.reported:
            state.selected.add(site_id)
            state.declined.discard(site_id)
            return [InviteSite(site_id, state.round)]
        return self.tick(now)

    def site_offline(self, site_id: str, now: float) -> list[Action]:
        self.online.discard(site_id)
        return self.tick(now)

    def update_stored(self, site_id: str, rnd: int, now: float) -> list[Action]:
        state = self.open
        if state is None:
            # Stored before the round (re)opened: a site that trained while the coordinator
            # was down offers its update as soon as it is back. It counts when the round opens.
            if rnd == self.current_round and not self.finished:
                self._carried.add(site_id)
            return self.tick(now)
        if rnd != state.round or state.aggregating:
            return []
        state.reported.add(site_id)
        state.selected.add(site_id)
        return self.tick(now)

    def site_declined(self, site_id: str, rnd: int, now: float) -> list[Action]:
        state = self.open
        if state is None or rnd != state.round or site_id in state.reported:
            return []
        state.declined.add(site_id)
        return self.tick(now)

    def tick(self, now: float) -> list[Action]:
        if self.finished:
            return []
        state = self.open
        if state is None:
            if now < self._not_before:
                return []
            self._not_before = float("-inf")  # the wait is over: nothing left to wake up for
            if len(self.online) < self.min_sites:
                return []
            selected = set(self.online) | self._carried
            self.open = RoundState(
                round=self.current_round,
                selected=selected,
                deadline=now + self.deadline_s,
                reported=set(self._carried),
            )
            self._carried = set()
            actions: list[Action] = [
                OpenRound(self.current_round, tuple(sorted(selected)), now + self.deadline_s)
            ]
            actions += [
                InviteSite(s, self.current_round) for s in sorted(self.online - self.open.reported)
            ]
            # A restart may find every update already stored.
            return actions + self.tick(now)
        if state.aggregating:
            return []
        answered = state.reported | state.declined
        if answered >= state.selected or now >= state.deadline:
            if len(state.reported) >= self.quorum:
                state.aggregating = True
                return [Aggregate(state.round, tuple(sorted(state.reported)))]
            reason = (
                f"{len(state.reported)} of the quorum of {self.quorum} sites reported "
                "before the deadline"
            )
            self._carried = set(state.reported) if self.carry_updates else set()
            self.open = None
            self._not_before = now + self.retry_delay_s
            return [RetryRound(state.round, reason)]
        return []

    def aggregate_committed(self, rnd: int, now: float) -> list[Action]:
        """The adapter stored round ``rnd``'s new global model."""
        if self.open is None or self.open.round != rnd:
            return []
        self.open = None
        if rnd >= self.rounds:
            self.finished = True
            return [FinishRun(rnd)]
        self.current_round = rnd + 1
        return self.tick(now)

    def aggregate_failed(self, rnd: int, reason: str, now: float) -> list[Action]:
        """Aggregation could not be done (e.g. a disk error): retry the round."""
        if self.open is None or self.open.round != rnd:
            return []
        # The updates stay stored, and the server does not report a re-sent stored update
        # again, so the next attempt must count them itself.
        self._carried = set(self.open.reported) if self.carry_updates else set()
        self.open = None
        self._not_before = now + self.retry_delay_s
        return [RetryRound(rnd, reason)]

    def next_deadline(self) -> float | None:
        """When ``tick`` next has something to decide, if anything."""
        if self.open is None:
            return self._not_before if self._not_before > float("-inf") else None
        if self.open.aggregating:
            return None
        return self.open.deadline
