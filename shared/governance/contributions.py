"""The contribution ledger: who took part in what, computed from the provenance log only.

Consortia credit sites for authorship and for their share of the work, so the figures must be
ones every party can recompute: they are counted from logged entries (rounds a site was invited
to, updates accepted into a round, samples behind them, validations it ran), never from
anything the coordinator keeps outside the signed log.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from shared.provenance.log import LogEntry


@dataclass(slots=True)
class Contribution:
    site_id: str
    name: str
    rounds_invited: set[int] = field(default_factory=set)
    rounds_contributed: set[int] = field(default_factory=set)
    updates_accepted: int = 0
    samples: int = 0
    validations: int = 0

    def to_dict(self) -> dict[str, object]:
        return {
            "site_id": self.site_id,
            "name": self.name,
            "rounds_invited": len(self.rounds_invited),
            "rounds_contributed": len(self.rounds_contributed),
            "updates_accepted": self.updates_accepted,
            "samples": self.samples,
            "validations": self.validations,
        }


def contributions(entries: Sequence[LogEntry], run_id: str | None = None) -> list[Contribution]:
    """Per enrolled site, in enrolment order; ``run_id`` limits the counts to one run.

    An update counts as accepted when a closed round (or a securely aggregated one) lists it
    among its inputs, so an update received in an attempt that was later retried is not
    counted twice.
    """
    sites: dict[str, Contribution] = {}
    for e in entries:
        p = e.payload
        if e.kind == "site_enrolled":
            sites[p["site_id"]] = Contribution(p["site_id"], p.get("name", ""))
            continue
        if run_id is not None and p.get("run_id") != run_id:
            continue
        if e.kind == "round_opened":
            for site_id in p.get("selected", []):
                if site_id in sites:
                    sites[site_id].rounds_invited.add(p["round"])
        elif e.kind in ("round_closed", "secure_aggregate_computed"):
            # Under secure aggregation the round's inputs are the masked updates summed
            # (``coordinator.secagg_server``); its round_closed entry lists none.
            for item in p.get("inputs", []):
                c = sites.get(item["site_id"])
                if c is not None:
                    c.rounds_contributed.add(p["round"])
                    c.updates_accepted += 1
                    c.samples += int(item.get("num_samples", 0))
        elif e.kind == "validation_reported":
            c = sites.get(p.get("site_id", ""))
            if c is not None:
                c.validations += 1
    return list(sites.values())
