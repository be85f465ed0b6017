"""The shared local training loop: learns, is deterministic, can be cancelled."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.errors import DataError, TrainingCancelled, TrainingError
from shared.models import build_model, model_arrays
from shared.plan import TrainingPlan, demo_plan
from shared.training import TrainResult, evaluate, predict_scores, train_local

SIZE = 32


def _toy(n: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Trivially separable: positives carry a bright square in the centre."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.float32)
    images = (rng.normal(size=(n, 1, SIZE, SIZE)) * 0.1).astype(np.float32)
    images[labels == 1, :, 8:24, 8:24] += 1.0
    return images, labels


def _plan(**changes: object) -> TrainingPlan:
    settings: dict[str, object] = {
        "input_size": SIZE,
        "batch_size": 8,
        "optimiser": "sgd",
        "learning_rate": 0.05,
        "local_epochs": 1,
    }
    settings.update(changes)
    return demo_plan(**settings)


def _model(seed: int = 0) -> torch.nn.Module:
    return build_model("small_cnn", "1", input_size=SIZE, seed=seed)


def test_loss_decreases_on_separable_data() -> None:
    images, labels = _toy()
    model = _model()
    first = train_local(model, images, labels, _plan(), seed=0)
    later = train_local(model, images, labels, _plan(local_epochs=3), seed=1)
    assert later.mean_loss < 0.5 * first.mean_loss
    assert evaluate(model, images, labels).auc > 0.95


def test_result_counts_samples_and_steps() -> None:
    images, labels = _toy(n=17)
    calls: list[tuple[int, int]] = []
    result = train_local(
        _model(), images, labels, _plan(local_epochs=2), seed=0, progress=lambda *a: calls.append(a)
    )
    # 17 samples in batches of 8: 8, 8 and a lone sample that BatchNorm cannot use.
    assert result == TrainResult(num_samples=17, steps=4, mean_loss=result.mean_loss)
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_same_seed_gives_bit_identical_weights() -> None:
    images, labels = _toy()
    runs = []
    for _ in range(2):
        model = _model()
        train_local(model, images, labels, _plan(), seed=5)
        runs.append(model_arrays(model))
    assert all(runs[0][k].tobytes() == runs[1][k].tobytes() for k in runs[0])
    model = _model()
    train_local(model, images, labels, _plan(), seed=6)
    assert any(runs[0][k].tobytes() != model_arrays(model)[k].tobytes() for k in runs[0])


def test_training_leaves_global_rng_and_mode_alone() -> None:
    images, labels = _toy(n=8)
    model = _model().eval()
    torch.manual_seed(42)
    expected = torch.rand(2)
    torch.manual_seed(42)
    train_local(model, images, labels, _plan(), seed=0)
    assert torch.equal(torch.rand(2), expected)
    assert not model.training


def test_should_stop_cancels_between_steps() -> None:
    images, labels = _toy()
    done: list[int] = []
    with pytest.raises(TrainingCancelled, match="cancelled after 2 of 4 steps") as info:
        train_local(
            _model(),
            images,
            labels,
            _plan(),
            seed=0,
            progress=lambda step, total: done.append(step),
            should_stop=lambda: len(done) >= 2,
        )
    assert info.value.code == "training.cancelled"


def test_proximal_term_keeps_weights_near_the_start() -> None:
    images, labels = _toy()
    start = model_arrays(_model())

    def drift(mu: float | None) -> float:
        model = _model()
        train_local(model, images, labels, _plan(local_epochs=2), seed=0, proximal=mu)
        after = model_arrays(model)
        return sum(float(np.sum((after[k] - start[k]) ** 2)) for k in start if "running" not in k)

    assert drift(10.0) < drift(None)


def test_adam_trains_too() -> None:
    images, labels = _toy()
    result = train_local(
        _model(), images, labels, _plan(optimiser="adam", learning_rate=1e-3), seed=0
    )
    assert np.isfinite(result.mean_loss)


def test_nan_input_is_reported_as_divergence() -> None:
    images, labels = _toy(n=8)
    images[0, 0, 0, 0] = np.nan
    with pytest.raises(TrainingError, match="loss became nan at step 1") as info:
        train_local(_model(), images, labels, _plan(), seed=0)
    assert info.value.code == "training.diverged"


def test_bad_data_is_refused() -> None:
    images, labels = _toy(n=4)
    with pytest.raises(DataError, match="The dataset is empty"):
        train_local(_model(), images[:0], labels[:0], _plan(), seed=0)
    with pytest.raises(DataError, match="Labels must be 0 or 1"):
        train_local(_model(), images, labels + 2, _plan(), seed=0)
    with pytest.raises(DataError, match=r"one label per image \(4\)"):
        train_local(_model(), images, labels[:3], _plan(), seed=0)
    with pytest.raises(DataError, match=r"shape \(N, channels, height, width\)"):
        predict_scores(_model(), images[:, 0])


def test_model_with_two_outputs_is_refused() -> None:
    images, labels = _toy(n=4)
    model = build_model("small_cnn", "1", num_classes=2, input_size=SIZE, seed=0)
    with pytest.raises(TrainingError, match="needs one logit per image"):
        train_local(model, images, labels, _plan(), seed=0)


def test_predict_scores_are_probabilities_in_batches() -> None:
    images, labels = _toy(n=10)
    model = _model()
    scores = predict_scores(model, images, batch_size=3)
    assert scores.shape == (10,) and scores.dtype == np.float64
    assert np.all((scores > 0) & (scores < 1))
    assert np.allclose(scores, predict_scores(model, images, batch_size=256), rtol=1e-5)
    assert model.training  # mode restored
    assert evaluate(model, images, labels).n == 10


def test_auc_ranks_by_logits_when_confident_outputs_saturate() -> None:
    """Logits of 40-80 all give a probability of exactly 1.0, even in float64; the AUC must
    still see their order (a site's confident model would otherwise score AUC 0.5)."""
    from torch import nn

    from shared.training import evaluate, predict_logits, predict_scores

    class Confident(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 40.0 + 40.0 * x.mean(dim=(1, 2, 3)).unsqueeze(1)

    images = np.linspace(0, 1, 8, dtype=np.float32)[:, None, None, None] * np.ones(
        (8, 1, 4, 4), np.float32
    )
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    model = Confident()
    assert np.all(predict_scores(model, images) == 1.0)
    assert np.all(np.diff(predict_logits(model, images)) > 0)
    metrics = evaluate(model, images, labels)
    assert metrics.auc == 1.0
    assert metrics.sensitivity == 1.0 and metrics.specificity == 0.0
