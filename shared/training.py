"""The local training loop every party runs: sites in a round, the demo's local-only and pooled
baselines, and the benchmarks (DESIGN.md: one loop, so their numbers compare).

Theory of operation: ``train_local`` runs ``plan.local_epochs`` epochs of mini-batch
optimisation of binary cross-entropy on the logits (the ClientUpdate step of FedAvg, McMahan et
al., AISTATS 2017), optionally with the FedProx proximal term (Li et al., MLSys 2020). All
randomness comes from ``seed``: batches are shuffled by a local ``torch.Generator`` and the loop
runs inside ``torch.random.fork_rng`` with the CPU generator seeded, so any stochastic layer is
reproducible too and the caller's global RNG is untouched. Same weights, data, plan and seed
give bit-identical weights in the same process (torch's CPU kernels are deterministic for a
fixed thread count, which we never change). Batches are gathered by index from the arrays, so a
memory-mapped tensor cache is read one batch at a time.

A plan with example-level DP (``dp.level == "example"``, ``shared.privacy.dp_sgd``) trains
with DP-SGD instead (``_train_dp_sgd``): Poisson-sampled batches and Opacus's per-example
clipping and noise. Its sampling and noise come from a separate generator that must be
unpredictable (``dp_seed``: from ``os.urandom`` unless a test fixes it), so such a run is not
reproducible from the plan's seed: noise that anyone could regenerate would protect nobody.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from shared.errors import DataError, TrainingCancelled, TrainingError
from shared.metrics import Metrics, binary_metrics
from shared.plan import TrainingPlan
from shared.privacy.dp_sgd import ExampleDP, sample_rate, steps_per_round


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainResult:
    """What one call of ``train_local`` did. ``num_samples`` weights the update in FedAvg."""

    num_samples: int
    steps: int
    mean_loss: float


def _check_data(images: np.ndarray, labels: np.ndarray | None) -> None:
    if images.ndim != 4:
        raise DataError(
            f"Images must be an array of shape (N, channels, height, width); got {images.shape}.",
            code="data.shape",
        )
    if images.shape[0] == 0:
        raise DataError(
            "The dataset is empty: import and label some studies first.", code="data.empty"
        )
    if labels is not None:
        if labels.shape != (images.shape[0],):
            raise DataError(
                f"Expected one label per image ({images.shape[0]}), got shape {labels.shape}.",
                code="data.labels",
            )
        if not np.all((labels == 0) | (labels == 1)):
            raise DataError(
                "Labels must be 0 or 1 for binary classification; check the labels file.",
                code="data.labels",
            )


def _batches(num_samples: int, batch_size: int, generator: torch.Generator) -> list[np.ndarray]:
    """One epoch's shuffled index batches. A trailing batch of a single sample is dropped
    (when there are others): BatchNorm cannot normalise one value per channel in training."""
    order = torch.randperm(num_samples, generator=generator).numpy()
    batches = [order[i : i + batch_size] for i in range(0, num_samples, batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()
    return batches


def _optimiser(model: nn.Module, plan: TrainingPlan) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if plan.optimiser == "sgd":
        return torch.optim.SGD(
            params, lr=plan.learning_rate, momentum=plan.momentum, weight_decay=plan.weight_decay
        )
    # Adam keeps its default betas; the plan's momentum applies to SGD only.
    return torch.optim.Adam(params, lr=plan.learning_rate, weight_decay=plan.weight_decay)


def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    out = model(batch)
    if out.ndim != 2 or out.shape[1] != 1:
        raise TrainingError(
            f"Binary classification needs one logit per image; the model gave {tuple(out.shape)}."
            " Build it with num_classes=1.",
            code="training.model",
        )
    return out[:, 0]


def train_local(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    plan: TrainingPlan,
    *,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    proximal: float | None = None,
    dp_seed: int | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``plan.local_epochs`` epochs on (images, labels).

    ``images``: (N, C, H, W) float32; ``labels``: (N,) of 0/1. ``progress(step, total_steps)``
    is called after every step. ``should_stop()`` is polled before every step; when it returns
    True, ``TrainingCancelled`` is raised and the model is left half-trained (discard it).
    ``proximal`` is FedProx's mu: it adds ``mu/2 * ||w - w_start||^2``, where ``w_start`` are
    the weights the model had on entry (the global model), to limit client drift on non-IID
    data. Raises ``TrainingError(code="training.diverged")`` if the loss becomes NaN or Inf.
    ``dp_seed`` seeds DP-SGD's sampling and noise (example-level DP plans only; tests only).
    """
    _check_data(images, labels)
    if isinstance(plan.dp, ExampleDP):
        return _train_dp_sgd(
            model,
            images,
            labels,
            plan,
            plan.dp,
            seed=seed,
            dp_seed=dp_seed,
            progress=progress,
            should_stop=should_stop,
            proximal=proximal,
        )
    if proximal is not None and not (math.isfinite(proximal) and proximal >= 0):
        raise TrainingError(
            f"The proximal coefficient mu must be a finite number >= 0, got {proximal}.",
            code="training.config",
        )
    num_samples = int(images.shape[0])
    generator = torch.Generator().manual_seed(seed)
    epochs = [_batches(num_samples, plan.batch_size, generator) for _ in range(plan.local_epochs)]
    total_steps = sum(len(batches) for batches in epochs)
    anchor = (
        [p.detach().clone() for p in model.parameters() if p.requires_grad] if proximal else None
    )
    optimiser = _optimiser(model, plan)
    loss_fn = nn.BCEWithLogitsLoss()
    was_training = model.training
    losses: list[float] = []
    step = 0
    try:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            model.train()
            for batches in epochs:
                for index in batches:
                    if should_stop is not None and should_stop():
                        raise TrainingCancelled(
                            f"Training was cancelled after {step} of {total_steps} steps.",
                            code="training.cancelled",
                        )
                    x = torch.from_numpy(np.ascontiguousarray(images[index], dtype=np.float32))
                    y = torch.from_numpy(np.ascontiguousarray(labels[index], dtype=np.float32))
                    optimiser.zero_grad(set_to_none=True)
                    loss = loss_fn(_logits(model, x), y)
                    if anchor is not None and proximal:
                        params = [p for p in model.parameters() if p.requires_grad]
                        drift = sum(
                            ((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True)
                        )
                        loss = loss + 0.5 * proximal * drift
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise TrainingError(
                            f"The training loss became {value} at step {step + 1}. "
                            "Lower the plan's learning rate or check the images.",
                            code="training.diverged",
                        )
                    loss.backward()
                    optimiser.step()
                    losses.append(value)
                    step += 1
                    if progress is not None:
                        progress(step, total_steps)
    finally:
        model.train(was_training)
    return TrainResult(num_samples=num_samples, steps=step, mean_loss=float(np.mean(losses)))


def _train_dp_sgd(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    plan: TrainingPlan,
    dp: ExampleDP,
    *,
    seed: int,
    dp_seed: int | None,
    progress: Callable[[int, int], None] | None,
    should_stop: Callable[[], bool] | None,
    proximal: float | None,
) -> TrainResult:
    """DP-SGD (Abadi et al., CCS 2016) with Opacus's ``GradSampleModule`` (per-example
    gradients) and ``DPOptimizer`` (clip each to ``dp.max_grad_norm``, add Gaussian noise of
    standard deviation ``noise_multiplier * max_grad_norm``, divide by the expected batch size).
    Each step takes every image independently with probability ``q = batch_size / N`` (Poisson
    sampling, what the accountant assumes; a step may see no image and still adds noise), for
    ``steps_per_round`` steps, so ``TrainResult.steps`` is what the site's budget is charged.
    The model is left unwrapped (hooks removed) for the next round."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from opacus.validators import ModuleValidator

    if proximal:
        raise TrainingError(
            "DP-SGD cannot add FedProx's proximal term: its gradient is not clipped per image.",
            code="training.config",
        )
    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        raise TrainingError(
            f"This model cannot be trained with DP-SGD: {problems[0]}",
            code="training.model",
        )
    num_samples = int(images.shape[0])
    q = sample_rate(plan.batch_size, num_samples)
    total_steps = steps_per_round(plan.local_epochs, plan.batch_size, num_samples)
    if dp_seed is None:
        dp_seed = int.from_bytes(os.urandom(8), "little") >> 1
    secret = torch.Generator().manual_seed(dp_seed)  # sampling and noise: never the plan's seed
    optimiser = DPOptimizer(
        _optimiser(model, plan),
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=min(plan.batch_size, num_samples),
        loss_reduction="mean",
        generator=secret,
    )
    wrapped = GradSampleModule(model, loss_reduction="mean")
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
    was_training = model.training
    losses: list[float] = []
    step = 0
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # Opacus's hooks on the first layer, whose input needs no gradient: harmless.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            torch.default_generator.manual_seed(seed)
            model.train()
            for step in range(total_steps):
                if should_stop is not None and should_stop():
                    raise TrainingCancelled(
                        f"Training was cancelled after {step} of {total_steps} steps.",
                        code="training.cancelled",
                    )
                index = torch.nonzero(torch.rand(num_samples, generator=secret) < q)[:, 0]
                index_np = np.sort(index.numpy())
                x = torch.from_numpy(np.ascontiguousarray(images[index_np], dtype=np.float32))
                y = torch.from_numpy(np.ascontiguousarray(labels[index_np], dtype=np.float32))
                optimiser.zero_grad(set_to_none=True)
                loss = loss_fn(_logits(wrapped, x), y) / max(1, len(index_np))
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingError(
                        f"The training loss became {value} at step {step + 1}. "
                        "Lower the plan's learning rate or check the images.",
                        code="training.diverged",
                    )
                loss.backward()
                optimiser.step()
                if len(index_np):
                    losses.append(value)
                if progress is not None:
                    progress(step + 1, total_steps)
            step = total_steps
    finally:
        wrapped._close()
        model.train(was_training)
    mean_loss = float(np.mean(losses)) if losses else 0.0
    return TrainResult(num_samples=num_samples, steps=step, mean_loss=mean_loss)


def predict_scores(model: nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Probability of the positive class for each image (sigmoid of the logit), float64,
    computed in eval mode without gradients; the model's mode is restored afterwards."""
    return _sigmoid(predict_logits(model, images, batch_size))


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return np.asarray(torch.sigmoid(torch.from_numpy(logits)).numpy(), dtype=np.float64)


def predict_logits(model: nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The model's logit for each image, float64. Ranking by logits keeps the order that a
    float sigmoid loses once confident outputs saturate to exactly 1.0 (about 17 in float32)."""
    _check_data(images, None)
    was_training = model.training
    model.eval()
    chunks: list[np.ndarray] = []
    try:
        with torch.inference_mode():
            for start in range(0, images.shape[0], batch_size):
                x = torch.from_numpy(
                    np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32)
                )
                chunks.append(_logits(model, x).double().numpy())
    finally:
        model.train(was_training)
    scores = np.concatenate(chunks)
    if not np.all(np.isfinite(scores)):
        raise TrainingError(
            "The model produced NaN outputs; its weights are unusable (training diverged).",
            code="training.diverged",
        )
    return scores


def evaluate(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 256
) -> Metrics:
    """Validation metrics of ``model`` on (images, labels); see ``binary_metrics``."""
    _check_data(images, labels)
    logits = predict_logits(model, images, batch_size)
    return binary_metrics(_sigmoid(logits), labels, ranking=logits)
