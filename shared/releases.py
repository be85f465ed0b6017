"""Model releases: the folder a site receives, and the checks it runs before using it.

Theory of operation
-------------------
``tessera-coordinator release RUN --version X.Y`` (:mod:`coordinator.release`) writes::

    release.json        the manifest, signed by the coordinator (purpose ``release``)
    model.safetensors   the run's final weights; metadata: federation, run, plan, release
    model_card.json     what the model is for and how it was made (counts and metrics only)
    model_card.html     the same card for people (:func:`render_model_card_html`)
    plan.json           the training plan (its hash is in the manifest)
    charter.md          the charter version in force when the release was made (if any)
    provenance.json     the signed tree head, the ``release_published`` log entry and its
                        inclusion proof under that head (RFC 6962 / RFC 9162)

The release is itself an event: the coordinator logs ``release_published`` with the hashes of
the weights file and the model card (JSON and HTML), signs a tree head that covers that
entry, and then signs the manifest, which names both the logged fields and that head. So a
site holding only the coordinator's public key (from enrolment) can check, offline and in this
order, that

1. the manifest carries the coordinator's signature;
2. the tree head carries the coordinator's signature and is the one the manifest names;
3. the ``release_published`` entry holds exactly the manifest's fields and is in the log under
   that head (inclusion proof), so the release cannot have been made outside the log;
4. the weights file, the model card (JSON and HTML), the plan and the charter are the ones
   those hashes name.

The HTML page is checked by its hash, not by rendering the JSON again here, so a site running
another Tessera version (with another page layout) still accepts a genuine release.

:func:`verify_release` stops at the first check that fails and raises
:class:`~shared.errors.ReleaseError` whose code and message name what was altered. Checking the
head against the heads the site saw before (consistency proofs) is the witness's job
(:mod:`shared.provenance.witness`) once releases travel over the network.
"""

from __future__ import annotations

import datetime
import hashlib
import html
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.crypto.signing import verify
from shared.errors import ReleaseError, TesseraError
from shared.plan import TrainingPlan
from shared.protocol import signed
from shared.provenance import merkle
from shared.provenance.log import LogEntry, TreeHead
from shared.tensors import decode_tensors, encode_tensors, read_metadata, tensor_digest

__all__ = [
    "CARD_FORMAT",
    "FORMAT",
    "RESEARCH_USE",
    "ReleaseParts",
    "VerifiedRelease",
    "check_version",
    "json_bytes",
    "pack_release",
    "release_parts",
    "render_model_card_html",
    "unpack_release",
    "verify_release",
]

FORMAT = "tessera-release/1"
CARD_FORMAT = "tessera-model-card/1"
ENTRY_KIND = "release_published"

MANIFEST = "release.json"
WEIGHTS = "model.safetensors"
CARD_JSON = "model_card.json"
CARD_HTML = "model_card.html"
PLAN = "plan.json"
CHARTER = "charter.md"
PROVENANCE = "provenance.json"

RESEARCH_USE = (
    "For research use only. This model is not a medical device: it has not been cleared or "
    "approved by any regulator, and it must not be used to diagnose, treat or manage any "
    "patient, nor to replace the judgement of a qualified clinician."
)

_VERSION = re.compile(r"(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})")


def check_version(version: object) -> str:
    """``version`` if it is a release version ``MAJOR.MINOR`` (e.g. ``1.0``), else raise."""
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise ReleaseError(
            f"Release version {version!r} is not of the form MAJOR.MINOR (for example 1.0 or "
            "2.3, without leading zeros). Choose a version like that.",
            code="release.bad_version",
        )
    return version


