"""The site's activity timeline: what this site was offered, what a person here decided and
signed, what it checked and what it imported, newest first, in sentences hospital staff read.

Theory of operation
-------------------
Two records feed it, both on this computer: the governance record
(:class:`~site_client.core.governance.SiteGovernance`, its ``activity`` table: charters and
plans offered, acceptances and decisions signed with the site key, policy changes, the
coordinator's log heads checked, validations reported...) and the study index's import runs.
:func:`timeline` merges them and :func:`describe` words each kind; a kind this version does not
know (written by a newer participant) is still listed with its details, so nothing the site
did is hidden from the people answerable for it. Plan decisions name the plan as it was offered
(the decision rows carry only its hash).

Exports are for the hospital's own records (an audit, an ethics board): CSV for a spreadsheet,
JSON for a program, with the same fields. Both are written with ``shared.files.write_durably``,
so a crash leaves the old file or the whole new one. CSV cells that would start with ``=``,
``+``, ``-``, ``@``, a tab or a carriage return get a leading apostrophe: names and refusal
reasons are typed by people, and a spreadsheet must not run them as formulas (OWASP, "CSV
Injection").
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

from shared.errors import GovernanceError, StorageError
from shared.files import write_durably
from shared.governance.policy import SitePolicy
from site_client.core.config import SiteDir
from site_client.core.governance import SiteGovernance

__all__ = [
    "EXPORT_FIELDS",
    "SIGNED_KINDS",
    "ActivityEntry",
    "ImportRun",
    "describe",
    "export_activity",
    "import_entry",
    "load_activity",
    "load_import_runs",
    "open_governance",
    "policy_text",
    "timeline",
]

#: Kinds that a person here signed with the site key (a release verdict too, when a person
#: and not the automatic check gave it).
SIGNED_KINDS = frozenset({"charter_accepted", "plan_approved", "plan_refused", "dispute_raised"})
AUTOMATIC_SUFFIX = "(automatic)"  # how automatic verdicts and refusals name their signer
#: The columns of an export, in order.
EXPORT_FIELDS = ("time", "kind", "what", "person", "signed", "details")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivityEntry:
    """One thing that happened at this site. ``text`` is one plain sentence without the time;
    ``details`` are the recorded facts it was worded from."""

    at: float  # seconds since the epoch
    kind: str
    text: str
    person: str = ""
    signed: bool = False
    details: Mapping[str, Any] = field(default_factory=dict)

    def when(self, tz: tzinfo | None = None) -> datetime:
        """The time, in ``tz`` (``None``: this computer's time zone)."""
        return datetime.fromtimestamp(self.at, tz).astimezone(tz)

    def line(self, tz: tzinfo | None = None) -> str:
        """The entry as the page lists it: "14:02 Dr. Ada Byron approved plan ..."."""
        return f"{self.when(tz):%H:%M} {self.text}"

    def to_dict(self, tz: tzinfo | None = None) -> dict[str, Any]:
        return {
            "time": self.when(tz).isoformat(timespec="seconds"),
            "kind": self.kind,
            "what": self.text,
            "person": self.person,
            "signed": self.signed,
            "details": dict(self.details),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportRun:
    """One import into the study index (a folder, or images pushed from the PACS)."""

    run_id: str
    root: str
    started_at: float
    finished_at: float | None
    status: str  # done, cancelled, interrupted, running
    counts: Mapping[str, int] = field(default_factory=dict)


# -- wording ---------------------------------------------------------------------------------


def _short(digest: Any) -> str:
    return str(digest or "")[:12]


def _plan_words(detail: Mapping[str, Any], plan_names: Mapping[str, str]) -> str:
    digest = str(detail.get("plan_hash", ""))
    name = detail.get("name") or plan_names.get(digest)
    return f"plan '{name}' ({_short(digest)})" if name else f"plan {_short(digest)}"


def _who(detail: Mapping[str, Any]) -> str:
    return str(detail.get("person") or "Someone at this site")


def policy_text(policy: SitePolicy) -> str:
    """A site policy in one line: "secure aggregation required; differential privacy with
    epsilon at most 3 (delta at most 1e-05); training 19:00-07:00; up to 50% of the CPU"."""
    parts = [
        "secure aggregation required"
        if policy.require_secure_aggregation
        else "secure aggregation not required",
        f"differential privacy with epsilon at most {policy.max_epsilon:g} "
        f"(delta at most {policy.max_delta:g})"
        if policy.max_epsilon is not None
        else "differential privacy not required",
        f"training {policy.training_hours}"
        if policy.training_hours
        else "training at any time of day",
        f"up to {policy.cpu_share * 100:.0f}% of the CPU",
    ]
    return "; ".join(parts)


def _details_text(detail: Mapping[str, Any]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(detail.items()))


def describe(
    kind: str, detail: Mapping[str, Any], plan_names: Mapping[str, str] | None = None
) -> str:
    """One governance record entry as a sentence (see the module docstring)."""
    names = plan_names or {}
    if kind == "charter_offered":
        return (
            f"The coordinator offered charter version {detail.get('version')} "
            f"({_short(detail.get('sha256'))})"
        )
    if kind == "charter_accepted":
        return (
            f"{_who(detail)} accepted charter version {detail.get('version')} "
            f"({_short(detail.get('sha256'))}) and signed it with the site key"
        )
    if kind == "plan_offered":
        return f"The coordinator offered {_plan_words(detail, names)} for approval"
    if kind == "plan_approved":
        return f"{_who(detail)} approved {_plan_words(detail, names)}"
    if kind == "plan_refused":
        reason = str(detail.get("reason") or "").strip()
        return f"{_who(detail)} refused {_plan_words(detail, names)}" + (
            f": {reason}" if reason else ""
        )
    if kind == "policy_changed":
        try:
            return f"The site policy was set: {policy_text(SitePolicy.from_dict(detail))}"
        except (GovernanceError, TypeError):  # written by another version: show the facts
            return f"The site policy was set: {_details_text(detail)}"
    if kind == "tree_head_checked":
        return (
            f"Checked the coordinator's log of events ({detail.get('size')} entries): it "
            "extends what this site saw before, nothing was rewritten"
        )
    text = _round_sentence(kind, detail) or _release_sentence(kind, detail)
    if text:
        return text
    words = kind.replace("_", " ").strip().capitalize() or "Event"
    return f"{words}: {_details_text(detail)}" if detail else words


def _auc(metrics: Any) -> str:
    auc = metrics.get("auc") if isinstance(metrics, Mapping) else None
    return f"AUC {auc:.3f}" if isinstance(auc, int | float) else "AUC not defined"


def _round_sentence(kind: str, d: Mapping[str, Any]) -> str:
    """Training, validation and the log's proofs, in words (no digests or signatures)."""
    where = f"round {d.get('round')} of run {d.get('run_id')}"
    if kind == "update_accepted":
        return (
            f"This site's model update for {where} ({d.get('num_samples')} training images) "
            "was signed and accepted by the coordinator; no image left the site"
        )
    if kind == "validation_reported":
        n = d.get("metrics", {}).get("n") if isinstance(d.get("metrics"), Mapping) else None
        return (
            f"Checked the shared model of {where} on {n} held-out image(s) of this site "
            f"({_auc(d.get('metrics'))}) and sent the figures only"
        )
    if kind == "contribution_verified":
        return (
            f"Found this site's update for {where} in the coordinator's log as it was sent "
            f"(entry {d.get('index')} of {d.get('tree_size')})"
        )
    if kind == "training_images":
        return f"This site has {d.get('num_samples')} image(s) for training"
    if kind == "privacy_spent":
        return f"Spent privacy budget on {where} (noise multiplier {d.get('noise_multiplier')})"
    if kind == "plan_unrunnable":
        return f"Plan {_short(d.get('plan_hash'))} cannot run here: {d.get('reason')}"
    if kind == "history_rewritten":
        return (
            "ALERT: the coordinator's log no longer continues what this site saw before "
            f"({d.get('code')}); this site stopped taking part"
        )
    if kind == "site_withdrew":
        reason = str(d.get("reason") or "").strip()
        return f"{_who(d)} withdrew this site from run {d.get('run_id') or '-'}" + (
            f": {reason}" if reason else ""
        )
    return ""


def _release_sentence(kind: str, d: Mapping[str, Any]) -> str:
    if kind == "release_received":
        return (
            f"Received model release {d.get('version')} of run {d.get('run_id')}; its "
            "signatures, weights and place in the federation's log checked out"
        )
    if kind == "release_rejected":
        return f"Refused model release {d.get('version')}: {d.get('reason')}"
    if kind == "release_reported":
        verdict = "accepted" if d.get("accepted") else "refused"
        reason = str(d.get("reason") or "").strip()
        return (
            f"{_who(d)} {verdict} model release {d.get('version')} "
            f"({_auc(d.get('metrics'))} on this site's held-out images)"
            + (f": {reason}" if reason else "")
        )
    if kind == "dispute_raised":
        about = d.get("release") or (f"round {d.get('round')}" if d.get("round") else "")
        return (
            f"{_who(d)} raised a dispute on {d.get('subject')} {about} of run "
            f"{d.get('run_id')}: {d.get('reason')}"
        ).replace("  ", " ")
    return ""


def import_entry(run: ImportRun) -> ActivityEntry:
    c = run.counts
    counts = (
        f"{c.get('indexed', 0)} files indexed, {c.get('unchanged', 0)} unchanged, "
        f"{c.get('rejected', 0)} not usable"
    )
    if run.status == "done":
        text = f"Imported images from {run.root}: {counts}"
    elif run.status == "cancelled":
        text = f"An import from {run.root} was cancelled; kept so far: {counts}"
    elif run.status == "interrupted":
        text = f"An import from {run.root} was interrupted; kept so far: {counts}"
    else:
        text = f"Started importing images from {run.root} (not finished)"
    return ActivityEntry(
        at=run.finished_at if run.finished_at is not None else run.started_at,
        kind=f"import_{run.status}",
        text=text,
        details={"root": run.root, "status": run.status, "run_id": run.run_id, **c},
    )


def timeline(
    governance_rows: Sequence[Mapping[str, Any]],
    import_runs: Iterable[ImportRun] = (),
    plan_names: Mapping[str, str] | None = None,
) -> tuple[ActivityEntry, ...]:
    """Newest first. ``governance_rows``: ``SiteGovernance.activity()`` (in recording order,
    which breaks ties between equal times); ``plan_names``: plan hash -> name."""
    names = dict(plan_names or {})
    for row in governance_rows:  # the name a plan was offered under, for its decisions
        if row["kind"] == "plan_offered" and row["detail"].get("name"):
            names.setdefault(str(row["detail"].get("plan_hash")), str(row["detail"]["name"]))
    entries: list[tuple[float, int, ActivityEntry]] = []
    for seq, row in enumerate(governance_rows):
        kind, detail = str(row["kind"]), dict(row["detail"])
        entry = ActivityEntry(
            at=float(row["at"]),
            kind=kind,
            text=describe(kind, detail, names),
            person=str(detail.get("person") or ""),
            signed=kind in SIGNED_KINDS
            or (
                kind == "release_reported"
                and not str(detail.get("person", "")).endswith(AUTOMATIC_SUFFIX)
            ),
            details=detail,
        )
        entries.append((entry.at, seq, entry))
    for run in import_runs:
        entry = import_entry(run)
        entries.append((entry.at, -1, entry))
    entries.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return tuple(e for _, _, e in entries)


# -- reading the site's records ---------------------------------------------------------------


def open_governance(site_dir: SiteDir) -> SiteGovernance:
    """The site's governance record, opened with its enrolment (federation, site ID and the
    coordinator key that offers must be signed with). The caller closes it."""
    config = site_dir.load()
    return SiteGovernance(
        site_dir.governance_db,
        federation=config.federation,
        site_id=config.site_id,
        coordinator_key=config.coordinator_key,
    )


def load_import_runs(site_dir: SiteDir) -> list[ImportRun]:
    index = site_dir.open_index()
    try:
        rows = index.db.execute(
            "select run_id, root, started_at, finished_at, status, counts from import_runs"
        ).fetchall()
    finally:
        index.close()
    return [
        ImportRun(
            run_id=str(r[0]),
            root=str(r[1]),
            started_at=float(r[2]),
            finished_at=None if r[3] is None else float(r[3]),
            status=str(r[4]),
            counts=json.loads(r[5] or "{}"),
        )
        for r in rows
    ]


def load_activity(site_dir: SiteDir) -> tuple[ActivityEntry, ...]:
    """The whole timeline, newest first (a blocking call, for the task runner)."""
    governance = open_governance(site_dir)
    try:
        rows = governance.activity()
        names = {p.plan_hash: p.plan.name for p in governance.plans()}
    finally:
        governance.close()
    return timeline(rows, load_import_runs(site_dir), names)


# -- export --------------------------------------------------------------------------------


def _cell(value: str) -> str:
    return "'" + value if value.startswith(_FORMULA_START) else value


def _csv_bytes(entries: Sequence[ActivityEntry], tz: tzinfo | None) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(EXPORT_FIELDS)
    for entry in entries:
        d = entry.to_dict(tz)
        d["signed"] = "yes" if entry.signed else "no"
        d["details"] = json.dumps(d["details"], sort_keys=True, ensure_ascii=False)
        writer.writerow([_cell(str(d[k])) for k in EXPORT_FIELDS])
    # a byte-order mark, so that spreadsheets read the names as UTF-8
    return out.getvalue().encode("utf-8-sig")


def _json_bytes(entries: Sequence[ActivityEntry], tz: tzinfo | None) -> bytes:
    data = {"activity": [e.to_dict(tz) for e in entries]}
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def export_activity(
    entries: Sequence[ActivityEntry], path: Path, *, tz: tzinfo | None = None
) -> Path:
    """Write ``entries`` to ``path``: JSON if it ends in ``.json``, else CSV (a name without
    a suffix gets ``.csv``). Returns the path written."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".csv"):
        path = path.with_name(path.name + ".csv")
    data = _json_bytes(entries, tz) if suffix == ".json" else _csv_bytes(entries, tz)
    try:
        write_durably(path, [data])
    except OSError as exc:
        raise StorageError(
            f"Cannot write {path} ({exc.strerror or exc}). Choose a folder you can write to.",
            code="storage.export",
        ) from exc
    return path
