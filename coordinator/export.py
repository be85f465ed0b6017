"""``tessera-coordinator export RUN --out DIR``: the model, its provenance bundle and report.

The export is itself an event: the model file's hash goes into the log and a fresh tree head
covers it, so the bundle proves which file was handed out. The folder is written next to its
destination and renamed into place, so a crash never leaves half a bundle under that name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from coordinator.config import ConfigError
from coordinator.federation import Federation
from coordinator.report import render_report
from shared.provenance import bundle as layout
from shared.provenance.log import TreeHead
from shared.provenance.prov import prov_document
from shared.tensors import decode_tensors, encode_tensors


@dataclass(frozen=True, slots=True)
class Exported:
    out: Path
    run_id: str
    model_sha256: str
    head: TreeHead


def _find_run(fed: Federation, run_id: str) -> str:
    runs = [r for r in fed.store.runs() if r.run_id == run_id or r.run_id.startswith(run_id)]
    if len(runs) != 1:
        raise ConfigError(
            f"no single run matches {run_id!r}; 'tessera-coordinator status' lists the runs",
            code="run.unknown",
        )
    run = runs[0]
    if run.status != "finished":
        raise ConfigError(
            f"run {run.run_id} is {run.status}; export it once it has finished",
            code="run.not_finished",
        )
    return run.run_id


def export_run(fed: Federation, run_id: str, out: Path, now: float | None = None) -> Exported:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            f"{out} already exists and is not empty; choose a new folder for the bundle",
            code="export.exists",
        )
    run_id = _find_run(fed, run_id)
    run = fed.store.run(run_id)
    assert run is not None
    now = time.time() if now is None else now
    plan = fed.plan(run.plan_hash)
    if plan.homomorphic:
        raise ConfigError(
            f"run {run_id} was trained with homomorphic encryption: its model is encrypted "
            "under the sites' key, which this coordinator never holds, so it cannot be "
            "exported as weights. Its provenance log holds every round, upload and key "
            "acknowledgement.",
            code="export.encrypted",
        )
    last_head = fed.store.ledger.latest_head()
    metadata = {
        "federation": fed.config.federation,
        "run_id": run_id,
        "plan_hash": plan.plan_hash,
        "architecture": f"{plan.architecture}/{plan.architecture_version}",
        "weights_sha256": run.model_digest,
        "tree_head_size": str(last_head.size if last_head else 0),
        "tree_head_root": last_head.root if last_head else "",
    }
    model = encode_tensors(decode_tensors(fed.blobs.get(run.model_digest)), metadata)
    model_sha = hashlib.sha256(model).hexdigest()
    key = fed.signing_key()
    with fed.store.transaction():
        fed.store.log(
            "model_exported",
            now,
            run_id=run_id,
            file_sha256=model_sha,
            weights_sha256=run.model_digest,
        )
        head = fed.store.ledger.sign_head(key, now, reason=f"export {run_id}")
    entries = fed.store.ledger.log().entries[: head.size]
    heads = [h for h in fed.store.ledger.heads() if h.size <= head.size]
    charters = {c.version: c.text for c in fed.store.charters()}
    manifest = {
        "format": layout.FORMAT,
        "federation": fed.config.federation,
        "run_id": run_id,
        "plan_hash": plan.plan_hash,
        "model_file": layout.MODEL,
        "model_sha256": model_sha,
        "weights_sha256": run.model_digest,
        "exported_at": now,
        "head": head.to_dict(),
    }
    keys = {
        "coordinator": fed.public_key(),
        "sites": {s.site_id: s.public_key for s in fed.store.sites()},
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (staging / "provenance").mkdir()
        files: dict[str, bytes] = {
            layout.MANIFEST: layout.json_bytes(manifest),
            layout.MODEL: model,
            layout.ENTRIES: layout.canonical_lines(entries),
            layout.HEADS: layout.json_bytes([h.to_dict() for h in heads]),
            layout.KEYS: layout.json_bytes(keys),
            layout.PLAN: layout.json_bytes(plan.to_dict()),
            layout.PROV: layout.json_bytes(prov_document(entries)),
        }
        files.update({layout.charter_file(v): t.encode("utf-8") for v, t in charters.items()})
        for name, data in files.items():
            (staging / name).write_bytes(data)
        report = render_report(layout.read_bundle(staging), charters)
        (staging / layout.REPORT).write_text(report, "utf-8")
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Exported(out, run_id, model_sha, head)
