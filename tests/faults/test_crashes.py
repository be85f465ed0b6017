"""Crashes and cut links in the middle of a run: each run finishes with the same model.

End to end as ``test_runs_through_proxy.py``: a real coordinator process and real site
processes started through their command lines, TLS on loopback, every byte through the
``FaultProxy``. One federation is enrolled and a one-round run started once per module; that
state (coordinator and site directories) is then copied for each test, so every test runs the
*same* run: same run id, same sites, same seeds. Local training is seeded by (plan seed, run,
round, site) and aggregation is an order-independent fixed-point sum, so an uninterrupted
copy (the reference) and an interrupted one must end with the same global model, byte for
byte. That is what each test checks, together with the fault's own promise (a transfer
resumed rather than restarted, a run picked up after a SIGKILL).

The coordinator listens on a fixed port (``free_port()`` in the config) so that a restarted
coordinator is found again where the proxy forwards.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.config import CoordinatorConfig
from coordinator.federation import Federation
from coordinator.localrun import LocalFederation, SiteProcess, free_port
from shared.plan import demo_plan
from shared.synthetic import generate_federation

from .proxy import FaultProxy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

CHUNK = 1024 * 1024  # the protocol's chunk: transfers resume at chunk boundaries
# An MLP of ~5 MiB: its model and updates take several chunks, so a cut lands mid-transfer.
PLAN = dict(
    rounds=1, quorum=2, min_sites=2, round_deadline_s=60, input_size=32, batch_size=16,
    local_epochs=1, architecture="mlp", architecture_params={"width": 1300},
)  # fmt: skip


@dataclass
class Base:
    root: Path  # the enrolled federation with its run started, never run itself
    proxy: FaultProxy
    run_id: str
    sites: list[SiteProcess]


@dataclass
class Copy:
    launcher: LocalFederation
    fed: Federation
    proxy: FaultProxy
    run_id: str

    def log(self, site: SiteProcess) -> str:
        return site.log_path.read_text(errors="replace") if site.log_path.exists() else ""

    def logs(self) -> str:
        coordinator = self.launcher.root / "coordinator.log"
        text = coordinator.read_text(errors="replace")[-4000:] if coordinator.exists() else ""
        return "\n".join([text] + [f"--- {s.name}\n{self.log(s)[-3000:]}" for s in self.sites])

    @property
    def sites(self) -> list[SiteProcess]:
        return self.launcher.sites

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")
            time.sleep(0.05)

    def start_sites(self) -> None:
        for site in self.sites:
            self.launcher.start_site(site)

    def finish(self) -> str:
        """Wait for both sites to exit; the run must be finished: its final model's digest."""
        try:
            self.launcher.wait_sites(timeout=150)
        except Exception as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from exc
        run = self.fed.store.run(self.run_id)
        assert run is not None and run.status == "finished", self.logs()
        assert [s.proc.returncode for s in self.sites if s.proc] == [0, 0], self.logs()
        updates = self.fed.store.updates(self.run_id, 1)
        assert len(updates) == 2  # one per site: nothing lost, nothing twice
        (closed,) = [r for r in self.fed.store.rounds(self.run_id) if r["status"] == "closed"]
        assert closed["n_updates"] == 2
        return run.model_digest

    def model_size(self) -> int:
        """Bytes of the run's initial model (call before the run moves on)."""
        run = self.fed.store.run(self.run_id)
        assert run is not None
        return len(self.fed.blobs.get(run.model_digest))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Base]:
    root = tmp_path_factory.mktemp("crashes")
    launcher = LocalFederation(root / "base")
    manifest = generate_federation(
        root / "data", sites=2, seed=5, images_per_site=24, test_images=8, image_size=64
    )
    with FaultProxy() as proxy:
        fed = Federation.init(
            launcher.coordinator_dir,
            CoordinatorConfig(
                federation=launcher.federation, port=free_port(), public_url=proxy.url()
            ),
        )
        try:
            proxy.set_upstream("127.0.0.1", launcher.start_coordinator())
            for s in manifest.sites:
                launcher.enrol_site(fed, s.name, s.dicom_dir, s.labels_csv)
            launcher.stop()  # the base is a snapshot: nothing runs in it
            run_id = launcher.start_run(fed, demo_plan(name="crashes", **PLAN))
        finally:
            launcher.stop()
            fed.close()
        yield Base(launcher.root, proxy, run_id, list(launcher.sites))


