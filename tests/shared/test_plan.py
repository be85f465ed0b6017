"""Training plans: validation, canonical form and identity by hash."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from shared.canonical import canonical_json
from shared.errors import PlanError
from shared.plan import TrainingPlan, demo_plan, load_plan


def _plan_dict(**changes: Any) -> dict[str, Any]:
    data = demo_plan().to_dict()
    data.update(changes)
    return data


def test_demo_plan_is_valid_and_round_trips() -> None:
    plan = demo_plan(rounds=3)
    assert plan.rounds == 3
    assert plan.architecture == "small_cnn" and plan.input_size == 64
    again = TrainingPlan.from_dict(plan.to_dict())
    assert again == plan
    assert again.plan_hash == plan.plan_hash
    assert hash(again) == hash(plan)


def test_to_dict_is_json_and_canonical_json_matches() -> None:
    plan = demo_plan()
    data = plan.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert plan.canonical_json() == canonical_json(data)
    assert len(plan.plan_hash) == 64


def test_hash_is_stable_across_key_order() -> None:
    data = _plan_dict(preprocessing={"normalise": "zscore", "clip": 3.0})
    reordered = dict(reversed(list(data.items())))
    reordered["preprocessing"] = {"clip": 3.0, "normalise": "zscore"}
    assert TrainingPlan.from_dict(reordered).plan_hash == TrainingPlan.from_dict(data).plan_hash


def test_defaults_and_number_forms_are_normalised() -> None:
    explicit = TrainingPlan.from_dict(_plan_dict(min_sites=2, quorum=2, learning_rate=1))
    data = _plan_dict(quorum=2, learning_rate=1.0)
    del data["min_sites"]
    implicit = TrainingPlan.from_dict(data)
    assert implicit.min_sites == 2
    assert TrainingPlan.from_dict(_plan_dict(quorum=2, learning_rate=1.0, min_sites=0)) == implicit
    assert isinstance(implicit.learning_rate, float)
    assert implicit.plan_hash == explicit.plan_hash


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rounds", 6),
        ("learning_rate", 0.02),
        ("seed", 1),
        ("preprocessing", {"normalise": "minmax"}),
        ("max_update_norm", 10.0),
        ("weighting", "uniform"),
    ],
)
def test_hash_changes_when_a_field_changes(field: str, value: Any) -> None:
    assert TrainingPlan.from_dict(_plan_dict(**{field: value})).plan_hash != demo_plan().plan_hash


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("name", "", r"'name' must be a non-empty string"),
        ("task", "segmentation", r"'task' must be one of 'binary_classification'"),
        ("label_column", 3, r"'label_column' must be a non-empty string"),
        ("architecture_version", 1, r"'architecture_version' must be a non-empty string"),
        ("input_size", 16, r"'input_size' must be an integer from 32 to 512; got 16"),
        ("input_size", 513, r"'input_size' must be an integer from 32 to 512"),
        ("input_size", 64.0, r"'input_size' must be an integer"),
        ("preprocessing", ["zscore"], r"'preprocessing' must be an object mapping names"),
        ("preprocessing", {"normalise": [1]}, r"'preprocessing' must be an object"),
        ("preprocessing", {"scale": float("nan")}, r"'preprocessing' must be an object"),
        ("local_epochs", 0, r"'local_epochs' must be an integer >= 1"),
        ("local_epochs", True, r"'local_epochs' must be an integer >= 1; got True"),
        ("batch_size", "32", r"'batch_size' must be an integer >= 1; got '32'"),
        ("optimiser", "rmsprop", r"'optimiser' must be one of 'sgd', 'adam'"),
        ("learning_rate", 0, r"'learning_rate' must be a finite number > 0"),
        ("learning_rate", float("inf"), r"'learning_rate' must be a finite number > 0"),
        ("learning_rate", "0.1", r"'learning_rate' must be a finite number > 0"),
        ("momentum", 1.0, r"'momentum' must be a number in \[0, 1\)"),
        ("momentum", -0.1, r"'momentum' must be a number in \[0, 1\)"),
        ("weight_decay", -1e-4, r"'weight_decay' must be a finite number >= 0"),
        ("rounds", 0, r"'rounds' must be an integer >= 1"),
        ("quorum", 0, r"'quorum' must be an integer >= 1"),
        ("min_sites", 1, r"'min_sites' must be an integer >= quorum \(2\), or 0 for the quorum"),
        ("min_sites", -1, r"'min_sites' must be an integer >= quorum \(2\)"),
        ("min_sites", "3", r"'min_sites' must be an integer >= quorum, or 0 for the quorum"),
        ("min_sites", None, r"'min_sites' must be an integer >= quorum"),
        ("round_deadline_s", 0, r"'round_deadline_s' must be a finite number > 0"),
        ("seed", -1, r"'seed' must be an integer from 0 to 9223372036854775807"),
        ("seed", 2**63, r"'seed' must be an integer from 0"),
        ("aggregation", "krum", r"'aggregation' must be one of 'fedavg', 'fedprox', 'fedadam'"),
        ("compression", "gzip", r"'compression' is invalid: Unknown update codec 'gzip'"),
        ("compression", "topk:2", r"the top-k fraction must be in \(0, 1\]"),
        ("aggregation_params", {"mu": 0.1}, r"'fedavg' has no setting\(s\) 'mu'"),
        ("aggregation_params", [1], r"'aggregation_params' must be an object mapping names"),
        ("weighting", "sites", r"'weighting' must be one of 'samples', 'uniform'"),
        ("architecture_params", {"width": 3}, r"small_cnn v1 has no setting 'width'"),
        ("architecture_params", [1], r"'architecture_params' must be an object mapping names"),
        ("max_update_norm", 0.0, r"'max_update_norm' must be null or a finite number > 0"),
        ("max_update_norm", "big", r"'max_update_norm' must be null or a finite number > 0"),
    ],
)
def test_invalid_field_is_refused_with_its_name(field: str, value: Any, match: str) -> None:
    with pytest.raises(PlanError, match=match) as info:
        TrainingPlan.from_dict(_plan_dict(**{field: value}))
    assert info.value.code == "plan.invalid"
    assert info.value.fields["field"] == field


def test_architecture_params_are_completed_checked_and_hashed() -> None:
    mlp = _plan_dict(architecture="mlp", input_size=32)
    implicit = TrainingPlan.from_dict(mlp)
    explicit = TrainingPlan.from_dict({**mlp, "architecture_params": {"width": 256}})
    assert implicit.architecture_params == {"width": 256}  # the registry's default, written in
    assert implicit.plan_hash == explicit.plan_hash
    wider = TrainingPlan.from_dict({**mlp, "architecture_params": {"width": 4873}})
    assert wider.plan_hash != implicit.plan_hash
    assert TrainingPlan.from_dict(json.loads(json.dumps(wider.to_dict()))) == wider
    with pytest.raises(PlanError, match=r"would have .* parameters, more than") as info:
        TrainingPlan.from_dict({**mlp, "input_size": 512, "architecture_params": {"width": 1000}})
    assert info.value.fields["field"] == "architecture_params"
    # a plan written without the field means the same as one with none
    old = _plan_dict()
    del old["architecture_params"]
    assert TrainingPlan.from_dict(old).plan_hash == demo_plan().plan_hash


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(PlanError, match=r"Unknown architecture 'vit'.*small_cnn v1") as info:
        TrainingPlan.from_dict(_plan_dict(architecture="vit"))
    assert info.value.code == "plan.unknown_architecture"


def test_unknown_and_missing_keys_are_named() -> None:
    with pytest.raises(PlanError, match=r"Unknown plan field\(s\) 'epochs', 'lr'\. Allowed"):
        TrainingPlan.from_dict(_plan_dict(epochs=3, lr=0.1))
    data = _plan_dict()
    del data["seed"], data["rounds"]
    with pytest.raises(PlanError, match=r"missing required field\(s\) 'rounds', 'seed'"):
        TrainingPlan.from_dict(data)
    with pytest.raises(PlanError, match=r"A plan must be a JSON object, got list"):
        TrainingPlan.from_dict([1, 2])  # type: ignore[arg-type]


def test_plan_and_its_preprocessing_are_immutable() -> None:
    plan = demo_plan()
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'rounds'"):
        plan.rounds = 9  # type: ignore[misc]
    with pytest.raises(TypeError, match="does not support item assignment"):
        plan.preprocessing["normalise"] = "none"  # type: ignore[index]
    assert plan.preprocessing == {"normalise": "zscore"}


def test_load_plan(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(demo_plan().to_dict()), encoding="utf-8")
    assert load_plan(path) == demo_plan()


def test_load_plan_errors(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=r"Cannot read plan file .*missing\.json") as info:
        load_plan(tmp_path / "missing.json")
    assert info.value.code == "plan.unreadable"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(PlanError, match=r"bad\.json' is not valid UTF-8 JSON"):
        load_plan(bad)
    nan = tmp_path / "nan.json"
    nan.write_text(json.dumps(_plan_dict(learning_rate=float("nan"))), encoding="utf-8")
    with pytest.raises(PlanError, match="NaN is not valid JSON"):
        load_plan(nan)


def test_aggregation_defaults_to_fedavg_with_no_params() -> None:
    plan = demo_plan()
    assert plan.aggregation == "fedavg"
    assert plan.aggregation_params == {}
    assert plan.to_dict()["aggregation_params"] == {}
    data = plan.to_dict()
    del data["aggregation"], data["aggregation_params"]
    assert TrainingPlan.from_dict(data).plan_hash == plan.plan_hash


@pytest.mark.parametrize(
    ("aggregation", "params", "quorum"),
    [
        ("fedprox", {"mu": 0.01}, 2),
        ("fedadam", {}, 2),
        ("fedyogi", {"eta": 0.1, "tau": 1e-2}, 2),
        ("fedadagrad", {"eta": 1}, 2),
        ("median", {}, 3),
        ("trimmed_mean", {"trim_fraction": 0.25}, 4),
    ],
)
def test_strategies_are_accepted_and_their_params_hashed(
    aggregation: str, params: dict[str, Any], quorum: int
) -> None:
    data = _plan_dict(
        aggregation=aggregation, aggregation_params=params, quorum=quorum, min_sites=0
    )
    plan = TrainingPlan.from_dict(data)
    assert plan.aggregation == aggregation and dict(plan.aggregation_params) == params
    again = TrainingPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan and again.plan_hash == plan.plan_hash
    assert hash(again) == hash(plan)
    if params:
        other = {k: v * 1.5 for k, v in params.items()}
        data2 = _plan_dict(
            aggregation=aggregation, aggregation_params=other, quorum=quorum, min_sites=0
        )
        assert TrainingPlan.from_dict(data2).plan_hash != plan.plan_hash


@pytest.mark.parametrize(
    ("aggregation", "params", "quorum", "match", "field"),
    [
        ("fedprox", {}, 2, r"'mu' must be given for fedprox", "mu"),
        ("fedprox", {"mu": 0}, 2, r"'mu'", "mu"),
        ("fedadam", {"eta": -1.0}, 2, r"'eta'", "eta"),
        ("trimmed_mean", {"trim_fraction": 0.1}, 4, r"trims nothing.*at least 10", "quorum"),
        ("median", {}, 2, r"median of 2 update\(s\) is their mean.*at least 3", "quorum"),
        ("median", {"k": 1}, 3, r"'median' has no setting\(s\) 'k'", "aggregation_params"),
    ],
)
def test_unworkable_strategy_settings_are_refused_with_the_reason(
    aggregation: str, params: dict[str, Any], quorum: int, match: str, field: str
) -> None:
    data = _plan_dict(
        aggregation=aggregation, aggregation_params=params, quorum=quorum, min_sites=0
    )
    with pytest.raises(PlanError, match=match) as info:
        TrainingPlan.from_dict(data)
    assert info.value.code == "plan.invalid"
    assert info.value.fields["field"] == field


# -- privacy fields (issue 9) -------------------------------------------------------------

_DP = {"clip_norm": 2.0, "noise_multiplier": 1.1, "delta": 1e-5}


def test_privacy_fields_left_out_at_their_defaults_keep_old_hashes() -> None:
    """A plan written before dp/secure_aggregation existed, and the same plan with them at
    their defaults, have the hash they always had (the example plan's is pinned here)."""
    example = load_plan(Path(__file__).parents[2] / "docs" / "examples" / "plan.json")
    assert example.plan_hash == "dde3b48d95e686184ab3d7f3f8fb99ae15a8ec54348a270ebf60c52cca50ef3a"
    explicit = TrainingPlan.from_dict(
        {**example.to_dict(), "dp": None, "secure_aggregation": False}
    )
    assert explicit.plan_hash == example.plan_hash
    assert "dp" not in example.to_dict() and "secure_aggregation" not in example.to_dict()
    assert example.dp is None and example.epsilon is None


def test_dp_is_validated_normalised_hashed_and_round_trips() -> None:
    plan = demo_plan(
        weighting="uniform", dp={"clip_norm": 2, "noise_multiplier": 1.1, "delta": 1e-5}
    )
    assert plan.dp is not None and plan.dp.clip_norm == 2.0 and isinstance(plan.dp.clip_norm, float)
    assert plan.to_dict()["dp"] == _DP
    again = TrainingPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan and again.plan_hash == plan.plan_hash
    plain = demo_plan(weighting="uniform")
    assert plain.plan_hash != plan.plan_hash
    noisier = demo_plan(weighting="uniform", dp={**_DP, "noise_multiplier": 1.2})
    assert noisier.plan_hash != plan.plan_hash
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.dp.clip_norm = 3.0  # type: ignore[misc, union-attr]


@pytest.mark.parametrize(
    ("dp", "match"),
    [
        (
            {"clip_norm": 0, "noise_multiplier": 1.0, "delta": 1e-5},
            r"dp\.clip_norm must be a finite number > 0",
        ),
        ({"clip_norm": 1.0, "noise_multiplier": -1, "delta": 1e-5}, r"dp\.noise_multiplier"),
        (
            {"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1.0},
            r"dp\.delta must be a number strictly between 0 and 1",
        ),
        ({"clip_norm": 1.0, "noise_multiplier": True, "delta": 1e-5}, r"dp\.noise_multiplier"),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0}, r"dp must be null or an object"),
        ({**_DP, "epsilon": 3}, r"dp must be null or an object"),
        ("on", r"dp must be null or an object"),
    ],
)
def test_invalid_dp_settings_are_refused_with_the_reason(dp: Any, match: str) -> None:
    with pytest.raises(PlanError, match=match) as info:
        TrainingPlan.from_dict(_plan_dict(weighting="uniform", dp=dp))
    assert info.value.code == "plan.invalid" and info.value.fields["field"] == "dp"


