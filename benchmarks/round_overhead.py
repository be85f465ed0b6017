"""A round's time in a real federation against the time to move its bytes, in the same run.

Run: ``python -m benchmarks.round_overhead --sites 3 --params 5000000 --rounds 5`` (the
defaults). ``coordinator.localrun`` starts a real coordinator and ``--sites`` real site
processes (``tessera-site run``) on loopback over TLS, as the demo and the end-to-end tests
do: each site is enrolled with an invitation code and imports a few synthetic DICOM images.
The plan trains the registry's ``mlp`` with its ``width`` chosen so that the model has about
``--params`` float32 parameters, with one local step per round (one epoch, a batch larger than
a site's images, plain SGD): a round's time is then the framework's own, moving and checking
the model and the updates, one cheap step in the warm worker, aggregation, durable storage.

- ``round_seconds``: the coordinator's round time (opened -> committed), median over the
  rounds after the first (the first also starts the sites' training workers).
- ``transfer_floor_seconds``: the same bytes over a plain TLS websocket on this machine, in
  the same run: this process serves, ``--sites`` client processes hold connections; per trial
  the server pushes the model to every client at once in 1 MiB messages and each client, once
  it has it all, sends one update's bytes back. Median of ``FLOOR_TRIALS`` after a warm-up.
  Same TLS 1.3 stack and kind of certificate as the coordinator; no framework protocol.
- ``ratio`` = round_seconds / transfer_floor_seconds. Bars (issue 8): ``round_seconds <= 1.0``
  on 2 CPU cores and ``ratio <= 3``.

The breakdown. Both sides record each round's phases (``shared.phases``). A round's critical
path is the coordinator's model encode, then the phases of the site whose update was accepted
last (download, verify, train, encode update, upload), then the coordinator's aggregate,
persist and commit. Their sum is printed against the round time; what is left over is
messages in flight and waits for a busy event loop, and the check is that it stays within
10 % of the round. On a shared machine the figures move with the load: compare runs only on
the same, otherwise idle, machine. The processor time both sides record per round (and the
floor's, measured the same way) does not depend on the load; it is printed too, with the
shortest round it allows on this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shared.phases import COORDINATOR_PHASES, SITE_PHASES, RoundTimings

INPUT_SIZE = 32  # the MLP sees 32 x 32 = 1024 inputs
IMAGE_SIZE = 64
CHUNK = 1 << 20  # the protocol's default chunk size (shared.protocol.codec.Limits)
FLOOR_TRIALS = 11  # a trial is a fifth of a second; one alone moves by 10 % on a busy machine
TOLERANCE = 0.10
PHASE_ORDER = ("model_encode", *SITE_PHASES, *COORDINATOR_PHASES[1:])


def mlp_width(params: int, input_size: int = INPUT_SIZE) -> int:
    """The width whose one-hidden-layer MLP is closest to ``params`` parameters:
    ``width * (input_size**2 + 2) + 1`` (one channel, one logit)."""
    return max(1, round((params - 1) / (input_size * input_size + 2)))


@dataclass(frozen=True, slots=True)
class RoundPath:
    """One round's critical path: the coordinator's record and the last site's."""

    round: int
    seconds: float
    phases: dict[str, float]
    site_id: str
    coordinator_cpu: float  # processor seconds of the coordinator process
    sites_cpu: float  # of every site process and its training job (not its validation)

    @property
    def total(self) -> float:
        return sum(self.phases.values())

    @property
    def cpu(self) -> float:
        return self.coordinator_cpu + self.sites_cpu


def critical_paths(records: Sequence[RoundTimings]) -> list[RoundPath]:
    """Per round with a coordinator record and at least one site record, the phases along
    its critical path (see the module docstring), in round order."""
    coordinator = {r.round: r for r in records if r.side == "coordinator"}
    paths = []
    for rnd, coord in sorted(coordinator.items()):
        sites = [r for r in records if r.side == "site" and r.round == rnd]
        if not sites:
            continue
        last = max(sites, key=lambda r: r.ended)
        phases = {name: 0.0 for name in PHASE_ORDER}
        for name, value in coord.phases.items():
            phases[name] += value
        for name, value in last.phases.items():
            phases[name] += value
        sites_cpu = sum(r.cpu for r in sites)
        paths.append(RoundPath(rnd, coord.seconds, phases, last.site_id, coord.cpu, sites_cpu))
    return paths


def _label(phase: str) -> str:
    return phase.replace("_", " ")


