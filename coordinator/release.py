"""``tessera-coordinator release RUN --version X.Y``: a signed model release of a finished run.

Theory of operation
-------------------
A release is the run's final weights with everything a site needs to judge and check them:
the model card (:func:`model_card`, as JSON and as a page: intended use, the research-use
statement, task and labels, training data as counts per site and scanner, performance per site
with the worst, known limitations, privacy protections, participants and their contributions),
the plan, the charter version, and proof that the release is in the federation's provenance
log. The folder's layout and the site's checks are in :mod:`shared.releases`.

Making one is a single transaction: the ``release_published`` entry (hashes of the weights
file and of the model card, JSON and HTML; run, plan, architecture, release version) is
appended to the log, a tree head covering it is signed, the manifest naming both is signed
(purpose ``release``), and a row of the ``releases`` table keeps the manifest and the card in
both forms; the weights file goes to the blob store first (content-addressed, so a rolled-back
release leaves only an unused blob). Everything in the folder can be rebuilt from the store
(:func:`release_files`), which is what the server will send to sites; :func:`may_receive` says
which sites may have it.

Versions are explicit and unique: ``MAJOR.MINOR`` chosen by the operator, never reused; the
architecture's name and version and the plan hash travel in the signed manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sqlite_utils

from coordinator.config import ConfigError
from coordinator.federation import Federation
from coordinator.heterogeneity import scanner_shift
from coordinator.store import RunRecord, Store
from coordinator.store_governance import CharterRecord
from shared import releases as layout
from shared.crypto.signing import sign, verify
from shared.errors import GovernanceError, ReleaseError, SignatureError
from shared.governance.contributions import contributions
from shared.plan import TrainingPlan
from shared.protocol import signed
from shared.protocol.messages import ReleaseAcceptance
from shared.provenance.log import LogEntry, TreeHead
from shared.tensors import decode_tensors

TABLE = "releases"
ACCEPTANCES = "release_acceptances"
ACCEPTED_KIND = "release_accepted"
_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "loss", "n")


@dataclass(frozen=True, slots=True)
class Release:
    """A published release: its signed manifest, where its log entry is and the head over it."""

    version: str
    run_id: str
    manifest: dict[str, Any]
    entry_index: int
    head: TreeHead
    out: Path | None = None

    @property
    def weights_sha256(self) -> str:
        return str(self.manifest["release"]["weights_sha256"])

    @property
    def model_card_sha256(self) -> str:
        return str(self.manifest["release"]["model_card_sha256"])


def _releases(store: Store) -> sqlite_utils.db.Table:
    """The ``releases`` table, created on first use (inside the caller's transaction)."""
    table = store.db.table(TABLE)
    table.create(
        {
            "version": str,
            "run_id": str,
            "plan_hash": str,
            "weights_blob": str,
            "model_card": str,
            "model_card_html": str,
            "manifest": str,
            "entry_index": int,
            "head_size": int,
            "published_at": float,
        },
        pk="version",
        if_not_exists=True,
    )
    return table


def _row(store: Store, version: str) -> dict[str, Any] | None:
    if not store.db[TABLE].exists():
        return None
    rows = list(store.db.table(TABLE).rows_where("version = ?", [version]))
    return dict(rows[0]) if rows else None


def releases(store: Store) -> list[Release]:
    """Every published release, oldest first."""
    if not store.db[TABLE].exists():
        return []
    return [_release(store, r) for r in store.db.table(TABLE).rows_where(order_by="published_at")]


def _release(store: Store, row: dict[str, Any], out: Path | None = None) -> Release:
    head = store.ledger.head(row["head_size"])
    assert head is not None, "a release row always has its head"
    return Release(
        version=row["version"],
        run_id=row["run_id"],
        manifest=json.loads(row["manifest"]),
        entry_index=row["entry_index"],
        head=head,
        out=out,
    )


# --- who may have it ----------------------------------------------------------------------


def may_receive(store: Store, run_id: str, site_id: str) -> bool:
    """Whether ``site_id`` took part in ``run_id``, and so may receive its releases.

    Taking part means at least one of the site's updates was aggregated into a round of the
    run, counted from the provenance log by the contribution ledger
    (:func:`shared.governance.contributions.contributions`): the same figure every party can
    recompute. A site that was invited but never contributed, enrolled later, or is unknown,
    may not; neither may anyone for a run that does not exist.
    """
    for c in contributions(store.ledger.log().entries, run_id):
        if c.site_id == site_id:
            return bool(c.rounds_contributed)
    return False


# --- the model card -----------------------------------------------------------------------


def _of_run(entries: tuple[LogEntry, ...], run_id: str, kind: str) -> list[LogEntry]:
    return [e for e in entries if e.kind == kind and e.payload.get("run_id") == run_id]


def _performance(
    entries: tuple[LogEntry, ...], run_id: str, names: dict[str, str]
) -> dict[str, Any]:
    """Each site's latest validation of the run (metrics only, as the sites signed them) and
    the worst site by AUC."""
    latest: dict[str, LogEntry] = {}
    for e in _of_run(entries, run_id, "validation_reported"):
        site = e.payload["site_id"]
        if site not in latest or e.payload["round"] >= latest[site].payload["round"]:
            latest[site] = e
    rows = []
    for site, e in sorted(latest.items()):
        metrics = e.payload.get("metrics", {})
        rows.append(
            {"site_id": site, "name": names.get(site, ""), "round": e.payload["round"]}
            | {m: metrics.get(m) for m in _METRICS}
        )
    scored = [r for r in rows if isinstance(r["auc"], int | float)]
    worst = min(scored, key=lambda r: (r["auc"], r["site_id"])) if scored else None
    return {
        "note": "Each site evaluated the model on its own held-out images and reported metrics "
        "only (never per-image results); the latest report of each site is shown.",
        "sites": rows,
        "worst_site": worst,
        "images": sum(int(r["n"]) for r in rows if isinstance(r["n"], int)),
    }


def _training_data(
    summaries: dict[str, dict[str, Any]], sites: list[str], names: dict[str, str]
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    by_scanner: dict[str, int] = {}
    by_modality: dict[str, int] = {}
    for site in sites:
        s = summaries.get(site)
        row: dict[str, Any] = {"site_id": site, "name": names.get(site, "")}
        if s is None:
            row |= {"images": None, "patients": None, "studies": None}
            row |= {"by_scanner": {}, "by_modality": {}}
        else:
            row |= {k: s.get(k) for k in ("images", "patients", "studies")}
            row |= {"by_scanner": dict(s.get("by_scanner", {}))}
            row |= {"by_modality": dict(s.get("by_modality", {}))}
            for name, n in row["by_scanner"].items():
                by_scanner[name] = by_scanner.get(name, 0) + int(n)
            for name, n in row["by_modality"].items():
                by_modality[name] = by_modality.get(name, 0) + int(n)
        rows.append(row)
    return {
        "note": "Counts from the data summaries the participating sites chose to share (all "
        "images each site had imported when it last shared one; training used the labelled "
        "ones). No identifiers ever left a site.",
        "sites": rows,
        "by_scanner": by_scanner,
        "by_modality": by_modality,
        "sites_without_summary": [r["site_id"] for r in rows if r["images"] is None],
    }


def _privacy(plan: TrainingPlan) -> dict[str, Any]:
    settings = plan.to_dict()
    secure = bool(settings.get("secure_aggregation"))
    dp = settings.get("differential_privacy") or settings.get("dp")
    statements = [
        "Images and patient identifiers never left any site: only model updates (weights), "
        "validation metrics and counts were sent.",
        "Every update travelled over TLS pinned to the coordinator's certificate and was signed "
        "by the site that made it; every step is in the signed provenance log.",
        "Secure aggregation: the coordinator saw only the sum of the sites' updates."
        if secure
        else "No secure aggregation in this plan: the coordinator saw each site's update.",
        f"Differential privacy: {dp}."
        if dp
        else "No differential privacy in this plan: no privacy budget (epsilon) was spent, and "
        "no formal guarantee against inference from the model is claimed.",
    ]
    if plan.max_update_norm is not None:
        statements.append(f"Updates with an L2 norm above {plan.max_update_norm} were refused.")
    epsilon = dp.get("epsilon") if isinstance(dp, dict) else None
    return {
        "secure_aggregation": secure,
        "differential_privacy": bool(dp),
        "epsilon_spent": epsilon,
        "statements": statements,
    }


def _limitations(
    plan: TrainingPlan, data: dict[str, Any], perf: dict[str, Any], shift: dict[str, Any]
) -> list[str]:
    out = []
    scanners = data["by_scanner"]
    if scanners:
        seen = ", ".join(f"{k} ({v} images)" for k, v in sorted(scanners.items()))
        modalities = ", ".join(sorted(data["by_modality"])) or "unknown"
        out.append(
            f"Trained on images from these scanners only: {seen}; modalities: {modalities}. "
            "On images from other scanners or modalities it may do worse: check it on your "
            "own held-out data before relying on it."
        )
    else:
        out.append(
            "No participating site shared a data summary, so which scanners and modalities the "
            "model was trained on is not known here."
        )
    if data["sites_without_summary"]:
        out.append(
            f"{len(data['sites_without_summary'])} participating site(s) shared no data "
            "summary; the training data counts above are incomplete."
        )
    if shift.get("level") in ("moderate", "strong"):
        out.append(f"Scanner shift between the sites: {shift['message']}")
    worst = perf["worst_site"]
    if worst is None:
        out.append("No site reported a validation of this run: its performance is unknown.")
    else:
        out.append(
            f"Validated on {perf['images']} held-out images at {len(perf['sites'])} site(s); "
            f"the worst site reached AUC {worst['auc']:.3f}. Small validation sets make these "
            "figures uncertain."
        )
    out += [
        f"Each image is reduced to {plan.input_size} x {plan.input_size} pixels (the middle "
        "frame of a multi-frame image); findings smaller than that resolution shows are "
        "invisible to it.",
        "The probability is not calibrated to any site's prevalence; the predicted label uses "
        "a fixed threshold of 0.5.",
        "Saliency maps (Grad-CAM) show which regions drove the output, not where a finding is; "
        "they are not a segmentation.",
    ]
    return out


def model_card(
    fed: Federation,
    run: RunRecord,
    plan: TrainingPlan,
    charter: CharterRecord | None,
    version: str,
    now: float,
) -> dict[str, Any]:
    """The model card of a release of ``run``, from the store and the provenance log (counts
    and metrics only). Model cards after Mitchell et al., FAT* 2019."""
    entries = fed.store.ledger.log().entries
    names = {s.site_id: s.name for s in fed.store.sites()}
    ledger = contributions(entries, run.run_id)
    participants = [c for c in ledger if c.rounds_contributed]
    summaries = fed.store.site_summaries()
    data = _training_data(summaries, [c.site_id for c in participants], names)
    perf = _performance(entries, run.run_id, names)
    shift = scanner_shift(
        {s: summaries[s] for s in (c.site_id for c in participants) if s in summaries}
    ).to_dict()
    arrays = decode_tensors(fed.blobs.get(run.model_digest))
    parameters = sum(
        int(np.prod(a.shape)) for k, a in arrays.items() if not k.endswith(("_mean", "_var"))
    )
    label = plan.label_column
    modalities = " or ".join(sorted(data["by_modality"])) or "medical"
    return {
        "format": layout.CARD_FORMAT,
        "federation": fed.config.federation,
        "release_version": version,
        "run_id": run.run_id,
        "published_at": now,
        "not_a_medical_device": layout.RESEARCH_USE,
        "intended_use": (
            f"Research on telling images with '{label}' = 1 from images with '{label}' = 0, "
            f"in {modalities} images like those it was trained on, by the sites of the "
            f"{fed.config.federation} consortium: to study how the model behaves on their own "
            "data. Not for decisions about patients."
        ),
        "task": {
            "task": plan.task,
            "label_column": label,
            "labels": {"0": f"'{label}' absent", "1": f"'{label}' present"},
            "output": f"the probability that '{label}' is 1 (sigmoid of the model's output); "
            "predicted label 1 when it is at least 0.5",
        },
        "model": {
            "architecture": plan.architecture,
            "architecture_version": plan.architecture_version,
            "architecture_params": dict(plan.architecture_params),
            "input_size": plan.input_size,
            "preprocessing": dict(plan.preprocessing),
            "parameters": parameters,
            "weights_digest": run.model_digest,
        },
        "training_data": data,
        "training": {
            "plan_hash": plan.plan_hash,
            "rounds": plan.rounds,
            "rounds_completed": len(_of_run(entries, run.run_id, "round_closed")),
            "aggregation": plan.aggregation,
            "local_epochs": plan.local_epochs,
            "optimiser": plan.optimiser,
            "learning_rate": plan.learning_rate,
            "batch_size": plan.batch_size,
            "seed": plan.seed,
        },
        "performance": perf,
        "limitations": _limitations(plan, data, perf, shift),
        "privacy": _privacy(plan),
        "participants": [c.to_dict() for c in ledger if c.rounds_invited or c.rounds_contributed],
        "governance": {
            "plan_hash": plan.plan_hash,
            "plan_name": plan.name,
            "charter_version": charter.version if charter else None,
            "charter_sha256": charter.sha256 if charter else None,
        },
    }


# --- making and reading releases ----------------------------------------------------------


def _finished_run(fed: Federation, run_id: str) -> RunRecord:
    runs = [r for r in fed.store.runs() if r.run_id == run_id or r.run_id.startswith(run_id)]
    if len(runs) != 1 or not run_id:
        raise ConfigError(
            f"no single run matches {run_id!r}; 'tessera-coordinator status' lists the runs",
            code="run.unknown",
        )
    if runs[0].status != "finished":
        raise ConfigError(
            f"run {runs[0].run_id} is {runs[0].status}; release it once it has finished",
            code="run.not_finished",
        )
    return runs[0]


def _check_out(out: Path | None) -> None:
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            f"{out} already exists and is not empty; choose a new folder for the release",
            code="release.out_exists",
        )


def make_release(
    fed: Federation,
    run_id: str,
    version: str,
    out: Path | None = None,
    now: float | None = None,
) -> Release:
    """Publish release ``version`` of the finished run ``run_id`` (a unique prefix is
    enough); with ``out``, also write its folder there (a new or empty folder).

    Raises ``ReleaseError`` for a malformed or already used version and ``ConfigError`` for a
    run that is unknown or not finished, or a used ``out`` folder; nothing is logged then.
    """
    layout.check_version(version)
    out = None if out is None else Path(out)
    _check_out(out)
    if _row(fed.store, version) is not None:
        raise _duplicate(version)
    run = _finished_run(fed, run_id)
    run_id = run.run_id
    now = time.time() if now is None else now
    plan = fed.plan(run.plan_hash)
    if plan.homomorphic:
        raise ConfigError(
            f"run {run_id} was trained with homomorphic encryption: its model is encrypted "
            "under the sites' key, which this coordinator never holds, so it cannot sign a "
            "release of the weights. Every site that took part holds the model and validated "
            "it on its own data.",
            code="release.encrypted",
        )
    charter = fed.store.charter()
    federation = fed.config.federation
    parts = layout.release_parts(
        federation=federation,
        version=version,
        run_id=run_id,
        plan=plan,
        arrays=decode_tensors(fed.blobs.get(run.model_digest)),
        model_digest=run.model_digest,
        card=model_card(fed, run, plan, charter, version, now),
    )
    weights, card, page, entry_fields = parts.weights, parts.card, parts.page, parts.entry
    key = fed.signing_key()
    blob = fed.blobs.put(weights)
    with fed.store.transaction():
        table = _releases(fed.store)
        if _row(fed.store, version) is not None:
            raise _duplicate(version)
        entry = fed.store.ledger.append(layout.ENTRY_KIND, now, entry_fields)
        head = fed.store.ledger.sign_head(key, now, reason=f"release {version}")
        fields = signed.release_fields(
            entry=entry_fields, tree_head_size=head.size, tree_head_root=head.root
        )
        manifest = {
            "format": layout.FORMAT,
            "release": fields,
            "signature": sign(key, signed.RELEASE, fields),
        }
        table.insert(
            {
                "version": version,
                "run_id": run_id,
                "plan_hash": plan.plan_hash,
                "weights_blob": blob,
                "model_card": card.decode("utf-8"),
                "model_card_html": page.decode("utf-8"),
                "manifest": layout.json_bytes(manifest).decode("utf-8"),
                "entry_index": entry.index,
                "head_size": head.size,
                "published_at": now,
            }
        )
    if out is not None:
        write_release(release_files(fed, version), out)
    return Release(version, run_id, manifest, entry.index, head, out)


def _duplicate(version: str) -> ReleaseError:
    return ReleaseError(
        f"Release {version} has already been published; a version is never reused. Choose a "
        "new one (for example the next minor version).",
        code="release.duplicate_version",
    )


def release_files(fed: Federation, version: str) -> dict[str, bytes]:
    """The files of release ``version`` (name -> bytes), rebuilt from the store: the same
    bytes every time, for the folder written now and for what the server sends later."""
    row = _row(fed.store, version)
    if row is None:
        raise ReleaseError(
            f"There is no release {version}; 'tessera-coordinator status' lists the runs, and "
            "'tessera-coordinator release RUN --version X.Y' makes one.",
            code="release.unknown",
        )
    card = json.loads(row["model_card"])
    log = fed.store.ledger.log()
    head = fed.store.ledger.head(row["head_size"])
    assert head is not None, "a release row always has its head"
    entry = log.entries[row["entry_index"]]
    provenance = {
        "tree_head": head.to_dict(),
        "entry": entry.to_dict(),
        "inclusion_proof": [h.hex() for h in log.inclusion(entry.index, head.size)],
    }
    files = {
        layout.MANIFEST: row["manifest"].encode("utf-8"),
        layout.WEIGHTS: fed.blobs.get(row["weights_blob"]),
        layout.CARD_JSON: row["model_card"].encode("utf-8"),
        layout.CARD_HTML: row["model_card_html"].encode("utf-8"),
        layout.PLAN: layout.json_bytes(fed.plan(row["plan_hash"]).to_dict()),
        layout.PROVENANCE: layout.json_bytes(provenance),
    }
    charter_version = card["governance"].get("charter_version")
    if charter_version is not None:
        charter = fed.store.charter(charter_version)
        assert charter is not None, "a published charter is never removed"
        files[layout.CHARTER] = charter.text.encode("utf-8")
    return files


def write_release(files: dict[str, bytes], out: Path) -> None:
    """Write a release folder next to ``out`` and rename it into place, so a crash never
    leaves half a release under that name."""
    out = Path(out)
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# --- distribution and acceptance ---------------------------------------------------------


def release_pack(fed: Federation, version: str) -> bytes:
    """Release ``version`` as the one payload the server offers to the sites that may have it
    (:func:`shared.releases.pack_release` of :func:`release_files`: the same bytes each time)."""
    return layout.pack_release(release_files(fed, version))


def record_acceptance(fed: Federation, site_id: str, msg: ReleaseAcceptance, now: float) -> bool:
    """Record a site's signed verdict on a release (metrics of its acceptance validation) in
    the ``release_acceptances`` table and as a site-signed ``release_accepted`` log entry.

    Only a site that may receive the release, for the release's own run and weights file,
    signed with its enrolled key. A site's later verdict (a person refusing what was accepted
    automatically) replaces the earlier one and is logged too; the same message again changes
    nothing (``False``).
    """
    row = _row(fed.store, msg.version)
    if row is None or row["run_id"] != msg.run_id:
        raise ReleaseError(
            f"there is no release {msg.version} of run {msg.run_id}", code="release.unknown"
        )
    if not may_receive(fed.store, msg.run_id, site_id):
        raise ReleaseError(
            f"this site took no part in run {msg.run_id}, so release {msg.version} is not "
            "for it; nothing was recorded",
            code="release.not_participant",
        )
    manifest = json.loads(row["manifest"])
    if manifest["release"]["weights_sha256"] != msg.weights_sha256:
        raise ReleaseError(
            f"the weights this site checked are not those of release {msg.version}; nothing "
            "was recorded",
            code="release.weights_mismatch",
        )
    site = fed.store.site(site_id)
    body: dict[str, Any] = {
        "version": msg.version,
        "run_id": msg.run_id,
        "weights_sha256": msg.weights_sha256,
        "accepted": msg.accepted,
        "metrics": dict(msg.metrics),
        "reason": msg.reason,
        "person": msg.person,
    }
    fields = signed.release_acceptance_fields(
        federation=fed.config.federation, site_id=site_id, **body
    )
    try:
        if site is None:
            raise SignatureError("unknown site", code="crypto.bad_signature")
        verify(site.public_key, signed.RELEASE_ACCEPTANCE, fields, msg.signature)
    except SignatureError as exc:
        raise GovernanceError(
            "the signature does not match this site's key; nothing was recorded",
            code="governance.bad_signature",
        ) from exc
    store = fed.store
    with store.transaction():
        table = store.db.table(ACCEPTANCES)
        table.create(
            {
                "version": str,
                "site_id": str,
                "run_id": str,
                "accepted": int,
                "metrics": str,
                "reason": str,
                "person": str,
                "signature": str,
                "received_at": float,
            },
            pk=("version", "site_id"),
            if_not_exists=True,
        )
        rows = list(table.rows_where("version = ? AND site_id = ?", [msg.version, site_id]))
        if rows and rows[0]["signature"] == msg.signature:
            return False
        table.upsert(
            {
                "version": msg.version,
                "site_id": site_id,
                "run_id": msg.run_id,
                "accepted": int(msg.accepted),
                "metrics": json.dumps(body["metrics"]),
                "reason": msg.reason,
                "person": msg.person,
                "signature": msg.signature,
                "received_at": now,
            },
            pk=("version", "site_id"),
        )
        store.log(ACCEPTED_KIND, now, site_id=site_id, **body, signature=msg.signature)
    return True


def acceptances(store: Store) -> list[dict[str, Any]]:
    """Every site's latest verdict on every release (version, then site)."""
    if not store.db[ACCEPTANCES].exists():
        return []
    return [
        {**r, "accepted": bool(r["accepted"]), "metrics": json.loads(r["metrics"])}
        for r in store.db.table(ACCEPTANCES).rows_where(order_by="version, site_id")
    ]
