"""Predicting on DICOM files with a verified release, against a bare forward pass, same run.

Run: ``python -m benchmarks.inference``. Makes ``IMAGES`` synthetic chest radiographs
(``shared.synthetic``) at the plan's input size (``INPUT_SIZE`` = 64, the demo plan's, with
``densenet121`` as the architecture), publishes a release of a one-round run of that plan through
the coordinator's own code (``coordinator.release``), then on the site side verifies and loads
it (``site_client.core.predict.load_release``: the registry's DenseNet121 with the release's
weights) and times, on the same model and images:

- ``pipeline``: ``predict_files`` on the DICOM files, as ``tessera-site predict`` runs it:
  reading, decoding and preparing each file (``shared.imaging.pixels_to_input``) in a thread
  pool that works ahead while the model runs on the current batch;
- ``bare``: the same forward passes (``shared.training.predict_scores``, the function
  ``predict_files`` calls per batch, batch ``BATCH``) on the same images already prepared in
  memory as one float32 array.

The model runs on every core but one (``default_threads``, what ``tessera-site predict`` uses
unless told otherwise; one thread on a 2-core machine), the remaining core being the one that
reads ahead. The images are split in two halves timed in the order bare, pipeline,
pipeline, bare (ABBA), so that a drift in the machine's speed hits both sides alike; each
side's time is the sum of its two halves. Both sides must give the same probabilities (checked).

- ``ratio``: pipeline time over bare time. Bar: ``<= 1.3``.
- ``images_per_s``: images per second of the pipeline. ``decode_s``: the time to read and
  prepare every file one after another without the model (what the overlap has to hide).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from coordinator.config import CoordinatorConfig
from coordinator.federation import Federation
from coordinator.release import make_release
from shared.plan import demo_plan
from shared.synthetic import generate_federation
from shared.training import predict_scores
from site_client.core.predict import (
    default_threads,
    load_release,
    predict_files,
    prepare_file,
)

IMAGES = 1000
INPUT_SIZE = 64
BATCH = 32


def _release(root: Path) -> tuple[Path, str]:
    """A release of a finished one-round run of the DenseNet121 plan (its initial weights),
    and the coordinator's public key."""
    plan = demo_plan(rounds=1, architecture="densenet121", input_size=INPUT_SIZE)
    fed = Federation.init(root / "coordinator", CoordinatorConfig(federation="Benchmark"))
    try:
        run = fed.start_run(fed.add_plan(plan))
        now = time.time()
        fed.store.open_round(run.run_id, 1, [], run.model_digest, now, now + 60)
        fed.store.commit_round(run.run_id, 1, run.model_digest, 0, 0.0, True, now)
        make_release(fed, run.run_id, "1.0", root / "release")
        return root / "release", fed.public_key()
    finally:
        fed.close()


def main() -> None:
    torch.set_num_threads(default_threads())  # as 'tessera-site predict' runs by default
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp:
        root = Path(tmp)
        data = generate_federation(
            root / "data",
            sites=1,
            seed=5,
            images_per_site=IMAGES,
            test_images=0,
            image_size=INPUT_SIZE,
        )
        files = sorted(data.sites[0].dicom_dir.rglob("*.dcm"))
        assert len(files) == IMAGES, len(files)
        loaded = load_release(*_release(root))
        model = loaded.model

        started = time.perf_counter()
        prepared = [prepare_file(f, INPUT_SIZE, None) for f in files]
        decode_s = time.perf_counter() - started
        images = np.stack([p.image for p in prepared])  # type: ignore[union-attr]
        predict_scores(model, images[:BATCH], batch_size=BATCH)  # warm-up, untimed

        half = IMAGES // 2
        parts = [(files[:half], images[:half]), (files[half:], images[half:])]
        times = {"bare": 0.0, "pipeline": 0.0}
        scores: dict[str, dict[int, np.ndarray]] = {"bare": {}, "pipeline": {}}
        for side, part in (("bare", 0), ("pipeline", 0), ("pipeline", 1), ("bare", 1)):
            part_files, part_images = parts[part]
            started = time.perf_counter()
            if side == "bare":
                out = predict_scores(model, part_images, batch_size=BATCH)
            else:
                report = predict_files(loaded, part_files, batch_size=BATCH)
                if report.refused:
                    raise SystemExit(f"refused: {report.refused[0].reason}")
                out = np.array([p.probability for p in report.predictions])
            seconds = time.perf_counter() - started
            times[side] += seconds
            scores[side][part] = out
            print(f"{side:>8} half {part + 1}: {seconds:.2f} s")
        bare, pipeline = (np.concatenate([scores[s][0], scores[s][1]]) for s in times)
        if not np.allclose(bare, pipeline, rtol=0, atol=1e-6):
            raise SystemExit("the pipeline and the bare forward pass gave different outputs")
        ratio = times["pipeline"] / times["bare"]
        print(
            f"model {loaded.plan.architecture} v{loaded.plan.architecture_version} at "
            f"{INPUT_SIZE}x{INPUT_SIZE}, batch {BATCH}, {torch.get_num_threads()} torch threads"
        )
        print(
            f"RESULT images_per_s={IMAGES / times['pipeline']:.1f} ratio={ratio:.3f} "
            f"pipeline_s={times['pipeline']:.2f} bare_s={times['bare']:.2f} "
            f"decode_s={decode_s:.2f} images={IMAGES} input_size={INPUT_SIZE}"
        )


if __name__ == "__main__":
    main()
