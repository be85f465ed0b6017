"""A demo model release for the screenshots, signed by their throwaway coordinator key.

The site never makes releases (the coordinator does, and the site app must not import it), so
the screenshots assemble one from the shared release format: a demo plan's model with its
initial weights, a model card with demo figures, a one-entry provenance log in memory whose
signed tree head covers the release entry, and the signed manifest. It passes
:func:`shared.releases.verify_release` exactly as a real release does, so the Models page
shows it through its real code path. The figures in the card are illustrative, and the card
says so.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared import releases as layout
from shared.crypto.signing import sign
from shared.models.registry import build_model
from shared.models.state import model_arrays
from shared.plan import TrainingPlan
from shared.protocol import signed
from shared.provenance.log import ProvenanceLog
from shared.tensors import encode_tensors, tensor_digest

__all__ = ["write_demo_release"]

_SITES = (  # (site, scanner, images, AUC on its held-out patients)
    ("Demo General Hospital", "Acme XR-100", 48, 0.86),
    ("North Valley Clinic", "Borealis DR-7", 36, 0.81),
    ("St. Example Infirmary", "Acme XR-100", 52, 0.88),
)


def _card(
    federation: str, version: str, run_id: str, plan: TrainingPlan, charter_sha: str
) -> dict[str, Any]:
    label = plan.label_column
    sites, perf, participants = [], [], []
    by_scanner: dict[str, int] = {}
    for name, scanner, n, auc in _SITES:
        sites.append(
            {"name": name, "images": n, "patients": n // 2, "studies": n}
            | {"by_scanner": {scanner: n}, "by_modality": {"DX": n}}
        )
        by_scanner[scanner] = by_scanner.get(scanner, 0) + n
        perf.append(
            {"name": name, "round": plan.rounds, "auc": auc, "accuracy": round(auc - 0.07, 2)}
            | {"sensitivity": round(auc - 0.1, 2), "specificity": round(auc - 0.04, 2)}
            | {"loss": round(1.2 - auc, 2), "n": n // 4}
        )
        participants.append(
            {"name": name, "rounds_invited": plan.rounds, "rounds_contributed": plan.rounds}
            | {"updates_accepted": plan.rounds, "samples": n * plan.rounds}
        )
    return {
        "format": layout.CARD_FORMAT,
        "federation": federation,
        "release_version": version,
        "run_id": run_id,
        "published_at": time.time(),
        "not_a_medical_device": layout.RESEARCH_USE,
        "intended_use": (
            f"Research on telling images with '{label}' = 1 from images with '{label}' = 0, "
            "by the sites of the consortium. Not for decisions about patients. (A demo "
            "release for the documentation: its figures are illustrative.)"
        ),
        "task": {
            "task": plan.task,
            "label_column": label,
            "labels": {"0": f"'{label}' absent", "1": f"'{label}' present"},
            "output": f"the probability that '{label}' is 1",
        },
        "model": {
            "architecture": plan.architecture,
            "architecture_version": plan.architecture_version,
            "input_size": plan.input_size,
            "preprocessing": dict(plan.preprocessing),
        },
        "training_data": {
            "note": "Counts from the data summaries the sites shared. No identifiers ever "
            "left a site.",
            "sites": sites,
            "by_scanner": by_scanner,
            "by_modality": {"DX": sum(n for _, _, n, _ in _SITES)},
        },
        "training": {"plan_hash": plan.plan_hash, "rounds": plan.rounds},
        "performance": {
            "note": "Each site evaluated the model on its own held-out images.",
            "sites": perf,
            "worst_site": min(perf, key=lambda r: r["auc"]),
        },
        "limitations": [
            "Trained on two scanner models only (Acme XR-100, Borealis DR-7).",
            "North Valley Clinic's held-out AUC is the lowest (0.81).",
        ],
        "privacy": {"statements": ["Only model updates and counts left each hospital."]},
        "participants": participants,
        "governance": {
            "plan_hash": plan.plan_hash,
            "plan_name": plan.name,
            "charter_version": 1,
            "charter_sha256": charter_sha,
        },
    }


def write_demo_release(
    out: Path,
    *,
    key: Ed25519PrivateKey,
    federation: str,
    plan: TrainingPlan,
    charter: str,
    version: str = "1.0",
    run_id: str = "run-3f9c2a71",
) -> Path:
    """Write a verifiable demo release of ``plan``'s initial model into ``out``."""
    model = build_model(
        plan.architecture,
        plan.architecture_version,
        input_size=plan.input_size,
        params=plan.architecture_params,
        seed=plan.seed,
    )
    arrays = model_arrays(model)
    charter_bytes = charter.encode("utf-8")
    parts = layout.release_parts(
        federation=federation,
        version=version,
        run_id=run_id,
        plan=plan,
        arrays=arrays,
        model_digest=tensor_digest(encode_tensors(arrays)),
        card=_card(federation, version, run_id, plan, hashlib.sha256(charter_bytes).hexdigest()),
    )
    weights, card, page, entry_fields = parts.weights, parts.card, parts.page, parts.entry
    log = ProvenanceLog()
    now = time.time()
    entry = log.append(layout.ENTRY_KIND, entry_fields, now)
    head = log.head(key, now)
    fields = signed.release_fields(
        entry=entry_fields, tree_head_size=head.size, tree_head_root=head.root
    )
    manifest = {
        "format": layout.FORMAT,
        "release": fields,
        "signature": sign(key, signed.RELEASE, fields),
    }
    provenance = {
        "tree_head": head.to_dict(),
        "entry": entry.to_dict(),
        "inclusion_proof": [h.hex() for h in log.inclusion(entry.index, head.size)],
    }
    files = {
        layout.MANIFEST: layout.json_bytes(manifest),
        layout.WEIGHTS: weights,
        layout.CARD_JSON: card,
        layout.CARD_HTML: page,
        layout.PLAN: layout.json_bytes(plan.to_dict()),
        layout.PROVENANCE: layout.json_bytes(provenance),
        layout.CHARTER: charter_bytes,
    }
    out.mkdir(parents=True, exist_ok=False)
    for name, data in files.items():
        (out / name).write_bytes(data)
    return out
