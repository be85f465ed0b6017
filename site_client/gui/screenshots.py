"""``tessera-site gui --screenshots DIR``: every page built so far, with demo data, as PNGs.

For the documentation and for review: the renderings are of the real widgets driven through
their own code paths (the import runs through the Import tab and the task runner, the labels
file through the Labels box), on a small synthetic federation (``shared.synthetic``; no real
patient) generated in a temporary folder that is deleted afterwards. The demo export mixes
two scanners and a few files that cannot be used, and its labels file has a row that matches
no image and one with a label that is not 0 or 1, so every report has something to show.
The site is given a demo enrolment record (no coordinator is contacted); the PACS receiver
is switched on on this computer only, on a free port, and off again.

For the Governance and Activity pages, a throwaway coordinator key (made here, never saved)
signs a charter and two plans, which are recorded into the demo site's governance record as
the participant records real offers (signatures checked); the site gets a throwaway key of its
own. The charter is then accepted, the first plan approved and the policy saved through the
pages themselves, so the history and the timeline hold real, signed entries.

The Participation page is drawn from a recorded snapshot: the participant's phase events of
a three-round run (with the metrics such a run reports) folded by the service's own
``apply``, with the fourth round in training; no coordinator is contacted.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from PySide6.QtWidgets import QApplication, QWidget

from shared.crypto.keys import generate_signing_key, public_key_b64, save_private_key
from shared.crypto.signing import sign
from shared.governance.charter import charter_hash
from shared.identity.invitation import Invitation, encode_invitation, new_token
from shared.plan import demo_plan
from shared.protocol import signed
from shared.synthetic import generate_federation
from site_client.core.activity import open_governance
from site_client.core.config import SiteConfig, SiteDir
from site_client.core.pacs_settings import LOOPBACK
from site_client.core.participant import PhaseEvent
from site_client.core.participation import Snapshot, apply, with_progress

__all__ = ["render_screenshots"]

WAIT_S = 60.0
SIZE = (1180, 760)


def _demo_export(root: Path, seed: int) -> tuple[Path, Path]:
    """A folder as a hospital might export it, and its labels file."""
    fed = generate_federation(
        root / "generated",
        sites=2,
        seed=seed,
        images_per_site=[36, 24],
        test_images=0,
        image_size=96,
    )
    export = root / "export"
    export.mkdir()
    rows: list[str] = []
    for i, site in enumerate(fed.sites):
        shutil.move(str(site.dicom_dir), export / f"scanner-{'ab'[i]}")
        lines = site.labels_csv.read_text("utf-8").splitlines()
        header, body = lines[0], lines[1:]
        rows.extend(body)
    first = next((export / "scanner-a").rglob("*.dcm"))
    extra = export / "from-cd"
    extra.mkdir()
    (extra / "README.TXT").write_text("Exported by the PACS for the Tessera demo.\n")
    (extra / "IMG0001.dcm").write_bytes(first.read_bytes()[:1500])  # a cut-off copy
    labels = root / "labels.csv"
    bad = ["1.2.826.0.1.3680043.8.498.1,SYN-UNKNOWN,1", rows[0].rsplit(",", 1)[0] + ",maybe"]
    labels.write_text("\n".join([header, *rows[1:], *bad]) + "\n", "utf-8")
    return export, labels


DEMO_FEDERATION = "Demo chest X-ray federation"
DEMO_CHARTER = """# Charter of the Demo Chest X-ray Federation

A new version of this charter needs every hospital's signature again.

## Data use policy

Each hospital keeps its images and patient identifiers on its own premises. Only model
updates and counts leave a hospital, and only for the training plans it approves.

## Model ownership

Models trained together are owned jointly by the participating hospitals.

## Validation duties

After every round each hospital checks the shared model on its own held-out studies and
reports the figures (AUC, accuracy, sensitivity, specificity, loss, number of studies) only.

## Contribution expectations

Hospitals take part in the rounds of the plans they approved when they can, and keep their
labels current.

## Dispute resolution

A hospital raises a dispute through Tessera; the consortium lead answers within 30 days.

## Publication and authorship

