"""End to end: a real coordinator and real site processes over TLS websockets on loopback.

Nothing is mocked: the processes are started through their own command lines, enrol with
invitation codes, train on real DICOM files and exchange signed, chunked updates.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from coordinator.export import export_run
from coordinator.federation import Federation
from coordinator.localrun import LocalFederation, free_port
from coordinator.release import acceptances, make_release
from shared.plan import demo_plan
from shared.provenance.bundle import verify_bundle
from shared.releases import verify_release
from shared.synthetic import generate_federation
from site_client.core.config import SiteDir
from site_client.core.releases import AUTOMATIC, release_dir

pytestmark = pytest.mark.e2e

TINY = {"input_size": 32, "batch_size": 16, "local_epochs": 1}


def _data(root: Path, sites: int):
    return generate_federation(
        root / "data", sites=sites, seed=3, images_per_site=24, test_images=8, image_size=64
    )


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _closed_rounds(fed: Federation, run_id: str) -> list[dict]:
    return [r for r in fed.store.rounds(run_id) if r["status"] == "closed"]


def _log(site) -> str:
    return site.log_path.read_text(errors="replace") if site.log_path.exists() else ""


@pytest.fixture
def launcher(tmp_path: Path):
    lf = LocalFederation(tmp_path)
    yield lf
    lf.stop()


def test_two_sites_two_rounds_over_tls(launcher: LocalFederation) -> None:
    manifest = _data(launcher.root, 2)
    fed = launcher.init()
    launcher.start_coordinator()
    for s in manifest.sites:
        launcher.enrol_site(fed, s.name, s.dicom_dir, s.labels_csv)
    assert len(fed.store.sites()) == 2
    plan = demo_plan(rounds=2, quorum=2, min_sites=2, round_deadline_s=90, **TINY)
    run_id = launcher.start_run(fed, plan)
    initial = fed.store.run(run_id).model_digest
    for site in launcher.sites:
        launcher.start_site(site)
    launcher.wait_sites(timeout=180)

    run = fed.store.run(run_id)
    assert run.status == "finished"
    rounds = _closed_rounds(fed, run_id)
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["n_updates"] == 2 for r in rounds)
    assert rounds[0]["model_in"] == initial
    assert rounds[1]["model_in"] == rounds[0]["model_out"] != initial
    assert run.model_digest == rounds[1]["model_out"]
    # every stored update is signed and its blob is on disk
    for rnd in (1, 2):
        updates = fed.store.updates(run_id, rnd)
        assert {u.site_id for u in updates} == {s.site_id for s in fed.store.sites()}
        assert all(fed.blobs.has(u.digest) for u in updates)
    # each site shared its data summary, counts only, and the coordinator kept it
    summaries = fed.store.site_summaries()
    assert set(summaries) == {s.site_id for s in fed.store.sites()}
    for summary, site in zip(
        (summaries[s.site_id] for s in fed.store.sites()), manifest.sites, strict=True
    ):
        assert summary["images"] == site.n_images
        assert summary["by_scanner"] == {f"{site.manufacturer} {site.model}": site.n_images}
    # the sites exited by themselves when the coordinator said the run was over
    assert all(site.proc.returncode == 0 for site in launcher.sites)
    assert all("finished after 2 rounds" in _log(site) for site in launcher.sites)
    # the run exports to a bundle that an auditor verifies offline
    exported = export_run(fed, run_id, launcher.root / "bundle")
    checked = verify_bundle(exported.out)
    assert checked.updates == 4 and checked.sites == 2
    assert checked.heads >= 3  # one per closed round, one for the export
    # each site validated the model of each round on its own held-out patients; the report an
    # ethics board files shows the chart, every site's validation and the worst site
    assert sorted(v["round"] for v in fed.store.validations(run_id)) == [1, 1, 2, 2]
    page = (exported.out / "report.html").read_text("utf-8")
    assert page.count("<svg") == 2 and "Worst site:" in page
    for site in manifest.sites:
        assert site.name in page


def test_site_killed_mid_round_does_not_stop_the_round(launcher: LocalFederation) -> None:
    manifest = _data(launcher.root, 3)
    fed = launcher.init()
    launcher.start_coordinator()
    for s in manifest.sites:
        launcher.enrol_site(fed, s.name, s.dicom_dir, s.labels_csv)
    plan = demo_plan(rounds=1, quorum=2, min_sites=3, round_deadline_s=25, **TINY)
    run_id = launcher.start_run(fed, plan)
    for site in launcher.sites:
        launcher.start_site(site)
    victim = launcher.sites[2]
    _wait(lambda: "training on local data" in _log(victim), 60, "the victim to start training")
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()

    launcher.sites.remove(victim)
    launcher.wait_sites(timeout=120)
    run = fed.store.run(run_id)
    assert run.status == "finished"
    (round1,) = _closed_rounds(fed, run_id)
    assert round1["n_updates"] == 2
    victim_id = next(s.site_id for s in fed.store.sites() if s.name == victim.name)
    assert victim_id not in {u.site_id for u in fed.store.updates(run_id, 1)}


def test_coordinator_restarted_between_rounds_carries_the_run_on(
    launcher: LocalFederation,
) -> None:
    manifest = _data(launcher.root, 2)
    fed = launcher.init(port=free_port())
    launcher.start_coordinator()
    for s in manifest.sites:
        launcher.enrol_site(fed, s.name, s.dicom_dir, s.labels_csv)
    plan = demo_plan(rounds=3, quorum=2, min_sites=2, round_deadline_s=60, **TINY)
    run_id = launcher.start_run(fed, plan)
    for site in launcher.sites:
        launcher.start_site(site)
    _wait(lambda: len(_closed_rounds(fed, run_id)) >= 1, 120, "round 1 to close")
    launcher.kill_coordinator()  # SIGKILL: no chance to tidy up
    round1 = _closed_rounds(fed, run_id)[0]
    time.sleep(1.0)
    launcher.start_coordinator()
    launcher.wait_sites(timeout=180)

    run = fed.store.run(run_id)
    assert run.status == "finished"
    rounds = _closed_rounds(fed, run_id)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[0]["model_out"] == round1["model_out"]  # history kept as it was
    assert rounds[1]["model_in"] == round1["model_out"]  # and carried on from it
    assert all(r["n_updates"] == 2 for r in rounds)


def test_fedadam_keeps_its_server_state_across_rounds(launcher: LocalFederation) -> None:
    manifest = _data(launcher.root, 2)
    fed = launcher.init()
    launcher.start_coordinator()
    for s in manifest.sites:
        launcher.enrol_site(fed, s.name, s.dicom_dir, s.labels_csv)
    plan = demo_plan(
        rounds=2,
        quorum=2,
        min_sites=2,
        round_deadline_s=90,
        aggregation="fedadam",
        aggregation_params={"eta": 0.01},
        **TINY,
    )
    run_id = launcher.start_run(fed, plan)
    for site in launcher.sites:
        launcher.start_site(site)
    launcher.wait_sites(timeout=180)

    assert fed.store.run(run_id).status == "finished"
    rounds = _closed_rounds(fed, run_id)
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[1]["model_out"] != rounds[0]["model_out"] != rounds[0]["model_in"]
    # the optimiser's state after each round is a stored blob, recorded with its round
    states = [r["opt_state"] for r in rounds]
    assert all(states) and states[0] != states[1]
    assert all(fed.blobs.has(d) for d in states)


def test_a_release_reaches_the_sites_which_check_validate_and_accept_it(
    launcher: LocalFederation,
) -> None:
    manifest = _data(launcher.root, 2)
    fed = launcher.init()
    launcher.start_coordinator()
    for s in manifest.sites:
        launcher.enrol_site(fed, s.name, s.dicom_dir, s.labels_csv)
    plan = demo_plan(rounds=1, quorum=2, min_sites=2, round_deadline_s=90, **TINY)
    run_id = launcher.start_run(fed, plan)
    for site in launcher.sites:
        launcher.start_site(site)
    launcher.wait_sites(timeout=180)
    assert fed.store.run(run_id).status == "finished"

    # The consortium lead releases the run; the sites learn of it when they next connect.
    release = make_release(fed, run_id, "1.0")
    for site in launcher.sites:
        launcher.start_site(site, exit_when_done=False)
    _wait(lambda: len(acceptances(fed.store)) == 2, 120, "both sites' verdicts")
    for row in acceptances(fed.store):
        assert row["version"] == "1.0" and row["accepted"] is True
        assert row["person"] == AUTOMATIC and row["metrics"]["n"] > 0  # validated on site
    for site in launcher.sites:
        folder = release_dir(SiteDir(site.data_dir), "1.0")
        config = SiteDir(site.data_dir).load()
        assert verify_release(folder, config.coordinator_key).head.size == release.head.size
        assert "verified and kept" in _log(site)
