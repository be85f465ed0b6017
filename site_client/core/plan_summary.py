"""A training plan explained in plain language, for the person at the hospital who approves it.

Radiology and IT staff decide whether their hospital takes part; they need to know what the
model will learn, how long it runs, what leaves the building and how much of it, and which
protections apply, without reading JSON. Everything here is computed from the plan and the
model registry (parameter count gives the size of each update), so the text cannot drift from
what the plan will actually do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from shared.models.registry import build_model, get_architecture
from shared.plan import TrainingPlan

_STRATEGIES = {
    "fedavg": "federated averaging (McMahan 2017): the hospitals' updates are averaged",
    "fedprox": "FedProx (Li 2020): averaging, with local training kept close to the shared "
    "model so hospitals with unusual data do not pull it apart",
    "fedadam": "averaging followed by an adaptive server step (FedAdam, Reddi 2021)",
    "fedyogi": "averaging followed by an adaptive server step (FedYogi, Reddi 2021)",
    "fedadagrad": "averaging followed by an adaptive server step (FedAdagrad, Reddi 2021)",
    "fedbn": "averaging, with each hospital keeping its own normalisation layers (FedBN, "
    "Li 2021), which suits differences between scanners",
    "median": "the coordinate-wise median of the updates, which resists one hospital's "
    "faulty update",
    "trimmed_mean": "a trimmed mean of the updates, which resists a few faulty updates",
}


@dataclass(frozen=True, slots=True)
class PlanSummary:
    title: str
    lines: tuple[tuple[str, str], ...]  # (heading, plain-language text)
    parameters: int
    update_bytes: int

    def text(self) -> str:
        width = max(len(h) for h, _ in self.lines)
        return "\n".join([self.title, ""] + [f"{h.ljust(width)}  {t}" for h, t in self.lines])


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _state(plan: TrainingPlan) -> dict[str, Any]:
    model = build_model(
        plan.architecture,
        plan.architecture_version,
        input_size=plan.input_size,
        params=dict(plan.architecture_params),
        seed=0,
    )
    return dict(model.state_dict())


def parameter_count(plan: TrainingPlan) -> int:
    return sum(p.numel() for p in _state(plan).values())


def update_bytes(plan: TrainingPlan) -> int:
    """The most one update can take on the wire in the plan's codec (float32 values when it
    compresses nothing; fp16, int8 or top-k need less)."""
    layout = {
        name: (tuple(t.shape), "float32")
        for name, t in _state(plan).items()
        if t.is_floating_point()
    }
    if plan.homomorphic:  # the encrypted local model: ciphertexts, about 12 bytes a number
        from shared.privacy.homomorphic import max_encrypted_bytes

        return max_encrypted_bytes(sum(math.prod(shape) for shape, _ in layout.values()))
    return int(plan.codec.max_payload_size(layout))


def summarise(
    plan: TrainingPlan,
    *,
    epsilon: float | None = None,
    delta: float | None = None,
    secure_aggregation: bool = False,
    per_example: bool = False,
) -> PlanSummary:
    """``epsilon``/``delta``: the privacy budget the run would spend here (``None``: no
    differential privacy); ``secure_aggregation``: whether only the sum is ever visible;
    ``per_example``: DP-SGD, whose budget is ``None`` until the images are counted."""
    spec = get_architecture(plan.architecture, plan.architecture_version)
    params = parameter_count(plan)
    update = update_bytes(plan)
    per_run = update * plan.rounds
    protections = [
        "signed by this hospital and sent over an encrypted connection pinned to the "
        "coordinator's certificate"
    ]
    protections.append(
        "secure aggregation: the coordinator only ever sees the sum of all hospitals' updates"
        if secure_aggregation
        else "homomorphic encryption: this hospital's model leaves it encrypted under a key "
        "only the hospitals hold; the coordinator averages without being able to read it"
        if plan.homomorphic
        else "no secure aggregation: the coordinator sees this hospital's update itself"
    )
    if plan.max_update_norm is not None:
        protections.append(f"updates larger than {plan.max_update_norm:g} (L2 norm) are refused")
    kind = "for each training image (DP-SGD) " if per_example else ""
    budget = (
        f"differential privacy {kind}with a total budget of epsilon {epsilon:.2f}"
        + (f" at delta {delta:g}" if delta is not None else "")
        + " for the whole run"
        if epsilon is not None
        else "differential privacy for each training image (DP-SGD); its budget depends on "
        "this hospital's number of training images, and each round is checked against this "
        "hospital's limit before anything is sent"
        if per_example
        else "none: this plan uses no differential privacy, so it spends no privacy budget "
        "and gives no formal guarantee against inference from the updates"
    )
    lines = (
        (
            "Task",
            f"learn to answer yes or no for the label '{plan.label_column}' on each image "
            f"(binary classification), from this hospital's labelled studies",
        ),
        (
            "Model",
            f"{spec.name} version {spec.version}: {spec.description}; "
            f"{params:,} numbers to learn; images resized to "
            f"{plan.input_size} x {plan.input_size} pixels",
        ),
        (
            "How long",
            f"{plan.rounds} rounds; in each, this computer trains for {plan.local_epochs} "
            f"pass(es) over the hospital's training images; a round waits at most "
            f"{plan.round_deadline_s / 60:.0f} minutes and needs {plan.quorum} hospitals",
        ),
        (
            "What leaves",
            f"per round one model update of at most {_size(update)}"
            + ("" if plan.compression == "none" else f" (compressed: {plan.compression})")
            + " (numbers only: no images, "
            f"no patient identifiers), about {_size(per_run)} over the run, plus the count "
            "of images trained on and the validation figures (AUC, accuracy, sensitivity, "
            "specificity, loss, number of images)",
        ),
        (
            "What stays",
            "every image, label and patient identifier, and the held-out 20% of "
            "patients used to check the shared model here",
        ),
        ("Combining", _STRATEGIES.get(plan.aggregation, plan.aggregation)),
        ("Protections", "; ".join(protections)),
        ("Privacy budget", budget),
    )
    return PlanSummary(
        title=f"Plan '{plan.name}' ({plan.plan_hash[:12]})",
        lines=lines,
        parameters=params,
        update_bytes=update,
    )