Each participating hospital names at least one author on publications using a shared model.
"""


def _demo_config(coordinator_key: str = "") -> SiteConfig:
    return SiteConfig(
        site_id="demo-site-7f3a",
        site_name="Demo General Hospital",
        federation=DEMO_FEDERATION,
        coordinator_url="wss://coordinator.demo-consortium.example:8443",
        fingerprint=hashlib.sha256(b"tessera demo certificate").hexdigest(),
        coordinator_key=coordinator_key,
        enrolled_at=time.time() - 3 * 86400,
    )


def _demo_offers(site_dir: SiteDir, coordinator: Ed25519PrivateKey) -> list[str]:
    """Record a charter and two plans signed by ``coordinator``; returns the plan hashes."""
    now = time.time()
    governance = open_governance(site_dir)
    try:
        sha = charter_hash(DEMO_CHARTER)
        fields = signed.charter_fields(federation=DEMO_FEDERATION, version=1, sha256=sha)
        governance.record_charter(
            1, sha, DEMO_CHARTER, sign(coordinator, signed.CHARTER, fields), now - 2 * 86400
        )
        hashes: list[str] = []
        for i, (name, rounds) in enumerate((("chest-xray v1", 5), ("chest-xray v2", 20))):
            plan = demo_plan(rounds=rounds, name=name, quorum=2, min_sites=3)
            signature = sign(coordinator, signed.PLAN, signed.plan_fields(plan_hash=plan.plan_hash))
            governance.record_plan(plan.plan_hash, plan.to_dict(), signature, now - 86400 + i)
            hashes.append(plan.plan_hash)
        return hashes
    finally:
        governance.close()


def _demo_release_received(site_dir: SiteDir, coordinator: Ed25519PrivateKey) -> None:
    """A release of the first demo plan, kept and automatically accepted as the participant
    does with a real one (verified, then a signed verdict with the site's validation)."""
    from shared.crypto.keys import load_private_key
    from shared.releases import verify_release
    from site_client.core.governance_link import GovernanceLink
    from site_client.core.releases import acceptance, release_dir
    from site_client.gui.demo_release import write_demo_release

    plan = demo_plan(rounds=5, name="chest-xray v1", quorum=2, min_sites=3)
    folder = write_demo_release(
        release_dir(site_dir, "1.0"),
        key=coordinator,
        federation=DEMO_FEDERATION,
        plan=plan,
        charter=DEMO_CHARTER,
    )
    metrics = {"auc": 0.86, "accuracy": 0.79, "sensitivity": 0.76}
    metrics |= {"specificity": 0.82, "loss": 0.44, "n": 12}
    governance = open_governance(site_dir)
    try:
        link = GovernanceLink(governance, site_dir.load(), load_private_key(site_dir.key_file))
        verified = verify_release(folder, site_dir.load().coordinator_key)
        acceptance(link, verified, metrics, time.time())
    finally:
        governance.close()


def demo_snapshot(privacy_cap: float | None = None) -> Snapshot:
    """A run of 10 rounds at round 4, as the participant's phase events record it."""
    from site_client.core.participation import PrivacyBudget

    run = "run-3f9c2a71"
    events = [
        PhaseEvent("connecting"),
        PhaseEvent("connected", detail={"federation": DEMO_FEDERATION}),
    ]
    figures = [  # (train loss, AUC, accuracy, held-out loss) after each round
        (0.69, 0.71, 0.64, 0.66),
        (0.58, 0.78, 0.70, 0.59),
        (0.51, 0.83, 0.75, 0.53),
    ]
    for rnd, (train, auc, accuracy, loss) in enumerate(figures, start=1):
        events += [
            PhaseEvent("downloading", run, rnd, {"rounds": 10}),
            PhaseEvent("training", run, rnd),
            PhaseEvent("uploading", run, rnd, {"train_loss": train, "num_samples": 48}),
            PhaseEvent("accepted", run, rnd),
            PhaseEvent("validating", run, rnd),
            PhaseEvent(
                "validated",
                run,
                rnd,
                {"metrics": {"auc": auc, "accuracy": accuracy, "loss": loss, "n": 12}},
            ),
        ]
    events += [PhaseEvent("downloading", run, 4, {"rounds": 10}), PhaseEvent("training", run, 4)]
    snap = Snapshot(privacy=PrivacyBudget(cap=privacy_cap))
    for event in events:
        snap = apply(snap, event)
    return with_progress(snap, 37, 60)


def _demo_code() -> str:
    return encode_invitation(
        Invitation(
            coordinator_url="wss://coordinator.demo-consortium.example:8443",
            fingerprint=hashlib.sha256(b"tessera demo certificate").hexdigest(),
            token=new_token(),
            federation="Demo chest X-ray federation",
            expires_at=int(time.time()) + 7 * 86400,
        )
    )


def _save(widget: QWidget, path: Path) -> Path:
    QApplication.processEvents()
    if not widget.grab().save(str(path), "PNG"):
        raise OSError(f"cannot write {path}")
    return path


def render_screenshots(out_dir: Path, *, seed: int = 7) -> list[Path]:
    """Render the wizard and every page of the main window into ``out_dir``; returns the
    files written, in page order."""
    from site_client.gui.errors import ErrorReporter
    from site_client.gui.main_window import MainWindow
    from site_client.gui.pages.wizard import FirstRunWizard
    from site_client.gui.tasks import TaskRunner

    out_dir.mkdir(parents=True, exist_ok=True)
    errors = ErrorReporter()
    errors.dialogs = False
    runner = TaskRunner(errors)
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="tessera-screenshots-") as tmp:
        root = Path(tmp)
        export, labels = _demo_export(root, seed)

        wizard = FirstRunWizard(runner, initial_folder=root / "Tessera site data")
        wizard.show()
        written.append(_save(wizard, out_dir / "01-setup-data-folder.png"))
        wizard.next()
        wizard.invitation_page.code.setPlainText(_demo_code())
        wizard.invitation_page.site_name.setText("Demo General Hospital")
        wizard.invitation_page.confirm.setChecked(True)
        written.append(_save(wizard, out_dir / "02-setup-invitation.png"))
        wizard.close()

        site_dir = SiteDir(root / "site")
        coordinator = generate_signing_key()  # throwaway: it only signs the demo offers
        site_dir.save(_demo_config(public_key_b64(coordinator)))
        save_private_key(generate_signing_key(), site_dir.key_file)
        first_plan, second_plan = _demo_offers(site_dir, coordinator)
        _demo_release_received(site_dir, coordinator)
        window = MainWindow(site_dir, site_dir.load(), runner)
        window.resize(*SIZE)
        window.show()
        page = window.data_page
        page.import_panel.start_import(export)
        _wait(runner)
        page.import_panel.load_labels(labels)
        _wait(runner)
        page.tabs.setCurrentIndex(0)
        written.append(_save(window, out_dir / "03-data-import-and-labels.png"))
        page.tabs.setCurrentIndex(1)
        page.studies.select_first()
        _wait(runner)
        written.append(_save(window, out_dir / "04-data-studies.png"))
        page.tabs.setCurrentIndex(2)
        _wait(runner)  # showing a tab may refresh it in the background
        QApplication.processEvents()  # let the charts lay out and paint their bars
        written.append(_save(window, out_dir / "05-data-summary.png"))
        page.tabs.setCurrentIndex(3)
        page.pacs.callers.setPlainText("PACS1\nCT_SCANNER_2")
        page.pacs.host.setCurrentIndex(page.pacs.host.findData(LOOPBACK))
        page.pacs.port.setValue(_free_port())
        page.pacs.start()
        _wait(runner)
        written.append(_save(window, out_dir / "06-data-pacs-receiver.png"))
        page.pacs.stop_now()
        _wait(runner)

        window.show_page(1)
        governance = window.governance_page
        _wait(runner)
        governance.name.setText("Dr. Ada Byron")
        governance.charter.sign(1, "Dr. Ada Byron")
        _wait(runner)
        governance.tabs.setCurrentIndex(2)
        policy = governance.policy
        policy.hours.setText("19:00-07:00")
        policy.cpu.setValue(50)
        policy.save()
        _wait(runner)
        governance.tabs.setCurrentIndex(1)
        governance.plans.select(first_plan)
        governance.plans.approve()
        _wait(runner)
        view = governance.view
        if (
            view is None
            or view.charter is None
            or not view.charter.accepted_by
            or not view.plans
            or view.plans[-1].record.decision != "approve"
        ):
            raise RuntimeError(f"the demo decisions were not recorded: {view}")
        governance.tabs.setCurrentIndex(0)
        written.append(_save(window, out_dir / "07-governance-charter.png"))
        governance.tabs.setCurrentIndex(1)
        governance.plans.select(second_plan)
        written.append(_save(window, out_dir / "08-governance-plans.png"))
        governance.tabs.setCurrentIndex(2)
        written.append(_save(window, out_dir / "09-governance-policy.png"))
        window.show_page(2)
        window.participation_page.snapshot_changed.emit(demo_snapshot())  # as the service does
        written.append(_save(window, out_dir / "10-participation.png"))
        window.show_page(3)
        models = window.models_page
        _wait(runner)
        models.person.setText("Dr. Ada Byron")
        models.tabs.setCurrentIndex(0)
        written.append(_save(window, out_dir / "11-models-card.png"))
        models.tabs.setCurrentIndex(1)
        models.predict.use_folder.setChecked(True)
        models.predict.folder.setText(str(export / "scanner-b"))
        models.predict.start()
        _wait(runner)
        if models.predict.report is None or not models.predict.report.predicted:
            raise RuntimeError("the demo predictions were not made")
        written.append(_save(window, out_dir / "12-models-predictions.png"))
        window.show_page(4)
        _wait(runner)
        written.append(_save(window, out_dir / "13-activity.png"))
        window.show_page(5)
        written.append(_save(window, out_dir / "14-this-site.png"))
        window.close()
    if errors.last is not None:  # a page would show an error instead of the demo data
        raise RuntimeError(f"the demo failed: {errors.last.title}: {errors.last.text}")
    return written


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _wait(runner) -> None:
    if not runner.wait_idle(WAIT_S):
        raise TimeoutError(f"the demo's background work did not finish: {runner.activity()}")
