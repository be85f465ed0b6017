"""Round aggregation and update checks over the blob store (run in a worker thread).

Updates are deltas (site weights minus the round's global weights). The new global model is
the old one plus their weighted mean (FedAvg, McMahan et al. 2017), computed by the streaming,
order-independent accumulator in ``shared.aggregation``: each update is read from its blob
file in chunks, so memory stays O(model) however many sites report.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from coordinator.blobs import BlobStore
from coordinator.store import UpdateRecord
from shared.aggregation import FedAvgAccumulator, layout_of, validate_update
from shared.errors import StorageError, UpdateError
from shared.tensors import decode_tensors, encode_tensors

READ_CHUNK = 1 << 20


def check_update(path: Path, blobs: BlobStore, model_digest: str, max_norm: float | None) -> float:
    """Validate a received update against the round's model; returns its L2 norm.

    Raises ``UpdateError`` with a stable code for garbage bytes, wrong names, shapes or
    dtypes, NaN/Inf, values out of range and norms beyond the plan's bound.
    """
    layout = layout_of(decode_tensors(blobs.get(model_digest)))
    update = decode_tensors(path.read_bytes())
    return validate_update(update, layout, max_abs=16.0, max_norm=max_norm)


def aggregate_round(
    blobs: BlobStore, model_digest: str, updates: Sequence[UpdateRecord], weighting: str
) -> bytes:
    if not updates:
        raise UpdateError("no updates to aggregate", code="update.empty")
    base = decode_tensors(blobs.get(model_digest))
    raw = [float(u.num_samples) if weighting == "samples" else 1.0 for u in updates]
    total = sum(raw)
    acc = FedAvgAccumulator(layout_of(base), max_abs=16.0, max_total_weight=1.0 + 1e-9)
    for update, weight in zip(updates, raw, strict=True):
        stream = acc.begin(weight / total)
        seen = hashlib.sha256()
        with open(blobs.path(update.digest), "rb") as fh:
            while chunk := fh.read(READ_CHUNK):
                seen.update(chunk)
                stream.feed(chunk)
        if seen.hexdigest() != update.digest:
            stream.abort()
            raise StorageError(
                f"update blob {update.digest[:12]} is corrupted on disk", code="storage.blob"
            )
        stream.finish()
    mean = acc.result()
    return encode_tensors({name: base[name] + mean[name] for name in base})
