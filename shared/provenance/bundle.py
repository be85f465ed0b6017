"""The provenance bundle an auditor checks offline, without trusting the coordinator.

Theory of operation
-------------------
``tessera-coordinator export`` writes a folder::

    manifest.json               format, federation, run, plan hash, model file and hashes, head
    model.safetensors           the run's final model; metadata: run, plan, weights digest, head
    provenance/entries.jsonl    every log entry, one canonical JSON object per line, in order
    provenance/tree_heads.json  every tree head the coordinator signed, oldest first
    provenance/keys.json        the coordinator's and every site's public key
    provenance/plan.json        the run's training plan
    provenance/charter-vN.md    every charter version published
    prov.json                   a W3C PROV-JSON view of the entries
    report.html                 the human-readable report (derived; not part of the proof)

:func:`verify_bundle` trusts nothing but the coordinator key recorded in the log's first entry
and checks, in order: entries are whole and in order; every tree head is signed by that key and
matches the Merkle root of the entries it covers (RFC 6962), and the last covers them all; site
keys are the ones enrolled, and every entry a site signed (update, charter signature, plan
decision, validation report) carries that site's signature; plan and charter texts hash to what
the log recorded and carry the coordinator's signature; the model file is the one the log says
was exported, holding the weights the final round produced; the PROV view is the one the
entries give. It stops at the first thing that does not hold and
raises :class:`ProvenanceError` naming it (code ``bundle.*``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.crypto.signing import verify
from shared.errors import TesseraError
from shared.plan import TrainingPlan
from shared.privacy.secagg import MaskedInput
from shared.protocol import signed
from shared.provenance import merkle
from shared.provenance.errors import ProvenanceError
from shared.provenance.log import LogEntry, TreeHead
from shared.provenance.prov import prov_document
from shared.tensors import decode_tensors, encode_tensors, read_metadata, tensor_digest

FORMAT = "tessera-bundle/1"
MANIFEST = "manifest.json"
MODEL = "model.safetensors"
ENTRIES = "provenance/entries.jsonl"
HEADS = "provenance/tree_heads.json"
KEYS = "provenance/keys.json"
PLAN = "provenance/plan.json"
PROV = "prov.json"
REPORT = "report.html"


def charter_file(version: int) -> str:
    return f"provenance/charter-v{version}.md"


@dataclass(frozen=True, slots=True)
class Bundle:
    """A bundle's parts as read from disk (nothing verified yet)."""

    root: Path
    manifest: dict[str, Any]
    entries: list[LogEntry]
    heads: list[TreeHead]
    keys: dict[str, Any]
    plan: TrainingPlan


@dataclass(frozen=True, slots=True)
class Verified:
    """What a successful verification established (for the command's output)."""

    run_id: str
    entries: int
    heads: int
    sites: int
    updates: int
    model_sha256: str
    head: TreeHead


def _fail(code: str, message: str, **fields: Any) -> ProvenanceError:
    return ProvenanceError(message, code=f"bundle.{code}", **fields)


def _read(root: Path, name: str) -> bytes:
    try:
        return (root / name).read_bytes()
    except OSError as exc:
        raise _fail("missing_file", f"{name} is missing from the bundle ({exc.strerror})") from exc


def _json(root: Path, name: str) -> Any:
    try:
        return json.loads(_read(root, name))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _fail("bad_file", f"{name} is not valid JSON: {exc}") from exc


