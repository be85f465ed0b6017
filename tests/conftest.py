"""Test-wide settings.

In CI (``CI=true``) hypothesis runs derandomized: the same examples on every run, so a green
run on a developer's machine with ``CI=true`` predicts CI exactly. Locally it explores new
examples each run, which is where new failures are found.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")
