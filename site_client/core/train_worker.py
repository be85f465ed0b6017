"""The training process: jobs in, updates out. Started by ``trainer``, never imported by it.

A separate process so that training can be cancelled at any moment (kill it) and never blocks
the site's connection. Two ways to run it:

- ``python -m site_client.core.train_worker --serve``: the warm worker ``Trainer`` keeps for
  as long as the site runs. It imports torch once, then reads one job per line on stdin and
  answers on stdout with JSON lines only (never pickle)::

      parent -> worker   {"type": "job", "name": "...", "job": {...}}
      worker -> parent   {"type": "progress", "step": 3, "total": 10}        (some steps)
      worker -> parent   {"type": "result", "ok": true, "num_samples": ..., "train_loss": ...,
                          "steps": ..., "sha256": ..., "size": ..., "timings": {...}}
                      or {"type": "result", "ok": false, "code": "...", "message": "..."}

  A failed job is a result, and the worker waits for the next one; end of input ends it. The
  real stdout is kept for these lines and file descriptor 1 is pointed at stderr, so whatever
  a library prints cannot corrupt the channel. Keeping the process between rounds saves the
  torch import (about 2 s) and the model's construction on every round.
- ``python -m site_client.core.train_worker job.json``: one job, its result record written
  to ``job["result_path"]`` and its progress to ``job["progress_path"]`` (for scripts).

A job reads the global model with safetensors (never pickle or ``torch.load``) after checking
its SHA-256 against the digest the coordinator signed, prepares the local images once into a
tensor cache (from the site's study index when the job names one, else from a DICOM folder and
labels CSV), trains with the shared loop and writes the update (new weights minus global
weights; clipped and noised first when the plan asks for client-level differential privacy,
its norms in the result's ``dp``; example-level DP-SGD is done by the training loop, and the
result's ``steps`` is what the site charges) with its SHA-256, so the site signs it without
reading it again.
The update is written in the plan's codec (``TrainingPlan.compression``; top-k adds the
residual it kept from earlier rounds and keeps what it does not send). Under FedBN the site's
own normalisation layers replace the global model's before training and validation, and leave
out of the update; both kinds of state are kept per round in the job's ``state_dir``
(:mod:`site_client.core.local_state`).
``timings`` holds the job's phases in seconds (``verify``, ``train``, ``encode``) and the
processor time it used (``cpu``) for the site's round record.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

Progress = Callable[[int, int], None]


def cache_key(dicom_dir: Path, labels_csv: Path, input_size: int, seed: int) -> str:
    """Changes whenever a file, its size or mtime, the labels or the input size change."""
    from shared.errors import DataError

    if not labels_csv.is_file():
        raise DataError(f"The labels file {labels_csv} was not found.", code="data.labels")
    if not dicom_dir.is_dir():
        raise DataError(f"The DICOM folder {dicom_dir} was not found.", code="data.folder")
    h = hashlib.sha256(f"v1:{input_size}:{seed}".encode())
    h.update(labels_csv.read_bytes())
    for path in sorted(p for p in dicom_dir.rglob("*") if p.is_file()):
        st = path.stat()
        h.update(f"{path.relative_to(dicom_dir)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def load_training_set(
    dicom_dir: Path, labels_csv: Path, cache_dir: Path, input_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    from safetensors.numpy import load_file, save_file

    from site_client.core.dataset import LocalDataset

    path = cache_dir / f"{cache_key(dicom_dir, labels_csv, input_size, seed)}.safetensors"
    if path.is_file():
        data = load_file(path)
        return data["images"], data["labels"]
    ds = LocalDataset.from_folder(dicom_dir, labels_csv, input_size=input_size, seed=seed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(
        {
            "images": np.ascontiguousarray(ds.train_images),
            "labels": np.ascontiguousarray(ds.train_labels),
        },
        str(tmp),
    )
    os.replace(tmp, path)
    return ds.train_images, ds.train_labels


def load_from_index(
    index_db: Path,
    pseudonym_key: Path,
    cache_dir: Path,
    plan: Any,
    seed: int,
    *,
    holdout: bool = False,
    keep_open: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The training side (or, with ``holdout``, the held-out side) of the site's indexed,
    labelled images (``tessera-site import``), from the tensor cache: memory maps, read one
    batch at a time by the training loop. ``keep_open``: a warm worker's, which keeps the
    index open for the next job (:class:`_Indexes`)."""
    from shared.errors import DataError
    from site_client.core.intake.index import SiteIndex

    if not index_db.is_file():
        raise DataError(
            "This site has no imported images yet: run 'tessera-site import DIR --labels CSV'.",
            code="data.empty",
        )
    try:
        secret = pseudonym_key.read_bytes()  # never made here: a new key would match nothing
    except OSError as exc:
        raise DataError(
            f"The site's pseudonymisation key {pseudonym_key} cannot be read; it is made by "
            "'tessera-site import' and must stay with the index.",
            code="data.key",
        ) from exc
    index = _INDEXES.get(index_db, secret) if keep_open else SiteIndex(index_db, secret)
    try:
        if keep_open:
            ds = _INDEXES.dataset(cache_dir, plan, seed)
        else:
            ds = _build(index, cache_dir, plan, seed)
    except BaseException:
        if keep_open:
            _INDEXES.close()
        raise
    finally:
        if not keep_open:
            index.close()
    if holdout:
        return ds.holdout_images, ds.holdout_labels
    print(ds.summary(), file=sys.stderr)
    for skip in ds.skipped[:20]:
        print(f"left out image {skip.image} of study {skip.study}: {skip.reason}", file=sys.stderr)
    return ds.train_images, ds.train_labels


