"""Real sites for in-process end-to-end runs: enrolled with invitation codes from the
coordinator, their synthetic DICOM files imported into their indexes and labelled; a real
coordinator serving them, and a run they are approved to take part in."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from coordinator.federation import Federation
from coordinator.server import CoordinatorServer
from shared.plan import TrainingPlan
from shared.synthetic import FederationManifest
from site_client.core.config import SiteDir
from site_client.core.enrolment import enrol
from site_client.core.governance_link import StandingApprovals
from site_client.core.intake.importer import import_folder
from site_client.core.intake.labels import attach_labels


async def enrolled_sites(fed: Federation, data: FederationManifest, root: Path) -> list[SiteDir]:
    """One enrolled, imported, labelled site folder per site of ``data``, under ``root``."""
    sites = []
    for i, site in enumerate(data.sites):
        site_dir = SiteDir(root / f"site-{i}")
        await enrol(fed.invite(site.name), site_dir, site.name)
        index = site_dir.open_index()
        try:
            import_folder(index, site.dicom_dir)
            attach_labels(index, site.labels_csv)
        finally:
            index.close()
        sites.append(site_dir)
    return sites


CHARTER = Path(__file__).parents[2] / "coordinator" / "templates" / "charter.md"


@contextlib.asynccontextmanager
async def serving(fed: Federation) -> AsyncIterator[CoordinatorServer]:
    """A coordinator serving ``fed`` over TLS on a free port while the body runs."""
    server = CoordinatorServer(fed, admin_poll_s=0.05)
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(server.serve(ready=ready.set_result))
    try:
        await asyncio.wait_for(ready, timeout=10)
        yield server
    finally:
        server.stop()
        await asyncio.wait_for(task, timeout=15)


def start_run(fed: Federation, plan: TrainingPlan) -> tuple[str, StandingApprovals]:
    """Publish the template charter, start a run of ``plan``, and the standing approvals
    under which a site's person accepts both (as the wizard and Governance page record)."""
    charter = fed.publish_charter(CHARTER.read_bytes())
    plan_hash = fed.add_plan(plan)
    run_id = fed.start_run(plan_hash).run_id
    standing = StandingApprovals(
        person="Site lead", charters=frozenset({charter.sha256}), plans=frozenset({plan_hash})
    )
    return run_id, standing