@contextlib.contextmanager
def copied(base: Base, root: Path) -> Iterator[Copy]:
    """A fresh copy of the base federation in ``root``, its coordinator serving (on the
    base's port, where the proxy forwards)."""
    shutil.copytree(base.root, root, ignore=shutil.ignore_patterns("*.log"))
    launcher = LocalFederation(root)
    for site in base.sites:
        data_dir = root / site.data_dir.relative_to(base.root)
        log_path = root / site.log_path.name
        launcher.sites.append(
            SiteProcess(site.name, data_dir, site.dicom_dir, site.labels_csv, log_path)
        )
    fed = Federation.open(launcher.coordinator_dir)
    base.proxy.heal()
    try:
        launcher.start_coordinator()
        yield Copy(launcher, fed, base.proxy, base.run_id)
    finally:
        launcher.stop()
        fed.close()


@pytest.fixture
def copy(base: Base, tmp_path: Path) -> Iterator[Copy]:
    with copied(base, tmp_path / "fed") as fresh:
        yield fresh


@pytest.fixture(scope="module")
def reference(base: Base, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The global model of the run without any fault."""
    with copied(base, tmp_path_factory.mktemp("reference") / "fed") as ref:
        ref.start_sites()
        return ref.finish()


def test_two_uninterrupted_runs_end_with_the_same_model(reference: str, copy: Copy) -> None:
    """Training and aggregation are deterministic: the premise of every test below."""
    copy.start_sites()
    assert copy.finish() == reference


def test_link_cut_during_the_model_download_resumes(reference: str, copy: Copy) -> None:
    size = copy.model_size()
    before = len(copy.proxy.links())
    copy.proxy.cut_after(size // 2, "down")  # half a model into the first download
    copy.start_sites()
    assert copy.finish() == reference
    assert not copy.proxy.armed
    links = copy.proxy.links()[before:]
    assert sum(link.cut for link in links) == 1
    # Each site downloads the round's model and the final model (for validation): 4 models.
    # A download restarted from zero would add the half model already received (2.6 MiB);
    # a resumed one at most the chunk that was cut.
    assert size > 4 * CHUNK
    assert sum(link.down for link in links) < 4 * size + 1.5 * CHUNK, links


def test_link_cut_during_an_update_upload_resumes(reference: str, copy: Copy) -> None:
    size = copy.model_size()
    copy.start_sites()
    copy.wait(
        lambda: all("training on local data" in copy.log(s) for s in copy.sites),
        "both sites to train",
    )
    before = {link.id: link.up for link in copy.proxy.links()}
    copy.proxy.cut_after(size // 2, "up")  # half an update into the first upload
    assert copy.finish() == reference
    assert not copy.proxy.armed
    update_bytes = sum(
        len(copy.fed.blobs.get(u.digest)) for u in copy.fed.store.updates(copy.run_id, 1)
    )
    up = sum(link.up - before.get(link.id, 0) for link in copy.proxy.links())
    # Both updates once, the cut one resumed: at most the cut chunk again, where a restart
    # would send the half update already sent (2.6 MiB) again.
    assert update_bytes > 8 * CHUNK
    assert up < update_bytes + 1.5 * CHUNK, (up, update_bytes)


def test_coordinator_killed_after_acknowledging_an_update(reference: str, copy: Copy) -> None:
    copy.start_sites()
    copy.wait(lambda: len(copy.fed.store.updates(copy.run_id, 1)) >= 1, "a first update")
    copy.launcher.kill_coordinator()  # SIGKILL: no shutdown code runs
    assert len(copy.fed.store.updates(copy.run_id, 1)) in (1, 2)
    copy.launcher.start_coordinator()  # the same data directory and port
    assert copy.finish() == reference


def test_site_killed_during_training_and_restarted(reference: str, copy: Copy) -> None:
    copy.start_sites()
    victim = copy.sites[0]
    copy.wait(lambda: "training on local data" in copy.log(victim), "the site to train")
    assert victim.proc is not None
    victim.proc.kill()
    victim.proc.wait()
    copy.launcher.start_site(victim)
    assert copy.finish() == reference