def _build(index: Any, cache_dir: Path, plan: Any, seed: int) -> Any:
    """The ``CachedDataset`` of ``index`` for a plan's input, labels and preprocessing."""
    from site_client.core.intake.dataset import build_dataset

    return build_dataset(
        index,
        cache_dir,
        input_size=plan.input_size,
        label_column=plan.label_column,
        seed=seed,
        preprocessing=dict(plan.preprocessing),
    )


class _Indexes:
    """The site's study index, kept open by a warm worker between jobs. Opening it checks its
    schema in a write transaction and closing it checkpoints its journal, both with disk
    syncs, for every training and validation job of every round. Reopened when the file or
    the key changes.

    The dataset built from it is kept too, for the next jobs of the same plan (a round's
    training and the validation after it, the next round's...), as long as the index is
    unchanged: SQLite's ``data_version`` moves whenever another connection commits, so an
    import or a relabelling between rounds is seen as before."""

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._index: Any = None
        self._dataset: tuple[tuple[Any, ...], Any] | None = None

    def dataset(self, cache_dir: Path, plan: Any, seed: int) -> Any:
        """The open index's ``CachedDataset`` for ``plan`` and ``seed``: built afresh, or the
        last one while neither the index nor what it was built for has changed."""
        index = self._index
        assert index is not None
        (version,) = index.db.execute("PRAGMA data_version").fetchone()
        key = (
            version,
            str(cache_dir),
            plan.input_size,
            plan.label_column,
            seed,
            json.dumps(dict(plan.preprocessing), sort_keys=True),
        )
        if self._dataset is None or self._dataset[0] != key:
            self._dataset = None
            self._dataset = (key, _build(index, cache_dir, plan, seed))
        return self._dataset[1]

    def get(self, index_db: Path, secret: bytes) -> Any:
        from site_client.core.intake.index import SiteIndex

        st = index_db.stat()
        key = (str(index_db.resolve()), st.st_dev, st.st_ino, hashlib.sha256(secret).digest())
        if key != self._key or self._index is None:
            self.close()
            self._index = SiteIndex(index_db, secret)
            self._key = key
        return self._index

    def close(self) -> None:
        index, self._index, self._key, self._dataset = self._index, None, None, None
        if index is not None:
            index.close()


_INDEXES = _Indexes()


