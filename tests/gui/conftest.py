"""Fixtures for the site app's tests: offscreen Qt, one task runner, real data, a real
coordinator.

Nothing of ours is mocked. The coordinator is the real ``CoordinatorServer`` on a fresh
federation directory (SQLite, keys, a self-signed TLS certificate), serving on loopback from
its own asyncio loop in a thread, since the test's thread runs the Qt event loop. Images are
real DICOM files from ``shared.synthetic``.
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before any QApplication exists

import asyncio
import contextlib
import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.config import CoordinatorConfig
from coordinator.federation import Federation
from coordinator.server import CoordinatorServer
from shared.crypto.keys import generate_signing_key, public_key_b64, save_private_key
from shared.crypto.signing import sign
from shared.governance.charter import charter_hash
from shared.plan import demo_plan
from shared.protocol import signed
from shared.synthetic import FederationManifest, generate_federation
from site_client.core.activity import open_governance
from site_client.core.config import SiteConfig, SiteDir
from site_client.gui.errors import ErrorReporter
from site_client.gui.tasks import TaskRunner

WAIT_MS = 20_000  # the longest any test waits for a signal (normally < 1 s)


@pytest.fixture
def runner(qtbot) -> Iterator[TaskRunner]:
    errors = ErrorReporter()
    errors.dialogs = False  # tests read ``errors.last`` / ``reported`` instead
    runner = TaskRunner(errors)
    yield runner
    runner.shutdown(timeout_s=10)
    errors.close_dialogs()


@pytest.fixture(scope="session")
def federation(tmp_path_factory: pytest.TempPathFactory) -> FederationManifest:
    """Two synthetic sites (two scanners), small images: real DICOM files, made once."""
    root = tmp_path_factory.mktemp("synthetic")
    return generate_federation(
        root, sites=2, seed=11, images_per_site=[40, 24], test_images=0, image_size=32
    )


@pytest.fixture
def site_dir(tmp_path: Path) -> SiteDir:
    """A site data folder with an enrolment record (the main window needs one)."""
    site_dir = SiteDir(tmp_path / "site")
    site_dir.save(
        SiteConfig(
            site_id="site-test",
            site_name="Test Hospital",
            federation="Test federation",
            coordinator_url="wss://coordinator.test:8443",
            fingerprint=hashlib.sha256(b"test").hexdigest(),
            coordinator_key="",
            enrolled_at=time.time(),
        )
    )
    return site_dir


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[Federation]:
    """A real coordinator serving TLS on a loopback port, in its own thread and loop."""
    fed = Federation.init(
        tmp_path / "coordinator", CoordinatorConfig(federation="GUI test", port=0)
    )
    server = CoordinatorServer(fed, admin_poll_s=0.05)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    failure: list[BaseException] = []

    def serve() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.serve(ready=lambda _port: ready.set()))
            pending = list(server._tasks)  # fire-and-forget flushes to closed sockets
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        except BaseException as exc:
            failure.append(exc)
            ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=serve, name="coordinator", daemon=True)
    thread.start()
    assert ready.wait(15), "the coordinator did not start"
    assert not failure, failure
    try:
        yield fed
    finally:
        with contextlib.suppress(RuntimeError):  # the loop may already be closed
            loop.call_soon_threadsafe(server.stop)
        thread.join(15)
        fed.close()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound, so no one takes it, not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@dataclass(frozen=True)
class GovernedSite:
    """An enrolled site whose governance record holds a charter and a plan, offered and signed
    by a coordinator key made for the test (as the participant records real offers)."""

    site_dir: SiteDir
    coordinator: Ed25519PrivateKey
    site_key: Ed25519PrivateKey
    charter_text: str
    plan_hash: str


CHARTER_TEXT = (
    "# Charter of the Test Federation\n\n## Data use policy\n\nOnly updates leave. "
    "<b>not bold</b>\n\n## Publication and authorship\n\nEvery site names an author.\n"
)


@pytest.fixture
def governed_site(tmp_path: Path) -> GovernedSite:
    coordinator, site_key = generate_signing_key(), generate_signing_key()
    site_dir = SiteDir(tmp_path / "governed-site")
    site_dir.save(
        SiteConfig(
            site_id="site-gov",
            site_name="Governed Hospital",
            federation="Test federation",
            coordinator_url="wss://coordinator.test:8443",
            fingerprint=hashlib.sha256(b"test").hexdigest(),
            coordinator_key=public_key_b64(coordinator),
            enrolled_at=time.time(),
        )
    )
    save_private_key(site_key, site_dir.key_file)
    plan = demo_plan(rounds=3, name="chest-xray v2")
    sha = charter_hash(CHARTER_TEXT)
    governance = open_governance(site_dir)
    try:
        fields = signed.charter_fields(federation="Test federation", version=1, sha256=sha)
        governance.record_charter(
            1, sha, CHARTER_TEXT, sign(coordinator, signed.CHARTER, fields), time.time()
        )
        signature = sign(coordinator, signed.PLAN, signed.plan_fields(plan_hash=plan.plan_hash))
        governance.record_plan(plan.plan_hash, plan.to_dict(), signature, time.time())
    finally:
        governance.close()
    return GovernedSite(site_dir, coordinator, site_key, CHARTER_TEXT, plan.plan_hash)
