"""``tessera-site predict``: a verified release on local files, every bad file refused with a
reason, inputs prepared exactly as training prepares them, saliency maps, cancel.

The release is made by the coordinator's own code (a one-round run of the demo plan at 32x32,
so the weights are small_cnn's initial ones); the site side is the real command line.
"""

from __future__ import annotations

import csv
import hashlib
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
import torch
from torch import nn

import coordinator
from coordinator.config import CoordinatorConfig
from coordinator.federation import Federation
from coordinator.release import make_release
from shared.plan import demo_plan
from shared.synthetic import generate_federation
from shared.training import predict_scores
from site_client.cli import main
from site_client.core.config import SiteConfig, SiteDir
from site_client.core.intake.dataset import build_dataset
from site_client.core.intake.importer import import_folder
from site_client.core.intake.labels import attach_labels
from site_client.core.predict import (
    CSV_COLUMNS,
    grad_cam,
    load_release,
    overlay_png,
    predict_files,
)

CHARTER = Path(coordinator.__file__).parent / "templates" / "charter.md"
SHIPPED = Path(pydicom.data.__file__).parent / "test_files"
SIZE = 32


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A genuine release folder and the coordinator's public key."""
    root = tmp_path_factory.mktemp("coordinator")
    fed = Federation.init(root / "coord", CoordinatorConfig(federation="Predict test"), now=10.0)
    try:
        fed.publish_charter(CHARTER.read_bytes(), now=11.0)
        run = fed.start_run(fed.add_plan(demo_plan(rounds=1, input_size=SIZE), now=12.0))
        fed.store.open_round(run.run_id, 1, [], run.model_digest, 20.0, 80.0)
        fed.store.commit_round(run.run_id, 1, run.model_digest, 0, 0.5, True, 30.0)
        make_release(fed, run.run_id, "1.0", root / "release", now=40.0)
        return root / "release", fed.public_key()
    finally:
        fed.close()


@pytest.fixture
def site(tmp_path, release) -> SiteDir:
    site_dir = SiteDir(tmp_path / "site")
    site_dir.save(
        SiteConfig(
            site_id="site-predict",
            site_name="Predict Hospital",
            federation="Predict test",
            coordinator_url="wss://coordinator.test:8443",
            fingerprint=hashlib.sha256(b"cert").hexdigest(),
            coordinator_key=release[1],
            enrolled_at=time.time(),
        )
    )
    return site_dir


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        return list(reader)


def _is_png(data: bytes) -> bool:
    return data.startswith(b"\x89PNG\r\n\x1a\n")


def test_predict_runs_on_every_pydicom_test_file(site, release, tmp_path, capsys, monkeypatch):
    downloads: list[object] = []
    monkeypatch.setattr(
        pydicom.data.data_manager, "data_path_with_download", lambda *a, **k: downloads.append(a)
    )
    shipped = [Path(f) for f in pydicom.data.get_testdata_files() if os.path.isfile(f)]
    shipped = [f for f in shipped if SHIPPED in f.parents]
    assert downloads == [] and len(shipped) > 150
    out, saliency = tmp_path / "predictions.csv", tmp_path / "saliency"

    code = main(
        [
            "--data-dir",
            str(site.root),
            "predict",
            "--release",
            str(release[0]),
            "--folder",
            str(SHIPPED),
            "--out",
            str(out),
            "--saliency",
            str(saliency),
        ]
    )

    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "Traceback" not in printed.out + printed.err
    assert "release 1.0 of run" in printed.err and "verified" in printed.err
    rows = {r["file"]: r for r in _rows(out)}
    for path in shipped:  # every file: predicted, or refused with a reason
        row = rows[str(path.relative_to(SHIPPED))]
        assert row["release_version"] == "1.0"
        if row["status"] == "predicted":
            assert 0.0 <= float(row["probability"]) <= 1.0
            assert row["predicted_label"] == str(int(float(row["probability"]) >= 0.5))
            assert row["reason"] == "" and row["frame"] != ""
            assert _is_png((saliency / row["saliency"]).read_bytes())
        else:
            assert row["status"] == "refused" and row["probability"] == ""
            assert "[data." in row["reason"] and "Traceback" not in row["reason"]
    predicted = [r for r in rows.values() if r["status"] == "predicted"]
    assert len(predicted) > 40
    assert len(list(saliency.iterdir())) == len(predicted)
    ct = rows["CT_small.dcm"]
    assert ct["status"] == "predicted" and ct["frame"] == "0"
    assert ct["sop_uid"] == str(pydicom.dcmread(SHIPPED / "CT_small.dcm").SOPInstanceUID)
    assert rows["README.txt"]["reason"].endswith("[data.not_dicom]")
    assert rows["examples_rgb_color.dcm"]["reason"].endswith("[data.unsupported_photometric]")
    assert rows["reportsi.dcm"]["reason"].endswith("[data.no_pixels]")
    assert rows["MR_truncated.dcm"]["status"] == "refused"
    assert f"{len(predicted)} image(s) predicted" in printed.out