class _Models:
    """The last model built, kept by a warm worker: building a large model draws all its
    initial weights, and the next round overwrites every floating-point entry anyway."""

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._model: Any = None

    def get(self, plan: Any) -> Any:
        import torch

        from shared.models.registry import build_model

        key = (
            plan.architecture,
            plan.architecture_version,
            tuple(sorted(plan.architecture_params.items())),
            plan.input_size,
            plan.seed,
        )
        if key != self._key:
            self._model, self._key = None, None  # free the old one before building
            self._model = build_model(
                plan.architecture,
                plan.architecture_version,
                input_size=plan.input_size,
                params=plan.architecture_params,
                seed=plan.seed,
            )
            self._key = key
            return self._model
        # Integer buffers (BatchNorm's step counters) stay local and are not in the global
        # model: put them back to what a fresh build has, so a reused model trains the same.
        with torch.no_grad():
            for buffer in self._model.buffers():
                if not buffer.is_floating_point():
                    buffer.zero_()
        return self._model


_MODELS = _Models()


def _read_model(path: Path, sha256: str | None) -> memoryview | bytes:
    """The global model's bytes, checked against the digest the coordinator signed: the file
    in the site's model cache may be one downloaded rounds ago, or damaged on disk. Mapped
    read-only (``shared.files.map_file``), not copied: the arrays decoded from it are read
    once, into the model; the update is computed in the model's own memory (``run_job``)."""
    from shared.errors import TrainingError
    from shared.files import map_file

    data = map_file(path)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        path.unlink(missing_ok=True)  # the next invitation downloads it again
        raise TrainingError(
            "The stored copy of the global model is damaged (its SHA-256 does not match the "
            "signed digest); it was deleted and will be downloaded again.",
            code="training.model_corrupt",
        )
    return data


_HASHER: Any = None


def _hasher() -> Any:
    """The thread that hashes updates as they are written, started once per worker: a new
    thread for every job costs milliseconds to start on a busy machine."""
    global _HASHER
    if _HASHER is None:
        from concurrent.futures import ThreadPoolExecutor

        _HASHER = ThreadPoolExecutor(1, thread_name_prefix="update-hash")
    return _HASHER


def write_update(
    out: Path, arrays: dict[str, np.ndarray], spare: Path | None = None
) -> tuple[str, int]:
    """Write ``arrays`` as safetensors to ``out`` (atomically) and return the file's SHA-256
    and size. The bytes are those of ``shared.tensors.encode_tensors`` (names sorted, the
    header padded with spaces to 8 bytes), written from the arrays themselves and hashed on the
    way (``shared.tensors.encode_parts``): no model-sized intermediate buffer. Arrays that
    are not float32 go through ``encode_tensors``. ``spare``: the last accepted update's file,
    written over (``shared.files.open_recycled``)."""
    from shared.tensors import encode_parts, encode_tensors

    parts = encode_parts(arrays) or [encode_tensors(arrays)]
    digest = hashlib.sha256()
    # Hashed in a second thread while written: both release the GIL, so on two cores the
    # update costs the longer of the two rather than their sum.
    hashing = _hasher().submit(lambda: [digest.update(part) for part in parts])
    try:
        _write_parts(out, parts, spare)
    finally:
        hashing.result()
    return digest.hexdigest(), sum(len(part) for part in parts)


def _write_parts(out: Path, parts: list[Any], spare: Path | None) -> None:
    """``parts`` to ``out``, through a temporary file renamed when complete."""
    from shared.files import open_recycled

    tmp = out.with_suffix(".tmp")
    with open_recycled(tmp, spare) as fh:
        for part in parts:
            fh.write(part)
        fh.truncate()
    os.replace(tmp, out)


