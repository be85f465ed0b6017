"""The participant's governance duties, kept out of its connection loop (sans-I/O).

What the site must do on the wire, decided from its own record (:mod:`.governance`):

- on a ``GovernanceNotice``: keep the offered charter and plans (after checking the
  coordinator's signatures), refuse on the site's behalf any plan below the site policy (signed,
  with the policy's reasons, so the consortium lead reads why), and send every acceptance or
  decision a person made here that the coordinator does not hold yet;
- before training: train only for an approved plan hash, only inside the training hours, and
  only if the round keeps the plan's privacy budget at this site within the policy's epsilon
  cap; each round this site commits to is charged to that budget (``privacy_spent`` notes in
  the record, one per round, from which the ``PrivacyBudget`` is rebuilt); under DP-SGD
  (example-level DP) a round's cost depends on the site's number of training images and the
  steps it took, so it is charged once trained, before its update may leave
  (:meth:`GovernanceLink.charge_trained`), and the site's last count of its training images
  (``training_images`` notes) gives the plan's epsilon for the policy check;
- on a ``HeadUpdate``: accept the new tree head only if it extends the last one this site saw
  (else stop taking part: history was rewritten) and check that each of this site's accepted
  updates is in the log exactly as it sent it;
- after a round: sign the metrics of its validation of the global model.

Methods take ``now`` and return messages; the participant sends them.
"""

from __future__ import annotations

import datetime
import json
import math
import uuid
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.crypto.signing import sign
from shared.errors import GovernanceError, PlanError, PrivacyBudgetExceeded, TesseraError
from shared.governance.policy import SitePolicy
from shared.plan import TrainingPlan
from shared.privacy import dp_sgd
from shared.privacy.accountant import PrivacyBudget, SampledGaussian
from shared.privacy.client_dp import ClientDP, round_mechanism
from shared.protocol import signed
from shared.protocol.messages import (
    Dispute,
    GovernanceNotice,
    HeadRequest,
    HeadUpdate,
    Message,
    UpdateOffer,
    ValidationReport,
)
from shared.provenance.errors import ProvenanceError
from shared.provenance.log import LogEntry, TreeHead
from site_client.core.config import SiteConfig
from site_client.core.governance import SiteGovernance
from site_client.core.governance_view import plan_privacy, privacy_refusals, training_images

POLICY_PERSON = "Site policy (automatic)"
MAX_PROOFS = 64


@dataclass(frozen=True, slots=True)
class StandingApprovals:
    """Decisions a person made in advance for an unattended site (``tessera-site run
    --approve-as NAME --accept-charter SHA256 --approve-plan HASH``): the exact charter text
    and plan, named by their hashes (sent by the consortium lead), are accepted under that
    person's name when they are offered. Anything else still waits for a person."""

    person: str
    charters: frozenset[str] = frozenset()  # SHA-256 of accepted charter texts
    plans: frozenset[str] = frozenset()  # approved plan hashes


