"""Example-level DP (DP-SGD) at the site: the plan's epsilon from the site's own number of
images, the round charged with the steps it took before its update may leave, the policy's cap
refusing a plan or a round beyond it, and the training worker reporting those steps."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from coordinator import governance
from shared.governance.policy import SitePolicy
from shared.models.registry import build_model
from shared.models.state import model_arrays
from shared.plan import demo_plan
from shared.privacy.accountant import get_epsilon
from shared.synthetic import generate_federation
from shared.tensors import encode_tensors, tensor_digest
from site_client.core.governance_view import plan_privacy, privacy_refusals
from site_client.core.plan_summary import summarise
from site_client.core.train_worker import run_job

Z, DELTA = 1.0, 1e-5
DP = {"level": "example", "noise_multiplier": Z, "max_grad_norm": 1.0, "delta": DELTA}
IMAGES, BATCH, EPOCHS = 100, 10, 1  # q = 0.1, 10 steps a round


def _plan(rounds: int = 3):
    return demo_plan(
        rounds=rounds,
        architecture="small_cnn_gn",
        batch_size=BATCH,
        local_epochs=EPOCHS,
        dp=DP,
    )


def _eps(steps: int, q: float = BATCH / IMAGES) -> float:
    return get_epsilon(noise_multiplier=Z, sample_rate=q, steps=steps, delta=DELTA)[0]


def test_the_plans_epsilon_is_the_accountants_for_this_sites_images() -> None:
    plan = _plan(rounds=3)
    privacy = plan_privacy(plan, num_samples=IMAGES)
    assert privacy.per_example and privacy.delta == DELTA
    assert privacy.epsilon == pytest.approx(_eps(3 * 10), rel=1e-12)
    lines = dict(summarise(plan, epsilon=privacy.epsilon, delta=DELTA, per_example=True).lines)
    assert (
        "differential privacy for each training image (DP-SGD) with a total budget of "
        in (lines["Privacy budget"])
    )
    tight = SitePolicy(max_epsilon=privacy.epsilon - 0.1)
    (reason,) = privacy_refusals(tight, privacy)
    assert f"would spend a privacy budget of epsilon {privacy.epsilon:.2f}, more than" in reason
    # before the site has counted its images the figure is unknown, and says so
    unknown = plan_privacy(plan)
    assert unknown.epsilon is None and unknown.per_example
    text = dict(summarise(plan, delta=DELTA, per_example=True).lines)["Privacy budget"]
    assert "depends on this hospital's number of training images" in text
    assert privacy_refusals(tight, unknown) == []  # judged per round instead (below)


def test_a_plan_beyond_the_cap_is_refused_on_arrival_with_the_reason(world) -> None:
    fed, site_id, link = world
    link.charge_trained("0" * 64, now=1.0, run_id="x", rnd=1, num_samples=IMAGES, steps=1)
    assert link.training_images() == IMAGES
    plan = _plan(rounds=3)
    cap = _eps(30) - 0.2
    link.record.set_policy(SitePolicy(max_epsilon=cap), now=4.0)
    plan_hash = fed.add_plan(plan, now=5.0)
    fed.start_run(plan_hash, now=6.0)
    (decision,) = link.on_notice(governance.notice(fed, site_id), now=7.0)
    assert decision.decision == "refuse"
    assert f"would spend a privacy budget of epsilon {_eps(30):.2f}, more than the {cap:g}" in (
        decision.reason
    )


def test_each_trained_round_is_charged_its_steps_and_the_cap_stops_the_update(world) -> None:
    fed, site_id, link = world
    plan = _plan(rounds=2)
    cap = _eps(2 * 10) + 0.01  # the plan fits, a third round does not
    link.record.set_policy(SitePolicy(max_epsilon=cap), now=4.0)
    plan_hash = fed.add_plan(plan, now=5.0)
    fed.start_run(plan_hash, now=6.0)
    assert link.on_notice(governance.notice(fed, site_id), now=7.0) == []  # images unknown
    link.record.decide_plan(plan_hash, approve=True, reason="", person="A", key=link.key, now=8)
    now = time.time()
    assert link.refusal(plan_hash, now, run_id="r1", rnd=1) is None
    assert link.privacy_budget(plan_hash).spent == 0.0  # charged once trained, not before
    for rnd in (1, 2):
        kwargs = dict(run_id="r1", rnd=rnd, num_samples=IMAGES, steps=10)
        assert link.charge_trained(plan_hash, now, **kwargs) is None
        assert link.charge_trained(plan_hash, now, **kwargs) is None  # sent again: no charge
        assert link.privacy_budget(plan_hash).spent == pytest.approx(_eps(rnd * 10), rel=1e-9)
    spent = [a["detail"] for a in link.record.activity() if a["kind"] == "privacy_spent"]
    assert [(s["round"], s["steps"], s["sample_rate"]) for s in spent] == [
        (1, 10, 0.1),
        (2, 10, 0.1),
    ]
    # A third round: refused before training (the site knows its images now) ...
    code, reason = link.refusal(plan_hash, now, run_id="r1", rnd=3)
    assert code == "privacy.budget_exceeded"
    assert f"beyond this site's limit of {cap:.3g}" in reason
    # ... and, had it trained, its update would not be allowed to leave.
    code, reason = link.charge_trained(
        plan_hash, now, run_id="r1", rnd=3, num_samples=IMAGES, steps=10
    )
    assert code == "privacy.budget_exceeded" and "The round was refused" in reason
    assert link.privacy_budget(plan_hash).spent == pytest.approx(_eps(20), rel=1e-9)


def test_the_worker_trains_with_dp_sgd_and_reports_the_steps_it_took(tmp_path: Path) -> None:
    federation = generate_federation(
        tmp_path / "fed", sites=1, seed=5, images_per_site=16, test_images=4, image_size=64
    )
    plan = demo_plan(
        rounds=1,
        architecture="small_cnn_gn",
        input_size=32,
        batch_size=8,
        local_epochs=1,
        dp=DP,
    )
    model = build_model("small_cnn_gn", "1", input_size=32, seed=0)
    data = encode_tensors(model_arrays(model))
    (tmp_path / "global.safetensors").write_bytes(data)
    site = federation.sites[0]
    record = run_job(
        {
            "plan": plan.to_dict(),
            "model_path": str(tmp_path / "global.safetensors"),
            "model_sha256": tensor_digest(data),
            "dicom_dir": str(site.dicom_dir),
            "labels_csv": str(site.labels_csv),
            "cache_dir": str(tmp_path / "cache"),
            "update_path": str(tmp_path / "update.safetensors"),
            "data_seed": 0,
            "seed": 11,
            "dp_seed": 3,
            "threads": 1,
        }
    )
    assert "dp" not in record  # no client-level clipping of the update
    n = record["num_samples"]
    assert record["steps"] == -(-n // 8)
    assert Path(tmp_path / "update.safetensors").stat().st_size == record["size"]
