"""What a site keeps between rounds of a run and never sends: FedBN's normalisation layers and
top-k's error-feedback residual.

Theory of operation: each kind of state is a safetensors file per round in the run's folder
of the site's data directory (``runs/run-<run id>/<kind>-r<round>.safetensors``), written
atomically (temporary file, fsync, rename) by the training process after it trained that
round. A round reads the latest file of an *earlier* round, so training a round again (an
update that was refused, a site that restarted mid-round) starts from the same state and gives
the same update; validating the model of round ``r`` reads the latest file of a round ``<= r``
(the layers that trained with that model). Files older than the one before the newest are
removed: validation of round ``r - 1`` runs after round ``r`` has trained.

Files are read with safetensors (never pickle); a damaged or foreign file raises
``UpdateError`` and the caller decides (training refuses the round with the reason).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from shared.tensors import decode_tensors, encode_tensors

NORM_LAYERS = "norm"
FEEDBACK = "feedback"
_FILE = re.compile(r"(?P<kind>[a-z]+)-r(?P<round>[0-9]+)\.safetensors")


def run_folder(root: Path, run_id: str) -> Path:
    """The folder of ``run_id``'s state under the site's data directory ``root``. The prefix
    keeps a run id such as ``..`` (allowed by the protocol's identifier syntax) a plain name."""
    return root / "runs" / f"run-{run_id}"


def _rounds(folder: Path, kind: str) -> list[int]:
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _FILE.fullmatch(path.name)
        if match is not None and match["kind"] == kind:
            found.append(int(match["round"]))
    return sorted(found)


def load(folder: Path, kind: str, *, up_to: int) -> dict[str, np.ndarray] | None:
    """The arrays of ``kind`` saved for the latest round ``<= up_to``, or ``None``."""
    rounds = [r for r in _rounds(folder, kind) if r <= up_to]
    if not rounds:
        return None
    return decode_tensors((folder / f"{kind}-r{rounds[-1]}.safetensors").read_bytes())


def save(folder: Path, kind: str, rnd: int, arrays: Mapping[str, np.ndarray]) -> None:
    """Store ``arrays`` as round ``rnd``'s ``kind`` durably, then drop files older than the
    newest but one."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}-r{rnd}.safetensors"
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(encode_tensors(dict(arrays)))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    rounds = _rounds(folder, kind)
    for old in rounds[:-2]:
        (folder / f"{kind}-r{old}.safetensors").unlink(missing_ok=True)
