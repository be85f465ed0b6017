"""A site's check of a model release: a genuine one passes, and every part that was altered
(signature, weights, tree head, log entry, model card, plan, charter) is named when refused.

The release is made by the coordinator's own code on a real (tiny) federation, so these tests
check the format both sides agree on, not a copy of it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

import coordinator
from coordinator.config import CoordinatorConfig
from coordinator.federation import Federation
from coordinator.release import make_release
from shared import releases as layout
from shared.crypto.keys import generate_signing_key, public_key_b64
from shared.crypto.signing import sign
from shared.errors import CryptoError, ReleaseError
from shared.plan import demo_plan
from shared.protocol import signed
from shared.provenance.log import TreeHead
from shared.releases import check_version, render_model_card_html, verify_release
from shared.tensors import decode_tensors

CHARTER = Path(coordinator.__file__).parent / "templates" / "charter.md"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A genuine release, the coordinator key, and an earlier genuine tree head."""
    root = tmp_path_factory.mktemp("release")
    fed = Federation.init(root / "coord", CoordinatorConfig(federation="Release test"), now=10.0)
    try:
        fed.publish_charter(CHARTER.read_bytes(), now=11.0)
        plan = demo_plan(rounds=1, input_size=32)
        run = fed.start_run(fed.add_plan(plan, now=12.0), now=13.0)
        fed.store.open_round(run.run_id, 1, [], run.model_digest, 20.0, 80.0)
        fed.store.commit_round(run.run_id, 1, run.model_digest, 0, 0.5, True, 30.0)
        earlier = fed.store.ledger.heads()[0]
        make_release(fed, run.run_id, "1.0", root / "release", now=40.0)
        return root / "release", fed.public_key(), earlier, fed.signing_key()
    finally:
        fed.close()


