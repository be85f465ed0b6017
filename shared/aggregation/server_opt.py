"""Server optimisers: FedAdam, FedYogi, FedAdagrad, and server momentum (FedAvgM).

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated
Optimization", ICLR 2021, Algorithm 2. The round's aggregated delta ``D`` (mean of the sites'
``local - global``) is treated as a pseudo-gradient (pointing downhill) and fed to an adaptive
optimiser on the coordinator, per parameter:

    m  = beta1 * m + (1 - beta1) * D
    v  = v + D**2                                            FedAdagrad
    v  = beta2 * v + (1 - beta2) * D**2                      FedAdam
    v  = v - (1 - beta2) * D**2 * sign(v - D**2)             FedYogi
    x  = x + eta * m / (sqrt(v) + tau)

Server momentum (FedAvgM; Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification", 2019) is the same loop with SGD and heavy-ball
momentum on the server, ``m = beta1 * m + D``, ``x = x + eta * m`` (``v`` unused, kept at
``tau**2``): consistent directions across rounds accumulate, which speeds up federated training
where each round moves the model only as far as one site's few local steps. It is not a plan
strategy by itself; FedBN uses it (``aggregation_params: {"server_momentum": beta}``, eta 1).

As in the paper there is no bias correction, and ``v`` starts at ``tau**2`` (Algorithm 2 asks
for ``v_{-1} >= tau**2``; we take the bound), ``m`` at zero. ``beta2`` is unused by FedAdagrad.
``tau`` sets the degree of adaptivity: the paper's grid is 1e-7 .. 1e-1 and 1e-3 does well
across its tasks; ``eta`` is the server learning rate (tune it; 1e-2 .. 1 in the paper).
Normalisation layers' running statistics (``*.running_mean``, ``*.running_var``) are not
parameters: they take the plain average (``x + D``) and keep their ``m``, ``v`` unchanged, else
they would lag the sites' statistics by ``eta`` a round (benchmarks/heterogeneity.py).

State precision: ``m`` and ``v`` are stored as float32, one array each per tensor, the model's
own precision, so the persisted state is twice the model's size (float64 would double that for
no gain: the weights they update are float32). Each step computes in float64 from the stored
float32 state and rounds the new ``m``, ``v`` and weights once. Every operation is elementwise,
so a step is deterministic and a replay from the persisted state gives the same bits.
:meth:`ServerOptState.to_arrays` / :meth:`ServerOptState.from_arrays` give safetensors-ready
arrays (names ``m/<tensor>``, ``v/<tensor>`` and ``step``) for the coordinator to persist.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from shared.aggregation._config import choice, invalid, number
from shared.aggregation.validation import check_keys, check_tensor_meta
from shared.errors import UpdateError

SERVER_OPTIMISERS = ("fedadam", "fedyogi", "fedadagrad")
# Server momentum; not a plan strategy by itself, chosen through FedBN's ``server_momentum``.
MOMENTUM: Literal["fedavgm"] = "fedavgm"
WEIGHTINGS = ("samples", "uniform")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerOptConfig:
    """Settings of one server optimiser (Reddi et al. 2021); invalid values raise
    ``PlanError(plan.invalid)``. ``weighting`` is how the sites' deltas are averaged into the
    pseudo-gradient (FedAvg's rule; the paper uses the uniform mean)."""

    optimiser: Literal["fedadam", "fedyogi", "fedadagrad", "fedavgm"]
    eta: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    weighting: Literal["samples", "uniform"] = "samples"

    def __post_init__(self) -> None:
        choice("optimiser", self.optimiser, (*SERVER_OPTIMISERS, MOMENTUM))
        put = object.__setattr__
        put(self, "eta", number("eta", self.eta, low=0.0, low_open=True))
        put(self, "beta1", number("beta1", self.beta1, low=0.0, high=1.0))
        put(self, "beta2", number("beta2", self.beta2, low=0.0, high=1.0))
        put(self, "tau", number("tau", self.tau, low=0.0, low_open=True))
        if self.tau**2 < np.finfo(np.float32).tiny:
            raise invalid("tau", "at least 1.1e-19 (tau**2 must be a normal float32)", self.tau)
        choice("weighting", self.weighting, WEIGHTINGS)

    @property
    def name(self) -> str:
        return self.optimiser


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerOptState:
    """The optimiser's memory between rounds: ``step`` rounds taken, first and second moments
    ``m`` and ``v`` (float32, one per tensor, read-only copies, names sorted). Build the first
    one with :func:`initial_state`. Invalid contents raise ``UpdateError``."""

    step: int
    m: Mapping[str, np.ndarray]
    v: Mapping[str, np.ndarray]

    def __post_init__(self) -> None:
        if not isinstance(self.step, int) or isinstance(self.step, bool) or self.step < 0:
            raise _state_error(f"its step count is {self.step!r}, not an integer >= 0")
        m = {name: _frozen32(self.m[name]) for name in sorted(self.m)}
        v = {name: _frozen32(self.v[name]) for name in sorted(self.v)}
        if set(m) != set(v):
            raise _state_error("its first and second moments name different tensors")
        for name in m:
            if m[name].shape != v[name].shape:
                raise _state_error(f"its moments of {name!r} have different shapes")
            if not (np.isfinite(m[name]).all() and np.isfinite(v[name]).all()):
                raise _state_error(f"its moments of {name!r} hold NaN or infinite values")
            if not (v[name] > 0).all():
                raise _state_error(f"its second moment of {name!r} is not positive")
        object.__setattr__(self, "m", m)
        object.__setattr__(self, "v", v)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Safetensors-ready arrays: ``step`` (int64, shape (1,)), ``m/<name>``, ``v/<name>``."""
        out: dict[str, np.ndarray] = {"step": np.array([self.step], dtype=np.int64)}
        for name in self.m:
            out[f"m/{name}"] = self.m[name]
            out[f"v/{name}"] = self.v[name]
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> ServerOptState:
        """Inverse of :meth:`to_arrays`; ``UpdateError`` if the arrays are not such a state."""
        step = arrays.get("step")
        if step is None or np.shape(step) != (1,) or np.asarray(step).dtype.kind not in "iu":
            raise _state_error("its 'step' entry is missing or not one integer")
        m: dict[str, np.ndarray] = {}
        v: dict[str, np.ndarray] = {}
        for key, a in arrays.items():
            if key.startswith("m/"):
                m[key[2:]] = a
            elif key.startswith("v/"):
                v[key[2:]] = a
            elif key != "step":
                raise _state_error(f"it holds an unexpected entry {key!r}")
        return cls(step=int(np.asarray(step)[0]), m=m, v=v)


def initial_state(layout_or_weights: Mapping[str, Any], config: ServerOptConfig) -> ServerOptState:
    """Round-0 state for the tensors of ``layout_or_weights`` (arrays, or a layout mapping
    name -> (shape, dtype)): ``m = 0``, ``v = tau**2`` (Reddi et al. 2021, Algorithm 2).
    Pass only the aggregated tensors (under FedBN, the shared ones)."""
    shapes = {
        name: tuple(np.shape(a)) if isinstance(a, np.ndarray) else tuple(a[0])
        for name, a in layout_or_weights.items()
    }
    tau2 = np.float32(config.tau**2)
    return ServerOptState(
        step=0,
        m={name: np.zeros(s, dtype=np.float32) for name, s in shapes.items()},
        v={name: np.full(s, tau2, dtype=np.float32) for name, s in shapes.items()},
    )


STATISTIC_SUFFIXES = (".running_mean", ".running_var")


def is_statistic(name: str) -> bool:
    """Whether ``name`` is a normalisation layer's running statistic (torch's BatchNorm)."""
    return name.endswith(STATISTIC_SUFFIXES)


def server_step(
    global_weights: Mapping[str, np.ndarray],
    mean_delta: Mapping[str, np.ndarray],
    state: ServerOptState,
    config: ServerOptConfig,
) -> tuple[dict[str, np.ndarray], ServerOptState]:
    """One round of Algorithm 2: returns the new global weights and the new state.

    ``mean_delta`` must name exactly the state's tensors, with their shapes; ``global_weights``
    must hold them too (same shapes) and may hold more: those (FedBN's local layers) are
    returned unchanged. Results keep each weight's dtype. Pure: the inputs are not modified.
    Raises ``UpdateError`` (``update.keys``, ``update.shape``, ``update.dtype``,
    ``update.nonfinite``) for mismatched or non-finite inputs.
    """
    layout = {name: (tuple(a.shape), "float32") for name, a in state.m.items()}
    check_keys(mean_delta.keys(), layout)
    missing = set(layout) - set(global_weights)
    if missing:
        raise UpdateError(
            f"The global weights lack {len(missing)} tensor(s) the optimiser updates, e.g. "
            f"{sorted(missing)[0]!r}. Use the state built for this model.",
            code="update.keys",
        )
    for name in layout:
        for what, arrays in (("delta", mean_delta), ("weights", global_weights)):
            a = np.asarray(arrays[name])
            check_tensor_meta(name, a.shape, "float32", layout)
            if a.dtype.kind != "f":
                raise UpdateError(
                    f"The {what} tensor {name!r} has dtype {a.dtype}; it must be floating point.",
                    code="update.dtype",
                    tensor=name,
                )
            if not np.isfinite(a).all():
                raise UpdateError(
                    f"The {what} tensor {name!r} holds NaN or infinite values; the round's "
                    "aggregate cannot be applied.",
                    code="update.nonfinite",
                    tensor=name,
                )
    b1, b2, eta, tau = config.beta1, config.beta2, config.eta, config.tau
    new_weights = {name: np.array(a, copy=True) for name, a in global_weights.items()}
    new_m: dict[str, np.ndarray] = {}
    new_v: dict[str, np.ndarray] = {}
    for name in layout:
        if is_statistic(name):
            # A normalisation layer's running mean or variance estimates the data's moments;
            # it is not a parameter the server optimiser should move by eta a round (it would
            # lag far behind the sites' statistics). It takes the plain average, as in FedAvg.
            x = np.asarray(global_weights[name])
            plain = x.astype(np.float64) + np.asarray(mean_delta[name], dtype=np.float64)
            new_weights[name] = plain.astype(x.dtype)
            new_m[name], new_v[name] = state.m[name], state.v[name]
            continue
        d = np.asarray(mean_delta[name], dtype=np.float64)
        x = np.asarray(global_weights[name])
        if config.optimiser == MOMENTUM:
            m = b1 * state.m[name].astype(np.float64) + d
            new_weights[name] = (x.astype(np.float64) + eta * m).astype(x.dtype)
            new_m[name], new_v[name] = m.astype(np.float32), state.v[name]
            continue
        d2 = d * d
        m = b1 * state.m[name].astype(np.float64) + (1.0 - b1) * d
        v = state.v[name].astype(np.float64)
        if config.optimiser == "fedadagrad":
            v = v + d2
        elif config.optimiser == "fedadam":
            v = b2 * v + (1.0 - b2) * d2
        else:  # fedyogi
            v = v - (1.0 - b2) * d2 * np.sign(v - d2)
        new_weights[name] = (x.astype(np.float64) + eta * m / (np.sqrt(v) + tau)).astype(x.dtype)
        new_m[name] = m.astype(np.float32)
        # v > 0 in exact arithmetic (Yogi: v' >= beta2 * v); keep it so after rounding too.
        new_v[name] = np.maximum(v.astype(np.float32), np.finfo(np.float32).tiny)
    return new_weights, ServerOptState(step=state.step + 1, m=new_m, v=new_v)


def _frozen32(a: Any) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype != np.float32:
        raise _state_error(f"a moment has dtype {arr.dtype}, not float32")
    out = np.array(arr, dtype=np.float32, copy=True)
    out.setflags(write=False)
    return out


def _state_error(what: str) -> UpdateError:
    return UpdateError(
        f"The server optimiser's saved state is not usable: {what}. Restore it from the "
        "coordinator's store, or restart the run's optimiser from initial_state().",
        code="update.state",
    )


__all__ = [
    "SERVER_OPTIMISERS",
    "ServerOptConfig",
    "ServerOptState",
    "initial_state",
    "server_step",
]
