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
- FedBN (Li et al. 2021): updates carry no normalisation-layer entries (they stay at the
  sites); only the shared entries are averaged, and the global model keeps its initial values
  of the others (``shared.aggregation.fedbn``, "What the global model carries").

Updates are stored as the sites sent and signed them, in the plan's codec
(``TrainingPlan.compression``); :func:`decode_update` is the one place they become arrays.
Uncompressed updates stream from their blob files; compressed ones are small and are decoded
whole, one at a time (memory still O(model)).

Every path is deterministic: the same model, updates (in any order) and state give the same
bytes.

Folding as updates arrive (:class:`RoundFold`). Reading every update back from disk and
hashing it again once the last one is stored puts a pass over all of them on the round's
critical path. Once every site expected in the round has offered its update, each offer's
sample count fixes the weights, so the server folds each update into a :class:`RoundFold`
right after its receipt check, from the arrays the check decoded. The accumulator is
fixed-point, so the mean is bit for bit the one :func:`_streamed_mean` computes from the blob
files; :func:`aggregate_round` uses a fold only when it holds the round's updates with exactly
their weights, and folds any update it lacks from its blob file.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coordinator.blobs import BlobStore
from coordinator.store import UpdateRecord
from shared.aggregation import (
    FedAvgAccumulator,
    MedianConfig,
    ServerOptState,
    StrategyConfig,
    TensorLayout,
    TrimmedMeanConfig,
    aggregate_deltas,
    apply_aggregate,
    initial_state,
    layout_of,
    server_optimiser,
    upload_layout,
    validate_update,
)
from shared.compression import Codec, NoCompression
from shared.errors import StorageError, UpdateError
from shared.files import map_file
from shared.tensors import decode_tensors, encode_parts, encode_tensors

READ_CHUNK = 1 << 20
# Every element of an update is within this bound (``update.range``), checked on receipt; the
# round's fixed-point accumulators are scaled for it.
MAX_ABS = 16.0


def decode_update(
    data: bytes | memoryview, layout: TensorLayout, codec: Codec | None = None, *, copy: bool = True
) -> dict[str, np.ndarray]:
    """A stored update's arrays. ``codec``: the plan's (``TrainingPlan.codec``), which checks
    names, shapes and values against ``layout`` as it decodes; ``None`` or ``"none"``: plain
    safetensors, checked by the caller (``validate_update`` or the accumulator).
    ``copy=False``: plain safetensors are decoded to read-only views of ``data``, for a caller
    that only reads them."""
    if codec is None or isinstance(codec, NoCompression):
        return decode_tensors(data, copy=copy)
    return codec.decode(data, layout)


def check_update(
    path: Path,
    blobs: BlobStore,
    model_digest: str,
    max_norm: float | None,
    *,
    layout: TensorLayout | None = None,
    codec: Codec | None = None,
    fold: tuple[RoundFold, str, str] | None = None,
) -> float:
    """Validate a received update against the round's model; returns its L2 norm.

    ``layout``: what the sites upload (``shared.aggregation.upload_layout``: the model's, less
    FedBN's local entries), when the caller holds it (it is the same for every update of a
    run), so the model is not read and decoded again for each update. ``codec``: the plan's
    (:func:`decode_update`); the norm is that of the decoded update. Raises ``UpdateError``
    with a stable code for garbage bytes, wrong names, shapes or dtypes, NaN/Inf, values out
    of range and norms beyond the plan's bound. ``fold``: the round's :class:`RoundFold`, the
    sending site and the update's digest; a valid update is folded into it from the arrays
    decoded here.
    """
    if layout is None:
        layout = layout_of(decode_tensors(blobs.get(model_digest)))
    # Mapped, not read: the page cache's copy is checked and folded where it lies.
    update = decode_update(map_file(path), layout, codec, copy=False)
    norm = validate_update(update, layout, max_abs=MAX_ABS, max_norm=max_norm)
    if fold is not None:
        fold[0].add(fold[1], fold[2], update, checked=True)
    return norm