class GovernanceLink:
    def __init__(
        self,
        record: SiteGovernance,
        config: SiteConfig,
        key: Ed25519PrivateKey,
        standing: StandingApprovals | None = None,
    ):
        self.record = record
        self.config = config
        self.key = key
        self.standing = standing

    # -- notices -------------------------------------------------------------------------

    def on_notice(self, notice: GovernanceNotice, now: float) -> list[Message]:
        out: list[Message] = []
        if notice.charter_version:
            if notice.charter_text:
                self.record.record_charter(
                    notice.charter_version,
                    notice.charter_sha256,
                    notice.charter_text,
                    notice.charter_signature,
                    now,
                )
            mine = self.record.charter_signature(notice.charter_version)
            standing = self.standing
            if (
                mine is None
                and standing is not None
                and notice.charter_sha256 in standing.charters
                and self.record.charter(notice.charter_version) is not None
            ):
                mine = self.record.accept_charter(
                    notice.charter_version, standing.person, self.key, now
                )
            if mine is not None and not notice.charter_signed:
                out.append(mine)
        policy = self.record.policy()
        for item in notice.plans:
            try:
                plan = self.record.record_plan(
                    item["plan_hash"], item["plan"], item["plan_signature"], now
                )
            except PlanError as exc:
                self.record.note(
                    "plan_unrunnable", now, plan_hash=item["plan_hash"], reason=exc.message
                )
                continue
            local = self.record.plan(item["plan_hash"])
            assert local is not None
            if local.decision == "pending":
                reasons = self._refusals(policy, plan)
                if reasons:
                    out.append(
                        self.record.decide_plan(
                            item["plan_hash"],
                            approve=False,
                            reason=" ".join(reasons),
                            person=POLICY_PERSON,
                            key=self.key,
                            now=now,
                        )
                    )
                    continue
                if self.standing is not None and item["plan_hash"] in self.standing.plans:
                    self.record.decide_plan(
                        item["plan_hash"],
                        approve=True,
                        reason="",
                        person=self.standing.person,
                        key=self.key,
                        now=now,
                    )
            decision = self.record.plan_decision(item["plan_hash"])
            if decision is not None and decision.decision != item["decision"]:
                out.append(decision)
        return out

    def pending_decisions(self) -> list[Message]:
        """Every signed acceptance and decision, to send after a reconnect (the coordinator
        records each once; repeats are harmless)."""
        out: list[Message] = []
        charter = self.record.charter()
        if charter is not None:
            mine = self.record.charter_signature(charter.version)
            if mine is not None:
                out.append(mine)
        for plan in self.record.plans():
            decision = self.record.plan_decision(plan.plan_hash)
            if decision is not None:
                out.append(decision)
        return out

    # -- invitations ---------------------------------------------------------------------

    def refusal(
        self,
        plan_hash: str,
        now: float,
        *,
        run_id: str | None = None,
        rnd: int | None = None,
    ) -> tuple[str, str] | None:
        """Why this site must not train for ``plan_hash`` now (code, reason), or ``None``.

        ``None`` for a plan with differential privacy charges the round to the plan's budget
        here (the site trains and sends a noised update next). Without ``run_id`` and ``rnd``
        every call that says yes is charged, which can only overstate what was spent; with
        them a round already charged is not charged again (an update sent again is the same
        noised update, no new release).
        """
        record = self.record.plan(plan_hash)
        if record is None or record.decision == "pending":
            return (
                "governance.plan_not_approved",
                f"plan {plan_hash[:12]} is waiting for approval at this site",
            )
        if record.decision != "approve":
            return (
                "governance.plan_refused",
                f"this site refused plan {plan_hash[:12]}: {record.reason}",
            )
        policy = self.record.policy()
        reasons = self._refusals(policy, record.plan)
        if reasons:
            return "governance.below_policy", " ".join(reasons)
        local = datetime.datetime.fromtimestamp(now)
        if not policy.may_train_at(local.hour * 60 + local.minute):
            return (
                "governance.outside_hours",
                f"this site trains only between {policy.training_hours} (its policy)",
            )
        return self._charge(record.plan, plan_hash, now, run_id, rnd)

    def _refusals(self, policy: SitePolicy, plan: TrainingPlan) -> list[str]:
        return privacy_refusals(policy, plan_privacy(plan, self.training_images()))

    def training_images(self) -> int | None:
        """This site's number of training images when it last trained (``None``: never)."""
        return training_images(self.record.activity())

    def privacy_budget(self, plan_hash: str) -> PrivacyBudget | None:
        """The plan's privacy budget at this site: the policy's cap (no cap: infinite) at the
        plan's delta, and the rounds charged so far. ``None`` for a plan without DP."""
        record = self.record.plan(plan_hash)
        if record is None or record.plan.dp is None:
            return None
        dp = record.plan.dp
        cap = self.record.policy().max_epsilon
        spent = [a for a in self._spent() if a["plan_hash"] == plan_hash]
        return PrivacyBudget(
            cap=math.inf if cap is None else cap,
            delta=dp.delta,
            spent_rounds=tuple(
                round_mechanism(dp)
                if isinstance(dp, ClientDP)
                else SampledGaussian(
                    noise_multiplier=dp.noise_multiplier,
                    sample_rate=float(a["sample_rate"]),
                    steps=int(a["steps"]),
                )
                for a in spent
            ),
        )

    def _spent(self) -> list[dict[str, Any]]:
        return [a["detail"] for a in self.record.activity() if a["kind"] == "privacy_spent"]

    def _charge(
        self, plan: TrainingPlan, plan_hash: str, now: float, run_id: str | None, rnd: int | None
    ) -> tuple[str, str] | None:
        budget = self.privacy_budget(plan_hash)
        if budget is None or plan.dp is None:
            return None
        if isinstance(plan.dp, dp_sgd.ExampleDP):
            return self._example_preview(plan, plan.dp, budget)  # charged once trained
        if run_id is not None and rnd is not None:
            for spent in self._spent():
                if (spent["plan_hash"], spent.get("run_id"), spent.get("round")) == (
                    plan_hash,
                    run_id,
                    rnd,
                ):
                    return None  # this round's noised update was already made and counted
        try:
            after = budget.charge(round_mechanism(plan.dp))
        except PrivacyBudgetExceeded as exc:
            return exc.code, exc.message
        self.record.note(
            "privacy_spent",
            now,
            plan_hash=plan_hash,
            run_id=run_id,
            round=rnd,
            noise_multiplier=plan.dp.noise_multiplier,
            sample_rate=1.0,
            delta=plan.dp.delta,
            epsilon=after.spent,
        )
        return None

    def _example_preview(
        self, plan: TrainingPlan, dp: dp_sgd.ExampleDP, budget: PrivacyBudget
    ) -> tuple[str, str] | None:
        """Refuse, before training, a DP-SGD round that would pass the cap with as many
        images as this site had last time (the charge itself waits for the steps taken)."""
        images = self.training_images()
        if images is None:
            return None
        steps = dp_sgd.steps_per_round(plan.local_epochs, plan.batch_size, images)
        mechanism = dp_sgd.round_mechanism(
            dp, batch_size=plan.batch_size, num_samples=images, steps=steps
        )
        try:
            budget.charge(mechanism)
        except PrivacyBudgetExceeded as exc:
            return exc.code, exc.message
        return None

    def charge_trained(
        self,
        plan_hash: str,
        now: float,
        *,
        run_id: str,
        rnd: int,
        num_samples: int,
        steps: int,
    ) -> tuple[str, str] | None:
        """After local training, before its update may leave: note the site's number of
        training images, and under DP-SGD charge the round (``steps`` steps at sample rate
        ``batch_size / num_samples``) to the plan's budget here. Returns (code, reason) when
        that would pass the policy's cap: the update must then be discarded, unsent. A round
        already charged is not charged again (its update is the one sent again)."""
        if num_samples >= 1 and self.training_images() != num_samples:
            self.record.note("training_images", now, num_samples=num_samples)
        record = self.record.plan(plan_hash)
        budget = self.privacy_budget(plan_hash)
        if record is None or budget is None or not isinstance(record.plan.dp, dp_sgd.ExampleDP):
            return None
        plan, dp = record.plan, record.plan.dp
        for spent in self._spent():
            if (spent["plan_hash"], spent.get("run_id"), spent.get("round")) == (
                plan_hash,
                run_id,
                rnd,
            ):
                return None
        mechanism = dp_sgd.round_mechanism(
            dp, batch_size=plan.batch_size, num_samples=num_samples, steps=steps
        )
        try:
            after = budget.charge(mechanism)
        except PrivacyBudgetExceeded as exc:
            return exc.code, exc.message
        self.record.note(
            "privacy_spent",
            now,
            plan_hash=plan_hash,
            run_id=run_id,
            round=rnd,
            noise_multiplier=dp.noise_multiplier,
            sample_rate=mechanism.sample_rate,
            steps=steps,
            delta=dp.delta,
            epsilon=after.spent,
        )
        return None

    def threads(self, cpu_count: int) -> int:
        return self.record.policy().threads(cpu_count)

    # -- the log -------------------------------------------------------------------------

    def contributed(self, offer: UpdateOffer, now: float) -> None:
        """The coordinator acknowledged this update: check for it in the log later."""
        self.record.note(
            "update_accepted",
            now,
            run_id=offer.run_id,
            round=offer.round,
            digest=offer.update_offer.sha256,
            signature=offer.signature,
            num_samples=offer.num_samples,
        )

    def _unverified(self) -> list[dict[str, Any]]:
        verified = {
            (a["detail"]["run_id"], a["detail"]["round"])
            for a in self.record.activity()
            if a["kind"] == "contribution_verified"
        }
        return [
            a["detail"]
            for a in self.record.activity()
            if a["kind"] == "update_accepted"
            and (a["detail"]["run_id"], a["detail"]["round"]) not in verified
        ][-MAX_PROOFS:]

    def head_request(self) -> HeadRequest:
        head = self.record.witness().head
        return HeadRequest(
            known_size=head.size if head else 0,
            updates=[{"run_id": u["run_id"], "round": u["round"]} for u in self._unverified()],
        )

    def on_head_update(self, msg: HeadUpdate, now: float) -> int | None:
        """Accept the new head or raise ``ProvenanceError``; returns how many of this site's
        updates were newly proven to be in the log as sent, or ``None`` for the answer to an
        older request whose proof starts before the head this site now holds (ask again)."""
        witness = self.record.witness()
        try:
            head = TreeHead.from_dict(msg.head)
        except TesseraError as exc:
            raise ProvenanceError(
                f"The coordinator sent a damaged tree head: {exc}",
                code="provenance.bad_head",
            ) from exc
        last = witness.head
        if (
            last is not None
            and msg.known_size != last.size
            and (head.size, head.root) != (last.size, last.root)
        ):
            return None
        witness.observe(head, [bytes.fromhex(h) for h in msg.consistency])
        self.record.save_witness(witness, now)
        expected = {(u["run_id"], u["round"]): u for u in self._unverified()}
        proven = 0
        for item in msg.inclusions:
            entry = LogEntry.from_dict(item["entry"])
            p = entry.payload
            mine = expected.get((p.get("run_id"), p.get("round")))
            if mine is None or p.get("site_id") != self.config.site_id:
                continue
            if p.get("digest") != mine["digest"] or p.get("signature") != mine["signature"]:
                raise ProvenanceError(
                    f"The coordinator's log records this site's update for round {p.get('round')}"
                    " differently from what the site sent. Stop taking part in this federation "
                    "and contact the consortium lead.",
                    code="provenance.misrecorded",
                )
            witness.check_inclusion(entry, [bytes.fromhex(h) for h in item["proof"]], head)
            self.record.note(
                "contribution_verified",
                now,
                run_id=p["run_id"],
                round=p["round"],
                index=entry.index,
                tree_size=head.size,
            )
            proven += 1
        return proven

    # -- validation ----------------------------------------------------------------------

    def validated(self, run_id: str, rnd: int) -> bool:
        """Whether this site already reported its validation of (run, round)."""
        return any(
            a["kind"] == "validation_reported"
            and a["detail"].get("run_id") == run_id
            and a["detail"].get("round") == rnd
            for a in self.record.activity()
        )

    def validation_report(
        self, run_id: str, rnd: int, model: str, metrics: dict[str, Any], now: float
    ) -> ValidationReport:
        metrics = json.loads(json.dumps(metrics))  # plain JSON numbers, as they will be signed
        fields = signed.validation_fields(
            run_id=run_id, round=rnd, site_id=self.config.site_id, model=model, metrics=metrics
        )
        report = ValidationReport(
            run_id=run_id,
            round=rnd,
            model=model,
            metrics=metrics,
            signature=sign(self.key, signed.VALIDATION, fields),
        )
        self.record.note(
            "validation_reported", now, run_id=run_id, round=rnd, model=model, metrics=metrics
        )
        return report