def test_dp_needs_uniform_weighting_and_no_norm_bound() -> None:
    with pytest.raises(PlanError, match=r"equal weighting \(weighting: \"uniform\"\)") as info:
        TrainingPlan.from_dict(_plan_dict(dp=_DP))  # the demo plan weights by samples
    assert info.value.fields["field"] == "weighting"
    with pytest.raises(PlanError, match="max_update_norm cannot be combined with differential"):
        TrainingPlan.from_dict(_plan_dict(weighting="uniform", dp=_DP, max_update_norm=5.0))


@pytest.mark.parametrize(
    ("aggregation", "params"),
    [("median", {}), ("trimmed_mean", {"trim_fraction": 0.25}), ("fedprox", {"mu": 0.01})],
)
def test_dp_works_with_robust_and_proximal_strategies(aggregation: str, params: dict) -> None:
    plan = TrainingPlan.from_dict(
        _plan_dict(
            weighting="uniform",
            dp=_DP,
            aggregation=aggregation,
            aggregation_params=params,
            quorum=5,
            min_sites=5,
        )
    )
    assert plan.dp is not None and plan.aggregation == aggregation


_SECAGG = {"secure_aggregation": True, "quorum": 3, "min_sites": 3, "weighting": "uniform"}


def test_secure_aggregation_is_accepted_with_a_bound_and_takes_dps_clip_norm() -> None:
    bounded = TrainingPlan.from_dict(_plan_dict(**_SECAGG, max_update_norm=5.0))
    assert bounded.secure_aggregation and bounded.secagg_clip_norm == 5.0
    assert bounded.to_dict()["secure_aggregation"] is True
    private = TrainingPlan.from_dict(_plan_dict(**_SECAGG, dp=_DP))
    assert private.secagg_clip_norm == _DP["clip_norm"]
    fedbn = TrainingPlan.from_dict(_plan_dict(**_SECAGG, max_update_norm=5.0, aggregation="fedbn"))
    assert fedbn.aggregation == "fedbn"  # only the shared layers are masked
    assert demo_plan().secagg_clip_norm is None


