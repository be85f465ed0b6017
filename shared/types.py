"""Identifier types shared by both sides (NewType: free at run time, checked by mypy)."""

from __future__ import annotations

from typing import NewType

SiteId = NewType("SiteId", str)
RunId = NewType("RunId", str)
PlanHash = NewType("PlanHash", str)  # hex SHA-256 of a plan's canonical JSON
Digest = NewType("Digest", str)  # hex SHA-256 of a payload (model, update, blob)
TransferId = NewType("TransferId", str)
