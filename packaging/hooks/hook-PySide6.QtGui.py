"""PySide6.QtGui, with only the Qt plugins the site app uses (see _qt_keep.py)."""

import os
import sys

from PyInstaller.utils.hooks.qt import add_qt6_dependencies

sys.path.insert(0, os.path.dirname(__file__))
from _qt_keep import filter_hook

hiddenimports, binaries, datas = add_qt6_dependencies(__file__)
binaries, datas = filter_hook(binaries, datas)