@pytest.mark.parametrize(
    ("changes", "field", "match"),
    [
        ({"min_sites": 0, "quorum": 2}, "min_sites", "at least 3 sites per round"),
        ({"weighting": "samples"}, "weighting", "cannot weight each site's update"),
        ({"max_update_norm": None}, "max_update_norm", "needs a bound on each update"),
        ({"aggregation": "median"}, "aggregation", "cannot be computed under secure aggregation"),
    ],
)
def test_secure_aggregation_refuses_what_cannot_work(
    changes: dict[str, Any], field: str, match: str
) -> None:
    with pytest.raises(PlanError, match=match) as info:
        TrainingPlan.from_dict(_plan_dict(**{**_SECAGG, "max_update_norm": 5.0, **changes}))
    assert info.value.fields["field"] == field
    with pytest.raises(PlanError, match="'secure_aggregation' must be true or false"):
        TrainingPlan.from_dict(_plan_dict(secure_aggregation="yes"))


_HE = {"homomorphic": True, "architecture": "small_cnn_gn", "min_sites": 2, "quorum": 2}


def test_homomorphic_plans_are_accepted_hashed_and_round_trip() -> None:
    plan = TrainingPlan.from_dict(_plan_dict(**_HE))
    assert plan.homomorphic and plan.to_dict()["homomorphic"] is True
    assert TrainingPlan.from_dict(plan.to_dict()) == plan
    assert (
        plan.plan_hash
        != TrainingPlan.from_dict(_plan_dict(**{**_HE, "homomorphic": False})).plan_hash
    )
    assert "homomorphic" not in demo_plan().to_dict()  # left out at its default: old hashes hold
    private = TrainingPlan.from_dict(_plan_dict(**_HE, weighting="uniform", dp=_DP))
    assert private.homomorphic and private.epsilon is not None  # clipped and noised at the site
    assert TrainingPlan.from_dict(
        _plan_dict(**_HE, aggregation="fedprox", aggregation_params={"mu": 0.01})
    ).homomorphic


