"""The Governance page on a real governance record: accepting the charter (signed, verified
with the site key), approving and refusing a plan, a plan below the policy, the policy form."""

from __future__ import annotations

from PySide6.QtWidgets import QMessageBox

from shared.crypto.keys import load_private_key, public_key_b64
from shared.crypto.signing import verify
from shared.governance.policy import SitePolicy
from shared.protocol import signed
from site_client.core.activity import open_governance
from site_client.core.onboarding import format_fingerprint
from site_client.gui.pages.governance import GovernancePage
from site_client.gui.tasks import TaskRunner

WAIT_MS = 20_000


def _page(qtbot, runner: TaskRunner, site) -> GovernancePage:
    page = GovernancePage(site.site_dir, runner)
    qtbot.addWidget(page)
    page.resize(1100, 720)
    page.show()
    with qtbot.waitSignal(page.view_loaded, timeout=WAIT_MS):
        page.refresh()
    return page


def _record(site):
    governance = open_governance(site.site_dir)
    try:
        return governance.charter(1), governance.plan(site.plan_hash), governance.policy()
    finally:
        governance.close()


def test_accepting_the_charter_signs_it_with_the_site_key(
    qtbot, runner: TaskRunner, governed_site
) -> None:
    page = _page(qtbot, runner, governed_site)
    panel = page.charter
    charter = page.view.charter
    assert "Version 1 has not been accepted yet" in panel.status.text()
    assert format_fingerprint(charter.sha256) in panel.fingerprint.text()
    shown = panel.text.toPlainText()
    assert "Charter of the Test Federation" in shown and "# " not in shown  # rendered
    assert "<b>not bold</b>" in shown  # raw HTML in the terms is shown as text, not obeyed

    # no name: nothing to confirm, the name is asked for
    assert panel.ask_to_accept() is None
    assert "Type your name first" in panel.message.text()
    # the confirmation says what signing means; cancelling signs nothing
    page.name.setText("  Dr. Ada   Byron ")
    panel.accept_button.click()
    box = panel.confirm_box
    assert box is not None and box.isVisible()
    assert "as Dr. Ada Byron" in box.text() and "Signing means" in box.text()
    box.button(QMessageBox.StandardButton.Cancel).click()
    assert panel.task is None and _record(governed_site)[0].accepted_by is None

    panel.accept_button.click()
    with (
        qtbot.waitSignal(page.view_loaded, timeout=WAIT_MS),
        qtbot.waitSignal(panel.accepted, timeout=WAIT_MS) as blocker,
    ):
        panel.confirm_box.button(QMessageBox.StandardButton.Yes).click()
    message = blocker.args[0]
    site_key = load_private_key(governed_site.site_dir.key_file)
    verify(
        public_key_b64(site_key),
        signed.CHARTER_ACCEPT,
        signed.charter_accept_fields(
            federation="Test federation",
            site_id="site-gov",
            version=1,
            sha256=charter.sha256,
            person="Dr. Ada Byron",
        ),
        message.signature,
    )
    assert _record(governed_site)[0].accepted_by == "Dr. Ada Byron"
    assert "accepted and signed by Dr. Ada Byron" in panel.status.text()
    assert not panel.accept_button.isEnabled()
    history = page.history.tree
    assert history.topLevelItemCount() == 1
    assert history.topLevelItem(0).text(1) == "Dr. Ada Byron"
    assert history.topLevelItem(0).text(2).startswith("Dr. Ada Byron accepted charter version 1")


