"""An in-process federated simulation for the heterogeneity and compression benchmarks.

Theory of operation: no sockets, no processes, but every step that decides a number is the
product's own code. The synthetic DICOM files are read through the site's preprocessing
(:func:`shared.imaging.load_labelled_folder`), each site keeps back the same patient-level,
stratified hold-out a site keeps (:func:`shared.splits.split_patients`) and trains on the rest.
A round is what the coordinator and the sites do (DESIGN.md, "Data flow of one training run"):

1. each site loads the global weights (under FedBN with its own normalisation layers put back,
   :func:`shared.aggregation.merge_local`) and runs :func:`shared.training.train_local`, with
   the strategy's local options (FedProx's ``proximal=mu``,
   :func:`shared.aggregation.local_training_options`);
2. its update is ``local - global`` over the shared entries (FedBN: all but the normalisation
   layers, :func:`shared.aggregation.split_update`), encoded by the plan's codec
   (:func:`shared.compression.get_codec`; top-k through the site's own
   :class:`shared.compression.ErrorFeedback`), counted in bytes, and decoded as the
   coordinator would;
3. the decoded updates are reduced by :func:`shared.aggregation.aggregate_deltas` (weighted by
   each site's training examples) and applied by :func:`shared.aggregation.apply_aggregate`
   (a server optimiser keeps its :class:`~shared.aggregation.ServerOptState` between rounds).

Evaluation is a benchmark convenience (no real federation holds a pooled test set): the global
model scores the whole test set; under FedBN each site's share of the test set (its scanner) is
scored with that site's normalisation layers, as the site itself would. The centralised
baselines (all sites' data pooled, or one site alone) run the same loop with one party and no
aggregation: ``rounds`` calls of ``train_local`` with the plan's local epochs, so every model
here gets the same number of epochs over its data and the same optimiser restarts.

Randomness: the plan's seed builds the initial model, and round ``r`` of site ``k`` trains with
seed ``plan.seed + 7919 * r + k``; a run is reproducible in one process.

The hard task that both benchmarks train (:func:`hard_plan`, :func:`load_hard_setting`) is
defined here once, so that the compression benchmark runs exactly the heterogeneity one's task.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch

from shared.aggregation import (
    FedBNConfig,
    StrategyConfig,
    aggregate_deltas,
    apply_aggregate,
    initial_state,
    layout_of,
    local_training_options,
    merge_local,
    norm_layer_keys,
    server_optimiser,
    split_update,
)
from shared.compression import ErrorFeedback, TopK, get_codec
from shared.compression.codecs import Compressed
from shared.imaging import LabelledImages, load_labelled_folder
from shared.metrics import roc_auc
from shared.models.registry import build_model
from shared.models.state import load_model_arrays, model_arrays
from shared.plan import TrainingPlan, demo_plan
from shared.splits import split_patients
from shared.synthetic import FederationManifest, generate_federation
from shared.training import train_local

HOLDOUT_FRACTION = 0.2  # what each site keeps back for its own validation (the site default)
SPLIT_SEED = 0

# The hard task: small_cnn on 64 x 64 inputs (generated at that size), Adam, one plan and one
# budget (ROUNDS x LOCAL_EPOCHS epochs) for every model. Tried on the 2-core dev machine, with
# pooled, FedBN and FedAvg per setting: 2 local epochs beat 1 (at 24-30 rounds) and 4 (at 8-10)
# for the federated runs; lr 5e-4 left the pooled model undertrained and SGD (lr 0.01-0.05,
# momentum 0.9) made FedBN's sites collapse to constant outputs in some rounds; past about 12
# rounds FedBN gains little. 16 rounds keep the heterogeneity benchmark near 5 minutes.
SIZE = 64
ROUNDS = 16
LOCAL_EPOCHS = 2
BATCH_SIZE = 16
LEARNING_RATE = 1e-3
DATA_SEED = 0

Weights = dict[str, np.ndarray]


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteSet:
    """One site's training split (the hold-out stays at the site and is not used here)."""

    name: str
    scanner: str
    images: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True, slots=True, kw_only=True)
