"""``tessera-site predict``: run a model release on this site's studies or a folder.

The release is verified first with the coordinator key from enrolment; predictions, the CSV and
the saliency pictures stay on this machine. Progress goes to stderr; Ctrl-C stops after the
current batch and keeps what was predicted (exit status 130).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

from site_client.core.config import SiteDir

COMMANDS = ("predict",)


def add_parsers(sub: Any) -> None:
    predict = sub.add_parser(
        "predict",
        help="predict with a verified model release on local studies or a folder (nothing "
        "leaves this site)",
    )
    predict.add_argument(
        "--release", type=Path, required=True, help="the release folder from the coordinator"
    )
    which = predict.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--studies", nargs="+", metavar="UID", help="StudyInstanceUIDs of imported studies"
    )
    which.add_argument("--folder", type=Path, help="a folder of DICOM files (searched recursively)")
    predict.add_argument(
        "--out", type=Path, default=Path("predictions.csv"), help="the CSV to write"
    )
    predict.add_argument(
        "--saliency", type=Path, default=None, metavar="DIR", help="write Grad-CAM PNGs here"
    )
    predict.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for the model (default: all cores but one, which reads the files)",
    )


def dispatch(args: argparse.Namespace, site_dir: SiteDir) -> int:
    import torch

    from site_client.core.predict import (
        default_threads,
        folder_files,
        load_release,
        predict_files,
        study_files,
    )

    config = site_dir.load()
    torch.set_num_threads(max(1, args.threads or default_threads()))
    loaded = load_release(args.release, config.coordinator_key, site_root=site_dir.root)
    release = loaded.release
    print(
        f"release {release.version} of run {release.run_id} verified: signed by the "
        f"coordinator of {release.federation}, in its provenance log (entry "
        f"{release.entry_index} under a tree head of {release.head.size} entries)",
        file=sys.stderr,
    )
    if loaded.own_layers:
        print("with this site's own normalisation layers from that run (FedBN)", file=sys.stderr)
    elif loaded.needs_own_layers:
        print(
            "warning: this release was trained with FedBN and this site kept no normalisation "
            "layers of its run, so the release's initial ones are used; predictions may be poor",
            file=sys.stderr,
        )
    if args.folder is not None:
        files, base = folder_files(args.folder), Path(args.folder)
    else:
        index = site_dir.open_index()
        try:
            files, base = study_files(index, args.studies), None
        finally:
            index.close()

    stop = threading.Event()
    tty = sys.stderr.isatty()

    def on_progress(done: int, total: int) -> None:
        line = f"{done}/{total} files"
        print(f"\r{line}" if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)

    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    pydicom_log.setLevel(logging.CRITICAL)  # the report lists every refused file
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = predict_files(
                loaded,
                files,
                out_csv=args.out,
                saliency_dir=args.saliency,
                base=base,
                progress=on_progress,
                should_stop=stop.is_set,
            )
    finally:
        signal.signal(signal.SIGINT, previous)
        pydicom_log.setLevel(level)
        if tty:
            print(file=sys.stderr)
    for p in report.refused:
        print(f"not usable: {p.file}: {p.reason} [{p.code}]")
    print(report.summary())
    print(f"predictions written to {args.out}")
    if args.saliency is not None:
        print(f"saliency maps written to {args.saliency}")
    return 130 if report.cancelled else 0