class RoundFold:
    """One round's FedAvg mean, folded in as each update passes its receipt check.

    ``raw``: the weight before normalisation of every site expected to contribute (its sample
    count, or 1.0 when the strategy weights sites equally), known once all of them have
    offered; each update counts ``raw[site] / sum(raw)``, as in :func:`_streamed_mean`.
    :meth:`claim` hands the accumulator to :func:`aggregate_round` if it matches the round's
    updates and then seals it, so a check still running adds nothing more. Thread-safe: the
    checks run in worker threads.
    """

    def __init__(self, layout: TensorLayout, raw: Mapping[str, float], key: object = None):
        self.raw = dict(raw)
        self.key = key  # the caller's label, e.g. (run, round, model digest)
        self._total = sum(self.raw[s] for s in sorted(self.raw))
        self._acc = FedAvgAccumulator(layout, max_abs=MAX_ABS, max_total_weight=1.0 + 1e-9)
        self._folded: dict[str, str] = {}  # site -> digest of the update folded in
        self._sealed = False
        self._lock = threading.Lock()

    def add(
        self, site_id: str, digest: str, update: Mapping[str, np.ndarray], *, checked: bool = False
    ) -> bool:
        """Fold ``update`` in; ``False`` if it does not belong (a site not expected, one
        already folded, a sealed fold) or the accumulator refuses it. ``checked``: these very
        arrays have just passed the receipt check (``validate_update`` within ``MAX_ABS``), so
        the accumulator does not scan their values again."""
        with self._lock:
            if self._sealed or site_id in self._folded or site_id not in self.raw:
                return False
            try:
                self._acc.add(
                    update,
                    self.raw[site_id] / self._total,
                    checked_abs=MAX_ABS if checked else None,
                )
            except UpdateError:  # nothing was added: the disk path will say what is wrong
                return False
            self._folded[site_id] = digest
            return True

    def claim(
        self, layout: TensorLayout, updates: Sequence[UpdateRecord], weighting: str
    ) -> tuple[FedAvgAccumulator, set[str]] | None:
        """Seal the fold and return its accumulator and the sites already in it, if it was
        made for ``layout`` and exactly ``updates`` with their weights, and holds no other
        update; else ``None`` (the caller starts afresh from the blob files)."""
        raw = {u.site_id: _raw_weight(u, weighting) for u in updates}
        digests = {u.site_id: u.digest for u in updates}
        shapes = {n: (tuple(int(d) for d in s), str(t)) for n, (s, t) in layout.items()}
        with self._lock:
            self._sealed = True
            if raw != self.raw or len(raw) != len(updates) or shapes != self._acc.layout:
                return None
            if any(digests[s] != d for s, d in self._folded.items()):
                return None
            return self._acc, set(self._folded)


def fold_stored(
    fold: RoundFold,
    blobs: BlobStore,
    updates: Sequence[UpdateRecord],
    layout: TensorLayout,
    codec: Codec | None = None,
    *,
    checked: Collection[str] = (),
) -> int:
    """Fold updates stored before ``fold`` was made (their sites uploaded before the last
    site offered) from their blob files; returns how many were folded. ``checked``: the
    digests of updates this process hashed as they arrived and checked (``check_update``)
    moments ago; those are folded from their file's mapping, as the check's own fold is,
    instead of being read into memory and hashed again, and their values are not scanned
    again. Any other blob is read and checked against its digest as the disk path does. A
    blob that cannot be read or decoded is left out: :func:`aggregate_round` then reads it
    itself and says what is wrong."""
    folded = 0
    for update in updates:
        try:
            if update.digest in checked:
                data: bytes | memoryview = map_file(blobs.path(update.digest))
            else:
                data = blobs.get(update.digest)
            arrays = decode_update(data, layout, codec, copy=False)
        except (StorageError, UpdateError, OSError):
            continue
        folded += fold.add(update.site_id, update.digest, arrays, checked=update.digest in checked)
        blobs.drop_cached(update.digest)  # kept cached for this read only
    return folded


def fold_weights(strategy: StrategyConfig, samples: Mapping[str, int]) -> dict[str, float] | None:
    """A :class:`RoundFold`'s ``raw`` for sites offering updates of these sample counts;
    ``None`` for the strategies that do not take a weighted mean (median, trimmed mean)."""
    if isinstance(strategy, MedianConfig | TrimmedMeanConfig):
        return None
    return {s: float(n) if strategy.weighting == "samples" else 1.0 for s, n in samples.items()}


