"""What the site app's status bar says about the connection to the coordinator.

Participants in real deployments keep asking "what is running at my site right now?", so the
status bar always answers it in words. The states are the participant's (a site opens one
outbound connection only while it takes part in training); the words are here so that the
command line, the log and the app say the same thing.
"""

from __future__ import annotations

from enum import Enum
from urllib.parse import urlsplit

__all__ = ["Connection", "connection_text"]


class Connection(Enum):
    NOT_ENROLLED = "not_enrolled"
    OFFLINE = "offline"  # enrolled; not taking part in training, so no connection is open
    CONNECTING = "connecting"
    CONNECTED = "connected"
    FAILED = "failed"


def connection_text(state: Connection, coordinator_url: str = "") -> tuple[str, str]:
    """(short text for the status bar, longer explanation for its tooltip)."""
    host = urlsplit(coordinator_url).hostname or coordinator_url or "the coordinator"
    if state is Connection.NOT_ENROLLED:
        return (
            "Not enrolled",
            "This site has not joined a federation yet: enrol with an invitation code.",
        )
    if state is Connection.OFFLINE:
        return (
            "Not connected",
            f"This site opens a connection to {host} only while it takes part in training. "
            "Nothing is being sent now.",
        )
    if state is Connection.CONNECTING:
        return (f"Connecting to {host}", f"Opening an encrypted connection to {host}.")
    if state is Connection.CONNECTED:
        return (f"Connected to {host}", f"An encrypted connection to {host} is open.")
    return (
        f"Cannot reach {host}",
        f"The last attempt to reach {host} failed; check the network connection.",
    )
