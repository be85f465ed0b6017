"""Round aggregation and update checks over the blob store (run in a worker thread).

Updates are deltas (site weights minus the round's global weights). How they become the next
global model depends on the plan's strategy (``shared.aggregation.strategies``):

- FedAvg and FedProx: the old model plus the deltas' weighted mean (McMahan et al. 2017),
  computed by the streaming, order-independent accumulator in ``shared.aggregation``: each
  update is read from its blob file in chunks, so memory stays O(model) however many sites
  report.
- Server optimisers (FedAdam, FedYogi, FedAdagrad; Reddi et al. 2021): the same streamed mean
  is the pseudo-gradient of an optimiser step, whose state (``ServerOptState``) is kept as a
  content-addressed safetensors blob between rounds; the caller records its digest with the
  round, so a restarted coordinator continues from it.
- Median and trimmed mean (Yin et al. 2018): need every site's value per coordinate, so the
  updates are decoded in memory (O(sites x model)); sample counts are ignored.

Every path is deterministic: the same model, updates (in any order) and state give the same
bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coordinator.blobs import BlobStore
from coordinator.store import UpdateRecord
from shared.aggregation import (
    FedAvgAccumulator,
    MedianConfig,
    ServerOptConfig,
    ServerOptState,
    StrategyConfig,
    TensorLayout,
    TrimmedMeanConfig,
    aggregate_deltas,
    apply_aggregate,
    initial_state,
    layout_of,
    validate_update,
)
from shared.errors import StorageError, UpdateError
from shared.tensors import decode_tensors, encode_tensors

READ_CHUNK = 1 << 20


def check_update(
    path: Path,
    blobs: BlobStore,
    model_digest: str,
    max_norm: float | None,
    *,
    layout: TensorLayout | None = None,
) -> float:
    """Validate a received update against the round's model; returns its L2 norm.

    ``layout``: the model's, when the caller holds it (it is the same for every update of a
    run), so the model is not read and decoded again for each update. Raises ``UpdateError``
    with a stable code for garbage bytes, wrong names, shapes or dtypes, NaN/Inf, values out
    of range and norms beyond the plan's bound.
    """
    if layout is None:
        layout = layout_of(decode_tensors(blobs.get(model_digest)))
    update = decode_tensors(path.read_bytes())
    return validate_update(update, layout, max_abs=16.0, max_norm=max_norm)


@dataclass(frozen=True, slots=True)
class RoundResult:
    """A round's new global model (safetensors bytes) and, for a server optimiser, its new
    state (safetensors of ``ServerOptState.to_arrays()``) to store and record with the round."""

    model: bytes
    opt_state: bytes | None = None


def aggregate_round(
    blobs: BlobStore,
    model_digest: str,
    updates: Sequence[UpdateRecord],
    strategy: StrategyConfig,
    opt_state: str | None = None,
    *,
    base: Mapping[str, np.ndarray] | None = None,
) -> RoundResult:
    """The next global model from the round's ``updates`` under ``strategy``.

    ``opt_state``: for a server optimiser, the digest of the state blob the previous round
    recorded, or ``None`` in the first round (the optimiser then starts from
    ``initial_state``); it must be ``None`` for the other strategies. ``base``: the decoded
    weights of ``model_digest`` when the caller already holds them (decoded while the sites
    trained), so they are not read, hashed and decoded again here. Raises ``UpdateError``
    (bad or mismatched updates, unusable state) or ``StorageError`` (a blob missing or
    corrupted on disk).
    """
    if not updates:
        raise UpdateError("no updates to aggregate", code="update.empty")
    if opt_state is not None and not isinstance(strategy, ServerOptConfig):
        raise ValueError(f"{strategy.name} keeps no server state")
    if base is None:
        base = decode_tensors(blobs.get(model_digest))
    if isinstance(strategy, MedianConfig | TrimmedMeanConfig):
        decoded = [decode_tensors(blobs.get(u.digest)) for u in updates]
        delta = aggregate_deltas(strategy, decoded)
        new, _ = apply_aggregate(strategy, base, delta)
        return RoundResult(encode_tensors(new))
    mean = _streamed_mean(blobs, base, updates, strategy.weighting)
    if isinstance(strategy, ServerOptConfig):
        if opt_state is None:
            state = initial_state(base, strategy)
        else:
            state = ServerOptState.from_arrays(decode_tensors(blobs.get(opt_state)))
        new, after = apply_aggregate(strategy, base, mean, state)
        assert after is not None
        return RoundResult(encode_tensors(new), encode_tensors(after.to_arrays()))
    return RoundResult(encode_tensors({name: base[name] + mean[name] for name in base}))


def _streamed_mean(
    blobs: BlobStore,
    base: Mapping[str, np.ndarray],
    updates: Sequence[UpdateRecord],
    weighting: str,
) -> dict[str, np.ndarray]:
    """The updates' weighted mean, each read from its blob file in chunks (memory O(model))."""
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
    return acc.result()