@pytest.mark.parametrize(
    ("changes", "field", "match"),
    [
        (
            {
                "secure_aggregation": True,
                "weighting": "uniform",
                "max_update_norm": 5.0,
                "min_sites": 3,
                "quorum": 3,
            },
            "secure_aggregation",
            "not both",
        ),
        ({"aggregation": "median", "quorum": 3, "min_sites": 3}, "aggregation", "only add"),
        ({"aggregation": "fedadam"}, "aggregation", "only add encrypted models"),
        ({"compression": "int8"}, "compression", "adds ciphertexts"),
        ({"max_update_norm": 5.0}, "max_update_norm", "cannot measure an encrypted model"),
        ({"min_sites": 1, "quorum": 1}, "min_sites", "at least 2 sites per round"),
        ({"architecture": "small_cnn"}, "architecture", "BatchNorm layers"),
    ],
)
def test_homomorphic_plans_refuse_what_cannot_work(
    changes: dict[str, Any], field: str, match: str
) -> None:
    with pytest.raises(PlanError, match=match) as info:
        TrainingPlan.from_dict(_plan_dict(**{**_HE, **changes}))
    assert info.value.fields["field"] == field
    with pytest.raises(PlanError, match="'homomorphic' must be true or false"):
        TrainingPlan.from_dict(_plan_dict(homomorphic=1))