def raise_dispute(
    link: GovernanceLink,
    *,
    subject: str,
    run_id: str,
    rnd: int,
    release: str,
    reason: str,
    person: str,
    now: float,
) -> Dispute:
    """Sign and keep a dispute on a round, a release or this site's recorded contribution;
    the participant sends it (again on every connection: the coordinator records each id
    once)."""
    if not reason.strip():
        raise GovernanceError(
            "say what is disputed and why; the reason is sent to the consortium lead",
            code="governance.reason_required",
        )
    if not person.strip():
        raise GovernanceError(
            "give the name of the person raising the dispute", code="governance.person_required"
        )
    if (subject == "round" and rnd < 1) or (subject == "release" and not release):
        raise GovernanceError(
            "name the round (--round N) or the release (--release X.Y) that is disputed",
            code="governance.dispute_subject",
        )
    body = {
        "dispute_id": "d-" + uuid.uuid4().hex[:16],
        "subject": subject,
        "run_id": run_id,
        "round": rnd,
        "release": release,
        "reason": " ".join(reason.split()),
        "person": " ".join(person.split()),
    }
    fields = signed.dispute_fields(
        federation=link.config.federation, site_id=link.config.site_id, **body
    )
    message = Dispute(**body, signature=sign(link.key, signed.DISPUTE, fields))
    link.record.note("dispute_raised", now, **message.body())
    return message


def pending_disputes(link: GovernanceLink) -> list[Dispute]:
    return [Dispute(**a["detail"]) for a in link.record.activity() if a["kind"] == "dispute_raised"]


__all__ = ["POLICY_PERSON", "GovernanceLink", "StandingApprovals"]
