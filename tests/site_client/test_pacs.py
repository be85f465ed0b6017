"""PACS push end to end: dcmtk's storescu/echoscu as the real client, loopback sockets, real
DICOM files (pydicom's own test files) and the real study index."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from site_client.core.config import SiteDir
from site_client.core.intake import pacs
from site_client.core.intake.pacs import PacsReceiver, PacsReceiverError, inbox_path

ROOT = Path(__file__).resolve().parents[2]
DCMTK = ("storescu", "echoscu", "dcmconv")


@pytest.fixture(scope="module", autouse=True)
def _require_dcmtk() -> None:
    missing = [tool for tool in DCMTK if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: the PACS tests need dcmtk as the real DICOM "
            "client. Install the Debian package dcmtk (make test does it via .ci/system-deps)."
        )


def _testfile(name: str) -> Path:
    """A file that pydicom's wheel ships (never downloaded)."""
    return Path(get_testdata_file(name, download=False))


@pytest.fixture
def site(tmp_path: Path) -> SiteDir:
    return SiteDir(tmp_path / "site")


@pytest.fixture
def receiver(site: SiteDir):
    with PacsReceiver.for_site(
        site, ae_title="TESSERA", port=0, allowed_aes=["PACS1", "PACS2"], host="127.0.0.1"
    ) as rx:
        yield rx


def _dcmtk(
    tool: str, port: int, *options: str, files: tuple[Path, ...] = (), aet: str = "PACS1"
) -> subprocess.CompletedProcess:
    """Run a dcmtk client (storescu, echoscu) against the receiver on loopback."""
    command = [tool, *options, "-aet", aet, "-aec", "TESSERA", "-to", "5", "127.0.0.1", str(port)]
    command += [str(f) for f in files]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


def _storescu(
    port: int, *files: Path, flags: tuple[str, ...] = (), aet: str = "PACS1"
) -> subprocess.CompletedProcess:
    # -R: propose only each file's own SOP class and transfer syntax, so it travels as it is
    return _dcmtk("storescu", port, "-R", *flags, files=files, aet=aet)


def test_echoscu_gets_an_answer(receiver: PacsReceiver) -> None:
    out = _dcmtk("echoscu", receiver.port)
    assert out.returncode == 0, out.stderr


# (pydicom test file, storescu flag that proposes its transfer syntax as it is)
PUSHES = {
    "uncompressed": ("CT_small.dcm", ()),
    "jpeg2000-lossless": ("MR_small_jp2klossless.dcm", ("-xv",)),
    "jpeg2000": ("JPEG2000.dcm", ("-xw",)),
    "jpeg-baseline": ("SC_rgb_jpeg_dcmtk.dcm", ("-xy",)),
    "jpeg-lossless": ("SC_rgb_jpeg_gdcm.dcm", ("-xs",)),
    "jpeg-ls": ("MR_small_jpeg_ls_lossless.dcm", ("-xt",)),
    "rle": ("MR_small_RLE.dcm", ("-xr",)),
}


@pytest.mark.parametrize("kind", PUSHES)
def test_a_pushed_object_is_stored_as_sent_and_indexed(
    kind: str, receiver: PacsReceiver, site: SiteDir
) -> None:
    name, flags = PUSHES[kind]
    sent = pydicom.dcmread(_testfile(name))
    out = _storescu(receiver.port, _testfile(name), flags=flags)
    assert out.returncode == 0, out.stderr
    assert receiver.wait_imported(timeout=15)

    index = site.open_index()
    try:
        record = index.instance(sent.SOPInstanceUID)
    finally:
        index.close()
    assert record is not None, f"{name} is not in the index"
    assert record.transfer_syntax == sent.file_meta.TransferSyntaxUID
    stored = Path(record.path)
    assert stored == inbox_path(site.pacs_inbox, sent.StudyInstanceUID, sent.SOPInstanceUID)
    got = pydicom.dcmread(stored)
    # kept as received: same transfer syntax, same (still compressed) pixel bytes
    assert got.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
    assert got.file_meta.SourceApplicationEntityTitle == "PACS1"
    assert got.PixelData == sent.PixelData
    assert not list(site.pacs_inbox.rglob("*.part"))
    counts = receiver.counts()
    assert (counts.received, counts.indexed, counts.failed, counts.pending) == (1, 1, 0, 0)


def test_a_deflated_push_is_stored_and_indexed(
    tmp_path: Path, receiver: PacsReceiver, site: SiteDir
) -> None:
    deflated = tmp_path / "deflated.dcm"
    subprocess.run(["dcmconv", "+td", str(_testfile("CT_small.dcm")), str(deflated)], check=True)
    out = _storescu(receiver.port, deflated, flags=("-xd",))
    assert out.returncode == 0, out.stderr
    assert receiver.wait_imported(timeout=15)
    index = site.open_index()
    try:
        record = index.instance(pydicom.dcmread(deflated).SOPInstanceUID)
    finally:
        index.close()
    assert record is not None
    assert record.transfer_syntax == pydicom.uid.DeflatedExplicitVRLittleEndian


def test_a_study_in_one_association_is_imported_once_stopped(site: SiteDir) -> None:
    files = [_testfile(n) for n in ("CT_small.dcm", "MR_small.dcm", "SC_rgb_small_odd.dcm")]
    rx = PacsReceiver.for_site(site, ae_title="TESSERA", port=0, allowed_aes="PACS2")
    rx.start()
    out = _storescu(rx.port, *files, aet="PACS2")
    rx.stop()  # no wait: stop() imports everything it received first
    assert out.returncode == 0, out.stderr
    index = site.open_index()
    try:
        for f in files:
            assert index.instance(pydicom.dcmread(f).SOPInstanceUID) is not None
    finally:
        index.close()
    assert rx.counts().received == 3