class FederationData:
    """The sites' training data and the pooled test set; ``test_site[i]`` is the index of the
    site whose scanner took test image ``i`` (-1 when no site has that scanner)."""

    sites: tuple[SiteSet, ...]
    test_images: np.ndarray
    test_labels: np.ndarray
    test_site: np.ndarray


@dataclass(frozen=True, slots=True, kw_only=True)
class Evaluation:
    """AUC on each site's share of the test set (site order), and on the whole test set.

    ``auc``, the headline, is the mean of the sites' AUCs: what a typical hospital sees when
    it validates the model on its own images (DESIGN.md, validation protocol). ``whole_auc``
    ranks all test images together; under FedBN those scores come from four different models
    (one per site's normalisation layers) whose scales nothing aligns, so it measures
    cross-site calibration rather than how well each site's model works.
    """

    site_aucs: tuple[float, ...]
    whole_auc: float

    @property
    def auc(self) -> float:
        return float(np.mean(self.site_aucs))

    @property
    def worst_site_auc(self) -> float:
        return min(self.site_aucs)


@dataclass(frozen=True, slots=True, kw_only=True)
class History:
    """One training run: the (site-mean) AUC after every round, the final evaluation, bytes
    and time. ``upload_bytes`` counts the codec's payloads; ``raw_bytes`` the same updates at
    4 bytes per element (float32 values alone, no container)."""

    name: str
    aucs: tuple[float, ...]
    final: Evaluation
    upload_bytes: int
    raw_bytes: int
    seconds: float

    def rounds_to(self, target: float) -> int | None:
        """The first round (1-based) whose AUC reached ``target``, or None."""
        for r, auc in enumerate(self.aucs, start=1):
            if auc >= target:
                return r
        return None


def hard_plan() -> TrainingPlan:
    """The benchmarks' plan: the demo's (small_cnn, Adam) with the hard task's settings and
    four sites. Its ``aggregation`` is not read: the simulation takes the strategy."""
    return demo_plan(
        rounds=ROUNDS,
        input_size=SIZE,
        local_epochs=LOCAL_EPOCHS,
        batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE,
        quorum=4,
        min_sites=4,
        seed=0,
    )


def load_hard_setting(root: Path) -> FederationData:
    """Generate the hard setting under ``root`` and read it, printing what each site holds."""
    manifest = generate_federation(root, setting="hard", seed=DATA_SEED, image_size=SIZE)
    data = load_federation(manifest, SIZE)
    for k, (s, site) in enumerate(zip(manifest.sites, data.sites, strict=True)):
        share = int((data.test_site == k).sum())
        print(
            f"  {s.name}: {s.manufacturer} {s.model}, {s.n_images} studies, positive rate "
            f"{s.prevalence:.2f}; trains on {len(site.labels)}, {share} in the test set"
        )
    return data


def train_split(site: LabelledImages) -> tuple[np.ndarray, np.ndarray]:
    """The training part of a site's images: patient-level, stratified, as a site splits."""
    positive: dict[str, float] = {}
    for patient, label in zip(site.patient_ids, site.labels, strict=True):
        positive[patient] = max(positive.get(patient, 0.0), float(label))
    held = split_patients(positive, HOLDOUT_FRACTION, SPLIT_SEED)
    keep = [i for i, p in enumerate(site.patient_ids) if p not in held]
    return site.images[keep], site.labels[keep]


def load_federation(manifest: FederationManifest, input_size: int) -> FederationData:
    """Read every site's training split and the test set through the site's preprocessing,
    and find each test image's site by its scanner (ManufacturerModelName)."""
    sites = []
    for s in manifest.sites:
        data = load_labelled_folder(s.dicom_dir, s.labels_csv, input_size=input_size)
        images, labels = train_split(data)
        sites.append(SiteSet(name=s.name, scanner=s.model, images=images, labels=labels))
    test = load_labelled_folder(
        manifest.test_dicom_dir, manifest.test_labels_csv, input_size=input_size
    )
    index = {s.model: k for k, s in enumerate(manifest.sites)}
    test_site = np.array(
        [
            index.get(str(pydicom.dcmread(p, stop_before_pixels=True).ManufacturerModelName), -1)
            for p in test.paths
        ],
        dtype=np.int64,
    )
    return FederationData(
        sites=tuple(sites), test_images=test.images, test_labels=test.labels, test_site=test_site
    )


