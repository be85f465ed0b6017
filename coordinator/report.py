"""The HTML report an ethics board files: one self-contained page rendered from a bundle.

Everything on the page is computed from the bundle's log entries, plan and charters, so what
the board reads is what ``verify`` checks. The page has no scripts, fonts or external links
(it opens offline and prints cleanly); the charts are inline SVG drawn here, which keeps the
coordinator free of a plotting stack and the bytes deterministic.
"""

from __future__ import annotations

import datetime
import html
from collections.abc import Sequence
from typing import Any

from shared.governance.contributions import contributions
from shared.privacy.client_dp import protections
from shared.provenance.bundle import Bundle
from shared.provenance.log import LogEntry

_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "loss", "n")
_COLOURS = ("#1f6feb", "#d1242f", "#1a7f37", "#9a6700", "#8250df", "#bc4c00", "#0969da")

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
.box{background:#f6f8fa;border:1px solid #d0d7de;padding:.6rem .9rem}
@media print{h2{break-after:avoid}table{break-inside:avoid}}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _time(at: float) -> str:
    moment = datetime.datetime.fromtimestamp(at, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


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


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], *, y_label: str) -> str:
    """An inline SVG line chart of ``{name: [(x, y), ...]}`` with axes and a legend."""
    points = [p for values in series.values() for p in values]
    if not points:
        return f'<p class="muted">{_e(title)}: no data.</p>'
    w, h, left, right, top, bottom = 640, 260, 56, 150, 28, 36
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.08 or abs(y1) * 0.1 or 1.0
    y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (w - left - right)

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * (h - top - bottom)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}" role="img" aria-label="{_e(title)}">',
        f'<text x="{left}" y="16" font-size="13" font-weight="600">{_e(title)}</text>',
        f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="#888"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="#888"/>',
    ]
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        parts.append(
            f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" font-size="10" text-anchor="end">'
            f"{y:.3g}</text>"
            f'<line x1="{left}" y1="{sy(y):.1f}" x2="{w - right}" y2="{sy(y):.1f}" '
            'stroke="#eee"/>'
        )
    for x in sorted(set(xs)):
        parts.append(
            f'<text x="{sx(x):.1f}" y="{h - bottom + 14}" font-size="10" '
            f'text-anchor="middle">{x:g}</text>'
        )
    parts.append(
        f'<text x="{(left + w - right) / 2}" y="{h - 4}" font-size="11" '
        'text-anchor="middle">round</text>'
        f'<text x="12" y="{(top + h - bottom) / 2}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 12 {(top + h - bottom) / 2})">{_e(y_label)}</text>'
    )
    for i, (name, values) in enumerate(series.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in sorted(values))
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>'
        )
        parts.extend(
            f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>' for x, y in values
        )
        ly = top + 14 * i + 6
        parts.append(
            f'<rect x="{w - right + 12}" y="{ly - 8}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{w - right + 26}" y="{ly + 1}" font-size="11">{_e(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _of_run(entries: Sequence[LogEntry], run_id: str, kind: str) -> list[dict[str, Any]]:
    return [
        e.payload | {"_at": e.at}
        for e in entries
        if e.kind == kind and e.payload.get("run_id") == run_id
    ]


def validation_summary(
    entries: Sequence[LogEntry], run_id: str, names: dict[str, str]
) -> tuple[list[list[object]], str | None]:
    """Each site's latest validation of the run and the worst site by AUC (or ``None``)."""
    latest: dict[str, dict[str, Any]] = {}
    for p in _of_run(entries, run_id, "validation_reported"):
        if p["site_id"] not in latest or p["round"] >= latest[p["site_id"]]["round"]:
            latest[p["site_id"]] = p
    rows = []
    for site_id, p in sorted(latest.items()):
        metrics = p.get("metrics", {})
        rows.append(
            [names.get(site_id, site_id), p["round"]]
            + [
                f"{metrics[m]:.3f}" if isinstance(metrics.get(m), float) else metrics.get(m, "-")
                for m in _METRICS
            ]
        )
    scored = [
        (p["metrics"]["auc"], s)
        for s, p in latest.items()
        if isinstance(p.get("metrics", {}).get("auc"), float)
    ]
    worst = names.get(min(scored)[1], min(scored)[1]) if scored else None
    return rows, worst


def _scanner_shift(assessed: Sequence[dict[str, Any]], names: dict[str, str]) -> str:
    """The coordinator's last comparison of the sites' scanner fingerprints during the run
    (``coordinator.heterogeneity``, from counts the sites shared), with its warning."""
    if not assessed:
        return (
            "<p class='muted'>Fewer than two sites shared a data summary during this run, so "
            "their scanners were not compared.</p>"
        )
    last = assessed[-1]
    pair = last.get("pair") or []
    shown = " and ".join(names.get(s, s) or s for s in pair)
    rows = [
        ["Difference", f"{last.get('level', '')} ({last.get('distance', 0):.2f} of 1)"],
        ["Most different sites", shown or "-"],
        ["Sites compared", last.get("sites", "-")],
        ["Assessment", last.get("message", "")],
    ]
    table = _table(["", ""], rows, set()).replace("<thead><tr><th></th><th></th></tr></thead>", "")
    intro = (
        "<p>Distance between the sites' mixes of scanner model, pixel spacing, bits stored, "
        "photometric interpretation and image size (total variation, 0 = the same mix, "
        "1 = nothing in common), from the counts each site chose to share.</p>"
    )
    warning = last.get("warning")
    return intro + table + (f"<p class='warn'>{_e(warning)}</p>" if warning else "")


def _secure_aggregation(entries: Sequence[LogEntry], run_id: str, names: dict[str, str]) -> str:
    """Under secure aggregation, what each round's sum was made of: the masked updates the
    coordinator received (each signed by its site: the log holds the signatures), the sites
    whose masks cancelled in the sum, and those that dropped out after sharing their keys and
    were recovered from the others' shares. Empty for a run without it."""
    computed = _of_run(entries, run_id, "secure_aggregate_computed")
    if not computed:
        return ""
    received: dict[int, int] = {}
    for p in _of_run(entries, run_id, "masked_update_received"):
        received[p["round"]] = received.get(p["round"], 0) + 1
    refused = _of_run(entries, run_id, "secagg_message_rejected")

    def who(sites: Sequence[str]) -> str:
        return ", ".join(names.get(s, s) or s for s in sites) or "none"

    rows = [
        [
            p["round"],
            received.get(p["round"], 0),
            who(p.get("survivors", [])),
            who(p.get("dropped", [])),
            str(p.get("model", "-"))[:16],
        ]
        for p in computed
    ]
    text = (
        "<h2>Secure aggregation</h2><p>Each site masked its update before it left the site "
        "(Bonawitz et al., 2017); the coordinator only ever held masked updates and their sum, "
        "in which the masks cancel. A site that dropped out after sharing its keys was "
        "recovered from the other sites' shares of its mask, without its update.</p>"
        + _table(
            [
                "Round",
                "Masked updates received",
                "Sites in the sum",
                "Dropped after sharing (recovered)",
                "Model",
            ],
            rows,
            {0, 1},
        )
    )
    if refused:
        codes = sorted({p.get("code", "") for p in refused})
        text += (
            f"<p class='warn'>{len(refused)} secure-aggregation message(s) were refused and not "
            f"used (forged, replayed or malformed: {_e(', '.join(codes))}).</p>"
        )
    return text


def _privacy(plan_dict: dict[str, Any]) -> str:
    lines = [
        "Images and patient identifiers never left any site: only model updates (weights) "
        "and counts were sent.",
        "Every update travelled over TLS pinned to the coordinator's certificate and was "
        "signed by the site that made it.",
        *(_e(line) for line in protections(plan_dict)),
    ]
    if plan_dict.get("max_update_norm"):
        lines.append(f"Updates larger than norm {plan_dict['max_update_norm']} were refused.")
    return "<ul>" + "".join(f"<li>{line}</li>" for line in lines) + "</ul>"


def render_report(bundle: Bundle, charter_texts: dict[int, str]) -> str:
    """The whole page, as text. ``charter_texts``: the charter versions in the bundle."""
    entries, plan, manifest = bundle.entries, bundle.plan, bundle.manifest
    run_id = str(manifest.get("run_id"))
    federation = entries[0].payload.get("federation", "") if entries else ""
    names = {
        e.payload["site_id"]: e.payload.get("name", "")
        for e in entries
        if e.kind == "site_enrolled"
    }
    plan_dict = plan.to_dict()

    rounds: dict[int, dict[str, Any]] = {}
    for p in _of_run(entries, run_id, "round_opened"):
        r = rounds.setdefault(p["round"], {"attempts": 0, "invited": 0})
        r["attempts"] = p.get("attempt", r["attempts"] + 1)
        r["invited"] = len(p.get("selected", []))
        r["opened"] = p["_at"]
    for p in _of_run(entries, run_id, "round_closed"):
        rounds.setdefault(p["round"], {"attempts": 1, "invited": 0}).update(
            closed=p["_at"],
            updates=p.get("n_updates", 0),
            loss=p.get("mean_loss"),
            model=p["model"],
        )
    round_rows = [
        [
            n,
            r.get("invited", 0),
            r.get("updates", "-"),
            r.get("attempts", 1),
            f"{r['loss']:.4f}" if isinstance(r.get("loss"), float) else "-",
            str(r.get("model", "-"))[:16],
        ]
        for n, r in sorted(rounds.items())
    ]
    loss_series = {
        "mean training loss": [
            (float(n), float(r["loss"]))
            for n, r in sorted(rounds.items())
            if isinstance(r.get("loss"), float)
        ]
    }
    auc_series: dict[str, list[tuple[float, float]]] = {}
    for p in _of_run(entries, run_id, "validation_reported"):
        auc = p.get("metrics", {}).get("auc")
        if isinstance(auc, float):
            auc_series.setdefault(names.get(p["site_id"], p["site_id"]), []).append(
                (float(p["round"]), auc)
            )
    validation_rows, worst = validation_summary(entries, run_id, names)
    ledger = contributions(entries, run_id)
    rejected = _of_run(entries, run_id, "update_rejected")
    charters = [e.payload for e in entries if e.kind == "charter_published"]
    head = bundle.heads[-1]
    started = _of_run(entries, run_id, "run_started")
    finished = _of_run(entries, run_id, "run_finished")

    out = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Tessera report: {_e(federation)} {_e(run_id)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Federated training report: {_e(federation)}</h1>",
        f"<p class='muted'>Run <code>{_e(run_id)}</code>"
        + (f", started {_time(started[0]['_at'])}" if started else "")
        + (f", finished {_time(finished[-1]['_at'])}" if finished else ", not finished")
        + ". Check this report's bundle offline with <code>tessera-coordinator verify</code>.</p>",
        "<h2>What was trained</h2><div class='box'>",
        _table(
            ["", ""],
            [
                ["Plan", f"{plan.name} (hash {plan.plan_hash})"],
                ["Task", f"{plan.task.replace('_', ' ')} of label '{plan.label_column}'"],
                [
                    "Model",
                    f"{plan.architecture} version {plan.architecture_version}, "
                    f"{plan.input_size} x {plan.input_size} pixel input",
                ],
                ["Rounds", f"{len(rounds)} of {plan.rounds} planned; quorum {plan.quorum} sites"],
                [
                    "Aggregation",
                    f"{plan.aggregation} {dict(plan.aggregation_params) or ''}".strip(),
                ],
                ["Update compression", plan.compression],
                ["Final model", str(manifest.get("weights_sha256", ""))],
            ],
            set(),
        ).replace("<thead><tr><th></th><th></th></tr></thead>", ""),
        "</div>",
        "<h2>Consortium terms</h2>",
    ]
    if charters:
        out.append(
            _table(
                ["Charter version", "SHA-256", "Title"],
                [
                    [c["version"], c["sha256"], _title(charter_texts.get(c["version"], ""))]
                    for c in charters
                ],
                {0},
            )
        )
    else:
        out.append("<p class='warn'>No charter was published in this federation.</p>")
    signatures = [e for e in entries if e.kind == "charter_signed"]
    if signatures:
        out.append(
            _table(
                ["Site", "Signed charter version", "Signed by", "When"],
                [
                    [
                        names.get(e.payload["site_id"], e.payload["site_id"]),
                        e.payload["version"],
                        e.payload.get("person", ""),
                        _time(e.at),
                    ]
                    for e in signatures
                ],
                {1},
            )
        )
    decisions = [
        e
        for e in entries
        if e.kind in ("plan_approved", "plan_refused") and e.payload["plan_hash"] == plan.plan_hash
    ]
    out.append("<h2>Plan approvals</h2>")
    if decisions:
        out.append(
            _table(
                ["Site", "Decision", "By", "Reason", "When"],
                [
                    [
                        names.get(e.payload["site_id"], e.payload["site_id"]),
                        "approved" if e.kind == "plan_approved" else "refused",
                        e.payload.get("person", ""),
                        e.payload.get("reason", ""),
                        _time(e.at),
                    ]
                    for e in decisions
                ],
                set(),
            )
        )
    else:
        out.append("<p class='warn'>No site recorded a decision on this plan.</p>")
    out += [
        "<h2>Rounds</h2>",
        line_chart("Global model: mean training loss per round", loss_series, y_label="loss"),
        line_chart("Each site's validation AUC of the global model", auc_series, y_label="AUC")
        if auc_series
        else "",
        _table(
            ["Round", "Sites invited", "Updates aggregated", "Attempts", "Mean loss", "Model"],
            round_rows,
            {0, 1, 2, 3, 4},
        ),
        "<h2>Validation at each site</h2>",
    ]
    if validation_rows:
        out.append(
            f"<p>Each site evaluated the global model on its own held-out data and reported "
            f"metrics only. <strong>Worst site: {_e(worst)}</strong>.</p>"
            if worst
            else ""
        )
        out.append(
            _table(
                ["Site", "Round", "AUC", "Accuracy", "Sensitivity", "Specificity", "Loss", "n"],
                validation_rows,
                {1, 2, 3, 4, 5, 6, 7},
            )
        )
    else:
        out.append("<p class='warn'>No site reported a validation of this run.</p>")
    out += [
        "<h2>Scanner differences between sites</h2>",
        _scanner_shift(_of_run(entries, run_id, "scanner_shift_assessed"), names),
        "<h2>Privacy protections</h2>",
        _privacy(plan_dict),
        _secure_aggregation(entries, run_id, names),
        "<h2>Participation and contributions</h2>",
        _table(
            [
                "Site",
                "Site id",
                "Rounds invited",
                "Rounds contributed",
                "Updates accepted",
                "Samples",
                "Validations",
            ],
            [
                [
                    c.name,
                    c.site_id,
                    len(c.rounds_invited),
                    len(c.rounds_contributed),
                    c.updates_accepted,
                    c.samples,
                    c.validations,
                ]
                for c in ledger
            ],
            {2, 3, 4, 5, 6},
        ),
    ]
    if rejected:
        out += [
            "<h2>Refused updates</h2>",
            _table(
                ["Round", "Site", "Reason"],
                [
                    [p["round"], names.get(p["site_id"], p["site_id"]), p.get("reason", "")]
                    for p in rejected
                ],
                {0},
            ),
        ]
    accepted = _of_run(entries, run_id, "release_accepted")
    if accepted:
        latest = {(p["version"], p["site_id"]): p for p in accepted}  # each site's last verdict
        out += [
            "<h2>Release acceptance at the sites</h2>",
            "<p>Each site verified the release (signatures, weights, inclusion in the log) and "
            "validated it on its own held-out patients before reporting.</p>",
            _table(
                ["Release", "Site", "Verdict", "AUC", "n", "By", "Reason"],
                [
                    [
                        p["version"],
                        names.get(p["site_id"], p["site_id"]),
                        "accepted" if p["accepted"] else "refused",
                        f"{p['metrics']['auc']:.3f}"
                        if isinstance(p.get("metrics", {}).get("auc"), float)
                        else "-",
                        p.get("metrics", {}).get("n", "-"),
                        p.get("person", ""),
                        p.get("reason", ""),
                    ]
                    for p in latest.values()
                ],
                {3, 4},
            ),
        ]
    raised = _of_run(entries, run_id, "dispute_raised")
    resolved = {
        e.payload["dispute_id"]: e.payload.get("resolution", "")
        for e in entries
        if e.kind == "dispute_resolved"
    }
    out.append("<h2>Disputes</h2>")
    if raised:
        subjects = {"round": "round {round}", "release": "release {release}"}
        out.append(
            _table(
                ["Site", "About", "Raised by", "Reason", "State"],
                [
                    [
                        names.get(p["site_id"], p["site_id"]),
                        subjects.get(p["subject"], "recorded contribution").format(**p),
                        p.get("person", ""),
                        p.get("reason", ""),
                        f"resolved: {resolved[p['dispute_id']]}"
                        if p["dispute_id"] in resolved
                        else "open",
                    ]
                    for p in raised
                ],
                set(),
            )
        )
    else:
        out.append("<p>No site raised a dispute about this run.</p>")
    out += [
        "<h2>Signed record</h2>",
        "<p>The coordinator signed this tree head over every entry of the federation's "
        "provenance log (RFC 6962 Merkle tree, Ed25519 signature).</p>",
        _table(
            ["Entries", "Merkle root", "Signed at", "Signature"],
            [[head.size, head.root, _time(head.timestamp), head.signature]],
            {0},
        ),
        "<p class='muted'>Coordinator public key: "
        f"<code>{_e(bundle.keys.get('coordinator'))}</code></p>",
        "</body></html>",
    ]
    return "\n".join(part for part in out if part)


def _title(text: str) -> str:
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            return line.lstrip("# ").strip()
    return ""
