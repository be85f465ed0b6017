"""``tessera-coordinator``: the operator's command line (headless; config in the data dir)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from pathlib import Path

from coordinator.config import (
    ConfigError,
    CoordinatorConfig,
    DataDir,
    load_plan_with_defaults,
    load_service_config,
)
from coordinator.federation import Federation
from coordinator.pause import read_pause
from shared.errors import TesseraError
from shared.privacy.client_dp import protections

DEFAULT_DIR = Path("tessera-coordinator-data")
log = logging.getLogger("tessera.coordinator")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tessera-coordinator",
        description="Run a Tessera federation: invite sites, register plans, run training.",
    )
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DIR, help="federation data directory")
    sub = p.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="create a federation: keys, TLS certificate, database")
    init.add_argument("--federation", required=True, help="the federation's name")
    init.add_argument("--host", default="127.0.0.1", help="address to listen on")
    init.add_argument("--port", type=int, default=8765, help="port to listen on (0: any free)")
    init.add_argument("--public-url", default="", help="wss:// address sites should use")
    init.add_argument(
        "--insecure-loopback",
        action="store_true",
        help="plain ws:// without TLS; only allowed on a loopback address, for development",
    )

    invite = sub.add_parser("invite", help="print a one-time invitation code for a site")
    invite.add_argument("site_name")
    invite.add_argument("--valid-hours", type=float, default=None)

    plan = sub.add_parser("plan", help="training plans")
    plan_sub = plan.add_subparsers(dest="plan_command", required=True)
    plan_add = plan_sub.add_parser("add", help="validate, sign and register a plan (JSON)")
    plan_add.add_argument("path", type=Path)
    plan_sub.add_parser("list", help="list registered plans")

    run = sub.add_parser("run", help="training runs")
    run_sub = run.add_subparsers(dest="run_command", required=True)
    run_start = run_sub.add_parser("start", help="start a run of a registered plan")
    run_start.add_argument("plan_hash", help="plan hash (a unique prefix is enough)")

    status = sub.add_parser("status", help="federation, sites, runs and rounds")
    status.add_argument("--json", action="store_true")

    serve = sub.add_parser("serve", help="serve the federation (websockets over TLS)")
    serve.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="a TOML configuration file (packaging/coordinator.example.toml): its data_dir is "
        "created on first start and its settings replace the data directory's on every start",
    )

    charter = sub.add_parser("charter", help="the federation's terms that every site signs")
    charter_sub = charter.add_subparsers(dest="charter_command", required=True)
    publish = charter_sub.add_parser("publish", help="check, sign and publish a Markdown charter")
    publish.add_argument("path", type=Path)
    charter_sub.add_parser("list", help="list the published charter versions")

    dispute = sub.add_parser("dispute", help="disputes sites raised on rounds, releases, credit")
    dispute_sub = dispute.add_subparsers(dest="dispute_command", required=True)
    dlist = dispute_sub.add_parser("list", help="every dispute, open first")
    dlist.add_argument("--open", action="store_true", help="only those not yet resolved")
    resolve = dispute_sub.add_parser("resolve", help="resolve a dispute with a note (logged)")
    resolve.add_argument("dispute_id")
    resolve.add_argument("--note", required=True, help="the resolution, as the site will read it")

    export = sub.add_parser("export", help="write a finished run's model, bundle and report")
    export.add_argument("run_id", help="run id (a unique prefix is enough)")
    export.add_argument("--out", type=Path, required=True, help="a new, empty folder")

    release = sub.add_parser(
        "release", help="publish a signed release of a finished run (weights and model card)"
    )
    release.add_argument("run_id", help="run id (a unique prefix is enough)")
    release.add_argument(
        "--version", required=True, help="release version MAJOR.MINOR, e.g. 1.0 (never reused)"
    )
    release.add_argument("--out", type=Path, default=None, help="also write it to this new folder")

    check = sub.add_parser("verify", help="check an exported bundle offline")
    check.add_argument("bundle", type=Path)

    privacy = sub.add_parser("privacy", help="differential-privacy planning")
    privacy_sub = privacy.add_subparsers(dest="privacy_command", required=True)
    eps = privacy_sub.add_parser(
        "epsilon", help="epsilon of the sampled Gaussian mechanism (RDP accountant, as Opacus)"
    )
    eps.add_argument("--noise-multiplier", type=float, required=True, help="noise std / clip")
    eps.add_argument("--sample-rate", type=float, required=True, help="1 = full participation")
    eps.add_argument("--steps", type=int, required=True, help="rounds (or DP-SGD steps)")
    eps.add_argument("--delta", type=float, required=True, help="e.g. 1e-5")

    demo = sub.add_parser("demo", help="the end-to-end federated demo on this machine")
    demo.add_argument("--sites", type=int, default=3)
    demo.add_argument("--rounds", type=int, default=5)
    demo.add_argument("--out", type=Path, default=Path("demo-output"))
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--dp",
        action="store_true",
        help="client-level differential privacy: sites clip and noise their updates",
    )
    demo.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="secure aggregation: sites mask their updates, the coordinator sees only the sum",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return _dispatch(args)
    except TesseraError as exc:
        print(f"error [{exc.code}]: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "privacy":
        from shared.privacy.accountant import get_epsilon

        epsilon, _ = get_epsilon(
            noise_multiplier=args.noise_multiplier,
            sample_rate=args.sample_rate,
            steps=args.steps,
            delta=args.delta,
        )
        print(f"epsilon={epsilon:.6g}")
        return 0
    if args.command == "demo":
        from coordinator.demo import run_demo

        return run_demo(
            sites=args.sites,
            rounds=args.rounds,
            out=args.out,
            seed=args.seed,
            dp=args.dp,
            secure_aggregation=args.secure_aggregation,
        )
    if args.command == "verify":
        return _verify(args.bundle)
    if args.command == "init":
        fed = Federation.init(
            args.data_dir,
            CoordinatorConfig(
                federation=args.federation,
                host=args.host,
                port=args.port,
                public_url=args.public_url,
                insecure_loopback=args.insecure_loopback,
            ),
        )
        print(f"federation {args.federation!r} created in {args.data_dir}")
        print(f"certificate fingerprint (SHA-256): {fed.fingerprint()}")
        return 0
    if args.command == "serve" and args.config is not None:
        return _serve(_open_configured(args.config))
    fed = Federation.open(args.data_dir)
    try:
        if args.command == "invite":
            print(fed.invite(args.site_name, hours=args.valid_hours))
        elif args.command == "plan" and args.plan_command == "add":
            print(fed.add_plan(load_plan_with_defaults(args.path, fed.config)))
        elif args.command == "plan":
            for p in fed.store.plans():
                print(f"{p['plan_hash']}  {p['name']}")
        elif args.command == "run":
            run = fed.start_run(args.plan_hash)
            print(run.run_id)
        elif args.command == "status":
            status = fed.status()
            for run in status["runs"]:  # what each run's plan protects, and its epsilon
                run["protections"] = protections(fed.plan(run["plan_hash"]).to_dict())
            pause = read_pause(fed.paths.root)  # a failed disk write stopped the run
            status["paused"] = pause.to_dict() if pause is not None else None
            _print_status(status, as_json=args.json)
        elif args.command == "serve":
            return _serve(fed)
        elif args.command == "charter" and args.charter_command == "publish":
            record = fed.publish_charter(_read_file(args.path))
            print(f"charter version {record.version} published (sha256 {record.sha256})")
        elif args.command == "charter":
            for c in fed.store.charters():
                print(f"version {c.version}  {c.sha256}")
        elif args.command == "dispute" and args.dispute_command == "resolve":
            fed.store.resolve_dispute(args.dispute_id, args.note.strip(), time.time())
            print(f"dispute {args.dispute_id} resolved")
        elif args.command == "dispute":
            rows = fed.store.disputes(open_only=args.open)
            rows.sort(key=lambda r: (r["resolved_at"] is not None, r["raised_at"]))
            for r in rows:
                what = {"round": f"round {r['round']}", "release": f"release {r['release']}"}
                state = "open" if r["resolved_at"] is None else f"resolved: {r['resolution']}"
                print(
                    f"{r['dispute_id']}  {r['site_id']}  {r['run_id']} "
                    f"{what.get(r['subject'], 'contribution')}  [{state}]  "
                    f"{r['person']}: {r['reason']}"
                )
        elif args.command == "export":
            from coordinator.export import export_run

            done = export_run(fed, args.run_id, args.out)
            print(f"run {done.run_id} exported to {done.out}")
            print(f"  model sha256 {done.model_sha256}")
            print(f"  tree head: {done.head.size} entries, root {done.head.root}")
        elif args.command == "release":
            from coordinator.release import make_release

            made = make_release(fed, args.run_id, args.version, args.out)
            print(f"release {made.version} of run {made.run_id} published")
            print(f"  weights sha256 {made.weights_sha256}")
            print(f"  model card sha256 {made.model_card_sha256}")
            print(f"  in the log as entry {made.entry_index}, under tree head {made.head.size}")
            if made.out is not None:
                print(f"  written to {made.out}")
    finally:
        fed.close()
    return 0


def _print_status(status: dict, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(status, indent=2))
        return
    print(f"federation {status['federation']} at {status['address']}")
    print(f"  certificate {status['fingerprint']}")
    print(f"  sites: {len(status['sites'])}")
    for s in status["sites"]:
        print(f"    {s['site_id']}  {s['name']}")
    pause = status.get("paused")
    if pause:
        print(f"  PAUSED: run {pause['run_id']} at round {pause['round']}, a disk write failed:")
        print(f"    {pause['reason']} [{pause['code']}]")
        print(f"    {pause['advice']}")
    for run in status["runs"]:
        print(f"  run {run['run_id']}: {run['status']}, round {run['current_round']}")
        for line in run.get("protections", ()):
            print(f"    {line}")
        for r in run["rounds"]:
            loss = "-" if r["mean_loss"] is None else f"{r['mean_loss']:.4f}"
            print(f"    round {r['round']}: {r['status']}, {r['updates']} updates, loss {loss}")
    shift = status["scanner_shift"]
    if shift["level"] != "unknown":
        print(f"  scanner shift: {shift['level']}. {shift['message']}")
    if status["rejected_updates"]:
        print(f"  rejected updates: {status['rejected_updates']}")


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", code="config.file") from exc


def _verify(path: Path) -> int:
    from shared.provenance.bundle import verify_bundle

    try:
        ok = verify_bundle(path)
    except TesseraError as exc:
        print(f"FAILED [{exc.code}]: {exc}", file=sys.stderr)
        return 1
    print(f"bundle OK: run {ok.run_id}, {ok.entries} log entries under {ok.heads} signed heads,")
    print(f"  {ok.sites} site keys, {ok.updates} signed updates, model sha256 {ok.model_sha256}")
    print(f"  last tree head: {ok.head.size} entries, root {ok.head.root}")
    return 0


def _open_configured(path: Path) -> Federation:
    """The federation a service configuration file describes, created on first start."""
    service = load_service_config(path)
    paths = DataDir(service.data_dir)
    if not paths.config_file.exists():
        Federation.init(service.data_dir, service.coordinator).close()
        log.info("federation %r created in %s", service.coordinator.federation, paths.root)
    elif paths.update_config(service.coordinator):
        log.info("settings of %s updated from %s", paths.root, service.path)
    fed = Federation.open(service.data_dir)
    log.info("certificate SHA-256 %s (invitations carry it for sites to pin)", fed.fingerprint())
    return fed


def _serve(fed: Federation) -> int:
    from coordinator.server import CoordinatorServer

    server = CoordinatorServer(fed)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.stop)
        await server.serve()

    asyncio.run(main())
    return 0


if __name__ == "__main__":
    sys.exit(main())
