"""Real federations through the fault-injection proxy: latency, and every link cut mid-run.

End to end as in ``tests/e2e/test_federation.py``: a real coordinator process and real site
processes, started through their own command lines, over TLS on loopback. The only change is
the address in the invitations (``CoordinatorConfig.public_url``): it points at the proxy,
which forwards raw bytes to the coordinator, so the sites still pin the coordinator's own
certificate and every byte of enrolment, downloads and uploads crosses the proxy.

The two tests share one enrolled federation (enrolment and DICOM import are most of an e2e
test's time) and each start a run of their own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from coordinator.config import CoordinatorConfig
from coordinator.federation import Federation
from coordinator.localrun import LocalFederation, SiteProcess
from shared.plan import demo_plan
from shared.synthetic import generate_federation
from site_client.core.config import SiteDir

from .proxy import FaultProxy, LinkStats

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

TINY = {"input_size": 32, "batch_size": 16, "local_epochs": 1}
PLAN = dict(rounds=1, quorum=2, min_sites=2, round_deadline_s=60, **TINY)


@dataclass
class Proxied:
    launcher: LocalFederation
    fed: Federation
    proxy: FaultProxy
    enrolment_links: list[LinkStats]  # the proxy's links once both sites had enrolled

    def run(self, name: str) -> str:
        """Start a run of ``PLAN`` (the name keeps the plans distinct) and both sites."""
        run_id = self.launcher.start_run(self.fed, demo_plan(name=name, **PLAN))
        for site in self.launcher.sites:
            self.launcher.start_site(site)
        return run_id

    def assert_finished(self, run_id: str) -> None:
        run = self.fed.store.run(run_id)
        assert run is not None and run.status == "finished", _logs(self.launcher)
        (round1,) = [r for r in self.fed.store.rounds(run_id) if r["status"] == "closed"]
        assert round1["n_updates"] == 2
        updates = self.fed.store.updates(run_id, 1)
        assert {u.site_id for u in updates} == {s.site_id for s in self.fed.store.sites()}
        assert all(self.fed.blobs.has(u.digest) for u in updates)
        assert all(site.proc is not None for site in self.launcher.sites)
        assert [site.proc.returncode for site in self.launcher.sites] == [0, 0]  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxied]:
    root = tmp_path_factory.mktemp("proxied")
    launcher = LocalFederation(root)
    manifest = generate_federation(
        root / "data", sites=2, seed=3, images_per_site=24, test_images=8, image_size=64
    )
    # As LocalFederation.init, with the proxy's address in the invitations.
    with FaultProxy() as proxy:
        fed = Federation.init(
            launcher.coordinator_dir,
            CoordinatorConfig(federation=launcher.federation, port=0, public_url=proxy.url()),
        )
        try:
            proxy.set_upstream("127.0.0.1", launcher.start_coordinator())
            for s in manifest.sites:
                launcher.enrol_site(fed, s.name, s.dicom_dir, s.labels_csv)
            yield Proxied(launcher, fed, proxy, proxy.links())
        finally:
            launcher.stop()
            fed.close()


def _log(site: SiteProcess) -> str:
    return site.log_path.read_text(errors="replace") if site.log_path.exists() else ""


def _logs(launcher: LocalFederation) -> str:
    coordinator = launcher.root / "coordinator.log"
    parts = [coordinator.read_text(errors="replace")[-3000:] if coordinator.exists() else ""]
    parts += [f"--- {s.name}\n{_log(s)[-3000:]}" for s in launcher.sites]
    return "\n".join(parts)


def _wait(predicate, timeout: float, what: str, launcher: LocalFederation) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{_logs(launcher)}")
        time.sleep(0.05)


def test_sites_enrolled_through_the_proxy(proxied: Proxied) -> None:
    links = proxied.enrolment_links
    assert len(links) == 2 and not any(link.open for link in links)  # one per enrolment
    assert len(proxied.fed.store.sites()) == 2
    for site in proxied.launcher.sites:
        config = SiteDir(site.data_dir).load()
        assert config.coordinator_url == proxied.proxy.url()
        assert config.fingerprint == proxied.fed.fingerprint()  # the coordinator's own pin


def test_a_run_with_50ms_latency_finishes(proxied: Proxied) -> None:
    launcher, proxy = proxied.launcher, proxied.proxy
    proxy.delay(0.05)
    try:
        before = len(proxy.links())
        run_id = proxied.run("latency")
        launcher.wait_sites(timeout=150)
    finally:
        proxy.heal()

    proxied.assert_finished(run_id)
    (round1,) = proxied.fed.store.rounds(run_id)
    model = proxied.fed.blobs.get(round1["model_in"])
    new: list[LinkStats] = proxy.links()[before:]
    assert len(new) >= 2  # each site's connection went through the proxy...
    # ...the model to both sites and both updates back: more than 1.5 models' worth each way
    # means two of each, with room for compression, should the sites ever ask for it.
    assert sum(link.down for link in new) > 1.5 * len(model)
    assert sum(link.up for link in new) > 1.5 * len(model)


def test_a_run_where_every_link_is_cut_once_still_finishes(proxied: Proxied) -> None:
    launcher, proxy, fed = proxied.launcher, proxied.proxy, proxied.fed
    before = len(proxy.links())
    seen = {s.name: len(_log(s)) for s in launcher.sites}  # the logs hold earlier runs too
    run_id = proxied.run("cut")
    # Cut while both sites hold the model and train: the round is open, no update is sent.
    _wait(
        lambda: all("training on local data" in _log(s)[seen[s.name] :] for s in launcher.sites),
        90,
        "both sites to start training",
        launcher,
    )
    run = fed.store.run(run_id)
    assert run is not None and run.status == "running"
    cut = proxy.cut()

    assert len(cut) == 2, proxy.links()
    launcher.wait_sites(timeout=150)

    proxied.assert_finished(run_id)
    after = proxy.links()[before:]
    assert {link.id for link in after if link.cut} == set(cut)
    # Each site connected again after the cut and finished the round on the new link.
    assert len([link for link in after if link.id > max(cut)]) >= 2
