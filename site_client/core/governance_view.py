"""What the Governance page shows and the decisions it forwards, as plain values and blocking
calls (no Qt), so that every rule it applies is tested here.

Theory of operation
-------------------
:func:`load_governance_view` reads one snapshot of the site's governance record: the current
charter, every plan offered with its plain-language summary
(:func:`site_client.core.plan_summary.summarise`) and its check against the site policy
(:func:`shared.governance.policy.plan_refusals`), the policy itself and the history of
acceptances, decisions and policy changes. The page shows it and forwards intent to
:func:`accept_charter`, :func:`decide_plan` and :func:`save_policy`, each of which opens the
record, does one thing and closes it (a SQLite connection belongs to the worker thread that
opened it), signing with the site key where a person's decision is recorded.

The rules the page applies before anything is signed live here too, so the page and the
services cannot disagree: :func:`decision_problem` (a name is needed, a refusal needs a reason,
a plan below the site policy cannot be approved; checked again against the policy as it is at
the moment of signing, which may have changed since the page was drawn) and
:func:`parse_policy_form` (the policy form's text fields, each checked by the same
``SitePolicy`` rules the participant enforces, all problems reported at once, per field).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.crypto.keys import load_private_key
from shared.errors import GovernanceError
from shared.governance.policy import SitePolicy, plan_refusals
from shared.plan import TrainingPlan
from shared.privacy import dp_sgd
from shared.protocol.messages import CharterSignature, PlanDecision
from site_client.core.activity import ActivityEntry, open_governance, timeline
from site_client.core.config import SiteDir
from site_client.core.governance import CharterOffer, PlanRecord
from site_client.core.plan_summary import PlanSummary, summarise

__all__ = [
    "HISTORY_KINDS",
    "GovernanceView",
    "PlanPrivacy",
    "PlanView",
    "PolicyForm",
    "accept_charter",
    "charter_status",
    "decide_plan",
    "decision_problem",
    "load_governance_view",
    "parse_policy_form",
    "person_problem",
    "plan_privacy",
    "plan_view",
    "policy_form",
    "privacy_refusals",
    "save_policy",
    "training_images",
]

#: The kinds of activity the Governance page lists as its history.
HISTORY_KINDS = frozenset({"charter_accepted", "plan_approved", "plan_refused", "policy_changed"})
_DECISION_WORDS = {"pending": "waiting for a decision", "approve": "approved", "refuse": "refused"}


def _date(at: float) -> str:
    return f"{datetime.fromtimestamp(at):%d %B %Y, %H:%M}"


# -- plans ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlanPrivacy:
    """The protections a plan asks for, as the policy check and the summary need them."""

    epsilon: float | None  # total budget of the run at this site; None: no DP, or not known
    delta: float | None
    secure_aggregation: bool
    per_example: bool = False  # DP-SGD: the budget depends on this site's number of images


def plan_privacy(plan: TrainingPlan, num_samples: int | None = None) -> PlanPrivacy:
    """What ``plan`` promises about privacy.

    ``epsilon`` is what the whole run costs this site under the plan's client-level
    differential privacy (``TrainingPlan.epsilon``: the accountant's figure for ``rounds``
    Gaussian mechanisms at sample rate 1, at ``dp.delta``), ``None`` when the plan adds no
    noise. Under example-level DP-SGD it is the accountant's figure for ``rounds`` rounds of
    ``local_epochs * ceil(N / batch_size)`` steps at sample rate ``batch_size / N``, with N
    (``num_samples``) this site's number of training images, and ``None`` while N is not
    known. The summary, the policy check, the Governance page, ``tessera-site plan show``
    and the participant's refusals all read it from here.
    """
    if isinstance(plan.dp, dp_sgd.ExampleDP):
        epsilon = None
        if num_samples:
            epsilon = dp_sgd.run_epsilon(
                plan.dp,
                batch_size=plan.batch_size,
                local_epochs=plan.local_epochs,
                num_samples=num_samples,
                rounds=plan.rounds,
            )
        return PlanPrivacy(
            epsilon=epsilon,
            delta=plan.dp.delta,
            secure_aggregation=plan.secure_aggregation,
            per_example=True,
        )
    return PlanPrivacy(
        epsilon=plan.epsilon,
        delta=None if plan.dp is None else plan.dp.delta,
        secure_aggregation=plan.secure_aggregation,
    )


@dataclass(frozen=True, slots=True)
class PlanView:
    record: PlanRecord
    summary: PlanSummary
    refusals: tuple[str, ...]  # why the plan is below the site policy; empty if it is not

    @property
    def plan_hash(self) -> str:
        return self.record.plan_hash

    @property
    def name(self) -> str:
        return self.record.plan.name

    @property
    def title(self) -> str:
        return f"'{self.name}' ({self.plan_hash[:12]})"

    @property
    def meets_policy(self) -> bool:
        return not self.refusals

    @property
    def can_approve(self) -> bool:
        return self.meets_policy and self.record.decision != "approve"

    @property
    def can_refuse(self) -> bool:
        return self.record.decision != "refuse"

    def short_status(self) -> str:
        """For the list of plans: "approved by Dr. Ada Byron", "waiting for a decision",
        "below this site's policy"."""
        r = self.record
        words = _DECISION_WORDS.get(r.decision, r.decision)
        if r.decision == "pending" or not r.person:
            return words if self.meets_policy else "below this site's policy"
        return f"{words} by {r.person}"

    def status(self) -> str:
        """In full: "refused by Dr. Ada Byron on 03 May 2025, 14:02: too many rounds"."""
        r = self.record
        words = _DECISION_WORDS.get(r.decision, r.decision)
        if r.decision == "pending" or r.decided_at is None:
            return words + ("" if self.meets_policy else " (below this site's policy)")
        text = f"{words} by {r.person} on {_date(r.decided_at)}"
        return text + (f": {r.reason}" if r.reason else "")


def training_images(activity: list[dict[str, Any]]) -> int | None:
    """This site's number of training images when it last trained (the ``training_images``
    notes in its record), ``None`` before its first round: what a DP-SGD plan's epsilon here
    is computed for."""
    for entry in reversed(activity):
        if entry["kind"] == "training_images":
            return int(entry["detail"]["num_samples"])
    return None


def privacy_refusals(policy: SitePolicy, privacy: PlanPrivacy) -> list[str]:
    """``plan_refusals`` for what ``privacy`` says. A DP-SGD plan whose epsilon is not known
    yet (this site has not counted its training images) is judged on the rest; its epsilon
    is checked against the cap before each round's update leaves the site
    (``GovernanceLink.charge_trained``), so the cap holds either way."""
    unknown = privacy.per_example and privacy.epsilon is None
    return plan_refusals(
        policy,
        epsilon=0.0 if unknown else privacy.epsilon,
        delta=privacy.delta,
        secure_aggregation=privacy.secure_aggregation,
    )


def plan_view(record: PlanRecord, policy: SitePolicy, num_samples: int | None = None) -> PlanView:
    """``num_samples``: this site's number of training images, when known (DP-SGD plans)."""
    privacy = plan_privacy(record.plan, num_samples)
    summary = summarise(
        record.plan,
        epsilon=privacy.epsilon,
        delta=privacy.delta,
        secure_aggregation=privacy.secure_aggregation,
        per_example=privacy.per_example,
    )
    refusals = privacy_refusals(policy, privacy)
    return PlanView(record=record, summary=summary, refusals=tuple(refusals))


