"""A real failed disk write in the middle of a run: the run pauses, the operator sees why,
and a restart once the disk is fixed finishes it.

End to end as ``test_crashes.py``, without the proxy: a real coordinator process and two real
site processes started through their command lines, TLS on loopback. The coordinator runs
under a file size limit (``RLIMIT_FSIZE``, which binds root too; CPython ignores ``SIGXFSZ``,
so a write past the limit fails with ``EFBIG`` as on a full disk) below the size of an update
and above everything else it writes (database, log). The first update it receives fails to be
written half-way. Nothing is mocked: the failure is the kernel's.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from coordinator.aggregation import aggregate_round
from coordinator.config import CoordinatorConfig
from coordinator.federation import Federation
from coordinator.localrun import LocalFederation, free_port
from coordinator.pause import PAUSE_FILE, read_pause
from shared.aggregation import make_strategy
from shared.plan import demo_plan
from shared.synthetic import generate_federation

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

# An MLP of ~3.3 MB: its updates travel in four 1 MiB chunks.
PLAN: dict[str, Any] = dict(
    rounds=1, quorum=2, min_sites=2, round_deadline_s=120, input_size=32, batch_size=16,
    local_epochs=1, architecture="mlp", architecture_params={"width": 800},
)  # fmt: skip
FILE_LIMIT = 3 << 19  # 1.5 MiB: an update fails in its second chunk


@dataclass
class Federated:
    launcher: LocalFederation
    fed: Federation
    run_id: str

    @property
    def coordinator_log(self) -> str:
        path = self.launcher.root / "coordinator.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        sites = [
            f"--- {s.name}\n{s.log_path.read_text(errors='replace')[-3000:]}"
            for s in self.launcher.sites
            if s.log_path.exists()
        ]
        return "\n".join([self.coordinator_log[-6000:], *sites])

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")
            time.sleep(0.05)

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "coordinator.cli",
                "--data-dir",
                str(self.fed.paths.root),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout


# Run in the coordinator's own process before it starts: writes past the limit fail. (The
# limit is set there rather than in a ``preexec_fn``, which is unsafe in a threaded parent.)
LIMITED_SERVE = f"""
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({FILE_LIMIT}, {FILE_LIMIT}))
sys.argv = ["tessera-coordinator", *sys.argv[1:]]
runpy.run_module("coordinator.cli", run_name="__main__", alter_sys=True)
"""


def start_limited_coordinator(launcher: LocalFederation) -> subprocess.Popen[bytes]:
    """``tessera-coordinator serve`` as ``LocalFederation.start_coordinator`` starts it, under
    the file size limit."""
    port_file = launcher.coordinator_dir / "serve.port"
    port_file.unlink(missing_ok=True)
    with open(launcher.root / "coordinator.log", "ab") as log:
        data_dir = str(launcher.coordinator_dir)
        proc = subprocess.Popen(
            [sys.executable, "-c", LIMITED_SERVE, "--data-dir", data_dir, "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    launcher.coordinator = proc
    deadline = time.monotonic() + 60
    while not port_file.is_file():
        assert proc.poll() is None, (launcher.root / "coordinator.log").read_text()
        assert time.monotonic() < deadline, "the coordinator did not start"
        time.sleep(0.05)
    return proc


@pytest.fixture
def federated(tmp_path: Path) -> Iterator[Federated]:
    """Two sites enrolled (and their images imported), a one-round run started."""
    launcher = LocalFederation(tmp_path / "fed")
    manifest = generate_federation(
        tmp_path / "data", sites=2, seed=7, images_per_site=16, test_images=4, image_size=32
    )
    fed = Federation.init(
        launcher.coordinator_dir,
        CoordinatorConfig(federation=launcher.federation, port=free_port()),
    )
    try:
        launcher.start_coordinator()
        for s in manifest.sites:
            launcher.enrol_site(fed, s.name, s.dicom_dir, s.labels_csv)
        launcher.stop()
        run_id = launcher.start_run(fed, demo_plan(name="disk-failure", **PLAN))
        yield Federated(launcher, fed, run_id)
    finally:
        launcher.stop()
        fed.close()


def test_a_failed_disk_write_pauses_the_run_until_a_restart(federated: Federated) -> None:
    launcher, fed, run_id = federated.launcher, federated.fed, federated.run_id
    run = fed.store.run(run_id)
    assert run is not None
    initial = run.model_digest
    # The limit falls inside an update, above everything else the coordinator writes.
    assert len(fed.blobs.get(initial)) > 2 * FILE_LIMIT
    db_files = list(fed.paths.root.glob(fed.paths.database.name + "*"))  # with -wal, -shm
    assert db_files and all(p.stat().st_size < FILE_LIMIT // 3 for p in db_files), db_files

    limited = start_limited_coordinator(launcher)
    for site in launcher.sites:
        launcher.start_site(site)
    federated.wait(lambda: read_pause(fed.paths.root) is not None, "the run to pause")

    # Paused, not crashed: the process serves on, the reason is in its log and in `status`.
    time.sleep(1.0)  # a pause holds: nothing more is attempted meanwhile
    assert limited.poll() is None, federated.logs()
    pause = read_pause(fed.paths.root)
    assert pause is not None
    assert (pause.run_id, pause.round, pause.code) == (run_id, 1, "storage.write")
    assert "File too large" in pause.reason
    assert f"run {run_id} paused at round 1: a disk write failed" in federated.coordinator_log
    status = federated.cli("status")
    assert f"PAUSED: run {run_id} at round 1, a disk write failed:" in status
    assert "File too large [storage.write]" in status
    assert "restart the coordinator (tessera-coordinator serve)" in status
    assert json.loads(federated.cli("status", "--json"))["paused"]["run_id"] == run_id

    # Nothing corrupt: the database checks out, the run and its round are where they were,
    # no update was acknowledged, and every stored blob matches its digest.
    db = sqlite3.connect(fed.paths.database)
    try:
        assert db.execute("pragma integrity_check").fetchone() == ("ok",)
    finally:
        db.close()
    run = fed.store.run(run_id)
    assert run is not None and (run.status, run.current_round, run.model_digest) == (
        "running",
        1,
        initial,
    )
    assert fed.store.updates(run_id, 1) == []
    assert [r["status"] for r in fed.store.rounds(run_id)] == ["open"]
    for blob in fed.blobs.root.glob("??/*"):
        assert fed.blobs.get(blob.name)  # raises on a blob that does not match its digest
    assert all(s.proc is not None and s.proc.poll() is None for s in launcher.sites)

    # The disk is fixed: the operator restarts the coordinator, and the sites (which kept
    # their updates) finish the run.
    limited.send_signal(signal.SIGTERM)
    assert limited.wait(timeout=30) == 0
    launcher.start_coordinator()
    try:
        launcher.wait_sites(timeout=150)
    except Exception as exc:
        raise AssertionError(f"{exc}\n{federated.logs()}") from exc
    assert [s.proc.returncode for s in launcher.sites if s.proc] == [0, 0], federated.logs()
    assert not (fed.paths.root / PAUSE_FILE).exists()
    assert f"resuming run {run_id}, paused at round 1" in federated.coordinator_log
    assert "PAUSED" not in federated.cli("status")
    run = fed.store.run(run_id)
    assert run is not None and run.status == "finished", federated.logs()
    stored = fed.store.updates(run_id, 1)
    assert len(stored) == 2
    plan = fed.plan(run.plan_hash)
    strategy = make_strategy(plan.aggregation, plan.aggregation_params, weighting=plan.weighting)
    expected = aggregate_round(fed.blobs, initial, stored, strategy)
    assert run.model_digest == hashlib.sha256(expected.model).hexdigest() != initial
