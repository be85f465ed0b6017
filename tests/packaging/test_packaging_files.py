"""The packaging files that need no build: the bundle's entry script, the Qt plugin choice
and the Linux desktop entry (the build itself is tested in ``test_bundle.py``)."""

from __future__ import annotations

import configparser
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGING = ROOT / "packaging"
ENTRY = PACKAGING / "tessera_site_main.py"


def _qt_keep():
    spec = importlib.util.spec_from_file_location("_qt_keep", PACKAGING / "hooks" / "_qt_keep.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("plugin", "kept"),
    [
        ("platforms/libqxcb.so", True),
        ("platforms/libqoffscreen.so", True),
        ("platforms/libqwayland-egl.so", False),
        ("platforms/libqvnc.so", False),
        ("platformthemes/libqgtk3.so", False),
        ("imageformats/libqjpeg.so", False),
        ("iconengines/libqsvgicon.so", False),
        ("xcbglintegrations/libqxcb-glx-integration.so", False),
        ("platforminputcontexts/libcomposeplatforminputcontextplugin.so", True),
    ],
)
def test_only_the_qt_plugins_the_app_uses_are_kept(plugin: str, kept: bool) -> None:
    keep = _qt_keep()
    folder = plugin.split("/")[0]
    src = f"/venv/PySide6/Qt/plugins/{plugin}"
    assert keep.keep_binary((src, f"PySide6/Qt/plugins/{folder}")) is kept
    assert keep.keep_binary(("/venv/PySide6/Qt/lib/libQt6Gui.so.6", "PySide6/Qt/lib"))


def test_translations_are_left_out() -> None:
    keep = _qt_keep()
    binaries, datas = keep.filter_hook(
        [("/q/plugins/platforms/libqxcb.so", "PySide6/Qt/plugins/platforms")],
        [
            ("/q/translations/qtbase_de.qm", "PySide6/Qt/translations"),
            ("/q/resources/icudtl.dat", "PySide6/Qt/resources"),
        ],
    )
    assert [d[1] for d in datas] == ["PySide6/Qt/resources"]
    assert len(binaries) == 1


def _entry(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ENTRY), *args],
        cwd=ROOT,
        input="",
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_entry_runs_the_training_process_as_python_m_would() -> None:
    """The bundle's trainer starts ``tessera-site -m site_client.core.train_worker --serve``;
    with no job on its input the worker ends at once, cleanly."""
    result = _entry("-m", "site_client.core.train_worker", "--serve")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


def test_the_entry_runs_no_other_module() -> None:
    result = _entry("-m", "http.server")
    assert result.returncode == 2
    assert "only '-m site_client.core.train_worker' is available" in result.stderr


def test_the_desktop_entry_starts_the_installed_app() -> None:
    entry = configparser.ConfigParser(interpolation=None)
    entry.optionxform = str  # keys are case-sensitive
    entry.read(PACKAGING / "linux" / "tessera-site.desktop", encoding="utf-8")
    desktop = entry["Desktop Entry"]
    assert desktop["Type"] == "Application"
    assert desktop["Exec"] == desktop["TryExec"] == "/opt/tessera-site/tessera-site"
    assert desktop["Terminal"] == "false"
    assert (PACKAGING / "linux" / f"{desktop['Icon']}.svg").is_file()
    assert (PACKAGING / "linux" / f"{desktop['Icon']}.png").is_file()
    assert desktop["Categories"].endswith(";")
    guide = (ROOT / "docs" / "install-site.md").read_text("utf-8")
    assert "/opt/tessera-site" in guide  # the guide installs where the entry points