def run_job(
    job: dict[str, Any], progress: Progress | None = None, *, reuse_model: bool = False
) -> dict[str, Any]:
    """Train once; returns the result record's fields (``ok`` excluded). Raises on failure.
    A job of ``kind`` "validate" evaluates the model on the site's held-out split instead."""
    import torch

    if job.get("kind") == "validate":
        return validate_job(job, reuse_model=reuse_model)

    from shared.aggregation import local_entries, local_training_options, make_strategy
    from shared.models.state import load_model_arrays
    from shared.plan import TrainingPlan
    from shared.training import train_local
    from site_client.core import local_state

    clock = time.monotonic
    cpu_started = time.process_time()
    torch.set_num_threads(int(job.get("threads", 1)))
    plan = TrainingPlan.from_dict(job["plan"])
    started = clock()
    raw = _read_model(Path(job["model_path"]), job.get("model_sha256"))
    verify_s = clock() - started
    train_started = clock()
    if job.get("index_db"):
        images, labels = load_from_index(
            Path(job["index_db"]),
            Path(job["pseudonym_key"]),
            Path(job["cache_dir"]),
            plan,
            int(job["data_seed"]),
            keep_open=reuse_model,
        )
    else:  # a folder and a labels CSV given on the command line
        images, labels = load_training_set(
            Path(job["dicom_dir"]),
            Path(job["labels_csv"]),
            Path(job["cache_dir"]),
            plan.input_size,
            int(job["data_seed"]),
        )
    if reuse_model:
        model = _MODELS.get(plan)
    else:
        from shared.models.registry import build_model

        model = build_model(
            plan.architecture,
            plan.architecture_version,
            input_size=plan.input_size,
            params=plan.architecture_params,
            seed=plan.seed,
        )
    base = _global_arrays(raw, model, job)  # read-only views into ``raw`` (or decrypted)
    # The strategy's part of local training, e.g. FedProx's proximal term (mu).
    strategy = make_strategy(plan.aggregation, plan.aggregation_params, weighting=plan.weighting)
    options = local_training_options(strategy)
    local = local_entries(strategy, base)  # FedBN: this site's normalisation layers
    state_dir = Path(job["state_dir"]) if job.get("state_dir") else None
    rnd = int(job.get("round", 0))
    load_model_arrays(model, _with_own_layers(base, local, state_dir, rnd - 1))
    dp_seed = job.get("dp_seed")  # fixes DP noise for tests only; None: from os.urandom
    result = train_local(
        model,
        images,
        labels,
        plan,
        seed=int(job["seed"]),
        progress=progress,
        dp_seed=None if dp_seed is None else int(dp_seed),
        **options,
    )
    train_s = clock() - train_started
    encode_started = clock()
    # The update, new weights minus global weights, computed into the model's own memory (it
    # is loaded afresh by the next job): one pass per tensor, no model-sized allocation, and
    # the global weights stay as mapped. Registry models tie no weights, so no two entries
    # share that memory.
    state = model.state_dict()
    if local:
        own = {n: state[n].detach().numpy().copy() for n in sorted(local)}
        if state_dir is not None:
            local_state.save(state_dir, local_state.NORM_LAYERS, rnd, own)
    update: dict[str, np.ndarray] = {}
    for name, array in base.items():
        if name in local:
            continue  # never leaves the site
        after = state[name].detach().numpy()
        if array.dtype == np.float32 and after.dtype == np.float32:
            update[name] = np.subtract(after, array, out=after)
        else:
            update[name] = np.subtract(after, array, dtype=np.float32)
    dp = _privatise(update, plan, job.get("dp_seed"))
    spare = Path(job["spare_path"]) if job.get("spare_path") else None
    if job.get("he_key"):  # what leaves is the local model (global + update), encrypted
        from shared.aggregation import layout_of
        from shared.privacy.he_rounds import encrypt_local_model

        secret = Path(job["he_key"]).read_bytes()
        payload = encrypt_local_model(secret, base, update, layout_of(update))
        digest, size = write_payload(Path(job["update_path"]), payload, spare)
    elif plan.compression == "none":
        digest, size = write_update(Path(job["update_path"]), update, spare)
    else:
        digest, size = write_payload(
            Path(job["update_path"]), _compress(update, plan.codec, state_dir, rnd), spare
        )
    encode_s = clock() - encode_started
    return {
        **({"dp": dp} if dp is not None else {}),
        "num_samples": result.num_samples,
        "train_loss": result.mean_loss,
        "steps": result.steps,
        "sha256": digest,
        "size": size,
        "timings": {
            "verify": verify_s,
            "train": train_s,
            "encode": encode_s,
            "cpu": time.process_time() - cpu_started,
        },
    }