def read_bundle(root: Path) -> Bundle:
    """Parse a bundle's files; raises ``ProvenanceError`` naming the first unreadable part."""
    root = Path(root)
    manifest = _json(root, MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _fail("bad_file", f"{MANIFEST} is not a {FORMAT} manifest")
    entries: list[LogEntry] = []
    lines = _read(root, ENTRIES).decode("utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            entry = LogEntry.from_dict(json.loads(line))
        except (ValueError, TesseraError) as exc:
            raise _fail(
                "bad_entry", f"{ENTRIES} line {number} is not a valid log entry: {exc}"
            ) from exc
        if entry.index != number - 1:
            raise _fail(
                "entry_order",
                f"{ENTRIES} line {number} holds entry {entry.index}: an entry was removed, "
                "added or moved",
                line=number,
            )
        entries.append(entry)
    raw_heads = _json(root, HEADS)
    if not isinstance(raw_heads, list) or not raw_heads:
        raise _fail("bad_file", f"{HEADS} must list at least one tree head")
    try:
        heads = [TreeHead.from_dict(h) for h in raw_heads]
    except TesseraError as exc:
        raise _fail("bad_head", f"{HEADS} holds a damaged tree head: {exc}") from exc
    keys = _json(root, KEYS)
    if not isinstance(keys, dict) or not isinstance(keys.get("sites"), dict):
        raise _fail("bad_file", f"{KEYS} must hold the coordinator key and a map of site keys")
    try:
        plan = TrainingPlan.from_dict(_json(root, PLAN))
    except TesseraError as exc:
        raise _fail("bad_plan", f"{PLAN} is not a valid training plan: {exc}") from exc
    return Bundle(root, manifest, entries, heads, keys, plan)


def verify_bundle(root: Path) -> Verified:
    """Check a bundle offline; returns what holds or raises at the first thing that does not."""
    b = read_bundle(root)
    coordinator_key = _check_heads(b)
    site_keys = _check_sites(b)
    updates = _check_updates(b.entries, site_keys)
    _check_plan(b, coordinator_key)
    _check_charters(b, coordinator_key)
    model_sha = _check_model(b)
    if _json(b.root, PROV) != prov_document(b.entries):
        raise _fail("prov_mismatch", f"{PROV} does not match the log entries")
    return Verified(
        run_id=str(b.manifest.get("run_id")),
        entries=len(b.entries),
        heads=len(b.heads),
        sites=len(site_keys),
        updates=updates,
        model_sha256=model_sha,
        head=b.heads[-1],
    )


def _check_heads(b: Bundle) -> str:
    if not b.entries or b.entries[0].kind != "federation_created":
        raise _fail("bad_entry", "the log does not start with the federation's creation")
    key = b.entries[0].payload.get("public_key")
    if not isinstance(key, str) or b.keys.get("coordinator") != key:
        raise _fail(
            "key_mismatch",
            f"the coordinator key in {KEYS} is not the one the log was created with",
        )
    leaves = [e.leaf_hash() for e in b.entries]
    previous = -1
    for number, head in enumerate(b.heads, start=1):
        try:
            head.verify(key)
        except TesseraError as exc:
            raise _fail(
                "bad_signature",
                f"tree head {number} (size {head.size}) is not signed by the coordinator key",
                size=head.size,
            ) from exc
        if head.size <= previous or head.size > len(leaves):
            raise _fail(
                "bad_head",
                f"tree head {number} has size {head.size}, out of order or beyond the "
                f"{len(leaves)} entries",
            )
        if merkle.root(leaves[: head.size]).hex() != head.root:
            raise _fail(
                "root_mismatch",
                f"tree head {number} (size {head.size}) does not match the entries it covers: "
                "an entry was changed",
                size=head.size,
            )
        previous = head.size
    last = b.heads[-1]
    if last.size != len(leaves):
        raise _fail(
            "unsigned_entries",
            f"the last tree head covers {last.size} of {len(leaves)} entries",
        )
    if b.manifest.get("head") != last.to_dict():
        raise _fail("manifest_mismatch", f"{MANIFEST} names another tree head than the last")
    return key


def _check_sites(b: Bundle) -> dict[str, str]:
    enrolled = {
        e.payload["site_id"]: e.payload.get("public_key")
        for e in b.entries
        if e.kind == "site_enrolled"
    }
    listed = b.keys["sites"]
    for site_id, key in listed.items():
        if enrolled.get(site_id) != key:
            raise _fail(
                "key_mismatch",
                f"the public key of {site_id} in {KEYS} is not the one it enrolled with",
                site=site_id,
            )
    missing = sorted(set(enrolled) - set(listed))
    if missing:
        raise _fail("key_missing", f"{KEYS} lacks the key of {missing[0]}", site=missing[0])
    return {k: str(v) for k, v in listed.items()}


_SITE_SIGNED = {
    # secure aggregation: the site's signature on its masked input (shared.privacy.secagg)
    "masked_update_received": lambda p, federation: (
        MaskedInput.PURPOSE,
        {
            "run_id": p["secagg_run_id"],
            "round": p["round"],
            "config_digest": p["config_digest"],
            "site": p["site_id"],
            "digest": p["digest"],
        },
    ),
    "charter_signed": lambda p, federation: (
        signed.CHARTER_ACCEPT,
        signed.charter_accept_fields(
            federation=federation,
            site_id=p["site_id"],
            version=p["version"],
            sha256=p["sha256"],
            person=p["person"],
        ),
    ),
    "plan_approved": lambda p, federation: (
        signed.PLAN_DECISION,
        signed.plan_decision_fields(
            federation=federation,
            site_id=p["site_id"],
            plan_hash=p["plan_hash"],
            decision=p["decision"],
            reason=p["reason"],
            person=p["person"],
        ),
    ),
    "validation_reported": lambda p, federation: (
        signed.VALIDATION,
        signed.validation_fields(
            run_id=p["run_id"],
            round=p["round"],
            site_id=p["site_id"],
            model=p["model"],
            metrics=p["metrics"],
        ),
    ),
}
_SITE_SIGNED["plan_refused"] = _SITE_SIGNED["plan_approved"]
_SITE_SIGNED["dispute_raised"] = lambda p, federation: (
    signed.DISPUTE,
    signed.dispute_fields(
        federation=federation,
        site_id=p["site_id"],
        dispute_id=p["dispute_id"],
        subject=p["subject"],
        run_id=p["run_id"],
        round=p["round"],
        release=p["release"],
        reason=p["reason"],
        person=p["person"],
    ),
)

_SITE_SIGNED["release_accepted"] = lambda p, federation: (
    signed.RELEASE_ACCEPTANCE,
    signed.release_acceptance_fields(
        federation=federation,
        site_id=p["site_id"],
        version=p["version"],
        run_id=p["run_id"],
        weights_sha256=p["weights_sha256"],
        accepted=p["accepted"],
        metrics=p["metrics"],
        reason=p["reason"],
        person=p["person"],
    ),
)


def _check_updates(entries: Sequence[LogEntry], site_keys: Mapping[str, str]) -> int:
    """Every entry a site signed (updates, charter signatures, plan decisions, validations)
    verifies with that site's key; every aggregated input was received. Returns the updates."""
    federation = entries[0].payload.get("federation", "")
    plans = {
        e.payload["run_id"]: e.payload["plan_hash"] for e in entries if e.kind == "run_started"
    }
    received: set[tuple[str, int, str, str]] = set()
    count = 0
    for e in entries:
        p = e.payload
        if e.kind == "update_received":
            fields = signed.update_fields(
                run_id=p["run_id"],
                round=p["round"],
                site_id=p["site_id"],
                plan_hash=plans.get(p["run_id"], ""),
                base_model=p.get("base_model") or "",
                sha256=p["digest"],
                num_samples=p["num_samples"],
            )
            key = site_keys.get(p["site_id"], "")
            try:
                verify(key, signed.UPDATE, fields, p.get("signature", ""))
            except TesseraError as exc:
                raise _fail(
                    "bad_signature",
                    f"entry {e.index}: the update of {p['site_id']} for round {p['round']} "
                    "does not carry that site's signature",
                    index=e.index,
                ) from exc
            received.add((p["run_id"], p["round"], p["site_id"], p["digest"]))
            count += 1
        elif e.kind in _SITE_SIGNED:
            purpose, fields = _SITE_SIGNED[e.kind](p, federation)
            try:
                verify(site_keys.get(p.get("site_id", ""), ""), purpose, fields, p["signature"])
            except (TesseraError, KeyError) as exc:
                raise _fail(
                    "bad_signature",
                    f"entry {e.index}: the {e.kind.replace('_', ' ')} entry of "
                    f"{p.get('site_id')} does not carry that site's signature",
                    index=e.index,
                ) from exc
            if e.kind == "masked_update_received":  # secure aggregation's site input
                count += 1
        elif e.kind == "round_closed":
            for item in p.get("inputs", []):
                if (p["run_id"], p["round"], item["site_id"], item["digest"]) not in received:
                    raise _fail(
                        "unknown_input",
                        f"entry {e.index}: round {p['round']} aggregated an update of "
                        f"{item['site_id']} that the log never received",
                        index=e.index,
                    )
    return count


def _check_plan(b: Bundle, coordinator_key: str) -> None:
    plan_hash = b.plan.plan_hash
    if b.manifest.get("plan_hash") != plan_hash:
        raise _fail("plan_mismatch", f"{PLAN} is not the plan named in {MANIFEST}")
    started = [
        e
        for e in b.entries
        if e.kind == "run_started" and e.payload["run_id"] == b.manifest.get("run_id")
    ]
    if not started or started[0].payload["plan_hash"] != plan_hash:
        raise _fail(
            "plan_mismatch", f"the log does not start run {b.manifest.get('run_id')} with this plan"
        )
    registered = [
        e for e in b.entries if e.kind == "plan_registered" and e.payload["plan_hash"] == plan_hash
    ]
    try:
        if not registered:
            raise ValueError
        verify(
            coordinator_key,
            signed.PLAN,
            signed.plan_fields(plan_hash=plan_hash),
            registered[-1].payload.get("signature", ""),
        )
    except (ValueError, TesseraError) as exc:
        raise _fail("bad_signature", "the plan is not registered and signed in the log") from exc


def _check_charters(b: Bundle, coordinator_key: str) -> None:
    federation = b.entries[0].payload.get("federation", "")
    for e in b.entries:
        if e.kind != "charter_published":
            continue
        version, name = e.payload["version"], charter_file(e.payload["version"])
        if hashlib.sha256(_read(b.root, name)).hexdigest() != e.payload["sha256"]:
            raise _fail("charter_mismatch", f"{name} is not the charter version {version} logged")
        try:
            verify(
                coordinator_key,
                signed.CHARTER,
                signed.charter_fields(
                    federation=federation, version=version, sha256=e.payload["sha256"]
                ),
                e.payload.get("signature", ""),
            )
        except TesseraError as exc:
            raise _fail(
                "bad_signature", f"charter version {version} is not signed by the coordinator"
            ) from exc


def _check_model(b: Bundle) -> str:
    run_id = b.manifest.get("run_id")
    data = _read(b.root, MODEL)
    sha = hashlib.sha256(data).hexdigest()
    exports = [
        e for e in b.entries if e.kind == "model_exported" and e.payload.get("run_id") == run_id
    ]
    if not exports or sha not in {e.payload.get("file_sha256") for e in exports}:
        raise _fail("model_mismatch", f"{MODEL} is not a model file the log says was exported")
    if b.manifest.get("model_sha256") != sha:
        raise _fail("manifest_mismatch", f"{MANIFEST} names another model file")
    final = [
        e.payload["model"]
        for e in b.entries
        if e.kind == "run_finished" and e.payload.get("run_id") == run_id
    ]
    try:
        weights = tensor_digest(encode_tensors(decode_tensors(data)))
        metadata = read_metadata(data)
    except TesseraError as exc:
        raise _fail("model_mismatch", f"{MODEL} is not a readable model: {exc}") from exc
    if not final or weights != final[-1]:
        raise _fail("model_mismatch", f"{MODEL} does not hold the weights the run finished with")
    if metadata.get("run_id") != run_id or metadata.get("plan_hash") != b.plan.plan_hash:
        raise _fail("model_mismatch", f"{MODEL}'s metadata names another run or plan")
    return sha


def canonical_lines(entries: Sequence[LogEntry]) -> bytes:
    """``entries.jsonl``: one canonical entry per line (the leaf bytes themselves)."""
    return b"".join(e.leaf_bytes() + b"\n" for e in entries)


def json_bytes(value: Any) -> bytes:
    """How the bundle's JSON files are written: sorted and indented, for people to read."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n"
