"""Publishing the federation's charter: content rules, versions, signatures, the log."""

from __future__ import annotations

import pytest

from coordinator.cli import main as cli
from coordinator.config import CoordinatorConfig
from coordinator.federation import Federation
from shared.crypto.signing import verify
from shared.errors import GovernanceError
from shared.governance.charter import charter_hash
from shared.protocol import signed

from .conftest import CHARTER


@pytest.fixture
def fed(tmp_path):
    f = Federation.init(
        tmp_path / "coord", CoordinatorConfig(federation="Charter test", host="127.0.0.1")
    )
    yield f
    f.close()


def test_publish_signs_and_logs_each_version(fed):
    text = CHARTER.read_bytes()
    first = fed.publish_charter(text, now=5.0)
    second = fed.publish_charter(text + b"\nAmended: reports are due within 14 days.\n", now=6.0)
    assert (first.version, second.version) == (1, 2)
    assert first.sha256 == charter_hash(text.decode())
    assert fed.store.charter().version == 2
    assert fed.store.charter(1).text == text.decode()
    for record in (first, second):
        verify(
            fed.public_key(),
            signed.CHARTER,
            signed.charter_fields(
                federation="Charter test", version=record.version, sha256=record.sha256
            ),
            record.signature,
        )
    logged = [e["detail"] for e in fed.store.events("charter_published")]
    assert [(d["version"], d["sha256"]) for d in logged] == [(1, first.sha256), (2, second.sha256)]


def test_a_charter_missing_sections_is_refused_with_what_is_missing(fed):
    text = CHARTER.read_text().replace("## Dispute resolution", "## Other matters")
    text = text.replace("## Publication and authorship", "## Papers")
    with pytest.raises(
        GovernanceError, match="no section on: dispute resolution, publication and authorship"
    ) as info:
        fed.publish_charter(text.encode())
    assert info.value.code == "governance.charter_incomplete"
    assert fed.store.charter() is None
    assert fed.store.events("charter_published") == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "The charter is empty"),
        (b"\xff\xfe# Charter", "not UTF-8 text"),
        (b"#" * 200_001, "keep it under"),
    ],
)
def test_unreadable_charters_are_refused(fed, data, message):
    with pytest.raises(GovernanceError, match=message):
        fed.publish_charter(data)


def test_publishing_the_same_text_again_is_refused(fed):
    fed.publish_charter(CHARTER.read_bytes())
    with pytest.raises(GovernanceError, match="already charter version 1"):
        fed.publish_charter(CHARTER.read_bytes())


def test_cli_publishes_and_lists(fed, tmp_path, capsys):
    root = str(fed.paths.root)
    fed.close()
    assert cli(["--data-dir", root, "charter", "publish", str(CHARTER)]) == 0
    assert "charter version 1 published" in capsys.readouterr().out
    assert cli(["--data-dir", root, "charter", "list"]) == 0
    assert f"version 1  {charter_hash(CHARTER.read_text())}" in capsys.readouterr().out
    assert cli(["--data-dir", root, "charter", "publish", str(tmp_path / "nope.md")]) == 2
    assert "cannot read" in capsys.readouterr().err
