"""The provenance error, until it joins the tree in :mod:`shared.errors`.

Codes::

    provenance.rewritten       a new tree head is not an extension of the last one seen
    provenance.shrunk          a new tree head has fewer entries than the last one seen
    provenance.bad_signature   a tree head is not signed by the coordinator's key
    provenance.missing_entry   an entry is not in the tree under a head (or not at its index)
    provenance.unknown_head    a head the witness never verified was used for a check
    provenance.bad_entry       a log entry that cannot be built (bad index, kind, time, payload)
    provenance.bad_head        a tree head that cannot be built (bad size, root or timestamp)
    provenance.bad_state       stored witness state that is damaged or for another coordinator
    provenance.out_of_range    a proof asked for an index or size the log does not have (our bug)
"""

from __future__ import annotations

from shared.errors import TesseraError

__all__ = ["ProvenanceError"]


class ProvenanceError(TesseraError):
    """The verifiable log or a site's check of it failed; ``code`` says which way."""

    code = "provenance.error"
