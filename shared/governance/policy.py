"""A site's policy: the floor every plan must meet before anyone at the site is asked to approve it.

The hospital sets it once (privacy floor, secure aggregation required, the largest privacy
budget it will spend, the hours when training may run, the share of the machine it may use);
each plan is checked against it and a plan below it is refused with reasons a person can read
and act on. The checks are pure: the caller passes the plan's epsilon (from the accountant) and
the local time, so they are unit-tested with plain values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from shared.errors import GovernanceError

_HOURS = re.compile(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)")


def _policy_error(message: str) -> GovernanceError:
    return GovernanceError(message, code="governance.policy_invalid")


@dataclass(frozen=True, slots=True, kw_only=True)
class SitePolicy:
    """``max_epsilon``: the largest (epsilon, delta)-DP budget one run may spend here; ``None``
    means the site does not require differential privacy. ``training_hours``: ``"HH:MM-HH:MM"``
    local time (may wrap past midnight), ``None`` for any time. ``cpu_share``: fraction of this
    machine's cores local training may use."""

    require_secure_aggregation: bool = False
    max_epsilon: float | None = None
    max_delta: float = 1e-5
    training_hours: str | None = None
    cpu_share: float = 0.5

    def __post_init__(self) -> None:
        if self.max_epsilon is not None and not (
            math.isfinite(self.max_epsilon) and self.max_epsilon > 0
        ):
            raise _policy_error(
                f"The largest privacy budget must be a number above 0, not {self.max_epsilon}."
            )
        if not (0 < self.max_delta < 1):
            raise _policy_error(f"delta must be between 0 and 1, not {self.max_delta}.")
        if self.training_hours is not None and not _HOURS.fullmatch(self.training_hours):
            raise _policy_error(
                f"Training hours {self.training_hours!r} must look like 19:00-07:00 (24-hour "
                "clock, local time)."
            )
        if not (0 < self.cpu_share <= 1):
            raise _policy_error(
                f"The share of the CPU must be above 0 and at most 1, not {self.cpu_share}."
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SitePolicy:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise _policy_error(f"Unknown policy settings: {', '.join(unknown)}.")
        return cls(**dict(data))

    def threads(self, cpu_count: int) -> int:
        """Training threads this policy allows on a machine with ``cpu_count`` cores."""
        return max(1, math.floor(max(1, cpu_count) * self.cpu_share))

    def may_train_at(self, minute_of_day: int) -> bool:
        """Whether local time ``minute_of_day`` (0..1439) is inside the training hours."""
        if self.training_hours is None:
            return True
        m = _HOURS.fullmatch(self.training_hours)
        assert m is not None
        start = int(m[1]) * 60 + int(m[2])
        end = int(m[3]) * 60 + int(m[4])
        if start == end:
            return True
        if start < end:
            return start <= minute_of_day < end
        return minute_of_day >= start or minute_of_day < end


def plan_refusals(
    policy: SitePolicy,
    *,
    epsilon: float | None,
    delta: float | None = None,
    secure_aggregation: bool = False,
) -> list[str]:
    """Why a plan is below ``policy`` (empty: it meets the floor).

    ``epsilon``/``delta``: the privacy budget the whole run would spend at this site (from the
    accountant), ``None`` if the plan uses no differential privacy. ``secure_aggregation``:
    whether the coordinator would only ever see the sum of updates.
    """
    reasons = []
    if policy.require_secure_aggregation and not secure_aggregation:
        reasons.append(
            "This hospital requires secure aggregation (the coordinator may only see the sum "
            "of all hospitals' updates), and this plan does not use it."
        )
    if policy.max_epsilon is not None:
        if epsilon is None:
            reasons.append(
                "This hospital requires differential privacy with a budget of at most "
                f"epsilon {policy.max_epsilon:g}, and this plan uses none."
            )
        elif epsilon > policy.max_epsilon:
            reasons.append(
                f"This plan would spend a privacy budget of epsilon {epsilon:.2f}, more than "
                f"the {policy.max_epsilon:g} this hospital allows."
            )
        if delta is not None and delta > policy.max_delta:
            reasons.append(
                f"This plan's delta {delta:g} is above this hospital's limit of "
                f"{policy.max_delta:g}."
            )
    return reasons
