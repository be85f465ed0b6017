"""The federation's charter: versioned Markdown terms that every site signs before it trains.

A charter must cover the topics a multi-centre imaging study agrees before it starts (data use,
model ownership, validation duties, contributions, disputes, publication and authorship); a
draft that leaves one out is refused with the list of what is missing, because a site that
signed terms silent on, say, authorship has signed less than the consortium thinks.
Identity is the SHA-256 of the exact UTF-8 bytes: what a site signs is that hash and the
version number, so the text itself never needs to travel with a signature.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from shared.errors import GovernanceError

MAX_CHARTER_BYTES = 200_000  # it travels to every site inside one message header

#: topic -> words of which one must appear in a Markdown heading of the charter.
REQUIRED_TOPICS: dict[str, tuple[str, ...]] = {
    "data-use policy": ("data use", "data-use"),
    "model ownership": ("ownership", "owner"),
    "validation duties": ("validation",),
    "contribution expectations": ("contribution",),
    "dispute resolution": ("dispute",),
    "publication and authorship": ("publication", "authorship"),
}

_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Charter:
    version: int
    text: str

    @property
    def sha256(self) -> str:
        return charter_hash(self.text)

    @property
    def title(self) -> str:
        headings = _HEADING.findall(self.text)
        return headings[0] if headings else "Charter"


def charter_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_charter_text(data: bytes) -> str:
    """The charter text from a file's bytes, or ``GovernanceError`` saying what to fix."""
    if len(data) > MAX_CHARTER_BYTES:
        raise GovernanceError(
            f"The charter is {len(data)} bytes; keep it under {MAX_CHARTER_BYTES} bytes "
            "(terms, not attachments).",
            code="governance.charter_invalid",
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GovernanceError(
            f"The charter is not UTF-8 text (byte {exc.start}); save it as UTF-8 Markdown.",
            code="governance.charter_invalid",
        ) from exc
    if not text.strip():
        raise GovernanceError("The charter is empty.", code="governance.charter_invalid")
    missing = missing_topics(text)
    if missing:
        raise GovernanceError(
            "The charter has no section on: "
            + ", ".join(missing)
            + ". Add a Markdown heading for each (for example '## Dispute resolution').",
            code="governance.charter_incomplete",
            missing=missing,
        )
    return text


def missing_topics(text: str) -> list[str]:
    headings = " | ".join(h.lower() for h in _HEADING.findall(text))
    return [
        topic
        for topic, words in REQUIRED_TOPICS.items()
        if not any(word in headings for word in words)
    ]
