"""The site desktop app (PySide6): a thin view over ``site_client.core``.

Qt is imported only below this package (``tests/test_layering.py``). Start with
:mod:`site_client.gui.app`; background work goes through :mod:`site_client.gui.tasks` and
every error through :mod:`site_client.gui.errors`.
"""