def json_bytes(value: Any) -> bytes:
    """How a release's JSON files are written: sorted and indented, for people to read; the
    hashes in the manifest are over exactly these bytes."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- one payload on the wire -----------------------------------------------------------------

PACK_MAGIC = b"TESSERA-RELEASE-PACK/1\n"
FILE_NAMES = (MANIFEST, WEIGHTS, CARD_JSON, CARD_HTML, PLAN, CHARTER, PROVENANCE)
_MAX_INDEX = 4096


@dataclass(frozen=True, slots=True)
class ReleaseParts:
    """The signed files of a release and the provenance-log entry that names them."""

    weights: bytes
    card: bytes
    page: bytes
    entry: dict[str, Any]


def release_parts(
    *,
    federation: str,
    version: str,
    run_id: str,
    plan: TrainingPlan,
    arrays: Mapping[str, Any],
    model_digest: str,
    card: Mapping[str, Any],
) -> ReleaseParts:
    """The weights (with their identity in the safetensors metadata, which
    :func:`verify_release` checks), the model card as JSON and as its page, and the
    ``release_published`` entry over their hashes: one recipe for every maker of releases."""
    weights = encode_tensors(
        arrays,
        {
            "format": FORMAT,
            "federation": federation,
            "release_version": version,
            "run_id": run_id,
            "plan_hash": plan.plan_hash,
            "architecture": f"{plan.architecture}/{plan.architecture_version}",
            "weights_sha256": model_digest,
        },
    )
    card_bytes = json_bytes(card)
    page = render_model_card_html(card).encode("utf-8")
    entry = signed.release_entry_fields(
        federation=federation,
        version=version,
        run_id=run_id,
        plan_hash=plan.plan_hash,
        architecture=plan.architecture,
        architecture_version=plan.architecture_version,
        model=model_digest,
        weights_sha256=_sha256(weights),
        model_card_sha256=_sha256(card_bytes),
        model_card_html_sha256=_sha256(page),
    )
    return ReleaseParts(weights, card_bytes, page, entry)


def pack_release(files: Mapping[str, bytes]) -> bytes:
    """A release folder's files as one payload, for the coordinator to offer like a model.

    Deterministic (the same files give the same bytes, so the offer's SHA-256 names the
    release): a magic line, the index length (8 bytes, big-endian), a JSON index of
    ``[name, size]`` pairs in name order, then the files' bytes in that order. No archive
    format, no paths, no timestamps, no pickle: :func:`unpack_release` reads only the known
    file names back.
    """
    unknown = sorted(set(files) - set(FILE_NAMES))
    if unknown:
        raise _fail("bad_file", f"{unknown[0]} is not a file of a release", file=unknown[0])
    names = sorted(files)
    index = json.dumps([[n, len(files[n])] for n in names], separators=(",", ":")).encode()
    return b"".join([PACK_MAGIC, len(index).to_bytes(8, "big"), index, *(files[n] for n in names)])


def unpack_release(data: bytes) -> dict[str, bytes]:
    """The files of a packed release (name -> bytes); only the known names of a release
    folder, each once, with sizes that add up to exactly the payload. Anything else is a
    damaged payload (``release.bad_pack``); what the files say is :func:`verify_release`'s job.
    """
    view = memoryview(data)
    start = len(PACK_MAGIC) + 8
    if bytes(view[: len(PACK_MAGIC)]) != PACK_MAGIC or len(data) < start:
        raise _fail("bad_pack", "the received release is not a Tessera release payload")
    size = int.from_bytes(view[len(PACK_MAGIC) : start], "big")
    if size > _MAX_INDEX or start + size > len(data):
        raise _fail("bad_pack", "the received release has a damaged index")
    try:
        index = json.loads(bytes(view[start : start + size]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _fail("bad_pack", f"the received release has a damaged index ({exc})") from exc
    if not isinstance(index, list) or not all(
        isinstance(i, list)
        and len(i) == 2
        and i[0] in FILE_NAMES
        and isinstance(i[1], int)
        and not isinstance(i[1], bool)
        and i[1] >= 0
        for i in index
    ):
        raise _fail("bad_pack", "the received release names files a release does not have")
    names = [i[0] for i in index]
    if len(set(names)) != len(names) or names != sorted(names):
        raise _fail("bad_pack", "the received release lists a file twice or out of order")
    offset = start + size
    if offset + sum(i[1] for i in index) != len(data):
        raise _fail("bad_pack", "the received release's files do not fill the payload exactly")
    out: dict[str, bytes] = {}
    for name, length in index:
        out[name] = bytes(view[offset : offset + length])
        offset += length
    return out


# --- the site's check ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifiedRelease:
    """What :func:`verify_release` established; ``weights`` are the file's bytes as checked
    (use these, not a second read of the file, which could have changed since)."""

    root: Path
    version: str
    federation: str
    run_id: str
    plan: TrainingPlan
    model_card: dict[str, Any]
    weights: bytes
    head: TreeHead
    entry_index: int


_ENTRY_KEYS = tuple(
    signed.release_entry_fields(
        federation="",
        version="",
        run_id="",
        plan_hash="",
        architecture="",
        architecture_version="",
        model="",
        weights_sha256="",
        model_card_sha256="",
        model_card_html_sha256="",
    )
)


def _fail(code: str, message: str, **fields: Any) -> ReleaseError:
    return ReleaseError(message, code=f"release.{code}", **fields)


def _read(root: Path, name: str) -> bytes:
    try:
        return (root / name).read_bytes()
    except OSError as exc:
        raise _fail(
            "missing_file",
            f"The release folder has no readable {name} ({exc.strerror or exc}). Copy the "
            "whole release folder again from the coordinator.",
            file=name,
        ) from exc


def _json(root: Path, name: str) -> Any:
    try:
        return json.loads(_read(root, name))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _fail(
            "bad_file",
            f"{name} in the release is not valid JSON ({exc}); the release is damaged. Do not "
            "use it; ask the consortium lead for it again.",
            file=name,
        ) from exc


def _altered(code: str, what: str) -> ReleaseError:
    return _fail(
        code,
        f"{what} Do not use this release: it was changed after the coordinator made it, or "
        "it comes from someone else. Ask the consortium lead for a fresh copy.",
    )


def _manifest_fields(manifest: Any) -> tuple[dict[str, Any], str]:
    """The signed fields of a manifest, rebuilt with exactly the expected keys, and the
    signature. A manifest of another shape is a damaged file, not a forgery."""
    release = manifest.get("release") if isinstance(manifest, dict) else None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(release, dict)
        or not isinstance(manifest.get("signature"), str)
    ):
        raise _fail(
            "bad_file",
            f"{MANIFEST} is not a {FORMAT} manifest; the release is damaged or of a newer "
            "Tessera version. Do not use it; ask the consortium lead for it again.",
            file=MANIFEST,
        )
    try:
        entry = signed.release_entry_fields(
            **{k: release[k] for k in _ENTRY_KEYS},
        )
        fields = signed.release_fields(
            entry=entry,
            tree_head_size=release["tree_head_size"],
            tree_head_root=release["tree_head_root"],
        )
    except (KeyError, TypeError) as exc:
        raise _fail(
            "bad_file", f"{MANIFEST} lacks the field {exc}; the release is damaged.", file=MANIFEST
        ) from exc
    if fields != release or not all(isinstance(release[k], str) for k in _ENTRY_KEYS):
        raise _fail(
            "bad_file",
            f"{MANIFEST} has unexpected or mistyped fields; the release is damaged.",
            file=MANIFEST,
        )
    return fields, manifest["signature"]


def verify_release(folder: Path, coordinator_key: str) -> VerifiedRelease:
    """Check a release folder with the coordinator's public key (base64, from enrolment).

    Returns what holds, or raises :class:`ReleaseError` at the first thing that does not,
    naming it (module docstring). A ``coordinator_key`` that is not a key at all raises
    ``CryptoError`` (``crypto.bad_public_key``): that is the site's configuration, not the
    release.
    """
    root = Path(folder)
    if not root.is_dir():
        raise _fail(
            "missing_file",
            f"{root.name or root} is not a folder; give the release folder made by "
            "'tessera-coordinator release'.",
            file=MANIFEST,
        )
    fields, signature = _manifest_fields(_json(root, MANIFEST))
    try:
        verify(coordinator_key, signed.RELEASE, fields, signature)
    except TesseraError as exc:
        if exc.code != "crypto.bad_signature":
            raise
        raise _altered(
            "bad_signature",
            f"The release manifest ({MANIFEST}) is not signed by this federation's coordinator.",
        ) from exc

    head, entry = _check_provenance(root, fields, coordinator_key)
    weights = _check_weights(root, fields)
    card = _check_card(root, fields)
    plan = _check_plan(root, fields)
    _check_charter(root, card)
    return VerifiedRelease(
        root=root,
        version=fields["version"],
        federation=fields["federation"],
        run_id=fields["run_id"],
        plan=plan,
        model_card=card,
        weights=weights,
        head=head,
        entry_index=entry.index,
    )


def _check_provenance(
    root: Path, fields: Mapping[str, Any], coordinator_key: str
) -> tuple[TreeHead, LogEntry]:
    data = _json(root, PROVENANCE)
    try:
        if not isinstance(data, dict):
            raise TypeError("not an object")
        head = TreeHead.from_dict(data["tree_head"])
        entry = LogEntry.from_dict(data["entry"])
        proof = [bytes.fromhex(h) for h in data["inclusion_proof"]]
    except (KeyError, TypeError, ValueError, TesseraError) as exc:
        raise _fail(
            "bad_file",
            f"{PROVENANCE} does not hold a tree head, the release entry and its inclusion "
            f"proof ({exc}); the release is damaged.",
            file=PROVENANCE,
        ) from exc
    try:
        head.verify(coordinator_key)
    except TesseraError as exc:
        if exc.code != "provenance.bad_signature":
            raise
        raise _altered(
            "bad_tree_head",
            f"The tree head in {PROVENANCE} ({head.size} entries) is not signed by the "
            "coordinator.",
        ) from exc
    if head.size != fields["tree_head_size"] or head.root != fields["tree_head_root"]:
        raise _altered(
            "tree_head_mismatch",
            f"The tree head in {PROVENANCE} is not the one the signed manifest names.",
        )
    expected = {k: fields[k] for k in _ENTRY_KEYS}
    if entry.kind != ENTRY_KIND or entry.payload != expected:
        raise _altered(
            "not_in_log",
            f"The log entry in {PROVENANCE} is not the release the manifest describes.",
        )
    if not merkle.verify_inclusion(
        entry.leaf_hash(), entry.index, head.size, proof, head.root_bytes
    ):
        raise _altered(
            "not_in_log",
            f"The release entry's inclusion proof in {PROVENANCE} does not lead to the signed "
            "tree head, so the release is not in the federation's provenance log.",
        )
    return head, entry


def _check_weights(root: Path, fields: Mapping[str, Any]) -> bytes:
    data = _read(root, WEIGHTS)
    if _sha256(data) != fields["weights_sha256"]:
        raise _altered(
            "weights_mismatch",
            f"The model weights ({WEIGHTS}) are not the ones the coordinator signed.",
        )
    try:
        metadata = read_metadata(data)
        digest = tensor_digest(encode_tensors(decode_tensors(data)))
    except TesseraError as exc:  # signed but unreadable: a coordinator bug, still refused
        raise _fail(
            "weights_mismatch", f"{WEIGHTS} cannot be read as model weights: {exc}"
        ) from exc
    expected = {
        "release_version": fields["version"],
        "run_id": fields["run_id"],
        "plan_hash": fields["plan_hash"],
    }
    if digest != fields["model"] or any(metadata.get(k) != v for k, v in expected.items()):
        raise _fail(
            "weights_mismatch",
            f"{WEIGHTS} does not hold the weights of run {fields['run_id']} that the log "
            "recorded; do not use this release.",
        )
    return data


def _check_card(root: Path, fields: Mapping[str, Any]) -> dict[str, Any]:
    data = _read(root, CARD_JSON)
    if _sha256(data) != fields["model_card_sha256"]:
        raise _altered(
            "model_card_mismatch",
            f"The model card ({CARD_JSON}) is not the one the coordinator signed.",
        )
    try:
        card = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _fail("model_card_mismatch", f"{CARD_JSON} is not valid JSON: {exc}") from exc
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise _fail("model_card_mismatch", f"{CARD_JSON} is not a {CARD_FORMAT} model card.")
    identity = {"release_version": "version", "run_id": "run_id", "federation": "federation"}
    if any(card.get(k) != fields[v] for k, v in identity.items()):
        raise _fail(
            "model_card_mismatch", f"{CARD_JSON} describes another release than the manifest."
        )
    if _sha256(_read(root, CARD_HTML)) != fields["model_card_html_sha256"]:
        raise _altered(
            "model_card_mismatch",
            f"The model card page ({CARD_HTML}) is not the one the coordinator signed.",
        )
    return card


def _check_plan(root: Path, fields: Mapping[str, Any]) -> TrainingPlan:
    try:
        plan = TrainingPlan.from_dict(_json(root, PLAN))
    except TesseraError as exc:
        if exc.code.startswith("release."):
            raise
        raise _fail(
            "plan_mismatch",
            f"{PLAN} is not a training plan this installation can use ({exc}).",
        ) from exc
    if plan.plan_hash != fields["plan_hash"]:
        raise _altered("plan_mismatch", f"The training plan ({PLAN}) is not the signed one.")
    if (plan.architecture, plan.architecture_version) != (
        fields["architecture"],
        fields["architecture_version"],
    ):
        raise _fail("plan_mismatch", f"{PLAN} names another architecture than the signed manifest.")
    return plan


def _check_charter(root: Path, card: Mapping[str, Any]) -> None:
    governance = card.get("governance") or {}
    sha = governance.get("charter_sha256")
    if not sha:
        return
    if _sha256(_read(root, CHARTER)) != sha:
        raise _altered(
            "charter_mismatch",
            f"The charter ({CHARTER}) is not the version the signed model card names.",
        )


# --- the model card page ---------------------------------------------------------------------

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;
max-width:60rem;color:#1f2328;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;
border-bottom:1px solid #d0d7de;padding-bottom:.2rem}
table{border-collapse:collapse;width:100%;margin:.5rem 0}
th,td{border:1px solid #d0d7de;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font:12px ui-monospace,monospace;word-break:break-all}
.muted{color:#59636e}.warn{background:#fff8c5;padding:.5rem;border:1px solid #d4a72c}
.stop{background:#ffebe9;padding:.6rem .9rem;border:1px solid #cf222e;font-weight:600}
@media print{h2{break-after:avoid}table{break-inside:avoid}}
"""