def test_plan_epsilon_is_the_accountants_for_rounds_at_full_participation() -> None:
    from shared.privacy.accountant import get_epsilon

    plan = demo_plan(rounds=7, weighting="uniform", dp=_DP)
    expected = get_epsilon(noise_multiplier=1.1, sample_rate=1.0, steps=7, delta=1e-5)[0]
    assert plan.epsilon == pytest.approx(expected, rel=1e-12)
    assert 5.0 < expected < 20.0  # seven plain Gaussian mechanisms at z = 1.1
    assert demo_plan(rounds=14, weighting="uniform", dp=_DP).epsilon > plan.epsilon


# -- heterogeneity and compression (issue 6) ----------------------------------------------


def test_fedbn_needs_normalisation_layers_in_the_planned_model() -> None:
    assert demo_plan(aggregation="fedbn").aggregation == "fedbn"  # small_cnn: BatchNorm
    momentum = demo_plan(aggregation="fedbn", aggregation_params={"server_momentum": 0.5})
    assert momentum.aggregation_params == {"server_momentum": 0.5}
    with pytest.raises(PlanError, match=r"this model has none .* would be plain FedAvg") as info:
        demo_plan(aggregation="fedbn", architecture="mlp", input_size=32)
    assert info.value.fields["field"] == "aggregation"


