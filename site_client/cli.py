"""``tessera-site``: the site's command line; with no command it opens the desktop app."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.errors import TesseraError
from site_client import cli_governance, cli_predict
from site_client.core.config import SiteDir

if TYPE_CHECKING:
    from site_client.core.governance_link import StandingApprovals
    from site_client.core.participant import LocalData

DEFAULT_DIR = Path("tessera-site-data")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tessera-site",
        description="Take part in a Tessera federation. Images never leave this hospital.",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DIR,
        help="where this site keeps its key, settings and caches",
    )
    p.add_argument(
        "--self-test",
        action="store_true",
        help="on its own: check that this installation works (libraries, database, DICOM, "
        "training, window) on synthetic data in a temporary folder, then exit",
    )
    sub = p.add_subparsers(dest="command", required=True)
    enrol = sub.add_parser("enrol", help="join a federation with an invitation code")
    enrol.add_argument("code", help="the invitation code from the consortium lead")
    enrol.add_argument("--name", default=None, help="this site's name as others will see it")
    run = sub.add_parser("run", help="take part in training rounds")
    run.add_argument("--headless", action="store_true", help="no window (the only mode so far)")
    run.add_argument(
        "--dicom",
        type=Path,
        default=None,
        help="folder of DICOM files (default: the images imported with 'import')",
    )
    run.add_argument("--labels", type=Path, default=None, help="labels CSV (with --dicom)")
    run.add_argument(
        "--exit-when-done",
        action="store_true",
        help="stop when the coordinator says the run is finished",
    )
    run.add_argument(
        "--proxy",
        metavar="URL",
        default=None,
        help="HTTP(S) proxy to reach the coordinator through, e.g. http://proxy.hospital:3128 "
        "(default: the HTTPS_PROXY environment variable, if set)",
    )
    run.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for training (default: the site policy's share of this machine)",
    )
    run.add_argument(
        "--share-summary",
        action="store_true",
        help="send the coordinator this site's data summary (counts by modality, scanner, "
        "label, image size; no identifiers). Off by default",
    )
    run.add_argument(
        "--approve-as",
        metavar="NAME",
        default=None,
        help="for an unattended site: the person whose advance decisions the next two options "
        "are (signed with the site key)",
    )
    run.add_argument(
        "--accept-charter",
        metavar="SHA256",
        action="append",
        default=[],
        help="accept the charter with this SHA-256 when the coordinator offers it",
    )
    run.add_argument(
        "--approve-plan",
        metavar="HASH",
        action="append",
        default=[],
        help="approve the plan with this hash when it is offered (if it meets the site policy)",
    )
    imp = sub.add_parser(
        "import", help="index a folder (or file) of DICOM images; only changed files are read"
    )
    imp.add_argument("path", type=Path, help="folder (searched recursively) or DICOM file")
    imp.add_argument("--labels", type=Path, default=None, help="labels CSV to attach after import")
    imp.add_argument("--label-column", default="label", help="the label column in the labels CSV")
    imp.add_argument("--json", action="store_true", help="print the import report as JSON")
    summary = sub.add_parser("summary", help="counts of the indexed images (no identifiers)")
    summary.add_argument("--json", action="store_true", help="print the summary as JSON")
    pacs = sub.add_parser("pacs-listen", help="receive images pushed from the PACS (C-STORE)")
    pacs.add_argument("--ae-title", default="TESSERA", help="this site's DICOM AE title")
    pacs.add_argument("--port", type=int, default=11112, help="TCP port to listen on")
    pacs.add_argument(
        "--allow-ae",
        action="append",
        default=[],
        required=True,
        metavar="AE_TITLE",
        help="AE title allowed to send (repeat for each PACS or modality)",
    )
    pacs.add_argument(
        "--host", default="0.0.0.0", help="address to listen on (default: all interfaces)"
    )
    gui = sub.add_parser("gui", help="open the desktop app (also what no command does)")
    gui.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="DIR",
        help="the site's data folder (default: the one chosen last time, else ask)",
    )
    gui.add_argument(
        "--screenshots",
        type=Path,
        default=None,
        metavar="DIR",
        help="render every page with demo data into PNG files in DIR, then exit",
    )
    cli_governance.add_parsers(sub)
    cli_predict.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--self-test"]:  # before the subcommands, which it does not need
        return _self_test(argv[1:])
    args = _parser().parse_args(argv or ["gui"])  # no command: the desktop app
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    site_dir = SiteDir(args.data_dir)
    try:
        if args.command == "enrol":
            from site_client.core.enrolment import enrol

            config = asyncio.run(enrol(args.code, site_dir, args.name))
            print(f"enrolled in {config.federation} as {config.site_name} ({config.site_id})")
            return 0
        if args.command == "import":
            return _import(args, site_dir)
        if args.command == "summary":
            return _summary(args, site_dir)
        if args.command == "pacs-listen":
            return _pacs_listen(args, site_dir)
        if args.command in cli_governance.COMMANDS:
            return cli_governance.dispatch(args, site_dir)
        if args.command in cli_predict.COMMANDS:
            return cli_predict.dispatch(args, site_dir)
        if args.command == "gui":
            return _gui(args)
        return _run(args, site_dir)
    except TesseraError as exc:
        print(f"error [{exc.code}]: {exc}", file=sys.stderr)
        return 2


def _self_test(extra: list[str]) -> int:
    """``--self-test``: the checks of ``site_client.core.selftest``, plus the main window when
    the desktop app is installed; exit status 0 only when every check passed."""
    import importlib.util

    from site_client.core.selftest import Check, Skipped, run_self_test

    if extra:
        print(
            f"error: --self-test takes no other arguments (got {' '.join(extra)})", file=sys.stderr
        )
        return 2

    def main_window(ctx: object) -> str:
        if importlib.util.find_spec("site_client.gui.main_window") is None:
            raise Skipped("no GUI module")
        from site_client.gui.selftest import check_main_window

        return check_main_window(ctx)

    gui: Check = ("main window", main_window)
    return run_self_test(extra=[gui]).exit_code


def _gui(args: argparse.Namespace) -> int:
    """The desktop app; ``--data`` wins over a ``--data-dir`` given before the command."""
    from site_client.gui.app import main as gui_main

    data = args.data
    if data is None and args.data_dir != DEFAULT_DIR:
        data = args.data_dir
    return gui_main(sys.argv[:1], data_dir=data, screenshots=args.screenshots)


def _import(args: argparse.Namespace, site_dir: SiteDir) -> int:
    """Import with a progress line on stderr; Ctrl-C stops after the current file, keeping
    what was indexed (the next import finishes the job)."""
    from site_client.core.intake.importer import ImportProgress, import_files, import_folder

    stop = threading.Event()
    tty = sys.stderr.isatty()

    def on_progress(p: ImportProgress) -> None:
        line = (
            f"{p.files_seen}/{p.files_total} files: {p.indexed} indexed, "
            f"{p.unchanged} unchanged, {p.rejected} not usable"
        )
        print(f"\r{line}" if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)

    # pydicom's notes about odd files would drown the progress line; the report says it all
    index = site_dir.open_index()
    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    pydicom_log.setLevel(logging.CRITICAL)
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kwargs: dict[str, Any] = {"progress": on_progress, "should_stop": stop.is_set}
            if args.path.is_file():
                report = import_files(index, [args.path], **kwargs)
            else:
                report = import_folder(index, args.path, **kwargs)
        labels = None
        if args.labels is not None and not report.cancelled:
            from site_client.core.intake.labels import attach_labels

            labels = attach_labels(index, args.labels, label_column=args.label_column)
    finally:
        signal.signal(signal.SIGINT, previous)
        pydicom_log.setLevel(level)
        index.close()
        if tty:
            print(file=sys.stderr)
    if args.json:
        out = report.to_dict()
        if labels is not None:
            out["labels"] = labels.to_dict()
        print(json.dumps(out, indent=2))
    else:
        print(report.summary())
        if labels is not None:
            print(labels.summary())
    return 130 if report.cancelled else 0


def _summary(args: argparse.Namespace, site_dir: SiteDir) -> int:
    from site_client.core.intake.summary import data_summary

    index = site_dir.open_index()
    try:
        result = data_summary(index)
    finally:
        index.close()
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    return 0


def _run(args: argparse.Namespace, site_dir: SiteDir) -> int:
    from site_client.core.participant import Participant

    participant = Participant(
        site_dir,
        _local_data(args, site_dir),
        exit_when_done=args.exit_when_done,
        share_summary=args.share_summary,
        threads=args.threads or _policy_threads(site_dir),
        standing=_standing(args),
        proxy=args.proxy,
    )

    async def main() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: (participant.trainer.cancel(), task.cancel()))
        await participant.run()

    try:
        asyncio.run(main())
    except asyncio.CancelledError:
        return 130
    return 0


def _policy_threads(site_dir: SiteDir) -> int:
    """Training threads from the site policy's CPU share (``tessera-site policy set``)."""
    import os

    from site_client.core.activity import open_governance

    if not site_dir.is_enrolled():
        return 1
    record = open_governance(site_dir)
    try:
        return record.policy().threads(os.cpu_count() or 1)
    finally:
        record.close()