@pytest.fixture
def release(made, tmp_path):
    copy = tmp_path / "release"
    shutil.copytree(made[0], copy)
    return copy


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text("utf-8"))
    change(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", "utf-8")


def _flip_byte(path: Path, at: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_genuine_release_passes(made, release):
    ok = verify_release(release, made[1])
    manifest = json.loads((release / layout.MANIFEST).read_text())["release"]
    assert ok.version == manifest["version"] == "1.0"
    assert ok.plan.plan_hash == manifest["plan_hash"]
    assert (ok.plan.architecture, ok.plan.architecture_version) == ("small_cnn", "1")
    assert ok.weights == (release / layout.WEIGHTS).read_bytes()
    assert hashlib.sha256(ok.weights).hexdigest() == manifest["weights_sha256"]
    assert decode_tensors(ok.weights)  # real, readable weights
    assert ok.head.size == manifest["tree_head_size"] and ok.entry_index < ok.head.size
    assert ok.model_card["not_a_medical_device"] == layout.RESEARCH_USE
    page = (release / layout.CARD_HTML).read_text("utf-8")
    assert "not a medical device" in page and ok.run_id in page


def _sign_manifest_with(key):
    def change(data):
        data["signature"] = sign(key, signed.RELEASE, data["release"])

    return change


# (what is changed, error code, words the message must hold)
TAMPERING = {
    "manifest signature": (
        lambda r: _edit_json(
            r / layout.MANIFEST, lambda d: d.update(signature=d["signature"][::-1])
        ),
        "release.bad_signature",
        r"release manifest \(release.json\) is not signed by this federation's coordinator",
    ),
    "manifest field": (
        lambda r: _edit_json(
            r / layout.MANIFEST, lambda d: d["release"].update(weights_sha256="0" * 64)
        ),
        "release.bad_signature",
        "not signed by this federation's coordinator",
    ),
    "manifest signed by another key": (
        lambda r: _edit_json(r / layout.MANIFEST, _sign_manifest_with(generate_signing_key())),
        "release.bad_signature",
        "not signed by this federation's coordinator",
    ),
    "weights byte": (
        lambda r: _flip_byte(r / layout.WEIGHTS),
        "release.weights_mismatch",
        r"model weights \(model.safetensors\) are not the ones the coordinator signed",
    ),
    "tree head root": (
        lambda r: _edit_json(
            r / layout.PROVENANCE, lambda d: d["tree_head"].update(root="ab" * 32)
        ),
        "release.bad_tree_head",
        "tree head in provenance.json .* is not signed by the coordinator",
    ),
    "tree head size": (
        lambda r: _edit_json(
            r / layout.PROVENANCE,
            lambda d: d["tree_head"].update(size=d["tree_head"]["size"] + 1),
        ),
        "release.bad_tree_head",
        "is not signed by the coordinator",
    ),
    "log entry": (
        lambda r: _edit_json(r / layout.PROVENANCE, lambda d: d["entry"].update(at=41.0)),
        "release.not_in_log",
        "inclusion proof .* does not lead to the signed tree head",
    ),
    "log entry payload": (
        lambda r: _edit_json(
            r / layout.PROVENANCE, lambda d: d["entry"]["payload"].update(version="9.9")
        ),
        "release.not_in_log",
        "log entry in provenance.json is not the release the manifest describes",
    ),
    "inclusion proof": (
        lambda r: _edit_json(
            r / layout.PROVENANCE,
            lambda d: d.update(inclusion_proof=["00" * 32, *d["inclusion_proof"][1:]]),
        ),
        "release.not_in_log",
        "inclusion proof",
    ),
    "model card": (
        lambda r: _edit_json(
            r / layout.CARD_JSON, lambda d: d.update(intended_use="Diagnosing patients.")
        ),
        "release.model_card_mismatch",
        r"model card \(model_card.json\) is not the one the coordinator signed",
    ),
    "model card page": (
        lambda r: (r / layout.CARD_HTML).write_text(
            (r / layout.CARD_HTML).read_text("utf-8").replace("not a medical device", "safe"),
            "utf-8",
        ),
        "release.model_card_mismatch",
        r"model card page \(model_card.html\) is not the one the coordinator signed",
    ),
    "plan": (
        lambda r: _edit_json(r / layout.PLAN, lambda d: d.update(learning_rate=0.5)),
        "release.plan_mismatch",
        r"training plan \(plan.json\) is not the signed one",
    ),
    "charter": (
        lambda r: (r / layout.CHARTER).write_text("# Another charter\n", "utf-8"),
        "release.charter_mismatch",
        r"charter \(charter.md\) is not the version the signed model card names",
    ),
}


@pytest.mark.parametrize("what", sorted(TAMPERING))
def test_an_altered_release_is_refused_naming_what_changed(made, release, what):
    alter, code, message = TAMPERING[what]
    alter(release)
    with pytest.raises(ReleaseError, match=message) as info:
        verify_release(release, made[1])
    assert info.value.code == code
    assert "Do not use this release" in str(info.value)


def test_another_genuine_tree_head_is_not_the_one_the_manifest_names(made, release):
    earlier: TreeHead = made[2]
    _edit_json(release / layout.PROVENANCE, lambda d: d.update(tree_head=earlier.to_dict()))
    with pytest.raises(ReleaseError, match="not the one the signed manifest names") as info:
        verify_release(release, made[1])
    assert info.value.code == "release.tree_head_mismatch"


def test_a_release_is_checked_against_this_federations_key_only(release):
    stranger = public_key_b64(generate_signing_key())
    with pytest.raises(ReleaseError, match="not signed by this federation's coordinator"):
        verify_release(release, stranger)
    with pytest.raises(CryptoError, match="public key"):
        verify_release(release, "not-a-key")


def test_missing_or_damaged_parts_are_named(made, release, tmp_path):
    (release / layout.WEIGHTS).unlink()
    with pytest.raises(ReleaseError, match=r"no readable model\.safetensors") as info:
        verify_release(release, made[1])
    assert info.value.code == "release.missing_file"
    (release / layout.MANIFEST).write_text("{not json", "utf-8")
    with pytest.raises(ReleaseError, match=r"release\.json in the release is not valid JSON"):
        verify_release(release, made[1])
    (release / layout.MANIFEST).write_text('{"format": "tessera-release/0"}', "utf-8")
    with pytest.raises(ReleaseError, match="is not a tessera-release/1 manifest") as info:
        verify_release(release, made[1])
    assert info.value.code == "release.bad_file"
    with pytest.raises(ReleaseError, match="is not a folder"):
        verify_release(tmp_path / "nowhere", made[1])


def test_release_versions_are_major_dot_minor():
    for good in ("1.0", "0.1", "12.345"):
        assert check_version(good) == good
    for bad in ("1", "1.0.0", "v1.0", "01.0", "1.00", "", " 1.0", 1.0, None):
        with pytest.raises(ReleaseError, match=r"not of the form MAJOR\.MINOR") as info:
            check_version(bad)
        assert info.value.code == "release.bad_version"


def test_the_card_page_escapes_what_it_shows():
    card = {"release_version": "1.0", "federation": "<script>x</script>", "limitations": ["a&b"]}
    page = render_model_card_html(card)
    assert "<script>x" not in page and "&lt;script&gt;x" in page and "a&amp;b" in page
    assert layout.RESEARCH_USE in page  # the statement is shown even if the card lacks it
    assert page == render_model_card_html(card)  # deterministic: same card, same page
