"""``tessera-site --self-test`` from source: every check runs on real data and passes, and a
failing check is named in the report and in the exit status."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from site_client.cli import main
from site_client.core.selftest import (
    CHECKS,
    SelfTestContext,
    Skipped,
    check_modules,
    run_self_test,
)


def test_every_check_passes_from_source(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    assert main(["--self-test"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Tessera site self-test: tessera ") and "(source)" in out[0]
    rows = [(line[2:9].strip(), line[10:28].strip()) for line in out[1:-1]]
    assert rows == [("ok", name) for name, _ in CHECKS] + [("ok", "main window")]
    assert out[-1] == f"self-test passed: {len(CHECKS) + 1} checks"
    text = "\n".join(out)
    assert "torch 2.13.0" in text
    assert "RLE, JPEG 2000, JPEG, JPEG-LS decoded" in text
    assert "child process trained on" in text
    assert "pages rendered on the 'offscreen' platform" in text


def _fails(ctx: SelfTestContext) -> str:
    raise RuntimeError("the disk is full")


def _skips(ctx: SelfTestContext) -> str:
    raise Skipped("no GUI module")


def test_a_failed_check_is_named_and_the_rest_still_run(tmp_path: Path) -> None:
    out = io.StringIO()
    report = run_self_test(
        out,
        checks=[("modules", check_modules), ("site database", _fails)],
        extra=[("main window", _skips)],
        work_dir=tmp_path,
    )
    assert report.failed == ("site database",)
    assert report.exit_code == 1
    lines = out.getvalue().splitlines()
    assert lines[1].startswith("  ok      modules")
    assert lines[2].startswith("  FAIL    site database      RuntimeError: the disk is full")
    assert lines[3].startswith("  skipped main window        skipped: no GUI module")
    assert lines[-1] == "self-test FAILED: site database"
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone


def test_a_check_that_needs_a_failed_one_says_so(tmp_path: Path) -> None:
    from site_client.core.selftest import check_dicom_import

    out = io.StringIO()
    report = run_self_test(
        out, checks=[("site database", _fails), ("dicom import", check_dicom_import)]
    )
    assert report.failed == ("site database", "dicom import")
    assert "not run: needs the site database check, which failed" in out.getvalue()


def test_self_test_takes_no_other_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--self-test", "--data-dir", "x"]) == 2
    assert "--self-test takes no other arguments" in capsys.readouterr().err
