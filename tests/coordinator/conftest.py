"""A finished two-round run built through the coordinator's own operations (no network).

Real database, real blobs, real Ed25519 signatures by two site keys; the aggregation is a plain
mean of the two sites' weights, which is all the provenance checks care about.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from coordinator import governance
from coordinator.config import CoordinatorConfig
from coordinator.federation import Federation
from coordinator.store import UpdateRecord
from shared.crypto.keys import generate_signing_key, public_key_b64
from shared.crypto.signing import sign
from shared.identity.invitation import decode_invitation, token_digest
from shared.plan import TrainingPlan, demo_plan
from shared.protocol import signed
from shared.protocol.messages import CharterSignature, PlanDecision, ValidationReport
from shared.tensors import decode_tensors, encode_tensors

CHARTER = Path(__file__).parents[2] / "coordinator" / "templates" / "charter.md"


@dataclass
class FinishedRun:
    fed: Federation
    run_id: str
    site_ids: list[str]


def build_finished_run(root: Path, rounds: int = 2) -> FinishedRun:
    fed = Federation.init(
        root, CoordinatorConfig(federation="Audit test", host="127.0.0.1", port=8765), now=10.0
    )
    fed.publish_charter(CHARTER.read_bytes(), now=11.0)
    keys, site_ids = [], []
    for n, name in enumerate(["North Hospital", "South Clinic"]):
        key = generate_signing_key()
        token = decode_invitation(fed.invite(name, now=12.0 + n)).token
        site = fed.store.redeem_invitation(token_digest(token), public_key_b64(key), 20.0 + n)
        keys.append(key)
        site_ids.append(site.site_id)
    plan = TrainingPlan.from_dict({**demo_plan().to_dict(), "rounds": rounds, "input_size": 32})
    plan_hash = fed.add_plan(plan, now=30.0)
    run = fed.start_run(plan_hash, now=40.0)
    charter = fed.store.charter()
    for n, (key, site_id) in enumerate(zip(keys, site_ids, strict=True)):
        person = f"Dr. Reviewer {n}"
        fields = signed.charter_accept_fields(
            federation="Audit test",
            site_id=site_id,
            version=charter.version,
            sha256=charter.sha256,
            person=person,
        )
        governance.record_charter_signature(
            fed,
            site_id,
            CharterSignature(
                version=charter.version,
                sha256=charter.sha256,
                person=person,
                signature=sign(key, signed.CHARTER_ACCEPT, fields),
            ),
            now=41.0 + n,
        )
        fields = signed.plan_decision_fields(
            federation="Audit test",
            site_id=site_id,
            plan_hash=plan_hash,
            decision="approve",
            reason="",
            person=person,
        )
        governance.record_plan_decision(
            fed,
            site_id,
            PlanDecision(
                plan_hash=plan_hash,
                decision="approve",
                reason="",
                person=person,
                signature=sign(key, signed.PLAN_DECISION, fields),
            ),
            now=43.0 + n,
        )
    model = run.model_digest
    for rnd in range(1, rounds + 1):
        t = 100.0 * rnd
        fed.store.open_round(run.run_id, rnd, site_ids, model, t, t + 60)
        weights = decode_tensors(fed.blobs.get(model))
        updates = []
        for i, (key, site_id) in enumerate(zip(keys, site_ids, strict=True)):
            arrays = {k: v + np.float32(0.01 * (i + 1)) for k, v in weights.items()}
            digest = fed.blobs.put(encode_tensors(arrays))
            fields = signed.update_fields(
                run_id=run.run_id,
                round=rnd,
                site_id=site_id,
                plan_hash=plan_hash,
                base_model=model,
                sha256=digest,
                num_samples=50 + 10 * i,
            )
            fed.store.add_update(
                UpdateRecord(run.run_id, rnd, site_id, digest, 50 + 10 * i, 0.5, t + 10 + i),
                sign(key, signed.UPDATE, fields),
            )
            updates.append(arrays)
        mean = {k: (updates[0][k] + updates[1][k]) / np.float32(2) for k in weights}
        model = fed.blobs.put(encode_tensors(mean))
        fed.store.commit_round(run.run_id, rnd, model, 2, 0.5 / rnd, rnd == rounds, t + 30)
        for i, (key, site_id) in enumerate(zip(keys, site_ids, strict=True)):
            metrics = {
                "auc": 0.7 + 0.1 * rnd - 0.05 * i,
                "accuracy": 0.8,
                "sensitivity": 0.75,
                "specificity": 0.85,
                "loss": 0.4,
                "n": 20 + i,
            }
            fields = signed.validation_fields(
                run_id=run.run_id, round=rnd, site_id=site_id, model=model, metrics=metrics
            )
            governance.record_validation(
                fed,
                site_id,
                ValidationReport(
                    run_id=run.run_id,
                    round=rnd,
                    model=model,
                    metrics=metrics,
                    signature=sign(key, signed.VALIDATION, fields),
                ),
                now=t + 40 + i,
            )
    return FinishedRun(fed, run.run_id, site_ids)


@pytest.fixture
def finished_run(tmp_path):
    built = build_finished_run(tmp_path / "coord")
    yield built
    built.fed.close()
