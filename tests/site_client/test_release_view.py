"""A person's view of the releases a site holds: verified again when listed, accepted or
refused under a name (signed with the site key, replacing the automatic verdict), and used for
predictions whose files stay in the site folder."""

from __future__ import annotations

import csv
import threading

import pytest

from shared.crypto.keys import load_private_key, public_key_b64
from shared.crypto.signing import verify
from shared.errors import DataError, GovernanceError, ReleaseError
from shared.protocol import signed
from shared.releases import RESEARCH_USE, WEIGHTS
from shared.synthetic import generate_federation
from site_client.core.activity import open_governance
from site_client.core.governance_link import GovernanceLink
from site_client.core.release_view import (
    decide,
    load_release_summaries,
    predict_with_release,
)
from site_client.core.releases import AUTOMATIC, release_dir, verdicts
from tests.release_fixtures import METRICS, SIZE, make_release_folder, site_holding


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_release_folder(tmp_path_factory.mktemp("coordinator"))


@pytest.fixture
def held(tmp_path, release):
    return site_holding(tmp_path, *release)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    manifest = generate_federation(
        root, sites=1, seed=5, images_per_site=[6], test_images=0, image_size=SIZE
    )
    return manifest.sites[0].dicom_dir


def _verdicts(site_dir):
    record = open_governance(site_dir)
    try:
        key = load_private_key(site_dir.key_file)
        return verdicts(GovernanceLink(record, site_dir.load(), key)), public_key_b64(key)
    finally:
        record.close()


def test_a_held_release_is_listed_with_its_card_and_automatic_verdict(held):
    [summary] = load_release_summaries(held.site_dir)
    assert summary.version == "1.0" and summary.usable
    assert summary.verdict == "accepted" and summary.decided_by == AUTOMATIC
    assert summary.verdict_text == "Accepted automatically, because every check passed."
    assert summary.metrics_text.startswith("On 40 held-out image(s) of this site: AUC 0.875")
    assert RESEARCH_USE.split(".")[0] in summary.card_html
    assert summary.plan_name


def test_a_person_refuses_a_release_signed_and_replacing_the_automatic_verdict(held):
    message = decide(
        held.site_dir, "1.0", accepted=False, person="Dr. Ada Byron", reason="  AUC too low  here"
    )
    assert not message.accepted and message.reason == "AUC too low here"
    assert message.metrics == METRICS  # the site's own validation travels with the verdict
    reported, site_key = _verdicts(held.site_dir)
    assert reported["1.0"] == message
    body = {k: v for k, v in message.body().items() if k != "signature"}
    fields = signed.release_acceptance_fields(
        federation="Release test", site_id="site-release", **body
    )
    verify(site_key, signed.RELEASE_ACCEPTANCE, fields, message.signature)
    [summary] = load_release_summaries(held.site_dir)
    assert summary.verdict == "refused"
    assert summary.verdict_text == "Refused by Dr. Ada Byron: AUC too low here"


def test_a_decision_needs_a_name_and_a_refusal_a_reason(held):
    with pytest.raises(GovernanceError, match="type your name") as exc:
        decide(held.site_dir, "1.0", accepted=True, person="  ")
    assert exc.value.code == "governance.person_required"
    with pytest.raises(GovernanceError, match="say why") as exc:
        decide(held.site_dir, "1.0", accepted=False, person="Dr. Byron", reason=" ")
    assert exc.value.code == "governance.reason_required"
    with pytest.raises(GovernanceError, match=r"no release 2\.0") as exc:
        decide(held.site_dir, "2.0", accepted=True, person="Dr. Byron")
    assert exc.value.code == "governance.unknown_release"
    assert _verdicts(held.site_dir)[0]["1.0"].person == AUTOMATIC  # nothing was recorded


def test_a_release_altered_on_disk_is_not_usable(held, images):
    weights = release_dir(held.site_dir, "1.0") / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    [summary] = load_release_summaries(held.site_dir)
    assert not summary.usable and summary.verdict_text.startswith("Not usable: ")
    with pytest.raises(ReleaseError):
        decide(held.site_dir, "1.0", accepted=True, person="Dr. Byron")
    with pytest.raises(ReleaseError):
        predict_with_release(held.site_dir, "1.0", folder=images)
    assert not (held.site_dir.root / "predictions").exists()


