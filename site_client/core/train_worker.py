"""The training process: one job in, one update out. Run as ``python -m`` by ``trainer``.

A separate process so that training can be cancelled at any moment (terminate it) and never
blocks the site's connection. It reads the global model with safetensors (never pickle or
``torch.load``), prepares the local images once into a tensor cache (from the site's study
index when the job names one, else from a DICOM folder and labels CSV), trains with the shared
loop and writes the update (new weights minus global weights) and a small result record.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np


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
    index_db: Path, pseudonym_key: Path, cache_dir: Path, plan: Any, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The training side of the site's indexed, labelled images (``tessera-site import``),
    from the tensor cache: memory maps, read one batch at a time by the training loop."""
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
    print(ds.summary(), file=sys.stderr)
    for skip in ds.skipped[:20]:
        print(f"left out image {skip.image} of study {skip.study}: {skip.reason}", file=sys.stderr)
    return ds.train_images, ds.train_labels


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from shared.aggregation import local_training_options, make_strategy
    from shared.models.registry import build_model
    from shared.models.state import load_model_arrays, model_arrays
    from shared.plan import TrainingPlan
    from shared.tensors import decode_tensors, encode_tensors
    from shared.training import train_local

    torch.set_num_threads(int(job.get("threads", 1)))
    plan = TrainingPlan.from_dict(job["plan"])
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
    model = build_model(
        plan.architecture, plan.architecture_version, input_size=plan.input_size, seed=plan.seed
    )
    base = decode_tensors(Path(job["model_path"]).read_bytes())
    load_model_arrays(model, base)
    progress_path = Path(job["progress_path"])

    def progress(step: int, total: int) -> None:
        if step == total or step % 5 == 0:
            progress_path.write_text(f"{step} {total}")

    # The strategy's part of local training, e.g. FedProx's proximal term (mu).
    strategy = make_strategy(plan.aggregation, plan.aggregation_params, weighting=plan.weighting)
    options = local_training_options(strategy)
    result = train_local(
        model, images, labels, plan, seed=int(job["seed"]), progress=progress, **options
    )
    after = model_arrays(model)
    delta = {name: (after[name] - base[name]).astype(np.float32) for name in base}
    out = Path(job["update_path"])
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(encode_tensors(delta))
    os.replace(tmp, out)
    return {
        "num_samples": result.num_samples,
        "train_loss": result.mean_loss,
        "steps": result.steps,
    }


def main(argv: list[str]) -> int:
    job_path = Path(argv[0])
    job = json.loads(job_path.read_text("utf-8"))
    try:
        record = {"ok": True, **run_job(job)}
    except Exception as exc:  # the edge of the process: report, never a stack trace upstream
        record = {
            "ok": False,
            "code": getattr(exc, "code", "training.failed"),
            "message": str(exc)[:500],
        }
        print(f"training failed: {exc!r}", file=sys.stderr)
    Path(job["result_path"]).write_text(json.dumps(record), "utf-8")
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
