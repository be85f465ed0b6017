"""Which Qt plugins and translations the site bundle keeps (shared by the three Qt hooks).

PyInstaller's own hooks for ``PySide6.QtCore``, ``QtGui`` and ``QtWidgets`` collect every
plugin of every type those modules may use (Wayland, EGL, image formats, icon engines, ...) and
every translation. The site app draws plain widgets, in English, into a window or offscreen;
these hooks, found first because the spec puts this folder on ``hookspath``, call the same
helper and keep only the plugins below. They filter *before* PyInstaller's binary dependency
analysis, so the system libraries of a plugin left out (GTK for the gtk3 theme, Wayland, EGL)
are never pulled in either.
"""

from __future__ import annotations

import os

#: plugin folder -> file names kept, for Linux, Windows and macOS (only Linux is built here)
KEEP = {
    "platforms": {
        "libqxcb.so",  # X11 (and XWayland) desktops
        "libqoffscreen.so",  # no display: --self-test, screenshots
        "qwindows.dll",
        "qoffscreen.dll",
        "libqcocoa.dylib",
        "libqoffscreen.dylib",
    },
    "platforminputcontexts": {
        "libcomposeplatforminputcontextplugin.so",  # dead keys: accented names in forms
        "libibusplatforminputcontextplugin.so",  # the usual input method on Linux desktops
    },
    "platformthemes": {"libqxdgdesktopportal.so"},  # native file dialogs through the portal
    "styles": {"qmodernwindowsstyle.dll", "libqmacstyle.dylib"},
}


def keep_binary(entry: tuple[str, str]) -> bool:
    """``entry`` is a hook's ``(source, destination folder)``; non-plugins are kept."""
    src, dest = entry
    parts = dest.replace("\\", "/").split("/")
    if "plugins" not in parts:
        return True
    kind = parts[parts.index("plugins") + 1] if parts[-1] != "plugins" else ""
    return os.path.basename(src) in KEEP.get(kind, set())


def filter_hook(binaries: list, datas: list) -> tuple[list, list]:
    """Plugins as in :data:`KEEP`; no translations (the app's own texts are English)."""
    kept = [b for b in binaries if keep_binary(b)]
    no_translations = [d for d in datas if "translations" not in d[1].replace("\\", "/")]
    return kept, no_translations
