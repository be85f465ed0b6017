"""A whole federation on this machine: one coordinator and N site processes on loopback.

Used by the demo, the end-to-end tests and the benchmarks. Every participant is a separate
process started through its own command line (``tessera-coordinator serve``,
``tessera-site enrol`` / ``import`` / ``run``), talking over real websockets with TLS, exactly
as on separate machines; nothing here imports the site's code. A site is set up as a hospital
would set it up: enrolled with its invitation code, its DICOM folder imported into its study
index with the labels file attached, then ``run`` trains on what was imported.

Each side appends its per-round phase timings to ``timings.jsonl`` in its own data directory
(``shared.phases``); ``LocalFederation.timings()`` collects them, for the benchmarks.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.config import CoordinatorConfig
from coordinator.federation import Federation
from shared.errors import TesseraError
from shared.phases import TIMINGS_FILE, RoundTimings, read_timings
from shared.plan import TrainingPlan


class LaunchError(TesseraError):
    code = "demo.launch"


@dataclass
class SiteProcess:
    name: str
    data_dir: Path
    dicom_dir: Path
    labels_csv: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class LocalFederation:
    root: Path
    federation: str = "Tessera demo"
    coordinator: subprocess.Popen[bytes] | None = None
    sites: list[SiteProcess] = field(default_factory=list)

    @property
    def coordinator_dir(self) -> Path:
        return self.root / "coordinator"

    def init(self, port: int = 0) -> Federation:
        """Create the coordinator's data directory. ``port=0`` takes any free port at each
        start; pass ``free_port()`` for a coordinator that will be restarted."""
        self.root.mkdir(parents=True, exist_ok=True)
        return Federation.init(
            self.coordinator_dir, CoordinatorConfig(federation=self.federation, port=port)
        )

    def start_coordinator(self, timeout: float = 30.0) -> int:
        port_file = self.coordinator_dir / "serve.port"
        port_file.unlink(missing_ok=True)
        self.coordinator = _spawn(
            [
                sys.executable,
                "-m",
                "coordinator.cli",
                "--data-dir",
                str(self.coordinator_dir),
                "serve",
            ],
            self.root / "coordinator.log",
        )
        deadline = time.monotonic() + timeout
        while not port_file.is_file():
            if self.coordinator.poll() is not None:
                raise LaunchError(f"the coordinator exited; see {self.root / 'coordinator.log'}")
            if time.monotonic() > deadline:
                raise LaunchError("the coordinator did not start in time")
            time.sleep(0.05)
        return int(port_file.read_text())

    def enrol_site(
        self, fed: Federation, name: str, dicom_dir: Path, labels_csv: Path
    ) -> SiteProcess:
        code = fed.invite(name)
        site = SiteProcess(
            name,
            self.root / "sites" / _slug(name),
            dicom_dir,
            labels_csv,
            self.root / f"site-{_slug(name)}.log",
        )
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "site_client.cli",
                "--data-dir",
                str(site.data_dir),
                "enrol",
                code,
                "--name",
                name,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=_env(),
        )
        if result.returncode != 0:
            raise LaunchError(f"enrolment of {name} failed: {result.stderr.strip()[-500:]}")
        self.import_site(site)
        self.sites.append(site)
        return site

    def import_site(self, site: SiteProcess) -> None:
        """``tessera-site import DICOM --labels CSV``: index the images, attach the labels."""
        cmd = [
            sys.executable,
            "-m",
            "site_client.cli",
            "--data-dir",
            str(site.data_dir),
            "import",
            str(site.dicom_dir),
            "--labels",
            str(site.labels_csv),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
        site.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(site.log_path, "a", encoding="utf-8") as log:
            log.write(result.stdout + result.stderr)
        if result.returncode != 0:
            raise LaunchError(
                f"the import at {site.name} failed: {(result.stderr or result.stdout)[-500:]}"
            )

    def start_site(
        self, site: SiteProcess, *, exit_when_done: bool = True, share_summary: bool = True
    ) -> None:
        """Start a site as a hospital would; the demo's sites share their data summary."""
        cmd = [
            sys.executable,
            "-m",
            "site_client.cli",
            "--data-dir",
            str(site.data_dir),
            "run",
            "--headless",
        ]
        if exit_when_done:
            cmd.append("--exit-when-done")
        if share_summary:
            cmd.append("--share-summary")
        cmd += self._advance_decisions(site)
        site.proc = _spawn(cmd, site.log_path)

    def _advance_decisions(self, site: SiteProcess) -> list[str]:
        """The demo's site leads have read the charter and the plans the consortium lead sent
        them, and accept them in advance (signed, under their name, when offered)."""
        fed = Federation.open(self.coordinator_dir)
        try:
            charter = fed.store.charter()
            plans = [p["plan_hash"] for p in fed.store.plans()]
        finally:
            fed.close()
        args = ["--approve-as", f"Site lead of {site.name}"]
        if charter is not None:
            args += ["--accept-charter", charter.sha256]
        for plan_hash in plans:
            args += ["--approve-plan", plan_hash]
        return args

    def start_run(self, fed: Federation, plan: TrainingPlan) -> str:
        plan_hash = fed.add_plan(plan)
        return fed.start_run(plan_hash).run_id

    def wait_sites(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for site in self.sites:
            if site.proc is None:
                continue
            try:
                site.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as exc:
                raise LaunchError(f"site {site.name} did not finish in time") from exc

    def timings(self) -> list[RoundTimings]:
        """Every round's phase timings written so far: the coordinator's, then each site's."""
        records = read_timings(self.coordinator_dir / TIMINGS_FILE)
        for site in self.sites:
            records += read_timings(site.data_dir / TIMINGS_FILE)
        return records

    def kill_coordinator(self) -> None:
        if self.coordinator is not None and self.coordinator.poll() is None:
            self.coordinator.kill()
            self.coordinator.wait()

    def stop(self) -> None:
        procs = [s.proc for s in self.sites if s.proc is not None]
        if self.coordinator is not None:
            procs.append(self.coordinator)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "site"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _spawn(cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env())