# -- the snapshot --------------------------------------------------------------------------


def charter_status(charter: CharterOffer | None, earlier_accepted: bool = False) -> str:
    """Where the site stands with the current charter, in a sentence or two."""
    if charter is None:
        return (
            "No charter has been received from the coordinator yet. It arrives the next time "
            "this site connects."
        )
    if charter.accepted_by and charter.accepted_at is not None:
        return (
            f"Version {charter.version} was accepted and signed by {charter.accepted_by} on "
            f"{_date(charter.accepted_at)}."
        )
    again = (
        " An earlier version was accepted; a new version needs a new signature."
        if earlier_accepted
        else ""
    )
    return (
        f"Version {charter.version} has not been accepted yet. This site takes part in no "
        f"run until someone here accepts it.{again}"
    )


@dataclass(frozen=True, slots=True)
class GovernanceView:
    """Everything the Governance page shows, read at one moment."""

    charter: CharterOffer | None
    charter_status: str
    plans: tuple[PlanView, ...]  # newest offer first
    policy: SitePolicy
    history: tuple[ActivityEntry, ...]  # acceptances, decisions, policy changes; newest first

    def plan(self, plan_hash: str) -> PlanView | None:
        return next((p for p in self.plans if p.plan_hash == plan_hash), None)


def load_governance_view(site_dir: SiteDir) -> GovernanceView:
    """One snapshot of the governance record (a blocking call, for the task runner)."""
    governance = open_governance(site_dir)
    try:
        charter = governance.charter()
        earlier = charter is not None and any(
            (c := governance.charter(v)) is not None and c.accepted_by
            for v in range(1, charter.version)
        )
        policy = governance.policy()
        records = governance.plans()
        rows = governance.activity()
    finally:
        governance.close()
    images = training_images(rows)
    plans = tuple(plan_view(r, policy, images) for r in reversed(records))
    names = {r.plan_hash: r.plan.name for r in records}
    history = tuple(e for e in timeline(rows, (), names) if e.kind in HISTORY_KINDS)
    return GovernanceView(
        charter=charter,
        charter_status=charter_status(charter, earlier),
        plans=plans,
        policy=policy,
        history=history,
    )


# -- decisions -----------------------------------------------------------------------------


def person_problem(person: str) -> str | None:
    """Why ``person`` cannot sign (``None``: fine). The record keeps the name with the
    signature, so it must say who decided."""
    name = " ".join(person.split())
    if not name:
        return "Type your name first: it is recorded and signed with your decision."
    if len(name) > 200:
        return "Shorten the name to at most 200 characters."
    return None


