"""What each side signs, built in one place so both sides sign the very same fields.

Signatures cover digests and identifiers, never whole payloads (DESIGN.md, performance).
The TLS certificate fingerprint is part of the authentication and enrolment fields, which
binds the signature to the pinned channel: a relay with another certificate cannot reuse it.
"""

from __future__ import annotations

from typing import Any

AUTH = "auth"
CHARTER = "charter"
ENROL = "enrol"
MODEL = "model"
PLAN = "plan"
UPDATE = "update"


def auth_fields(*, nonce: str, site_id: str, fingerprint: str) -> dict[str, Any]:
    return {"nonce": nonce, "site_id": site_id, "fingerprint": fingerprint}


def enrol_fields(
    *, nonce: str, token: str, public_key: str, site_name: str, fingerprint: str
) -> dict[str, Any]:
    return {
        "nonce": nonce,
        "token": token,
        "public_key": public_key,
        "site_name": site_name,
        "fingerprint": fingerprint,
    }


def charter_fields(*, federation: str, version: int, sha256: str) -> dict[str, Any]:
    """Signed by the coordinator when it publishes a charter and by a site that accepts it."""
    return {"federation": federation, "version": version, "sha256": sha256}


def plan_fields(*, plan_hash: str) -> dict[str, Any]:
    return {"plan_hash": plan_hash}


def model_fields(*, run_id: str, round: int, plan_hash: str, sha256: str) -> dict[str, Any]:
    return {"run_id": run_id, "round": round, "plan_hash": plan_hash, "sha256": sha256}


def update_fields(
    *,
    run_id: str,
    round: int,
    site_id: str,
    plan_hash: str,
    base_model: str,
    sha256: str,
    num_samples: int,
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "round": round,
        "site_id": site_id,
        "plan_hash": plan_hash,
        "base_model": base_model,
        "sha256": sha256,
        "num_samples": num_samples,
    }