def print_breakdown(paths: Sequence[RoundPath]) -> bool:
    """The table of phases per round with their medians; returns whether every round's
    phases add up to its time within ``TOLERANCE``."""
    head = f"{'critical path, seconds':<26}{'median':>8}" + "".join(
        f"{'r' + str(p.round):>8}" for p in paths
    )
    print(head)
    for name in PHASE_ORDER:
        values = [p.phases[name] for p in paths]
        print(
            f"{_label(name):<26}{statistics.median(values):>8.3f}"
            + "".join(f"{v:>8.3f}" for v in values)
        )
    rows = (
        ("sum of phases", [p.total for p in paths]),
        ("round (opened->committed)", [p.seconds for p in paths]),
        ("unaccounted", [p.seconds - p.total for p in paths]),
        ("cpu, all but validation", [p.cpu for p in paths]),
    )
    for label, values in rows:
        print(
            f"{label:<26}{statistics.median(values):>8.3f}" + "".join(f"{v:>8.3f}" for v in values)
        )
    shares = [p.total / p.seconds for p in paths]
    ok = all(abs(1 - s) <= TOLERANCE for s in shares)
    print(
        f"check: the phases add up to the round within {TOLERANCE:.0%}: "
        f"{'yes' if ok else 'NO'} (sum / round: {' '.join(f'{s:.0%}' for s in shares)})"
    )
    return ok


# --- the federation ---------------------------------------------------------------------


def run_federation(
    root: Path, *, sites: int, params: int, rounds: int, images: int
) -> tuple[list[RoundTimings], Path, Path]:
    """Run the rounds; returns the timings and the files of the final model and of an update
    of the last round (the bytes the transfer floor moves)."""
    from coordinator.localrun import LaunchError, LocalFederation
    from shared.plan import demo_plan
    from shared.synthetic import generate_federation

    width = mlp_width(params)
    manifest = generate_federation(
        root / "data", sites=sites, seed=0, images_per_site=images, test_images=0,
        image_size=IMAGE_SIZE,
    )  # fmt: skip
    plan = demo_plan(
        rounds=rounds,
        name="round-overhead",
        architecture="mlp",
        architecture_params={"width": width},
        input_size=INPUT_SIZE,
        local_epochs=1,
        batch_size=max(2, images),  # one batch of every training image: a single step
        optimiser="sgd",
        learning_rate=0.01,
        momentum=0.0,
        quorum=sites,
        min_sites=sites,
        round_deadline_s=300.0,
    )
    lf = LocalFederation(root / "federation", federation="Round overhead")
    fed = lf.init()
    try:
        lf.start_coordinator()
        for s in manifest.sites:
            lf.enrol_site(fed, s.name, s.dicom_dir, s.labels_csv)
        run_id = lf.start_run(fed, plan)
        started = time.monotonic()
        for site in lf.sites:
            lf.start_site(site, share_summary=False)
        try:
            lf.wait_sites(timeout=120 + 60 * rounds)
            run = fed.store.run(run_id)
            if run is None or run.status != "finished":
                raise LaunchError("the run did not finish")
        except LaunchError:
            for log in sorted(lf.root.glob("*.log")):
                print(f"--- {log.name} (end)", file=sys.stderr)
                print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        print(f"{rounds} rounds done in {time.monotonic() - started:.1f} s (sites started)")
        update = fed.store.updates(run_id, rounds)[0]
        return lf.timings(), fed.blobs.path(run.model_digest), fed.blobs.path(update.digest)
    finally:
        lf.stop()
        fed.close()


# --- the transfer floor -----------------------------------------------------------------