def evaluate_scores(data: FederationData, scores: np.ndarray) -> Evaluation:
    """AUCs of per-image ``scores`` of the test set: each site's share and the whole set."""
    site_aucs = tuple(
        roc_auc(scores[data.test_site == k], data.test_labels[data.test_site == k])
        for k in range(len(data.sites))
    )
    return Evaluation(site_aucs=site_aucs, whole_auc=roc_auc(scores, data.test_labels))


def logits_of(model: torch.nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The model's logits (eval mode, no gradients), float64: the scores the AUCs rank.

    Not ``shared.training.predict_scores``' probabilities: a float32 sigmoid is exactly 1.0
    above a logit of about 17, so an overconfident model (a site alone with 80 % positives)
    would tie on many images and its AUC would say less than its ranking. AUC depends on the
    order only, and the logit orders like the probability.
    """
    model.eval()
    with torch.inference_mode():
        out = [
            model(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])))[:, 0]
            for i in range(0, images.shape[0], batch_size)
        ]
    scores = torch.cat(out).double().numpy()
    if not np.all(np.isfinite(scores)):
        raise ValueError("the model produced NaN or infinite logits (training diverged)")
    return scores


def _new_model(plan: TrainingPlan) -> torch.nn.Module:
    return build_model(
        plan.architecture, plan.architecture_version, input_size=plan.input_size, seed=plan.seed
    )


def site_seed(plan: TrainingPlan, round_no: int, site: int) -> int:
    """The training seed of site ``site`` (0-based) in round ``round_no`` (0-based)."""
    return plan.seed + 7919 * round_no + site


class Simulation:
    """A federation of ``data.sites`` training ``plan`` under ``strategy``, one round per call
    of :meth:`run_round`; ``codec`` is a plan codec name (``"none"``, ``"int8+zstd"``, ...)."""

    def __init__(
        self,
        data: FederationData,
        plan: TrainingPlan,
        strategy: StrategyConfig,
        *,
        codec: str = "none",
    ) -> None:
        self.data = data
        self.plan = plan
        self.strategy = strategy
        self.codec = get_codec(codec)
        self._model = _new_model(plan)
        self.global_weights: Weights = model_arrays(self._model)
        # FedBN: the normalisation layers' entries never leave a site; every site starts from
        # the global model's initial values (fedbn.py, site-side contract).
        self.local_names = (
            norm_layer_keys(self._model) & set(self.global_weights)
            if isinstance(strategy, FedBNConfig)
            else frozenset()
        )
        shared, local = split_update(self.global_weights, self.local_names)
        self.site_local: list[Weights] = [
            {n: a.copy() for n, a in local.items()} for _ in data.sites
        ]
        self.shared_layout = layout_of(shared)
        optimiser = server_optimiser(strategy)  # FedAdam; FedBN with server momentum
        self.server_state = None if optimiser is None else initial_state(shared, optimiser)
        inner = self.codec.codec if isinstance(self.codec, Compressed) else self.codec
        self.feedback = (
            [ErrorFeedback(self.shared_layout) for _ in data.sites]
            if isinstance(inner, TopK)
            else None
        )
        self.rounds_done = 0
        self.upload_bytes = 0
        self.raw_bytes = 0

    def site_weights(self, k: int) -> Weights:
        """The weights site ``k`` evaluates and starts training from: the global model, with
        its own normalisation layers under FedBN."""
        if not self.local_names:
            return self.global_weights
        return merge_local(self.global_weights, self.site_local[k])

    def run_round(self) -> float:
        """One round; returns the sites' mean training loss (weighted by examples)."""
        options = local_training_options(self.strategy)
        updates: list[Weights] = []
        counts: list[int] = []
        losses: list[float] = []
        for k, site in enumerate(self.data.sites):
            load_model_arrays(self._model, self.site_weights(k))
            result = train_local(
                self._model,
                site.images,
                site.labels,
                self.plan,
                seed=site_seed(self.plan, self.rounds_done, k),
                **options,
            )
            after = model_arrays(self._model)
            shared_after, local_after = split_update(after, self.local_names)
            if self.local_names:
                self.site_local[k] = local_after
            delta = {n: shared_after[n] - self.global_weights[n] for n in self.shared_layout}
            if self.feedback is not None:
                payload = self.feedback[k].compress(delta, self.codec)
            else:
                payload = self.codec.encode(delta)
            self.upload_bytes += len(payload)
            self.raw_bytes += 4 * sum(a.size for a in delta.values())
            updates.append(self.codec.decode(payload, self.shared_layout))
            counts.append(result.num_samples)
            losses.append(result.mean_loss * result.num_samples)
        mean_delta = aggregate_deltas(self.strategy, updates, counts, local=self.local_names)
        self.global_weights, self.server_state = apply_aggregate(
            self.strategy, self.global_weights, mean_delta, self.server_state
        )
        self.rounds_done += 1
        return float(sum(losses) / sum(counts))

    def scores(self) -> np.ndarray:
        """Scores of the whole test set: one global model, or (FedBN) each site's share with
        that site's own normalisation layers."""
        data = self.data
        if not self.local_names:
            load_model_arrays(self._model, self.global_weights)
            return logits_of(self._model, data.test_images)
        if np.any(data.test_site < 0):
            raise ValueError("FedBN needs every test image's site; some scanners are unknown")
        scores = np.empty(data.test_labels.shape[0], dtype=np.float64)
        for k in range(len(data.sites)):
            mask = data.test_site == k
            if mask.any():
                load_model_arrays(self._model, self.site_weights(k))
                scores[mask] = logits_of(self._model, data.test_images[mask])
        return scores

    def evaluate(self) -> Evaluation:
        return evaluate_scores(self.data, self.scores())


def run_strategy(
    name: str,
    data: FederationData,
    plan: TrainingPlan,
    strategy: StrategyConfig,
    *,
    codec: str = "none",
    on_round: Callable[[int, float, float], None] | None = None,
) -> History:
    """``plan.rounds`` rounds of a :class:`Simulation`, evaluated after each round;
    ``on_round(round, loss, auc)`` reports progress."""
    t0 = time.perf_counter()
    sim = Simulation(data, plan, strategy, codec=codec)
    aucs = []
    evaluation = Evaluation(site_aucs=(float("nan"),), whole_auc=float("nan"))
    for r in range(1, plan.rounds + 1):
        loss = sim.run_round()
        evaluation = sim.evaluate()
        aucs.append(evaluation.auc)
        if on_round is not None:
            on_round(r, loss, evaluation.auc)
    return History(
        name=name,
        aucs=tuple(aucs),
        final=evaluation,
        upload_bytes=sim.upload_bytes,
        raw_bytes=sim.raw_bytes,
        seconds=time.perf_counter() - t0,
    )


def run_centralised(
    name: str, data: FederationData, plan: TrainingPlan, sites: Sequence[int]
) -> History:
    """One party trains on ``sites``' data together (all of them: pooled; one: local-only) for
    ``plan.rounds`` chunks of ``plan.local_epochs`` epochs, the federated runs' budget."""
    t0 = time.perf_counter()
    images = np.concatenate([data.sites[k].images for k in sites])
    labels = np.concatenate([data.sites[k].labels for k in sites])
    model = _new_model(plan)
    aucs = []
    for r in range(plan.rounds):
        train_local(model, images, labels, plan, seed=site_seed(plan, r, 0))
        evaluation = evaluate_scores(data, logits_of(model, data.test_images))
        aucs.append(evaluation.auc)
    return History(
        name=name,
        aucs=tuple(aucs),
        final=evaluation,
        upload_bytes=0,
        raw_bytes=0,
        seconds=time.perf_counter() - t0,
    )
