"""The verifiable provenance log (see DESIGN.md, "Provenance").

* :mod:`shared.provenance.merkle`: RFC 6962 Merkle tree hashing, inclusion and consistency
  proofs, verified with the algorithms of RFC 9162.
* :mod:`shared.provenance.log`: log entries (canonical JSON leaves), signed tree heads and the
  coordinator's in-memory log.
* :mod:`shared.provenance.witness`: what a site keeps of the log and the checks it runs.

All pure: no clock, no storage, no network. Errors are ``ProvenanceError`` (codes
``provenance.*``, listed in :mod:`shared.provenance.errors`).
"""

from __future__ import annotations

from shared.provenance.errors import ProvenanceError
from shared.provenance.log import TREE_HEAD_PURPOSE, LogEntry, ProvenanceLog, TreeHead
from shared.provenance.witness import Witness

__all__ = [
    "TREE_HEAD_PURPOSE",
    "LogEntry",
    "ProvenanceError",
    "ProvenanceLog",
    "TreeHead",
    "Witness",
]
