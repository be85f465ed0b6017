"""Real sites for in-process end-to-end runs: enrolled with invitation codes from the
coordinator, their synthetic DICOM files imported into their indexes and labelled."""

from __future__ import annotations

from pathlib import Path

from coordinator.federation import Federation
from shared.synthetic import FederationManifest
from site_client.core.config import SiteDir
from site_client.core.enrolment import enrol
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
