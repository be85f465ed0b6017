"""Every command of both command lines is documented in docs/cli.md (after sqlite-utils)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from coordinator.cli import _parser as coordinator_parser
from site_client.cli import _parser as site_parser

DOCS = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text("utf-8")


def _commands(parser: argparse.ArgumentParser, prefix: str) -> list[str]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = _commands(sub, f"{prefix} {name}")
                found.extend(nested or [f"{prefix} {name}"])
    return found


COMMANDS = _commands(coordinator_parser(), "tessera-coordinator") + _commands(
    site_parser(), "tessera-site"
)


def test_the_scan_finds_the_commands() -> None:
    assert "tessera-coordinator plan add" in COMMANDS
    assert "tessera-site enrol" in COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_command_is_documented(command: str) -> None:
    assert f"`{command}" in DOCS, f"{command} is missing from docs/cli.md"


def test_the_example_plan_in_the_docs_is_valid() -> None:
    from shared.plan import load_plan

    path = Path(__file__).resolve().parents[1] / "docs" / "examples" / "plan.json"
    assert load_plan(path).architecture == "small_cnn"