def test_approving_and_refusing_a_plan(qtbot, runner: TaskRunner, governed_site) -> None:
    page = _page(qtbot, runner, governed_site)
    page.tabs.setCurrentWidget(page.plans)
    panel = page.plans
    assert panel.list.count() == 1 and "waiting for a decision" in panel.list.item(0).text()
    assert panel.current().plan_hash == governed_site.plan_hash
    assert panel.summary_form.rowCount() == 8  # task, model, ..., privacy budget
    assert "meets this site's policy" in panel.policy_check.text()
    assert panel.approve_button.isEnabled() and panel.refuse_button.isEnabled()

    page.name.setText("Dr. Grace Hopper")
    panel.refuse_button.click()  # no reason: blocked, with a message, nothing signed
    assert "Say why the plan is refused" in panel.message.text()
    assert panel.task is None and _record(governed_site)[1].decision == "pending"

    panel.reason.setPlainText("Twenty rounds is too long for us.")
    with (
        qtbot.waitSignal(page.view_loaded, timeout=WAIT_MS),
        qtbot.waitSignal(panel.decided, timeout=WAIT_MS) as blocker,
    ):
        panel.refuse_button.click()
    refusal = blocker.args[0]
    verify(
        public_key_b64(governed_site.site_key),
        signed.PLAN_DECISION,
        signed.plan_decision_fields(
            federation="Test federation",
            site_id="site-gov",
            plan_hash=governed_site.plan_hash,
            decision="refuse",
            reason="Twenty rounds is too long for us.",
            person="Dr. Grace Hopper",
        ),
        refusal.signature,
    )
    assert _record(governed_site)[1].decision == "refuse"
    assert "refused by Dr. Grace Hopper" in panel.list.item(0).text()
    assert "Refused and signed by Dr. Grace Hopper" in panel.message.text()
    assert not panel.refuse_button.isEnabled() and panel.approve_button.isEnabled()

    with (
        qtbot.waitSignal(page.view_loaded, timeout=WAIT_MS),
        qtbot.waitSignal(panel.decided, timeout=WAIT_MS) as blocker,
    ):
        panel.approve_button.click()
    assert blocker.args[0].decision == "approve"
    record = _record(governed_site)[1]
    assert (record.decision, record.person, record.reason) == ("approve", "Dr. Grace Hopper", "")
    assert "approved by Dr. Grace Hopper" in panel.list.item(0).text()
    texts = [
        page.history.tree.topLevelItem(i).text(2)
        for i in range(page.history.tree.topLevelItemCount())
    ]
    assert texts == [
        f"Dr. Grace Hopper approved plan 'chest-xray v2' ({governed_site.plan_hash[:12]})",
        f"Dr. Grace Hopper refused plan 'chest-xray v2' ({governed_site.plan_hash[:12]}): "
        "Twenty rounds is too long for us.",
    ]


def test_a_plan_below_the_policy_cannot_be_approved(
    qtbot, runner: TaskRunner, governed_site
) -> None:
    page = _page(qtbot, runner, governed_site)
    page.tabs.setCurrentWidget(page.policy)
    page.policy.secure.setChecked(True)
    with qtbot.waitSignal(page.view_loaded, timeout=WAIT_MS):
        page.policy.save()
    page.tabs.setCurrentWidget(page.plans)
    panel = page.plans
    assert "below this site's policy" in panel.list.item(0).text()
    check = panel.policy_check.text()
    assert "below this site's policy and cannot be approved" in check
    assert "This hospital requires secure aggregation" in check
    assert not panel.approve_button.isEnabled() and panel.refuse_button.isEnabled()
    page.name.setText("Dr. Ada Byron")
    assert panel.approve() is None  # even asked directly, nothing is signed
    assert "cannot be approved: This hospital requires secure aggregation" in (panel.message.text())
    assert _record(governed_site)[1].decision == "pending"


def test_the_policy_form_rejects_an_invalid_value_and_saves_a_valid_one(
    qtbot, runner: TaskRunner, governed_site
) -> None:
    page = _page(qtbot, runner, governed_site)
    form = page.policy
    page.tabs.setCurrentWidget(form)
    assert form.delta.text() == "1e-05" and form.cpu.value() == 50  # the default policy
    form.epsilon.setText("a lot")
    form.hours.setText("25:00-07:00")
    assert form.save() is None
    assert form.errors["max_epsilon"].isVisible()
    assert "must be a number, like 3 or 0.5; not 'a lot'" in form.errors["max_epsilon"].text()
    assert "must look like 19:00-07:00" in form.errors["training_hours"].text()
    assert not form.errors["cpu_share"].isVisible()
    assert "Nothing was saved" in form.message.text()
    assert _record(governed_site)[2] == SitePolicy()

    form.epsilon.setText("3")
    form.hours.setText("19:00-07:00")
    form.cpu.setValue(25)
    with (
        qtbot.waitSignal(page.view_loaded, timeout=WAIT_MS),
        qtbot.waitSignal(form.saved, timeout=WAIT_MS),
    ):
        form.save()
    expected = SitePolicy(max_epsilon=3.0, training_hours="19:00-07:00", cpu_share=0.25)
    assert _record(governed_site)[2] == expected == page.view.policy
    assert not any(label.isVisible() for label in form.errors.values())
    assert form.message.text().startswith("Saved.")
    assert form.epsilon.text() == "3" and not form.dirty
