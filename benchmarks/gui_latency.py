"""Does the site app's window stay responsive while it imports 2,000 files and trains a round?

Measures the GUI event loop's lateness: a ``QTimer`` fires every 10 ms on the GUI thread and
records how late each tick is (time since the previous tick minus 10 ms). Meanwhile the real
main window (offscreen) imports 2,000 synthetic DICOM files through the Data page's import
path (the task runner, a worker thread) and takes part in one training round through the
Participation page's service (the participant in its own thread and event loop, training in
its worker process) against a real coordinator on loopback, in its own process as in
practice. The measurement runs from the moment both start until both have finished.

Ends with ``RESULT max_latency_ms=... p99_latency_ms=...``; the goal (issue 4) is a maximum
of 100 ms, which a person perceives as the window still reacting at once.

Run: ``python -m benchmarks.gui_latency [--files 2000]``.
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from PySide6.QtCore import QElapsedTimer, QTimer

from coordinator.federation import Federation
from coordinator.localrun import LocalFederation
from shared.plan import demo_plan
from shared.synthetic import generate_federation
from site_client.core.config import SiteDir
from site_client.core.enrolment import enrol
from site_client.core.governance_link import StandingApprovals
from site_client.core.participant import LocalData
from site_client.core.participation import ParticipationService

CHARTER = Path(__file__).parents[1] / "coordinator" / "templates" / "charter.md"
TICK_MS = 10
GOAL_MS = 100.0


@contextlib.contextmanager
def _coordinator(root: Path) -> Iterator[Federation]:
    """A real coordinator in its own process, as in practice (it runs on another machine):
    a coordinator thread in this process would compete with the window for the interpreter
    lock, which measures the benchmark's set-up rather than the app."""
    launcher = LocalFederation(root)
    fed = launcher.init()
    try:
        launcher.start_coordinator()
        yield fed
    finally:
        launcher.stop()
        fed.close()


class LatencyProbe:
    """Lateness of a 10 ms timer on the GUI thread, in milliseconds."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.clock = QElapsedTimer()
        self.timer = QTimer()
        self.timer.setInterval(TICK_MS)
        self.timer.timeout.connect(self._tick)
        self._last = 0

    def start(self) -> None:
        self.clock.start()
        self._last = self.clock.nsecsElapsed()
        self.timer.start()

    def _tick(self) -> None:
        now = self.clock.nsecsElapsed()
        self.samples.append(max(0.0, (now - self._last) / 1e6 - TICK_MS))
        self._last = now

    def stop(self) -> None:
        self.timer.stop()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--timeout", type=float, default=180.0)
    args = parser.parse_args(argv)

    from site_client.gui.app import application
    from site_client.gui.errors import ErrorReporter
    from site_client.gui.main_window import MainWindow
    from site_client.gui.tasks import TaskRunner

    app = application([])
    with tempfile.TemporaryDirectory(prefix="tessera-gui-latency-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        data = generate_federation(
            root / "data",
            sites=2,
            seed=3,
            images_per_site=[args.files, 48],
            test_images=0,
            image_size=32,
        )
        print(f"generated {args.files} + 48 files in {time.perf_counter() - t0:.1f} s")
        with _coordinator(root / "coordinator") as fed:
            site_dir = SiteDir(root / "site")
            config = asyncio.run(enrol(fed.invite("Latency site"), site_dir, "Latency site"))
            plan = demo_plan(
                rounds=1, quorum=1, min_sites=1, input_size=32, batch_size=8, local_epochs=1
            )
            charter = fed.publish_charter(CHARTER.read_bytes())
            plan_hash = fed.add_plan(plan)
            fed.start_run(plan_hash)
            service = ParticipationService(
                site_dir,
                LocalData(data.sites[1].dicom_dir, data.sites[1].labels_csv),
                standing=StandingApprovals(
                    person="Benchmark",
                    charters=frozenset({charter.sha256}),
                    plans=frozenset({plan_hash}),
                ),
                exit_when_done=True,
            )
            errors = ErrorReporter()
            errors.dialogs = False
            runner = TaskRunner(errors)
            window = MainWindow(site_dir, config, runner, participation=service)
            window.show()
            app.processEvents()

            probe = LatencyProbe()
            probe.start()
            started = time.perf_counter()
            task = window.data_page.import_panel.start_import(data.sites[0].dicom_dir)
            window.show_page(2)
            window.participation_page.start()
            done_at: dict[str, float] = {}
            deadline = started + args.timeout
            while time.perf_counter() < deadline:
                app.processEvents()
                if "import" not in done_at and not task.running:
                    done_at["import"] = time.perf_counter() - started
                if "round" not in done_at and not service.running:
                    done_at["round"] = time.perf_counter() - started
                if len(done_at) == 2:
                    break
                time.sleep(0.001)  # the event loop's own idle wait, as app.exec() would
            probe.stop()
            window.participation_page.service.stop()
            runner.shutdown(timeout_s=30)
            if len(done_at) < 2:
                raise SystemExit(f"did not finish within {args.timeout:.0f} s: {done_at}")
            report = task.result
            snap = service.snapshot
            rounds = [r for r in snap.run_history() if r.accepted]
            if report is None or not rounds or errors.last is not None:
                raise SystemExit(f"the work failed: {errors.last} {snap}")
            window.hide()

    samples = probe.samples
    max_ms, p99_ms = max(samples), _percentile(samples, 0.99)
    print(
        f"import of {args.files} files: {done_at['import']:.1f} s "
        f"({report.indexed} indexed, {report.rejected} rejected); "
        f"round trained and accepted: {done_at['round']:.1f} s; "
        f"{len(samples)} ticks of {TICK_MS} ms"
    )
    print(f"goal: max lateness <= {GOAL_MS:.0f} ms -> {'met' if max_ms <= GOAL_MS else 'NOT met'}")
    print(
        f"RESULT max_latency_ms={max_ms:.1f} p99_latency_ms={p99_ms:.1f} "
        f"median_latency_ms={_percentile(samples, 0.5):.1f} goal_ms={GOAL_MS:.0f} "
        f"ratio_to_goal={max_ms / GOAL_MS:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