def test_compression_is_canonical_hashed_and_left_out_at_none() -> None:
    plain = demo_plan()
    assert plain.compression == "none" and "compression" not in plain.to_dict()
    assert demo_plan(compression="none").plan_hash == plain.plan_hash
    spelled = demo_plan(compression="int8;block=256+zstd")
    assert spelled.compression == "int8+zstd" and spelled.codec.name == "int8+zstd"
    assert spelled.plan_hash == demo_plan(compression="int8+zstd").plan_hash != plain.plan_hash
    assert TrainingPlan.from_dict(spelled.to_dict()) == spelled


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"compression": "topk:0.01"}, "masks make every coordinate non-zero"),
        ({"compression": "int8+zstd"}, "per-block scales, so the masked sum"),
        ({"compression": "fp16+zstd"}, "which zstd cannot shrink"),
        ({"compression": "fp16"}, "float16 saves nothing"),
    ],
)
def test_codecs_that_cannot_work_under_secure_aggregation_are_refused(
    changes: dict[str, Any], match: str
) -> None:
    with pytest.raises(PlanError, match=match) as info:
        TrainingPlan.from_dict(_plan_dict(secure_aggregation=True, **changes))
    assert info.value.fields["field"] == "compression"


def test_topk_is_refused_with_a_robust_estimator() -> None:
    with pytest.raises(PlanError, match="does not work with top-k compression"):
        demo_plan(aggregation="median", quorum=3, min_sites=3, compression="topk:0.01+zstd")
    assert demo_plan(aggregation="median", quorum=3, min_sites=3, compression="int8").codec