def test_an_ae_title_not_on_the_allow_list_is_refused(
    receiver: PacsReceiver, site: SiteDir
) -> None:
    out = _storescu(receiver.port, _testfile("CT_small.dcm"), aet="INTRUDER")
    assert out.returncode != 0
    assert "Calling AE Title Not Recognized" in out.stderr
    echo = _dcmtk("echoscu", receiver.port, aet="INTRUDER")
    assert echo.returncode != 0
    assert receiver.wait_imported(timeout=5)
    index = site.open_index()
    try:
        assert index.count("instances") == 0
    finally:
        index.close()
    assert not list(site.pacs_inbox.rglob("*.dcm"))
    assert receiver.counts().refused == 2 and receiver.counts().received == 0


def test_a_port_in_use_is_a_clear_error(site: SiteDir) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rx = PacsReceiver.for_site(site, ae_title="TESSERA", port=port, allowed_aes=["PACS1"])
        with pytest.raises(PacsReceiverError, match=f"Port {port} on 127.0.0.1 is already in use"):
            rx.start()
    assert not rx.running


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"allowed_aes": []}, "Name at least one PACS AE title"),
        ({"ae_title": "BAD\\TITLE"}, "'BAD\\\\\\\\TITLE' is not a valid DICOM AE title"),
        ({"ae_title": "A" * 17}, "is not a valid DICOM AE title"),
        ({"allowed_aes": [""]}, "The allowed AE title '' is not a valid"),
        ({"port": 70000}, "Port 70000 is not a TCP port"),
    ],
)
def test_bad_settings_are_refused_with_a_reason(site: SiteDir, kwargs, message) -> None:
    settings = {"ae_title": "TESSERA", "port": 0, "allowed_aes": ["PACS1"]} | kwargs
    with pytest.raises(PacsReceiverError, match=message):
        PacsReceiver.for_site(site, **settings)


def _scu_store(port: int, ds: Dataset) -> int:
    ae = AE(ae_title="PACS1")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="TESSERA")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def _echo_ok(port: int) -> bool:
    ae = AE(ae_title="PACS1")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="TESSERA")
    try:
        return assoc.is_established and int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()


def test_bad_peers_get_a_failure_status_and_the_receiver_keeps_going(
    receiver: PacsReceiver, site: SiteDir, monkeypatch
) -> None:
    ds = pydicom.dcmread(_testfile("CT_small.dcm"))
    del ds.StudyInstanceUID
    assert _scu_store(receiver.port, ds) == pacs.STATUS_CANNOT_UNDERSTAND

    ds = pydicom.dcmread(_testfile("CT_small.dcm"))
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        ds.SOPInstanceUID = "1.2.3.x"  # a file name must come from a real UID, never "../.."
        assert _scu_store(receiver.port, ds) == pacs.STATUS_CANNOT_UNDERSTAND

    with socket.create_connection(("127.0.0.1", receiver.port)) as raw:
        raw.sendall(os.urandom(300))  # not DICOM at all

    def disk_full(path, parts):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pacs, "write_durably", disk_full)
    assert _scu_store(receiver.port, pydicom.dcmread(_testfile("CT_small.dcm"))) == 0xA700
    monkeypatch.undo()

    assert _echo_ok(receiver.port)
    assert _scu_store(receiver.port, pydicom.dcmread(_testfile("CT_small.dcm"))) == 0
    assert receiver.wait_imported(timeout=15)
    counts = receiver.counts()
    assert (counts.failed, counts.received, counts.indexed) == (3, 1, 1)
    assert len(list(site.pacs_inbox.rglob("*.dcm"))) == 1


def test_objects_left_in_the_inbox_are_imported_at_start(site: SiteDir) -> None:
    sent = pydicom.dcmread(_testfile("CT_small.dcm"))
    left = inbox_path(site.pacs_inbox, sent.StudyInstanceUID, sent.SOPInstanceUID)
    left.parent.mkdir(parents=True)
    shutil.copyfile(_testfile("CT_small.dcm"), left)
    half_written = left.parent / ".xyz.part"
    half_written.write_bytes(b"\0" * 10)
    with PacsReceiver.for_site(site, ae_title="TESSERA", port=0, allowed_aes=["PACS1"]) as rx:
        assert rx.wait_imported(timeout=15)
    assert not half_written.exists()
    index = site.open_index()
    try:
        assert index.instance(sent.SOPInstanceUID) is not None
    finally:
        index.close()


def test_the_cli_listens_until_interrupted(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "site_client.cli", "--data-dir", str(tmp_path / "site")]
    cmd += ["pacs-listen", "--ae-title", "TESSERA", "--port", str(port)]
    cmd += ["--allow-ae", "PACS1", "--allow-ae", "PACS2", "--host", "127.0.0.1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if "receiving DICOM" in line or not line:
                break
        assert "receiving DICOM as TESSERA" in lines[-1], "".join(lines)
        out = _storescu(port, _testfile("CT_small.dcm"), aet="PACS2")
        assert out.returncode == 0, out.stderr
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=20)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest
    log = "".join(lines) + rest
    assert re.search(r"received CT Image Storage [0-9a-f]{10} \(Explicit VR Little Endian\)", log)
    # no patient data in the log: not the UIDs, not the name
    sent = pydicom.dcmread(_testfile("CT_small.dcm"))
    assert sent.SOPInstanceUID not in log and str(sent.PatientName) not in log
    assert "received 1, indexed 1" in rest
