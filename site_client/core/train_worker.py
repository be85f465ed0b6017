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
weights; clipped and noised first when the plan asks for differential privacy, its norms in
the result's ``dp``) with its SHA-256, so the site signs it without reading it again.
``timings`` holds the job's phases in seconds (``verify``, ``train``, ``encode``) and the
processor time it used (``cpu``) for the site's round record.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
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
) -> tuple[np.ndarray, np.ndarray]:
    """The training side (or, with ``holdout``, the held-out side) of the site's indexed,
    labelled images (``tessera-site import``), from the tensor cache: memory maps, read one
    batch at a time by the training loop."""
    from shared.errors import DataError
    from site_client.core.intake.dataset import build_dataset
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
    index = SiteIndex(index_db, secret)
    try:
        ds = build_dataset(
            index,
            cache_dir,
            input_size=plan.input_size,
            label_column=plan.label_column,
            seed=seed,
            preprocessing=dict(plan.preprocessing),
        )
    finally:
        index.close()
    if holdout:
        return ds.holdout_images, ds.holdout_labels
    print(ds.summary(), file=sys.stderr)
    for skip in ds.skipped[:20]:
        print(f"left out image {skip.image} of study {skip.study}: {skip.reason}", file=sys.stderr)
    return ds.train_images, ds.train_labels


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


def _read_model(path: Path, sha256: str | None) -> bytes:
    """The global model's bytes, checked against the digest the coordinator signed: the file
    in the site's model cache may be one downloaded rounds ago, or damaged on disk."""
    from shared.errors import TrainingError

    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        path.unlink(missing_ok=True)  # the next invitation downloads it again
        raise TrainingError(
            "The stored copy of the global model is damaged (its SHA-256 does not match the "
            "signed digest); it was deleted and will be downloaded again.",
            code="training.model_corrupt",
        )
    return data


def write_update(out: Path, arrays: dict[str, np.ndarray]) -> tuple[str, int]:
    """Write ``arrays`` as safetensors to ``out`` (atomically) and return the file's SHA-256
    and size. The bytes are those of ``shared.tensors.encode_tensors`` (names sorted, the
    header padded with spaces to 8 bytes), written from the arrays themselves and hashed on the
    way: no model-sized intermediate buffer. Float32 little-endian only; anything else goes
    through ``encode_tensors``."""
    names = sorted(arrays)
    parts: list[bytes | memoryview]
    if sys.byteorder == "little" and all(
        arrays[n].dtype == np.float32 and arrays[n].flags.c_contiguous for n in names
    ):
        header: dict[str, Any] = {}
        offset = 0
        for name in names:
            size = arrays[name].nbytes
            shape = list(arrays[name].shape)
            header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        parts = [struct.pack("<Q", len(raw)), raw]
        parts += [arrays[n].reshape(-1).view(np.uint8).data for n in names]
    else:
        from shared.tensors import encode_tensors

        parts = [encode_tensors(arrays)]
    digest, total = hashlib.sha256(), 0
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        for part in parts:
            digest.update(part)
            fh.write(part)
            total += len(part)
    os.replace(tmp, out)
    return digest.hexdigest(), total


def run_job(
    job: dict[str, Any], progress: Progress | None = None, *, reuse_model: bool = False
) -> dict[str, Any]:
    """Train once; returns the result record's fields (``ok`` excluded). Raises on failure.
    A job of ``kind`` "validate" evaluates the model on the site's held-out split instead."""
    import torch

    if job.get("kind") == "validate":
        return validate_job(job, reuse_model=reuse_model)

    from shared.aggregation import local_training_options, make_strategy
    from shared.models.state import load_model_arrays
    from shared.plan import TrainingPlan
    from shared.tensors import decode_tensors
    from shared.training import train_local

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
    base = decode_tensors(raw)
    del raw
    load_model_arrays(model, base)
    # The strategy's part of local training, e.g. FedProx's proximal term (mu).
    strategy = make_strategy(plan.aggregation, plan.aggregation_params, weighting=plan.weighting)
    options = local_training_options(strategy)
    result = train_local(
        model, images, labels, plan, seed=int(job["seed"]), progress=progress, **options
    )
    train_s = clock() - train_started
    encode_started = clock()
    # The update, new weights minus global weights, computed into the global weights' own
    # (decoded, hence private) arrays: one pass per tensor, no model-sized allocation.
    state = model.state_dict()
    for name, array in base.items():
        after = state[name].detach().numpy()
        if array.dtype == np.float32:
            np.subtract(after, array, out=array)
        else:
            base[name] = np.subtract(after, array, dtype=np.float32)
    dp = _privatise(base, plan, job.get("dp_seed"))
    digest, size = write_update(Path(job["update_path"]), base)
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


def _privatise(update: dict[str, np.ndarray], plan: Any, seed: Any) -> dict[str, float] | None:
    """Client-level DP (``shared.privacy.client_dp``) when the plan asks for it: clip the
    update to ``dp.clip_norm`` and add the site's full share of Gaussian noise, in place, before
    anything is hashed or written, so no unprotected copy leaves this process. The noise comes
    from a generator seeded by ``os.urandom``; ``seed`` (the job's ``dp_seed``) fixes it for
    tests only. Returns the norms for the site's round record (they stay at the site)."""
    if plan.dp is None:
        return None
    from shared.privacy.client_dp import clip_and_noise, secure_rng

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

    from shared.models.registry import build_model
    from shared.models.state import load_model_arrays
    from shared.plan import TrainingPlan
    from shared.tensors import decode_tensors
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
    load_model_arrays(model, decode_tensors(raw))
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
