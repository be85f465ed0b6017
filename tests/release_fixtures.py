"""A genuine model release, made by the coordinator's own code, held by an enrolled site.

Shared by the site's core tests and the app's tests: a one-round run of the demo plan at
32x32 is released by ``coordinator.release.make_release`` and installed in the site folder as
the participant installs one, with the participant's automatic verdict (metrics on the site's
held-out images) signed with the site key.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import coordinator
from coordinator.config import CoordinatorConfig
from coordinator.federation import Federation
from coordinator.release import make_release
from shared.crypto.keys import generate_signing_key, load_private_key, save_private_key
from shared.plan import demo_plan
from shared.releases import verify_release
from site_client.core.activity import open_governance
from site_client.core.config import SiteConfig, SiteDir
from site_client.core.governance_link import GovernanceLink
from site_client.core.releases import acceptance, release_dir

CHARTER = Path(coordinator.__file__).parent / "templates" / "charter.md"
SIZE = 32
METRICS = {
    "auc": 0.875,
    "accuracy": 0.8,
    "sensitivity": 0.75,
    "specificity": 0.85,
    "loss": 0.41,
    "n": 40,
}


@dataclass(frozen=True)
class ReleasedSite:
    site_dir: SiteDir
    version: str
    coordinator_key: str


def make_release_folder(
    root: Path, version: str = "1.0", **plan_overrides: object
) -> tuple[Path, str]:
    """A release folder of a real one-round run, and the coordinator's public key."""
    fed = Federation.init(root / "coord", CoordinatorConfig(federation="Release test"), now=10.0)
    try:
        fed.publish_charter(CHARTER.read_bytes(), now=11.0)
        run = fed.start_run(
            fed.add_plan(demo_plan(rounds=1, input_size=SIZE, **plan_overrides), now=12.0)
        )
        fed.store.open_round(run.run_id, 1, [], run.model_digest, 20.0, 80.0)
        fed.store.commit_round(run.run_id, 1, run.model_digest, 0, 0.5, True, 30.0)
        make_release(fed, run.run_id, version, root / "release", now=40.0)
        return root / "release", fed.public_key()
    finally:
        fed.close()


def site_holding(root: Path, folder: Path, key: str, version: str = "1.0") -> ReleasedSite:
    """An enrolled site that received, verified and automatically accepted the release."""
    site_dir = SiteDir(root / "site")
    site_dir.save(
        SiteConfig(
            site_id="site-release",
            site_name="Release Hospital",
            federation="Release test",
            coordinator_url="wss://coordinator.test:8443",
            fingerprint=hashlib.sha256(b"cert").hexdigest(),
            coordinator_key=key,
            enrolled_at=time.time(),
        )
    )
    save_private_key(generate_signing_key(), site_dir.key_file)
    target = release_dir(site_dir, version)
    shutil.copytree(folder, target)

    record = open_governance(site_dir)
    try:
        link = GovernanceLink(record, site_dir.load(), load_private_key(site_dir.key_file))
        acceptance(link, verify_release(target, key), dict(METRICS), time.time())
    finally:
        record.close()
    return ReleasedSite(site_dir, version, key)
