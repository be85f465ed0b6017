"""A coordinator federation and one enrolled site's governance link, for site-side tests that
need real coordinator records and real signatures but no network."""

from __future__ import annotations

import pytest

from coordinator.config import CoordinatorConfig
from coordinator.federation import Federation
from shared.crypto.keys import generate_signing_key, public_key_b64
from shared.identity.invitation import decode_invitation, token_digest
from site_client.core.config import SiteConfig
from site_client.core.governance import SiteGovernance
from site_client.core.governance_link import GovernanceLink


@pytest.fixture
def world(tmp_path):
    """(federation, site id, the site's GovernanceLink over its own record)."""
    fed = Federation.init(
        tmp_path / "coord", CoordinatorConfig(federation="Link", host="127.0.0.1"), now=1.0
    )
    key = generate_signing_key()
    token = decode_invitation(fed.invite("East", now=2.0)).token
    site = fed.store.redeem_invitation(token_digest(token), public_key_b64(key), 3.0)
    config = SiteConfig(
        site_id=site.site_id,
        site_name="East",
        federation="Link",
        coordinator_url="wss://127.0.0.1:1",
        fingerprint="f" * 64,
        coordinator_key=fed.public_key(),
        enrolled_at=3.0,
    )
    record = SiteGovernance(
        tmp_path / "gov.db",
        federation="Link",
        site_id=site.site_id,
        coordinator_key=fed.public_key(),
    )
    yield fed, site.site_id, GovernanceLink(record, config, key)
    record.close()
    fed.close()
