"""The plain-language explanation a person reads before approving a plan."""

from __future__ import annotations

from shared.plan import TrainingPlan, demo_plan
from site_client.core.plan_summary import parameter_count, summarise


def test_summary_states_what_leaves_and_how_much():
    plan = demo_plan(rounds=4)
    summary = summarise(plan)
    lines = dict(summary.lines)
    assert summary.parameters == parameter_count(plan) > 50_000
    # float32 values and the safetensors header, at most
    assert 4 * (summary.parameters - 10) < summary.update_bytes < 4 * summary.parameters + 8_192
    assert f"at most {summary.update_bytes / 1e3:.1f} kB" in lines["What leaves"]
    assert "no images, no patient identifiers" in lines["What leaves"]
    assert lines["How long"].startswith("4 rounds")
    assert "no secure aggregation" in lines["Protections"]
    assert lines["Privacy budget"].startswith("none")
    assert plan.plan_hash[:12] in summary.text()


def test_summary_reflects_privacy_and_strategy():
    plan = TrainingPlan.from_dict(
        {**demo_plan().to_dict(), "aggregation": "fedprox", "aggregation_params": {"mu": 0.01}}
    )
    lines = dict(summarise(plan, epsilon=2.5, delta=1e-6, secure_aggregation=True).lines)
    assert "epsilon 2.50 at delta 1e-06" in lines["Privacy budget"]
    assert "only ever sees the sum" in lines["Protections"]
    assert "FedProx" in lines["Combining"]


def test_summary_states_the_compressed_size_under_a_codec():
    plain = summarise(demo_plan(rounds=4))
    plan = TrainingPlan.from_dict({**demo_plan(rounds=4).to_dict(), "compression": "int8+zstd"})
    packed = summarise(plan)
    assert packed.update_bytes < 0.3 * plain.update_bytes
    assert "(compressed: int8+zstd)" in dict(packed.lines)["What leaves"]
