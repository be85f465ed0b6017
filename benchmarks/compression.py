"""Update compression on the hard setting: bytes each site uploads, and the AUC that remains.

Run: ``python -m benchmarks.compression``. The task of ``benchmarks.heterogeneity`` (hard 4-site
setting, small_cnn, same plan; ``benchmarks/_federation_sim.py``) under :data:`STRATEGY`, once
per codec of ``shared.compression`` (:data:`CODECS`):

- ``none``: the update as float32 safetensors;
- ``fp16``: half precision;
- ``int8+zstd``: int8 with one float32 scale per block of 256 values, in a zstd frame;
- ``topk:<f>+zstd``: each tensor's largest ``f`` share of entries (indices and float32 values),
  in a zstd frame, with the error feedback kept at each site (Stich et al., NeurIPS 2018).

Every update goes through the codec's real ``encode`` at the site and ``decode`` at the
coordinator before it is aggregated, so the AUC includes what the codec loses. Bytes are the
payloads of every site in every round; ``*_bytes_ratio`` divides them by the raw float32 size
of the same updates (4 bytes per value, no container), so the uncompressed payload is slightly
above 1. ``*_auc_delta`` = AUC(codec) - AUC(none), AUC as in ``benchmarks.heterogeneity`` (the
mean of the sites' AUCs on their own scanners). Bar: ``int8_bytes_ratio <= 0.30`` and
``|int8_auc_delta| <= 0.01``. Uploads only: downloads of the global model are the same for
every run here.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._federation_sim import (
    LOCAL_EPOCHS,
    ROUNDS,
    SIZE,
    History,
    hard_plan,
    load_hard_setting,
    run_strategy,
)
from shared.aggregation import make_strategy

STRATEGY = "fedbn"  # the best strategy of benchmarks.heterogeneity on this task
TOPK = "topk:0.1+zstd"
CODECS = ("none", "fp16", "int8+zstd", TOPK)


def main() -> int:
    t0 = time.perf_counter()
    torch.set_num_threads(2)
    print(
        f"hard setting, small_cnn {SIZE}x{SIZE}, {STRATEGY}, {ROUNDS} rounds x {LOCAL_EPOCHS} "
        "local epochs"
    )
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp:
        data = load_hard_setting(Path(tmp))
    plan = hard_plan()
    runs: dict[str, History] = {}
    for codec in CODECS:
        h = run_strategy(codec, data, plan, make_strategy(STRATEGY), codec=codec)
        print(f"  trained with {codec}: AUC {h.final.auc:.3f} in {h.seconds:.0f} s", flush=True)
        runs[codec] = h

    base = runs["none"]
    print()
    print(f"{'codec':<16} {'uploaded':>12} {'ratio':>7} {'AUC':>7} {'delta':>7} {'worst site':>10}")
    for codec, h in runs.items():
        print(
            f"{codec:<16} {h.upload_bytes:>12,} {h.upload_bytes / h.raw_bytes:>7.3f} "
            f"{h.final.auc:>7.3f} {h.final.auc - base.final.auc:>+7.3f} "
            f"{h.final.worst_site_auc:>10.3f}"
        )
    print(f"raw float32 updates: {base.raw_bytes:,} bytes over {ROUNDS} rounds and 4 sites")

    def ratio(codec: str) -> float:
        return runs[codec].upload_bytes / runs[codec].raw_bytes

    def delta(codec: str) -> float:
        return runs[codec].final.auc - base.final.auc

    ok = ratio("int8+zstd") <= 0.30 and abs(delta("int8+zstd")) <= 0.01
    print(f"bar: int8+zstd <= 0.30 of raw and AUC within 0.01: {'ok' if ok else 'MISSED'}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    print(
        f"RESULT fp16_bytes_ratio={ratio('fp16'):.4f} int8_bytes_ratio={ratio('int8+zstd'):.4f} "
        f"topk_bytes_ratio={ratio(TOPK):.4f} int8_auc_delta={delta('int8+zstd'):+.4f} "
        f"topk_auc_delta={delta(TOPK):+.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