def _decision_check(
    approve: bool, reason: str, person: str, refusals: tuple[str, ...] | list[str]
) -> tuple[str, str] | None:
    problem = person_problem(person)
    if problem:
        return "governance.person_required", problem
    if approve and refusals:
        return "governance.below_policy", (
            "This plan is below this site's policy and cannot be approved: " + " ".join(refusals)
        )
    if not approve and not reason.strip():
        return "governance.reason_required", (
            "Say why the plan is refused: the reason is signed and sent to the consortium lead."
        )
    return None


def decision_problem(
    *, approve: bool, reason: str, person: str, refusals: tuple[str, ...] | list[str] = ()
) -> str | None:
    """Why this decision cannot be signed as it stands (``None``: it can): a name is needed,
    a plan below the site policy (``refusals``) cannot be approved, a refusal needs a reason."""
    found = _decision_check(approve, reason, person, refusals)
    return None if found is None else found[1]


def _site_key(site_dir: SiteDir) -> Ed25519PrivateKey:
    return load_private_key(site_dir.key_file)


def accept_charter(site_dir: SiteDir, version: int, person: str, *, now: float) -> CharterSignature:
    """Sign charter ``version`` as ``person`` with the site key and record it."""
    problem = person_problem(person)
    if problem:
        raise GovernanceError(problem, code="governance.person_required")
    key = _site_key(site_dir)
    governance = open_governance(site_dir)
    try:
        return governance.accept_charter(version, person, key, now)
    finally:
        governance.close()


def decide_plan(
    site_dir: SiteDir, plan_hash: str, *, approve: bool, reason: str, person: str, now: float
) -> PlanDecision:
    """Approve or refuse a plan as ``person``, signed with the site key. The policy check is
    made again here, against the policy as it is now."""
    governance = open_governance(site_dir)
    try:
        record = governance.plan(plan_hash)
        if record is None:
            raise GovernanceError(
                f"plan {plan_hash[:12]} has not been received from the coordinator",
                code="governance.unknown_plan",
            )
        images = training_images(governance.activity())
        refusals = plan_view(record, governance.policy(), images).refusals if approve else ()
        found = _decision_check(approve, reason, person, refusals)
        if found is not None:
            raise GovernanceError(found[1], code=found[0])
        key = _site_key(site_dir)
        return governance.decide_plan(
            plan_hash, approve=approve, reason=reason, person=person, key=key, now=now
        )
    finally:
        governance.close()


# -- the policy form -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyForm:
    """The policy form as typed: empty ``max_epsilon`` means "differential privacy not
    required", empty ``training_hours`` means "any time"; ``cpu_percent`` is 1-100."""

    require_secure_aggregation: bool
    max_epsilon: str
    max_delta: str
    training_hours: str
    cpu_percent: int


def policy_form(policy: SitePolicy) -> PolicyForm:
    return PolicyForm(
        require_secure_aggregation=policy.require_secure_aggregation,
        max_epsilon="" if policy.max_epsilon is None else f"{policy.max_epsilon:g}",
        max_delta=f"{policy.max_delta:g}",
        training_hours=policy.training_hours or "",
        cpu_percent=round(policy.cpu_share * 100),
    )


def _number(text: str, what: str) -> float:
    try:
        value = float(text.strip().replace(",", "."))
    except ValueError:
        raise GovernanceError(
            f"{what} must be a number, like 3 or 0.5; not {text.strip()!r}.",
            code="governance.policy_invalid",
        ) from None
    if not math.isfinite(value):
        raise GovernanceError(f"{what} must be a finite number.", code="governance.policy_invalid")
    return value


def parse_policy_form(form: PolicyForm) -> SitePolicy:
    """The policy the form describes, or ``GovernanceError`` whose ``fields["errors"]`` maps
    each field that is wrong to what to change (the message lists them all)."""
    values: dict[str, Any] = {"require_secure_aggregation": form.require_secure_aggregation}
    errors: dict[str, str] = {}

    def check(name: str, parse: Callable[[], Any]) -> None:
        try:
            value = parse()
            SitePolicy(**{name: value})  # the same rule the participant applies
        except GovernanceError as exc:
            errors[name] = exc.message
        else:
            values[name] = value

    check(
        "max_epsilon",
        lambda: (
            _number(form.max_epsilon, "The largest privacy budget (epsilon)")
            if form.max_epsilon.strip()
            else None
        ),
    )
    check(
        "max_delta",
        lambda: _number(form.max_delta, "delta") if form.max_delta.strip() else 1e-5,
    )
    check("training_hours", lambda: form.training_hours.replace(" ", "") or None)
    check("cpu_share", lambda: form.cpu_percent / 100)
    if errors:
        raise GovernanceError(
            " ".join(errors.values()), code="governance.policy_invalid", errors=errors
        )
    return SitePolicy(**values)


def save_policy(site_dir: SiteDir, policy: SitePolicy, *, now: float) -> SitePolicy:
    governance = open_governance(site_dir)
    try:
        governance.set_policy(policy, now)
        return governance.policy()
    finally:
        governance.close()
