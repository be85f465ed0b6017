"""What each side signs, built in one place so both sides sign the very same fields.

Signatures cover digests and identifiers, never whole payloads (DESIGN.md, performance).
The TLS certificate fingerprint is part of the authentication and enrolment fields, which
binds the signature to the pinned channel: a relay with another certificate cannot reuse it.
"""

from __future__ import annotations

from typing import Any

AUTH = "auth"
CHARTER = "charter"
CHARTER_ACCEPT = "charter.accept"
DISPUTE = "dispute"
PLAN_DECISION = "plan.decision"
VALIDATION = "validation"
ENROL = "enrol"
MODEL = "model"
FINAL_MODEL = "model.final"
HE_KEY_ACK = "he.key_ack"
HE_KEY_REQUEST = "he.key_request"
HE_PUBLIC_KEY = "he.public_key"
HE_SEALED_KEY = "he.sealed_key"
PLAN = "plan"
RELEASE = "release"
RELEASE_ACCEPTANCE = "release.acceptance"
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


def charter_accept_fields(
    *, federation: str, site_id: str, version: int, sha256: str, person: str
) -> dict[str, Any]:
    """Signed by a site when a person there accepts a charter version."""
    return {
        "federation": federation,
        "site_id": site_id,
        "version": version,
        "sha256": sha256,
        "person": person,
    }


def plan_decision_fields(
    *, federation: str, site_id: str, plan_hash: str, decision: str, reason: str, person: str
) -> dict[str, Any]:
    """Signed by a site when a person there approves or refuses a plan."""
    return {
        "federation": federation,
        "site_id": site_id,
        "plan_hash": plan_hash,
        "decision": decision,
        "reason": reason,
        "person": person,
    }


def validation_fields(
    *, run_id: str, round: int, site_id: str, model: str, metrics: dict[str, Any]
) -> dict[str, Any]:
    """Signed by a site with the metrics of its local validation of a global model."""
    return {
        "run_id": run_id,
        "round": round,
        "site_id": site_id,
        "model": model,
        "metrics": metrics,
    }


def plan_fields(*, plan_hash: str) -> dict[str, Any]:
    return {"plan_hash": plan_hash}


def model_fields(*, run_id: str, round: int, plan_hash: str, sha256: str) -> dict[str, Any]:
    return {"run_id": run_id, "round": round, "plan_hash": plan_hash, "sha256": sha256}


def final_model_fields(*, run_id: str, rounds: int, plan_hash: str, sha256: str) -> dict[str, Any]:
    """Signed by the coordinator for the model a finished run produced."""
    return {"run_id": run_id, "rounds": rounds, "plan_hash": plan_hash, "sha256": sha256}


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


def release_entry_fields(
    *,
    federation: str,
    version: str,
    run_id: str,
    plan_hash: str,
    architecture: str,
    architecture_version: str,
    model: str,
    weights_sha256: str,
    model_card_sha256: str,
    model_card_html_sha256: str,
) -> dict[str, Any]:
    """What a model release consists of, as the coordinator logs it (``release_published``).

    ``model`` is the digest of the run's final weights as the log recorded them
    (``run_finished``); ``weights_sha256`` the SHA-256 of the release's weights file, which
    carries the same tensors with the release's metadata; the model card is hashed as JSON and
    as the HTML page people read.
    """
    return {
        "federation": federation,
        "version": version,
        "run_id": run_id,
        "plan_hash": plan_hash,
        "architecture": architecture,
        "architecture_version": architecture_version,
        "model": model,
        "weights_sha256": weights_sha256,
        "model_card_sha256": model_card_sha256,
        "model_card_html_sha256": model_card_html_sha256,
    }


def release_fields(
    *, entry: dict[str, Any], tree_head_size: int, tree_head_root: str
) -> dict[str, Any]:
    """Signed by the coordinator (purpose ``release``): the release as logged
    (:func:`release_entry_fields`) and the tree head that covers that log entry."""
    return {**entry, "tree_head_size": tree_head_size, "tree_head_root": tree_head_root}


def dispute_fields(
    *,
    federation: str,
    site_id: str,
    dispute_id: str,
    subject: str,
    run_id: str,
    round: int,
    release: str,
    reason: str,
    person: str,
) -> dict[str, Any]:
    """Signed by a site that raises a dispute."""
    return {
        "federation": federation,
        "site_id": site_id,
        "dispute_id": dispute_id,
        "subject": subject,
        "run_id": run_id,
        "round": round,
        "release": release,
        "reason": reason,
        "person": person,
    }


def release_acceptance_fields(
    *,
    federation: str,
    site_id: str,
    version: str,
    run_id: str,
    weights_sha256: str,
    accepted: bool,
    metrics: dict[str, Any],
    reason: str,
    person: str,
) -> dict[str, Any]:
    """Signed by a site that verified a release and ran its acceptance validation: metrics
    only, and whether it accepts the release (a refusal says why)."""
    return {
        "federation": federation,
        "site_id": site_id,
        "version": version,
        "run_id": run_id,
        "weights_sha256": weights_sha256,
        "accepted": accepted,
        "metrics": metrics,
        "reason": reason,
        "person": person,
    }


# --- homomorphic-encryption key distribution (coordinator.he_keys, site_client.core.he_keys_site)


def he_key_request_fields(
    *, run_id: str, attempt: str, key_site: str, site_keys: dict[str, str]
) -> dict[str, Any]:
    """Signed by the coordinator (purpose ``he.key_request``): the run's sites with their
    Ed25519 keys, against which sites check each other, and the one that makes the key."""
    return {"run_id": run_id, "attempt": attempt, "key_site": key_site, "site_keys": site_keys}


def he_public_key_fields(
    *, run_id: str, attempt: str, site_id: str, public_key: str
) -> dict[str, Any]:
    """Signed by a site (purpose ``he.public_key``): its fresh X25519 key for one attempt."""
    return {"run_id": run_id, "attempt": attempt, "site_id": site_id, "public_key": public_key}


def he_sealed_key_fields(
    *,
    run_id: str,
    attempt: str,
    recipient: str,
    key_site_public: str,
    public_context_sha256: str,
    key_id: str,
    sealed_sha256: str,
) -> dict[str, Any]:
    """Signed by the key site (purpose ``he.sealed_key``): digests of the public context and
    of the sealed blob, never the ~550 KB blob itself."""
    return {
        "run_id": run_id,
        "attempt": attempt,
        "recipient": recipient,
        "key_site_public": key_site_public,
        "public_context_sha256": public_context_sha256,
        "key_id": key_id,
        "sealed_sha256": sealed_sha256,
    }


def he_key_ack_fields(
    *, run_id: str, attempt: str, site_id: str, public_context_sha256: str, key_id: str
) -> dict[str, Any]:
    """Signed by a site (purpose ``he.key_ack``) once it opened the key whose public context
    has this digest."""
    return {
        "run_id": run_id,
        "attempt": attempt,
        "site_id": site_id,
        "public_context_sha256": public_context_sha256,
        "key_id": key_id,
    }