def _standing(args: argparse.Namespace) -> StandingApprovals | None:
    """Decisions made in advance for an unattended site, under a person's name."""
    from site_client.core.governance_link import StandingApprovals

    if not (args.accept_charter or args.approve_plan):
        return None
    if not args.approve_as:
        raise TesseraError(
            "--accept-charter and --approve-plan need --approve-as NAME: the person whose "
            "decision they are (it is signed with the site key).",
            code="config.arguments",
        )
    return StandingApprovals(
        person=args.approve_as,
        charters=frozenset(h.lower() for h in args.accept_charter),
        plans=frozenset(h.lower() for h in args.approve_plan),
    )


def _local_data(args: argparse.Namespace, site_dir: SiteDir) -> LocalData:
    """A folder and CSV when given, else the site's study index (``tessera-site import``)."""
    from site_client.core.participant import LocalData

    if (args.dicom is None) != (args.labels is None):
        raise TesseraError(
            "Give both --dicom and --labels, or neither to train on the imported images.",
            code="config.arguments",
        )
    if args.dicom is not None:
        return LocalData(args.dicom, args.labels)
    if not site_dir.index_db.is_file():
        raise TesseraError(
            "No images have been imported at this site yet: run "
            "'tessera-site import DICOM_FOLDER --labels LABELS.csv' first, or give "
            "--dicom and --labels.",
            code="data.empty",
        )
    return LocalData.site_index()


def _pacs_listen(args: argparse.Namespace, site_dir: SiteDir) -> int:
    """Receive pushed objects until SIGINT/SIGTERM; each one is imported as it arrives."""
    import threading

    from site_client.core.intake.pacs import PacsReceiver

    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO lines are noise
    receiver = PacsReceiver.for_site(
        site_dir,
        ae_title=args.ae_title,
        port=args.port,
        allowed_aes=args.allow_ae,
        host=args.host,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with receiver:
        while not stop.wait(0.5):
            pass
    c = receiver.counts()
    print(
        f"received {c.received}, indexed {c.indexed}, not imported {c.import_rejected}, "
        f"failed {c.failed}, refused connections {c.refused}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
