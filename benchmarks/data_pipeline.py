"""Training from the on-disk tensor cache against training from memory, in the same run.

Run: ``python -m benchmarks.data_pipeline``. Makes one synthetic site (``shared.synthetic``,
``IMAGES`` chest radiographs of 128x128 pixels), imports it into a fresh study index
(``import_folder``), attaches its labels, and builds the dataset for a 64x64 plan twice:
cold (every image decoded and resized into the cache, then the split files written) and warm
(every entry found; only stats and two memory maps opened). Both times are printed.

- ``epoch_ratio``: one local epoch of ``small_cnn`` (``shared.training.train_local``, batch 32,
  Adam, one CPU thread as a site trains by default) fed from the cache's read-only memory
  maps, over the same epoch fed from in-memory copies of the same arrays (``np.array``), best
  of ``RUNS`` each, the two interleaved so that drift in the machine's speed hits both alike.
  Every run starts from the same initial weights and seed; both paths must end with
  bit-identical weights (checked), so the only difference timed is where batches come from.
  Bar: ``<= 1.25``.

One untimed epoch runs first, so that torch's one-off set-up costs fall on neither side.
"""

from __future__ import annotations

import secrets
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shared.models.registry import build_model
from shared.models.state import model_arrays
from shared.plan import demo_plan
from shared.synthetic import generate_federation
from shared.training import train_local
from site_client.core.intake.dataset import build_dataset
from site_client.core.intake.importer import import_folder
from site_client.core.intake.index import SiteIndex
from site_client.core.intake.labels import attach_labels

IMAGES = 400
INPUT_SIZE = 64
RUNS = 3


def _epoch(plan, images: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    model = build_model(
        plan.architecture, plan.architecture_version, input_size=plan.input_size, seed=plan.seed
    )
    started = time.perf_counter()
    train_local(model, images, labels, plan, seed=7)
    return time.perf_counter() - started, model_arrays(model)


def main() -> None:
    torch.set_num_threads(1)
    plan = demo_plan(rounds=1, input_size=INPUT_SIZE, local_epochs=1, batch_size=32)
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp:
        root = Path(tmp)
        fed = generate_federation(
            root / "data", sites=1, seed=1, images_per_site=IMAGES, test_images=0
        )
        site = fed.sites[0]
        index = SiteIndex(root / "site" / "index.db", secrets.token_bytes(32))
        try:
            started = time.perf_counter()
            imported = import_folder(index, site.dicom_dir)
            import_s = time.perf_counter() - started
            labels = attach_labels(index, site.labels_csv)
            cache = root / "site" / "cache" / "tensors"
            build = {}
            for phase in ("cold", "warm"):
                started = time.perf_counter()
                ds = build_dataset(
                    index,
                    cache,
                    input_size=plan.input_size,
                    label_column=plan.label_column,
                    preprocessing=dict(plan.preprocessing),
                )
                build[phase] = (time.perf_counter() - started, ds.hits, ds.misses)
        finally:
            index.close()
        print(
            f"import: {imported.indexed} files in {import_s:.2f} s; labels: "
            f"{labels.labelled_studies} studies labelled"
        )
        for phase, (seconds, hits, misses) in build.items():
            print(f"cache build {phase}: {seconds:.3f} s ({hits} hits, {misses} misses)")
        print(ds.summary())

        cached_x, cached_y = ds.train_images, ds.train_labels
        assert isinstance(cached_x, np.memmap)
        memory_x, memory_y = np.array(cached_x), np.array(cached_y)
        _epoch(plan, memory_x, memory_y)  # warm-up, untimed
        times: dict[str, list[float]] = {"cache": [], "memory": []}
        weights: dict[str, dict[str, np.ndarray]] = {}
        for _ in range(RUNS):
            for name, (x, y) in (("cache", (cached_x, cached_y)), ("memory", (memory_x, memory_y))):
                seconds, weights[name] = _epoch(plan, x, y)
                times[name].append(seconds)
        same = all(
            np.array_equal(weights["cache"][k], weights["memory"][k]) for k in weights["memory"]
        )
        if not same:
            raise SystemExit("the cache and memory epochs ended with different weights")
        best = {name: min(t) for name, t in times.items()}
        for name, t in times.items():
            print(f"epoch from {name:>6}: " + ", ".join(f"{s:.3f}" for s in t) + " s")
        ratio = best["cache"] / best["memory"]
        cold, warm = build["cold"][0], build["warm"][0]
        print(
            f"RESULT epoch_ratio={ratio:.3f} epoch_cache_s={best['cache']:.3f} "
            f"epoch_memory_s={best['memory']:.3f} images={ds.n_train} "
            f"cache_cold_s={cold:.3f} cache_warm_s={warm:.3f}"
        )


if __name__ == "__main__":
    main()