def test_predictions_stay_in_the_site_folder(held, images):
    seen: list[tuple[int, int]] = []
    report = predict_with_release(
        held.site_dir, "1.0", folder=images, progress=lambda d, t: seen.append((d, t))
    )
    assert len(report.predicted) == 6 and not report.cancelled
    assert report.csv is not None and report.csv.is_relative_to(held.site_dir.root / "predictions")
    with report.csv.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["predicted"] * 6
    assert report.saliency_dir is not None
    assert sorted(p.name for p in report.saliency_dir.iterdir()) == sorted(
        r["saliency"] for r in rows
    )
    assert seen[-1] == (6, 6)


def test_predictions_can_be_cancelled_and_need_a_source(held, images):
    stop = threading.Event()
    stop.set()
    report = predict_with_release(held.site_dir, "1.0", folder=images, should_stop=stop.is_set)
    assert report.cancelled and len(report.predictions) < 6
    with pytest.raises(DataError, match="either imported studies or a folder"):
        predict_with_release(held.site_dir, "1.0")
    with pytest.raises(DataError, match="not among this site's imported images"):
        predict_with_release(held.site_dir, "1.0", study_uids=["1.2.3"])


def test_the_command_line_refuses_and_lists(held, capsys):
    from site_client.cli import main

    data = ["--data-dir", str(held.site_dir.root)]
    with pytest.raises(SystemExit) as exit_:
        main([*data, "releases", "refuse", "1.0", "--name", "Dr. Byron"])
    assert exit_.value.code == 2 and "--reason" in capsys.readouterr().err
    argv = [*data, "releases", "refuse", "1.0", "--name", "Dr. Byron", "--reason", "too weak"]
    assert main(argv) == 0
    assert "Release 1.0 refused by Dr. Byron, signed" in capsys.readouterr().out
    assert main([*data, "releases"]) == 0
    assert "refused: too weak, AUC here 0.875" in capsys.readouterr().out
    assert main([*data, "releases", "accept", "1.0", "--name", "Dr. Byron"]) == 0
    assert _verdicts(held.site_dir)[0]["1.0"].accepted


def test_the_activity_timeline_tells_release_verdicts_in_words(held):
    from site_client.core.activity import load_activity

    decide(held.site_dir, "1.0", accepted=False, person="Dr. Byron", reason="too weak here")
    entries = [e for e in load_activity(held.site_dir) if e.kind == "release_reported"]
    refusal, automatic = entries  # newest first
    assert refusal.text == (
        "Dr. Byron refused model release 1.0 (AUC 0.875 on this site's held-out images): "
        "too weak here"
    )
    assert refusal.signed and not automatic.signed  # a person signed only the refusal
    assert automatic.text.startswith(f"{AUTOMATIC} accepted model release 1.0")
    assert all("signature" not in e.text for e in entries)


def test_a_fedbn_release_is_used_with_this_sites_own_normalisation_layers(tmp_path):
    from shared.aggregation.fedbn import norm_layer_keys
    from shared.models.state import model_arrays
    from site_client.core import local_state
    from site_client.core.predict import load_release

    folder, key = make_release_folder(tmp_path / "coordinator", aggregation="fedbn")
    held = site_holding(tmp_path, folder, key)
    plain = load_release(release_dir(held.site_dir, "1.0"), key, site_root=held.site_dir.root)
    assert plain.needs_own_layers and not plain.own_layers  # this site kept none
    local = norm_layer_keys(plain.model)
    norms = {k: v for k, v in model_arrays(plain.model).items() if k in local}
    assert norms
    mine = {k: v + 0.25 for k, v in norms.items()}  # what this site trained in the run
    run = local_state.run_folder(held.site_dir.root, plain.release.run_id)
    local_state.save(run, local_state.NORM_LAYERS, 1, mine)
    loaded = load_release(release_dir(held.site_dir, "1.0"), key, site_root=held.site_dir.root)
    assert loaded.own_layers and not loaded.needs_own_layers
    arrays = model_arrays(loaded.model)
    assert all((arrays[k] == mine[k]).all() for k in mine)
    # the shared layers are the release's, untouched
    shared_names = [k for k in arrays if k not in local]
    assert all((arrays[k] == model_arrays(plain.model)[k]).all() for k in shared_names)
