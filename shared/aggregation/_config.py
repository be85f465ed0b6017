"""Checks shared by the strategy config objects: one message style, one error code.

A bad setting is a plan problem (the plan chose it), so it raises ``PlanError`` with code
``plan.invalid`` and a message naming the setting, what it must be and what it was.
"""

from __future__ import annotations

import math
from typing import Any

from shared.errors import PlanError


def invalid(name: str, allowed: str, value: Any) -> PlanError:
    return PlanError(
        f"Aggregation setting {name!r} must be {allowed}; got {value!r}. Correct it in the plan.",
        code="plan.invalid",
        field=name,
    )


def number(
    name: str,
    value: Any,
    *,
    low: float,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = True,
) -> float:
    """``value`` as a float if it is a finite real in the interval, else ``plan.invalid``."""
    lo = "(" if low_open else "["
    if high is None:
        allowed = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        allowed = f"a number in {lo}{low:g}, {high:g}{')' if high_open else ']'}"
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise invalid(name, allowed, value)
    v = float(value)
    if v < low or (low_open and v == low):
        raise invalid(name, allowed, value)
    if high is not None and (v > high or (high_open and v == high)):
        raise invalid(name, allowed, value)
    return v


def choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise invalid(name, "one of " + ", ".join(repr(c) for c in choices), value)
    return value
