"""FedBN: normalisation layers stay at each site; everything else is averaged.

Li, Jiang, Zhang, Kamp, Dou, "FedBN: Federated Learning on Non-IID Features via Local Batch
Normalization", ICLR 2021. When sites differ in *feature* distribution (scanners, protocols),
each site's BatchNorm statistics and affine parameters absorb its own shift; averaging them
(plain FedAvg) blurs every site's shift into one. FedBN leaves them out of aggregation.

Which entries are local: every state_dict entry of a normalisation layer (``weight``, ``bias``,
``running_mean``, ``running_var``, ``num_batches_tracked``). :func:`norm_layer_keys` finds them
by module type on a built model (BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm, GroupNorm,
LayerNorm: the paper uses BatchNorm; the same reasoning applies to any per-channel
normalisation). :func:`local_keys` finds them from names alone, for a party holding only the
arrays (the coordinator): a prefix with both ``running_mean`` and ``running_var`` is a
normalisation layer with tracked statistics, and its ``weight``, ``bias`` and
``num_batches_tracked`` go with it. Names cannot reveal GroupNorm or LayerNorm (no running
statistics); for the registry's models (small_cnn, densenet121: BatchNorm only) both agree,
which the tests check.

Site-side contract (nothing here does I/O; ``site_client/core/train_worker.py`` and
``local_state.py`` carry it out):

1. The site keeps its own values of the local entries between rounds, per round, in the run's
   folder of its data directory, so a restarted site keeps them; in the first round they are
   the global model's initial values.
2. On receiving a global model it overwrites the local entries with its own
   (:func:`merge_local`), trains, and stores the new local entries.
3. It sends the delta of the **shared** entries only (:func:`split_update`): its normalisation
   layers never leave the hospital, and the coordinator checks updates against the shared
   layout (``upload_layout``), so an update that carries a local entry is refused.
4. It validates every global model (each round's and the final one) with its own local
   entries in place: that is the model it would use.

What the global model carries for the local entries: their **initial values**, unchanged by
aggregation, and a FedBN model is complete only with a site's own local entries. Why not
something "better": the coordinator never sees the sites' entries, so it cannot average them;
asking the sites to send their running statistics at the end would send summary statistics of
each hospital's images (per-channel means and variances) that FedBN exists to keep local, and
their average fits no site, which is the feature shift FedBN is for (the heterogeneity
benchmark's "whole" AUC shows it). A hospital using the released model uses it as it
validated it: with its own layers, the ones it trained in the run. The initial values are a
neutral placeholder (identity affine, zero mean, unit variance), not a model to use alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from typing import TypeVar

import numpy as np
from torch import nn

from shared.errors import UpdateError

T = TypeVar("T")

NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm1d/2d/3d
    nn.GroupNorm,
    nn.LayerNorm,
)
_STAT_SUFFIXES = ("running_mean", "running_var")
_NORM_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def norm_layer_keys(model: nn.Module) -> frozenset[str]:
    """State_dict names of every normalisation layer's entries in ``model`` (by module type)."""
    names = set(model.state_dict())
    keys: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            for suffix in _NORM_SUFFIXES:
                name = f"{prefix}.{suffix}" if prefix else suffix
                if name in names:
                    keys.add(name)
    return frozenset(keys)


def local_keys(names: Iterable[str]) -> frozenset[str]:
    """The FedBN-local entries among ``names``, from names alone (see the module docstring):
    layers that track running statistics. Use :func:`norm_layer_keys` where a model exists."""
    present = set(names)
    prefixes = {n.rsplit(".", 1)[0] for n in present if n.endswith(".running_mean")}
    layers = {p for p in prefixes if all(f"{p}.{s}" in present for s in _STAT_SUFFIXES)}
    return frozenset(n for n in present if "." in n and n.rsplit(".", 1)[0] in layers)


def split_update(update: Mapping[str, T], local: Set[str]) -> tuple[dict[str, T], dict[str, T]]:
    """``(shared, local_part)``: the entries of ``update`` not in ``local``, and those in it.
    Works on any name-keyed mapping (updates, weights, layouts); order is kept."""
    shared = {n: a for n, a in update.items() if n not in local}
    kept = {n: a for n, a in update.items() if n in local}
    return shared, kept


def merge_local(
    global_weights: Mapping[str, np.ndarray], local_values: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The site's working weights: ``global_weights`` with its own ``local_values`` in place.

    Every local name must be a global name with the same shape (``UpdateError`` otherwise:
    the stored local layers belong to another architecture).
    """
    unknown = set(local_values) - set(global_weights)
    if unknown:
        raise UpdateError(
            f"The site's local layers include {len(unknown)} tensor(s) the global model lacks, "
            f"e.g. {sorted(unknown)[0]!r}. They were saved for another architecture; discard "
            "them and start from the global model's values.",
            code="update.keys",
        )
    merged = dict(global_weights)
    for name, value in local_values.items():
        if np.shape(value) != np.shape(global_weights[name]):
            raise UpdateError(
                f"The site's local tensor {name!r} has shape {np.shape(value)}, the global "
                f"model's {np.shape(global_weights[name])}. Discard the saved local layers.",
                code="update.shape",
                tensor=name,
            )
        merged[name] = value
    return merged
