"""A W3C PROV-JSON view of the provenance log, for tools that speak PROV.

The log is the record; this is a derived view (https://www.w3.org/Submission/prov-json/):
sites and the coordinator are agents, plans, charters, models and updates are entities, runs
and rounds are activities. Because it is a pure function of the entries, an auditor's verifier
regenerates it and compares, so the view cannot say something the signed log does not.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

from shared.provenance.log import LogEntry

PREFIX = {"tessera": "urn:tessera:", "prov": "http://www.w3.org/ns/prov#"}
COORDINATOR = "tessera:coordinator"


def _time(at: float) -> str:
    """ISO 8601 in UTC to the millisecond (no clock or locale involved)."""
    return datetime.datetime.fromtimestamp(at, datetime.UTC).isoformat(timespec="milliseconds")


def prov_document(entries: Sequence[LogEntry]) -> dict[str, Any]:
    """The PROV-JSON document for ``entries`` (deterministic: same entries, same document)."""
    doc: dict[str, dict[str, Any]] = {
        "agent": {},
        "entity": {},
        "activity": {},
        "used": {},
        "wasGeneratedBy": {},
        "wasAttributedTo": {},
        "wasAssociatedWith": {},
        "wasDerivedFrom": {},
    }

    def relation(kind: str, **fields: str) -> None:
        doc[kind][f"_:{kind}{len(doc[kind]) + 1}"] = {
            (k if k.startswith("prov:") else f"prov:{k}"): v for k, v in fields.items()
        }

    def model(digest: str) -> str:
        ident = f"tessera:model-{digest}"
        doc["entity"].setdefault(ident, {"prov:type": "tessera:Model", "tessera:sha256": digest})
        return ident

    run_plan: dict[str, str] = {}
    for e in entries:
        p, when = e.payload, _time(e.at)
        if e.kind == "federation_created":
            doc["agent"][COORDINATOR] = {
                "prov:type": "prov:SoftwareAgent",
                "tessera:federation": p.get("federation", ""),
                "tessera:public_key": p.get("public_key", ""),
            }
        elif e.kind == "site_enrolled":
            doc["agent"][f"tessera:{p['site_id']}"] = {
                "prov:type": "prov:Organization",
                "prov:label": p.get("name", ""),
                "tessera:public_key": p.get("public_key", ""),
            }
        elif e.kind == "charter_published":
            ident = f"tessera:charter-v{p['version']}"
            doc["entity"][ident] = {
                "prov:type": "tessera:Charter",
                "tessera:sha256": p["sha256"],
                "prov:generatedAtTime": when,
            }
            relation("wasAttributedTo", entity=ident, agent=COORDINATOR)
        elif e.kind == "plan_registered":
            ident = f"tessera:plan-{p['plan_hash']}"
            doc["entity"][ident] = {"prov:type": "tessera:Plan", "prov:label": p.get("name", "")}
            relation("wasAttributedTo", entity=ident, agent=COORDINATOR)
        elif e.kind == "run_started":
            run_plan[p["run_id"]] = p["plan_hash"]
            ident = f"tessera:{p['run_id']}"
            doc["activity"][ident] = {"prov:type": "tessera:Run", "prov:startTime": when}
            relation("used", activity=ident, entity=f"tessera:plan-{p['plan_hash']}")
            relation("wasAssociatedWith", activity=ident, agent=COORDINATOR)
        elif e.kind == "round_opened":
            ident = f"tessera:{p['run_id']}-round-{p['round']}"
            doc["activity"].setdefault(ident, {"prov:type": "tessera:Round"})
            doc["activity"][ident]["prov:startTime"] = when
            if p.get("model_in"):
                relation("used", activity=ident, entity=model(p["model_in"]))
        elif e.kind == "update_received":
            ident = f"tessera:update-{p['digest']}"
            site = f"tessera:{p['site_id']}"
            doc["entity"][ident] = {
                "prov:type": "tessera:ModelUpdate",
                "tessera:num_samples": p.get("num_samples", 0),
                "prov:generatedAtTime": when,
            }
            relation("wasAttributedTo", entity=ident, agent=site)
            if p.get("base_model"):
                relation("wasDerivedFrom", generatedEntity=ident, usedEntity=model(p["base_model"]))
        elif e.kind == "round_closed":
            activity = f"tessera:{p['run_id']}-round-{p['round']}"
            doc["activity"].setdefault(activity, {"prov:type": "tessera:Round"})
            doc["activity"][activity]["prov:endTime"] = when
            out = model(p["model"])
            relation("wasGeneratedBy", entity=out, activity=activity)
            relation("wasAssociatedWith", activity=activity, agent=COORDINATOR)
            for item in p.get("inputs", []):
                update = f"tessera:update-{item['digest']}"
                relation("used", activity=activity, entity=update)
                relation("wasDerivedFrom", generatedEntity=out, usedEntity=update)
        elif e.kind == "run_finished":
            doc["activity"].setdefault(f"tessera:{p['run_id']}", {"prov:type": "tessera:Run"})
            doc["activity"][f"tessera:{p['run_id']}"]["prov:endTime"] = when
    return {"prefix": dict(PREFIX), **{k: v for k, v in doc.items() if v}}