def _plus(base: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``base + mean``, into ``mean`` (a fresh array) when that gives the same result."""
    if base.dtype == mean.dtype and base.shape == mean.shape:
        return np.add(base, mean, out=mean)
    return base + mean


def _raw_weight(update: UpdateRecord, weighting: str) -> float:
    return float(update.num_samples) if weighting == "samples" else 1.0


@dataclass(frozen=True, slots=True)
class RoundResult:
    """A round's new global model (safetensors bytes) and, for a server optimiser, its new
    state (safetensors of ``ServerOptState.to_arrays()``) to store and record with the round."""

    model: bytes | memoryview  # read-only either way
    opt_state: bytes | None = None


def aggregate_round(
    blobs: BlobStore,
    model_digest: str,
    updates: Sequence[UpdateRecord],
    strategy: StrategyConfig,
    opt_state: str | None = None,
    *,
    base: Mapping[str, np.ndarray] | None = None,
    codec: Codec | None = None,
    fold: RoundFold | None = None,
) -> RoundResult:
    """The next global model from the round's ``updates`` under ``strategy``.

    ``opt_state``: for a server optimiser, the digest of the state blob the previous round
    recorded, or ``None`` in the first round (the optimiser then starts from
    ``initial_state``); it must be ``None`` for the other strategies. ``base``: the decoded
    weights of ``model_digest`` when the caller already holds them (decoded while the sites
    trained), so they are not read, hashed and decoded again here. ``codec``: the plan's, in
    which the updates were stored (:func:`decode_update`). ``fold``: the round's
    :class:`RoundFold`, used if it matches ``updates``. Raises ``UpdateError``
    (bad or mismatched updates, unusable state) or ``StorageError`` (a blob missing or
    corrupted on disk).
    """
    if not updates:
        raise UpdateError("no updates to aggregate", code="update.empty")
    optimiser = server_optimiser(strategy)  # FedAdam etc.; FedBN with server momentum
    if opt_state is not None and optimiser is None:
        raise ValueError(f"{strategy.name} keeps no server state")
    if base is None:
        base = decode_tensors(blobs.get(model_digest))
    layout = upload_layout(strategy, layout_of(base))  # FedBN: the shared entries only
    if isinstance(strategy, MedianConfig | TrimmedMeanConfig):
        decoded = [decode_update(blobs.get(u.digest), layout, codec) for u in updates]
        delta = aggregate_deltas(strategy, decoded)
        new, _ = apply_aggregate(strategy, base, delta)
        return RoundResult(encode_tensors(new))
    acc = _streamed_mean(blobs, layout, updates, strategy.weighting, codec, fold)
    if optimiser is not None:
        mean = acc.result()
        if opt_state is None:
            state = initial_state(layout, optimiser)
        else:
            state = ServerOptState.from_arrays(decode_tensors(blobs.get(opt_state)))
        new, after = apply_aggregate(strategy, base, mean, state)
        assert after is not None
        return RoundResult(encode_tensors(new), encode_tensors(after.to_arrays()))
    return RoundResult(_encoded_sum(base, acc))


def _encoded_sum(base: Mapping[str, np.ndarray], acc: FedAvgAccumulator) -> bytes | memoryview:
    """``encode_tensors`` of the new weights, base + mean, with entries no update carries
    (FedBN's local ones) keeping the model's values. For float32 models (``encode_parts``)
    the sums are computed straight into the encoded model's buffer, read-only once made:
    no mean arrays, no second copy of the model into its bytes (each a fresh 20 MB for a
    5 M-parameter model, costly on a virtual machine). The bytes are those of the general
    path below (``test_aggregation_fold``)."""
    mean_names = set(acc.layout)
    parts = encode_parts(dict(base))
    if parts is None or not mean_names <= set(base):
        mean = acc.result()
        new = {n: _plus(base[n], mean[n]) if n in mean else base[n] for n in base}
        return encode_tensors(new)
    head = b"".join(parts[:2])
    buf = np.empty(len(head) + sum(len(p) for p in parts[2:]), dtype=np.uint8)
    buf[: len(head)] = np.frombuffer(head, dtype=np.uint8)
    at = len(head)
    for name in sorted(base):  # the order of encode_parts' data
        src = base[name].reshape(-1)
        dst = buf[at : at + src.nbytes].view(np.float32)
        if name in mean_names:
            acc.result_into(name, dst)
            np.add(dst, src, out=dst)  # mean + base: what _plus computes, bit for bit
        else:
            dst[:] = src
        at += src.nbytes
    return buf.data.toreadonly()


def _streamed_mean(
    blobs: BlobStore,
    layout: TensorLayout,
    updates: Sequence[UpdateRecord],
    weighting: str,
    codec: Codec | None = None,
    fold: RoundFold | None = None,
) -> FedAvgAccumulator:
    """The accumulator of the updates' weighted mean, each read from its blob file in chunks
    (memory O(model)); compressed ones are decoded whole, one at a time. Those already in a
    matching ``fold`` are not read again."""
    raw = [_raw_weight(u, weighting) for u in updates]
    total = sum(raw)
    claimed = fold.claim(layout, updates, weighting) if fold is not None else None
    if claimed is not None:
        acc, done = claimed
    else:
        acc, done = FedAvgAccumulator(layout, max_abs=MAX_ABS, max_total_weight=1.0 + 1e-9), set()
    for update, weight in zip(updates, raw, strict=True):
        if update.site_id in done:
            continue
        if codec is not None and not isinstance(codec, NoCompression):
            acc.add(decode_update(blobs.get(update.digest), layout, codec), weight / total)
            continue
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
    return acc