async def _floor_server(
    root: Path, clients: int, model_path: Path, update_path: Path, trials: int
) -> tuple[list[float], float, float]:
    """Seconds of each trial, and the processor time per trial of the server and of the
    clients together."""
    from websockets.asyncio.server import ServerConnection, serve

    from shared.crypto.tls import generate_self_signed, server_ssl_context

    fingerprint = generate_self_signed(root / "floor-cert.pem", root / "floor-key.pem")
    ssl_ctx = server_ssl_context(root / "floor-cert.pem", root / "floor-key.pem")
    joined: asyncio.Queue[ServerConnection] = asyncio.Queue()
    finished = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        await joined.put(ws)
        await finished.wait()

    model = memoryview(model_path.read_bytes())
    model_size, update_size = len(model), update_path.stat().st_size

    async def push_pull(ws: ServerConnection) -> None:
        for lo in range(0, model_size, CHUNK):
            await ws.send(model[lo : lo + CHUNK])
        got = 0
        while got < update_size:
            got += len(await ws.recv())

    async with serve(
        handler,
        "127.0.0.1",
        0,
        ssl=ssl_ctx,
        max_size=CHUNK + 1024,
        ping_interval=None,
        compression=None,  # as the coordinator and the sites
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        cmd = [sys.executable, "-m", "benchmarks.round_overhead", "floor-client"]
        args = [f"wss://127.0.0.1:{port}", fingerprint, str(model_size), str(update_path)]
        procs = [subprocess.Popen([*cmd, *args, str(trials)]) for _ in range(clients)]
        try:
            conns = [await asyncio.wait_for(joined.get(), timeout=60) for _ in range(clients)]
            times = []
            server_cpu = -time.process_time()
            for _ in range(trials):
                started = time.perf_counter()
                await asyncio.gather(*(push_pull(ws) for ws in conns))
                times.append(time.perf_counter() - started)
            server_cpu += time.process_time()
            clients_cpu = 0.0
            for ws in conns:  # each client's own processor time for the trials
                clients_cpu += float(await asyncio.wait_for(ws.recv(), timeout=60))
        finally:
            finished.set()
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return times, server_cpu / trials, clients_cpu / trials


async def _floor_client(
    url: str, fingerprint: str, model_size: int, update_path: Path, trials: int
) -> None:
    from shared.crypto.tls import connect_pinned

    update = memoryview(update_path.read_bytes())
    update_size = len(update)
    async with connect_pinned(
        url, fingerprint, max_size=CHUNK + 1024, ping_interval=None, compression=None
    ) as ws:
        cpu = -time.process_time()
        for _ in range(trials):
            got = 0
            while got < model_size:
                got += len(await ws.recv())
            for lo in range(0, update_size, CHUNK):
                await ws.send(update[lo : lo + CHUNK])
        await ws.send(str(cpu + time.process_time()))


# --- main -------------------------------------------------------------------------------


def _load() -> str:
    """The 1-minute load average: other work on the machine slows rounds and floor alike,
    but not always at the same moments; a ratio measured under load is noisier."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (OSError, AttributeError):  # not on every platform
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.round_overhead", description=__doc__)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--params", type=int, default=5_000_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--images", type=int, default=8, help="synthetic images per site")
    return p


def main(argv: list[str]) -> int:
    if argv[:1] == ["floor-client"]:
        url, fingerprint, size, update, trials = argv[1:]
        asyncio.run(_floor_client(url, fingerprint, int(size), Path(update), int(trials)))
        return 0
    args = _parser().parse_args(argv)
    if args.rounds < 2 or args.sites < 1 or args.params < 1 or args.images < 2:
        sys.exit("use --rounds >= 2 (the first round is not counted), --sites >= 1, --images >= 2")
    width = mlp_width(args.params)
    count = width * (INPUT_SIZE * INPUT_SIZE + 2) + 1
    print(
        f"round_overhead: {args.sites} sites, {args.rounds} rounds, mlp width {width} "
        f"({count:,} parameters), one local step per round"
    )
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="tessera-round-") as tmp:
        root = Path(tmp)
        records, model_path, update_path = run_federation(
            root, sites=args.sites, params=args.params, rounds=args.rounds, images=args.images
        )
        sizes = model_path.stat().st_size, update_path.stat().st_size
        print(f"model {sizes[0]:,} bytes, update {sizes[1]:,} bytes")
        paths = [p for p in critical_paths(records) if p.round > 1]
        if len(paths) != args.rounds - 1:
            sys.exit(f"timings of {len(paths)} of the {args.rounds - 1} rounds after the first")
        print()
        print_breakdown(paths)
        floor_trials, floor_server_cpu, floor_clients_cpu = asyncio.run(
            _floor_server(root, args.sites, model_path, update_path, FLOOR_TRIALS + 1)
        )
    floor = floor_trials[1:]  # the first warms up
    round_s = statistics.median(p.seconds for p in paths)
    floor_s = statistics.median(floor)
    round_cpu = statistics.median(p.cpu for p in paths)
    floor_cpu = floor_server_cpu + floor_clients_cpu
    print(
        f"transfer floor (model to {args.sites} clients, one update back from each, plain TLS "
        f"websocket): {' '.join(f'{t:.3f}' for t in floor)} s, median {floor_s:.3f} s"
    )
    cores = os.cpu_count() or 1
    print(
        f"processor time (every process but the sites' validation jobs): {round_cpu:.3f} s per "
        f"round, {floor_cpu:.3f} s per "
        f"floor trial, cpu ratio {round_cpu / floor_cpu:.2f}; on {cores} idle cores a round "
        f"cannot take less than {round_cpu / cores:.3f} s"
    )
    print(
        "where it goes: coordinator "
        f"{statistics.median(p.coordinator_cpu for p in paths):.3f} s and sites (with their "
        f"training jobs) {statistics.median(p.sites_cpu for p in paths):.3f} s a "
        f"round; floor server {floor_server_cpu:.3f} s and clients {floor_clients_cpu:.3f} s a "
        "trial"
    )
    print(f"load average (1 min) of this machine before / after: {load_before} / {_load()}")
    print(
        f"RESULT round_seconds={round_s:.3f} transfer_floor_seconds={floor_s:.3f} "
        f"ratio={round_s / floor_s:.2f} sites={args.sites} params={args.params}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
