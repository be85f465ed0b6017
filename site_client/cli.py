"""``tessera-site``: the site's command line (headless mode; the desktop app comes next)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from shared.errors import TesseraError
from site_client.core.config import SiteDir

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
    sub = p.add_subparsers(dest="command", required=True)
    enrol = sub.add_parser("enrol", help="join a federation with an invitation code")
    enrol.add_argument("code", help="the invitation code from the consortium lead")
    enrol.add_argument("--name", default=None, help="this site's name as others will see it")
    run = sub.add_parser("run", help="take part in training rounds")
    run.add_argument("--headless", action="store_true", help="no window (the only mode so far)")
    run.add_argument("--dicom", type=Path, required=True, help="folder of DICOM files")
    run.add_argument("--labels", type=Path, required=True, help="labels CSV")
    run.add_argument(
        "--exit-when-done",
        action="store_true",
        help="stop when the coordinator says the run is finished",
    )
    run.add_argument("--threads", type=int, default=1, help="CPU threads for training")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
        return _run(args, site_dir)
    except TesseraError as exc:
        print(f"error [{exc.code}]: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, site_dir: SiteDir) -> int:
    from site_client.core.participant import LocalData, Participant

    participant = Participant(
        site_dir,
        LocalData(args.dicom, args.labels),
        exit_when_done=args.exit_when_done,
        threads=args.threads,
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


if __name__ == "__main__":
    sys.exit(main())