def test_imported_studies_are_prepared_exactly_as_for_training(site, release, tmp_path, capsys):
    data = generate_federation(
        tmp_path / "fed", sites=1, seed=2, images_per_site=8, test_images=0, image_size=48
    )
    index = site.open_index()
    try:
        import_folder(index, data.sites[0].dicom_dir)
        attach_labels(index, data.sites[0].labels_csv)
        studies = sorted({r.study_uid for r in index.instances()})
        training = build_dataset(index, tmp_path / "cache", input_size=SIZE, holdout_fraction=0.25)
    finally:
        index.close()
    out = tmp_path / "studies.csv"
    args = ["--data-dir", str(site.root), "predict", "--release", str(release[0]), "--out"]
    assert main([*args, str(out), "--studies", *studies]) == 0
    rows = _rows(out)
    assert sorted({r["study_uid"] for r in rows}) == studies
    assert all(r["status"] == "predicted" for r in rows) and len(rows) == 8

    model = load_release(release[0], release[1]).model
    images = np.concatenate([training.train_images, training.holdout_images])
    expected = np.sort(predict_scores(model, images))
    assert np.allclose(np.sort([float(r["probability"]) for r in rows]), expected, atol=1e-6)

    assert main([*args, str(tmp_path / "x.csv"), "--studies", "1.2.3.4.5"]) == 2
    assert "[data.unknown_study]" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


def test_an_altered_release_is_not_used(site, release, tmp_path, capsys):
    altered = tmp_path / "altered"
    altered.mkdir()
    for f in release[0].iterdir():
        (altered / f.name).write_bytes(f.read_bytes())
    weights = bytearray((altered / "model.safetensors").read_bytes())
    weights[-3] ^= 0x10
    (altered / "model.safetensors").write_bytes(bytes(weights))
    out = tmp_path / "predictions.csv"
    code = main(
        [
            *("--data-dir", str(site.root), "predict", "--release", str(altered)),
            *("--folder", str(SHIPPED), "--out", str(out)),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "[release.weights_mismatch]" in err and "Do not use this release" in err
    assert not out.exists()


def test_predict_needs_an_enrolled_site(release, tmp_path, capsys):
    code = main(
        [
            *("--data-dir", str(tmp_path / "nobody"), "predict"),
            *("--release", str(release[0]), "--folder", str(SHIPPED)),
        ]
    )
    assert code == 2
    assert "[config.not_enrolled]" in capsys.readouterr().err


def test_cancel_keeps_what_was_predicted(release, tmp_path):
    loaded = load_release(*release)
    files = sorted(SHIPPED.glob("*.dcm"))[:30]
    seen: list[tuple[int, int]] = []
    out = tmp_path / "partial.csv"
    report = predict_files(
        loaded,
        files,
        out_csv=out,
        progress=lambda done, total: seen.append((done, total)),
        should_stop=lambda: bool(seen) and seen[-1][0] >= 6,
        batch_size=4,
    )
    assert report.cancelled and 6 <= len(report.predictions) < len(files) == report.total
    assert [p.file for p in report.predictions] == [str(f) for f in files[: report.total]][
        : len(report.predictions)
    ]
    assert all(total == len(files) for _, total in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert len(_rows(out)) == len(report.predictions)
    assert "cancelled after" in report.summary()


class _Brightness(nn.Module):
    """Logit = mean of ReLU(image): the evidence is exactly where the image is bright."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, kernel_size=1, bias=False)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        nn.init.ones_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.act(self.conv(x))), 1)


def test_grad_cam_points_at_what_drives_the_output():
    model = _Brightness().eval().requires_grad_(False)
    images = -np.ones((2, 1, 16, 16), dtype=np.float32)
    images[0, 0, 2:6, 10:14] = 3.0  # a bright patch top right
    images[1, 0, 12:15, 1:4] = 2.0  # bottom left
    probabilities, cams = grad_cam(model, model.act, images)
    assert np.allclose(probabilities, predict_scores(model, images), atol=1e-6)
    assert cams.shape == (2, 16, 16) and cams.min() >= 0.0 and cams.max() <= 1.0
    patches = [(slice(2, 6), slice(10, 14)), (slice(12, 15), slice(1, 4))]
    for image, cam, (rows, cols) in zip(images, cams, patches, strict=True):
        y, x = np.unravel_index(np.argmax(cam), cam.shape)
        assert rows.start <= y < rows.stop and cols.start <= x < cols.stop
        assert cam[rows, cols].min() == pytest.approx(1.0)
        assert cam[image[0] < 0].max() == 0.0  # no evidence where the image is dark


def test_saliency_picture_is_a_well_formed_png():
    image = np.linspace(-1, 1, 32 * 32, dtype=np.float32).reshape(1, 32, 32)
    cam = np.zeros((32, 32), dtype=np.float32)
    cam[:16] = 1.0
    data = overlay_png(image, cam, side=64)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks[kind] = body
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (width, height, depth, colour) == (64, 64, 8, 2)
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(64, 1 + 64 * 3)
    assert (rows[:, 0] == 0).all()
    pixels = rows[:, 1:].reshape(64, 64, 3).astype(int)
    top, bottom = pixels[:20], pixels[44:]
    assert (top[..., 0] - top[..., 2]).mean() > 40  # the map's half is tinted
    assert np.abs(bottom[..., 0] - bottom[..., 2]).max() == 0  # the rest stays grey