def _global_arrays(raw: memoryview, model: Any, job: dict[str, Any]) -> dict[str, np.ndarray]:
    """The global model's weights: views decoded in place from safetensors or, in a
    homomorphically encrypted run's later rounds, decrypted with this site's key
    (``job["he_key"]``, ``shared.privacy.he_rounds``) into the model's own entries."""
    from shared.tensors import decode_tensors

    if job.get("he_key"):
        from shared.privacy.he_rounds import decrypt_global, is_encrypted

        if is_encrypted(raw):
            from shared.aggregation import layout_of
            from shared.models.state import model_arrays

            secret = Path(job["he_key"]).read_bytes()
            return decrypt_global(secret, bytes(raw), layout_of(model_arrays(model)))
    return decode_tensors(raw, copy=False)


def write_payload(out: Path, payload: bytes, spare: Path | None = None) -> tuple[str, int]:
    """Write an encoded update to ``out`` atomically (over ``spare``, as ``write_update``);
    its SHA-256 and size."""
    _write_parts(out, [payload], spare)
    return hashlib.sha256(payload).hexdigest(), len(payload)


def _with_own_layers(
    weights: dict[str, np.ndarray], local: Any, state_dir: Path | None, up_to: int
) -> dict[str, np.ndarray]:
    """``weights`` with this site's normalisation layers (FedBN) saved for the latest round
    ``<= up_to`` in place; as they are when there are none yet (the first round: the global
    model's initial values) or the strategy keeps nothing local."""
    if not local or state_dir is None:
        return weights
    from shared.aggregation import merge_local
    from site_client.core import local_state

    own = local_state.load(state_dir, local_state.NORM_LAYERS, up_to=up_to)
    return weights if own is None else merge_local(weights, own)


def _compress(update: dict[str, np.ndarray], codec: Any, state_dir: Path | None, rnd: int) -> bytes:
    """The update in the plan's codec. Top-k adds the residual of the latest earlier round
    and saves the new one as this round's (error feedback, Stich et al. 2018), so retraining
    a round starts from the same residual."""
    from shared.aggregation import layout_of
    from shared.compression import ErrorFeedback, uses_error_feedback
    from site_client.core import local_state

    if not uses_error_feedback(codec):
        return bytes(codec.encode(update))
    saved = None
    if state_dir is not None:
        saved = local_state.load(state_dir, local_state.FEEDBACK, up_to=rnd - 1)
    feedback = ErrorFeedback(layout_of(update), saved)
    payload = feedback.compress(update, codec)
    if state_dir is not None:
        local_state.save(state_dir, local_state.FEEDBACK, rnd, feedback.residual)
    return payload


def _privatise(update: dict[str, np.ndarray], plan: Any, seed: Any) -> dict[str, float] | None:
    """Client-level DP (``shared.privacy.client_dp``) when the plan asks for it: clip the
    update to ``dp.clip_norm`` and add the site's full share of Gaussian noise, in place, before
    anything is hashed or written, so no unprotected copy leaves this process. The noise comes
    from a generator seeded by ``os.urandom``; ``seed`` (the job's ``dp_seed``) fixes it for
    tests only. Returns the norms for the site's round record (they stay at the site)."""
    from shared.privacy.client_dp import ClientDP, clip_and_noise, secure_rng

    if not isinstance(plan.dp, ClientDP):
        return None  # no DP, or example-level DP-SGD, done during training

    rng = secure_rng() if seed is None else np.random.default_rng(int(seed))
    report = clip_and_noise(update, plan.dp, rng)
    return {
        "norm": report.norm,
        "clipped_norm": report.clipped_norm,
        "noise_std": report.noise_std,
    }


