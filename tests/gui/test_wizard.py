"""The first-run wizard against a real coordinator on loopback (TLS, real enrolment)."""

from __future__ import annotations

import time
from pathlib import Path

from PySide6.QtWidgets import QWizard

from coordinator.federation import Federation
from shared.identity.invitation import Invitation, encode_invitation, new_token
from site_client.core.config import SiteDir
from site_client.core.onboarding import enrol_site, format_fingerprint
from site_client.gui.pages.wizard import ENROL_PAGE, INVITATION_PAGE, FirstRunWizard
from site_client.gui.tasks import TaskRunner

WAIT_MS = 20_000


def _wizard(qtbot, runner: TaskRunner, folder: Path) -> FirstRunWizard:
    wizard = FirstRunWizard(runner, initial_folder=folder)
    qtbot.addWidget(wizard)
    wizard.show()
    return wizard


def _to_invitation(wizard: FirstRunWizard) -> None:
    assert wizard.button(QWizard.WizardButton.NextButton).isEnabled()
    wizard.next()
    assert wizard.currentId() == INVITATION_PAGE


def _paste(wizard: FirstRunWizard, code: str, name: str = "North Hospital") -> None:
    wizard.invitation_page.code.setPlainText(code)
    wizard.invitation_page.site_name.setText(name)


def _next_enabled(wizard: FirstRunWizard) -> bool:
    return wizard.button(QWizard.WizardButton.NextButton).isEnabled()


def test_a_good_code_enrols_the_site(
    qtbot, runner: TaskRunner, coordinator: Federation, tmp_path: Path
) -> None:
    folder = tmp_path / "Tessera" / "site"
    wizard = _wizard(qtbot, runner, folder)
    assert "will be created" in wizard.folder_page.status.text()
    _to_invitation(wizard)
    _paste(wizard, coordinator.invite("North Hospital"))
    page = wizard.invitation_page
    # checked before use: what the code says is shown, and nothing was sent yet
    assert page.federation.text() == "GUI test"
    assert coordinator.url() in page.address.text()
    fingerprint = page.fingerprint.text().replace("<br>", " ")
    assert format_fingerprint(coordinator.fingerprint()) in fingerprint
    assert coordinator.store.sites() == []
    assert not _next_enabled(wizard)  # the person must confirm the details first
    page.confirm.setChecked(True)
    assert _next_enabled(wizard)

    with qtbot.waitSignal(wizard.enrol_page.enrolled, timeout=WAIT_MS) as blocker:
        wizard.next()
        assert wizard.currentId() == ENROL_PAGE
        assert not wizard.button(QWizard.WizardButton.BackButton).isEnabled()  # busy
    config = blocker.args[0]
    assert (config.federation, config.site_name) == ("GUI test", "North Hospital")
    assert "Welcome to GUI test" in wizard.enrol_page.headline.text()
    assert config.site_id in wizard.enrol_page.status.text()
    assert SiteDir(folder).load() == config and SiteDir(folder).key_file.is_file()
    (site,) = coordinator.store.sites()
    assert (site.site_id, site.name) == (config.site_id, "North Hospital")
    assert wizard.button(QWizard.WizardButton.FinishButton).isEnabled()
    wizard.accept()
    assert (wizard.config, wizard.site_dir) == (config, SiteDir(folder))


def test_a_used_code_is_explained(
    qtbot, runner: TaskRunner, coordinator: Federation, tmp_path: Path
) -> None:
    code = coordinator.invite("North Hospital")
    enrol_site(code, tmp_path / "first", "North Hospital")
    wizard = _wizard(qtbot, runner, tmp_path / "second")
    _to_invitation(wizard)
    _paste(wizard, code)
    wizard.invitation_page.confirm.setChecked(True)
    with qtbot.waitSignal(wizard.enrol_page.failed, timeout=WAIT_MS) as blocker:
        wizard.next()
    message = blocker.args[0]
    assert message.code == "identity.invitation_used"
    page = wizard.enrol_page
    assert "This code has already been used" in page.headline.text()
    assert "already been used" in page.status.text()
    assert "identity.invitation_used" in page.status.text()
    assert not page.retry.isVisible()  # the same code will not work again: ask for a new one
    assert (
        not _next_enabled(wizard)
        and not wizard.button(QWizard.WizardButton.FinishButton).isEnabled()
    )
    assert wizard.button(QWizard.WizardButton.BackButton).isEnabled()
    assert not SiteDir(tmp_path / "second").is_enrolled()
    assert runner.errors.last is None  # shown on the page, not in a second dialog
    assert len(coordinator.store.sites()) == 1


def test_a_bad_code_is_refused_before_anything_is_sent(
    qtbot, runner: TaskRunner, tmp_path: Path
) -> None:
    wizard = _wizard(qtbot, runner, tmp_path / "site")
    _to_invitation(wizard)
    page = wizard.invitation_page
    _paste(wizard, "TESSERA-1-MFRGGZDFMZTWQ2LKNNWG23TPOBYXE43UOV3HO6DZPI")
    assert "incomplete or mistyped" in page.problem.text()
    assert not page.details.isVisible() and not page.confirm.isEnabled()
    assert not _next_enabled(wizard)
    expired = encode_invitation(
        Invitation(
            coordinator_url="wss://coordinator.test:8443",
            fingerprint="ab" * 32,
            token=new_token(),
            federation="Old",
            expires_at=int(time.time()) - 60,
        )
    )
    _paste(wizard, expired)
    assert "has expired" in page.problem.text() and not _next_enabled(wizard)
    assert not SiteDir(tmp_path / "site").root.exists()


def test_an_unreachable_coordinator_is_explained_and_can_be_retried(
    qtbot, runner: TaskRunner, tmp_path: Path, closed_port: int
) -> None:
    code = encode_invitation(
        Invitation(
            coordinator_url=f"wss://127.0.0.1:{closed_port}",
            fingerprint="ab" * 32,
            token=new_token(),
            federation="Far away",
            expires_at=int(time.time()) + 3600,
        )
    )
    wizard = _wizard(qtbot, runner, tmp_path / "site")
    _to_invitation(wizard)
    _paste(wizard, code)
    wizard.invitation_page.confirm.setChecked(True)
    with qtbot.waitSignal(wizard.enrol_page.failed, timeout=WAIT_MS) as blocker:
        wizard.next()
    assert blocker.args[0].code == "net.unreachable"
    page = wizard.enrol_page
    assert "Cannot reach the coordinator" in page.headline.text()
    assert f"wss://127.0.0.1:{closed_port}" in page.status.text()
    assert "Check the network connection" in page.status.text()
    assert page.retry.isVisible() and page.retry.isEnabled()
    with qtbot.waitSignal(page.failed, timeout=WAIT_MS):
        page.retry.click()  # still nobody there: the same clear message again
    assert "Cannot reach the coordinator" in page.headline.text()
    assert not SiteDir(tmp_path / "site").is_enrolled()


def test_a_folder_that_holds_a_site_just_opens_it(
    qtbot, runner: TaskRunner, site_dir: SiteDir
) -> None:
    wizard = _wizard(qtbot, runner, site_dir.root)
    assert "already holds the site 'Test Hospital'" in wizard.folder_page.status.text()
    assert wizard.button(QWizard.WizardButton.FinishButton).isVisible()
    wizard.accept()
    assert wizard.config == site_dir.load()