_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "loss", "n")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _time(at: object) -> str:
    if not isinstance(at, int | float):
        return "-"
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _number(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], numeric: set[int]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _list(items: Sequence[object]) -> str:
    return "<ul>" + "".join(f"<li>{_e(i)}</li>" for i in items) + "</ul>"


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _counts(table: object) -> str:
    items = sorted(_dict(table).items(), key=lambda kv: (-int(kv[1]), kv[0]))
    return ", ".join(f"{k}: {v}" for k, v in items) or "-"


def render_model_card_html(card: Mapping[str, Any]) -> str:
    """The model card as one self-contained page (no scripts, fonts or links), rendered from
    the card's JSON alone (deterministic), which the coordinator hashes and signs with it."""
    model, task = _dict(card.get("model")), _dict(card.get("task"))
    data, perf = _dict(card.get("training_data")), _dict(card.get("performance"))
    privacy, gov = _dict(card.get("privacy")), _dict(card.get("governance"))
    training = _dict(card.get("training"))
    version, federation = card.get("release_version", ""), card.get("federation", "")
    out = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Model card: {_e(federation)} release {_e(version)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Model card: {_e(federation)}, release {_e(version)}</h1>",
        f"<p class='stop'>{_e(card.get('not_a_medical_device', RESEARCH_USE))}</p>",
        f"<p class='muted'>Run <code>{_e(card.get('run_id', ''))}</code>, published "
        f"{_time(card.get('published_at'))}. Check the release with "
        "<code>tessera-site predict</code>, which verifies it before use.</p>",
        "<h2>Intended use</h2>",
        f"<p>{_e(card.get('intended_use', ''))}</p>",
        "<h2>Task and labels</h2>",
        _table(
            ["", ""],
            [
                ["Task", str(task.get("task", "")).replace("_", " ")],
                ["Label column", task.get("label_column", "")],
                [
                    "Labels",
                    "; ".join(f"{k} = {v}" for k, v in sorted(_dict(task.get("labels")).items())),
                ],
                ["Output", task.get("output", "")],
                [
                    "Model",
                    f"{model.get('architecture', '')} version "
                    f"{model.get('architecture_version', '')}, {model.get('input_size', '')} x "
                    f"{model.get('input_size', '')} pixel input, "
                    f"{model.get('parameters', '-')} parameters",
                ],
                ["Preprocessing", json.dumps(model.get("preprocessing", {}), sort_keys=True)],
                ["Weights digest", model.get("weights_digest", "")],
            ],
            set(),
        ).replace("<thead><tr><th></th><th></th></tr></thead>", ""),
        "<h2>Training data</h2>",
        f"<p>{_e(data.get('note', ''))}</p>",
    ]
    sites = data.get("sites") or []
    out.append(
        _table(
            ["Site", "Images", "Patients", "Studies", "Scanners (images)", "Modalities"],
            [
                [
                    s.get("name") or s.get("site_id", ""),
                    _number(s.get("images")),
                    _number(s.get("patients")),
                    _number(s.get("studies")),
                    _counts(s.get("by_scanner")),
                    _counts(s.get("by_modality")),
                ]
                for s in sites
            ],
            {1, 2, 3},
        )
        if sites
        else "<p class='warn'>No site shared a data summary.</p>"
    )
    out.append(f"<p>All sites, by scanner: {_e(_counts(data.get('by_scanner')))}.</p>")
    out.append("<h2>Performance at each site</h2>")
    rows = perf.get("sites") or []
    worst = _dict(perf.get("worst_site"))
    if rows:
        out.append(
            f"<p>{_e(perf.get('note', ''))} <strong>Worst site: "
            f"{_e(worst.get('name') or worst.get('site_id', '-'))}</strong> (AUC "
            f"{_e(_number(worst.get('auc')))}).</p>"
        )
        out.append(
            _table(
                ["Site", "Round", "AUC", "Accuracy", "Sensitivity", "Specificity", "Loss", "n"],
                [
                    [r.get("name") or r.get("site_id", ""), r.get("round", "-")]
                    + [_number(r.get(m)) for m in _METRICS]
                    for r in rows
                ],
                {1, 2, 3, 4, 5, 6, 7},
            )
        )
    else:
        out.append("<p class='warn'>No site reported a validation of this run.</p>")
    out += [
        "<h2>Known limitations</h2>",
        _list(card.get("limitations") or []),
        "<h2>Privacy protections</h2>",
        _list(privacy.get("statements") or []),
        f"<p>Privacy budget spent (epsilon): {_e(privacy.get('epsilon_spent') or 'none')}.</p>",
        "<h2>Participants and contributions</h2>",
        _table(
            ["Site", "Rounds invited", "Rounds contributed", "Updates accepted", "Samples"],
            [
                [
                    p.get("name") or p.get("site_id", ""),
                    p.get("rounds_invited", 0),
                    p.get("rounds_contributed", 0),
                    p.get("updates_accepted", 0),
                    p.get("samples", 0),
                ]
                for p in card.get("participants") or []
            ],
            {1, 2, 3, 4},
        ),
        "<h2>How it was made</h2>",
        _table(
            ["", ""],
            [
                ["Plan", f"{gov.get('plan_name', '')} (hash {gov.get('plan_hash', '')})"],
                [
                    "Charter",
                    f"version {gov.get('charter_version')} (SHA-256 {gov.get('charter_sha256')})"
                    if gov.get("charter_version")
                    else "none published",
                ],
                ["Rounds", f"{training.get('rounds_completed', '-')} of {training.get('rounds')}"],
                ["Aggregation", training.get("aggregation", "")],
                [
                    "Local training",
                    f"{training.get('local_epochs', '-')} epoch(s) of "
                    f"{training.get('optimiser', '')}, learning rate "
                    f"{training.get('learning_rate', '-')}, batch {training.get('batch_size')}",
                ],
                [
                    "Signed record",
                    "this release is an entry of the federation's provenance log, under a tree "
                    "head the coordinator signed (provenance.json)",
                ],
            ],
            set(),
        ).replace("<thead><tr><th></th><th></th></tr></thead>", ""),
        "</body></html>",
    ]
    return "\n".join(out) + "\n"