def validate_job(job: dict[str, Any], *, reuse_model: bool = False) -> dict[str, Any]:
    """The global model's metrics on this site's held-out patients (the validation protocol:
    metrics only leave the site). Undefined metrics (one class only) are ``None``."""
    import torch

    from shared.aggregation import local_entries, make_strategy
    from shared.models.registry import build_model
    from shared.models.state import load_model_arrays
    from shared.plan import TrainingPlan
    from shared.training import evaluate

    torch.set_num_threads(int(job.get("threads", 1)))
    plan = TrainingPlan.from_dict(job["plan"])
    raw = _read_model(Path(job["model_path"]), job.get("model_sha256"))
    if job.get("index_db"):
        images, labels = load_from_index(
            Path(job["index_db"]),
            Path(job["pseudonym_key"]),
            Path(job["cache_dir"]),
            plan,
            int(job["data_seed"]),
            holdout=True,
            keep_open=reuse_model,
        )
    else:
        from site_client.core.dataset import LocalDataset

        ds = LocalDataset.from_folder(
            Path(job["dicom_dir"]),
            Path(job["labels_csv"]),
            input_size=plan.input_size,
            seed=int(job["data_seed"]),
        )
        images, labels = ds.holdout_images, ds.holdout_labels
    model = (
        _MODELS.get(plan)
        if reuse_model
        else build_model(
            plan.architecture,
            plan.architecture_version,
            input_size=plan.input_size,
            params=plan.architecture_params,
            seed=plan.seed,
        )
    )
    weights = _global_arrays(raw, model, job)
    strategy = make_strategy(plan.aggregation, plan.aggregation_params, weighting=plan.weighting)
    state_dir = Path(job["state_dir"]) if job.get("state_dir") else None
    # FedBN: the model of round r is used with the layers this site trained with it.
    weights = _with_own_layers(
        weights, local_entries(strategy, weights), state_dir, int(job.get("round", 0))
    )
    load_model_arrays(model, weights)
    return {"metrics": evaluate(model, images, labels).to_dict()}


def _failure(exc: BaseException) -> dict[str, Any]:
    print(f"training failed: {exc!r}", file=sys.stderr)
    return {
        "ok": False,
        "code": getattr(exc, "code", "training.failed"),
        "message": str(exc)[:500],
    }


class _Throttled:
    """Progress for the parent: the first and last step, and at most ten lines a second."""

    def __init__(self, send: Callable[[dict[str, Any]], None]) -> None:
        self._send = send
        self._last = float("-inf")

    def __call__(self, step: int, total: int) -> None:
        now = time.monotonic()
        if step in (1, total) or now - self._last >= 0.1:
            self._last = now
            self._send({"type": "progress", "step": step, "total": total})


def _die_with_parent() -> None:
    """On Linux, ask to be killed when the site process dies (even by SIGKILL), so a warm
    worker never trains on for a site that is gone; elsewhere the end of stdin ends it."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return


def serve(source: IO[bytes], sink: IO[str]) -> int:
    """The warm worker's loop: one job per line of ``source``, JSON lines to ``sink``."""
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the site died before we asked
        return 0
    import torch  # noqa: F401  (the import is the cost a warm worker pays once)

    import shared.training  # noqa: F401

    def send(record: dict[str, Any]) -> None:
        sink.write(json.dumps(record) + "\n")
        sink.flush()

    for line in source:
        try:
            request = json.loads(line)
            if request.get("type") != "job" or not isinstance(request.get("job"), dict):
                raise ValueError("expected a job")
        except (ValueError, AttributeError) as exc:
            send({"type": "result", "ok": False, "code": "training.protocol", "message": str(exc)})
            continue
        try:
            record = {"ok": True, **run_job(request["job"], _Throttled(send), reuse_model=True)}
        except Exception as exc:  # the edge of the process: report, never a stack trace upstream
            record = _failure(exc)
        send({"type": "result", **record})
    return 0


def main(argv: list[str]) -> int:
    if argv == ["--serve"]:
        # Keep the real stdout for our JSON lines; anything else printed goes to stderr.
        channel = os.fdopen(os.dup(1), "w", encoding="utf-8")
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        return serve(sys.stdin.buffer, channel)
    job_path = Path(argv[0])
    job = json.loads(job_path.read_text("utf-8"))
    progress_path = Path(job["progress_path"]) if job.get("progress_path") else None

    def progress(step: int, total: int) -> None:
        if progress_path is not None and (step == total or step % 5 == 0):
            progress_path.write_text(f"{step} {total}")

    try:
        record = {"ok": True, **run_job(job, progress)}
    except Exception as exc:  # the edge of the process: report, never a stack trace upstream
        record = _failure(exc)
    Path(job["result_path"]).write_text(json.dumps(record), "utf-8")
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
