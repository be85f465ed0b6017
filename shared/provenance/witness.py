"""What a site keeps of the coordinator's provenance log, and the checks it runs (pure core).

Theory of operation
-------------------
A site cannot hold the whole log, and does not need to. It keeps the signed tree heads it has
accepted (a few hundred bytes per round) and, for each new head the coordinator presents,
checks two things before accepting it:

1. the head is signed by the coordinator's key, pinned at enrolment
   (``provenance.bad_signature`` otherwise);
2. the new tree extends the last one this site accepted: it is not smaller
   (``provenance.shrunk``), and a consistency proof (RFC 9162 section 2.1.4) shows that the
   old tree is a prefix of the new one (``provenance.rewritten`` otherwise).

If any entry the site has already seen under a head were changed, removed, inserted or moved,
the old root could no longer be a prefix of the new one, so no proof exists; the check fails
and the site stops taking part. The first head a site sees is accepted on its signature alone
(trust on first use, like the pinned key itself).

The site also checks that its own contributions (its enrolment, its charter signature, its
updates) are in the log, with an inclusion proof against a head it accepted
(``provenance.missing_entry``). It refuses to check against a head it never accepted
(``provenance.unknown_head``): a head that skipped the consistency check could belong to a
forked history shown only to this site.

The state (:meth:`Witness.to_dict`) is plain JSON for the site to store; :meth:`from_dict`
re-checks every signature so a damaged or edited file is refused (``provenance.bad_state``).
Not checked here, and left to the caller: that a head's timestamp is recent (the core reads no
clock), and that an entry's payload says what the site actually sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.crypto.keys import public_key_b64, public_key_from_b64
from shared.errors import CryptoError
from shared.provenance import merkle
from shared.provenance.errors import ProvenanceError
from shared.provenance.log import LogEntry, TreeHead

__all__ = ["STATE_VERSION", "Witness"]

STATE_VERSION = 1

_STOP = "Stop taking part in this federation and contact the consortium lead."


class Witness:
    """The tree heads one site accepted from one coordinator, oldest first."""

    def __init__(self, coordinator_public_key: Ed25519PublicKey | str) -> None:
        if isinstance(coordinator_public_key, str):
            public_key_from_b64(coordinator_public_key)  # CryptoError for text that is no key
            self._key = coordinator_public_key
        else:
            self._key = public_key_b64(coordinator_public_key)
        self._heads: list[TreeHead] = []

    @property
    def coordinator_public_key(self) -> str:
        return self._key

    @property
    def head(self) -> TreeHead | None:
        """The last head accepted, or ``None`` before the first."""
        return self._heads[-1] if self._heads else None

    @property
    def heads(self) -> tuple[TreeHead, ...]:
        """Every head accepted, one per size, oldest first (for the site's own records)."""
        return tuple(self._heads)

    def observe(self, new_head: TreeHead, consistency_proof: Sequence[bytes]) -> None:
        """Accept ``new_head`` if it is signed and extends the last head, else raise.

        ``consistency_proof`` proves the last accepted head's tree is a prefix of the new
        one (the coordinator's ``ProvenanceLog.consistency(last.size, new.size)``); it is not
        used for the first head. Nothing changes when this raises.
        """
        new_head.verify(self._key)
        last = self.head
        if last is None:
            self._heads.append(new_head)
            return
        if new_head.size == last.size and new_head.root == last.root:
            self._heads[-1] = new_head  # the same tree again (a repeated answer): no proof needed
            return
        if new_head.size < last.size:
            raise ProvenanceError(
                f"The coordinator's record of history got shorter: this site saw {last.size} "
                f"entries, and the coordinator now shows {new_head.size}. Entries that were "
                f"recorded have been removed. {_STOP}",
                code="provenance.shrunk",
                old_size=last.size,
                new_size=new_head.size,
            )
        if not merkle.verify_consistency(
            last.size,
            new_head.size,
            last.root_bytes,
            new_head.root_bytes,
            list(consistency_proof) if isinstance(consistency_proof, list | tuple) else [],
        ):
            raise ProvenanceError(
                f"The coordinator's record of history changed: its new record of "
                f"{new_head.size} entries does not continue the {last.size} entries this site "
                f"saw before, so something already recorded was altered, removed or "
                f"reordered (or the coordinator could not prove otherwise). {_STOP}",
                code="provenance.rewritten",
                old_size=last.size,
                new_size=new_head.size,
            )
        if new_head.size == last.size:
            self._heads[-1] = new_head  # same tree, fresher signature
        else:
            self._heads.append(new_head)

    def check_inclusion(
        self, entry: LogEntry, proof: Sequence[bytes], head: TreeHead | None = None
    ) -> None:
        """Return if ``entry`` is in the tree of ``head`` (default: the last accepted head).

        ``head`` must be one this witness accepted (same size and root). Raises
        ``provenance.missing_entry`` when the proof does not hold.
        """
        if head is None:
            head = self.head
            if head is None:
                raise ProvenanceError(
                    "This site has not accepted any record of history from the coordinator "
                    "yet, so it cannot check that its contributions are recorded. Wait for the "
                    "next round and try again.",
                    code="provenance.unknown_head",
                )
        elif not any(h.size == head.size and h.root == head.root for h in self._heads):
            raise ProvenanceError(
                f"The record of history of {head.size} entries was not checked by this site "
                "before, so it cannot be used to check the site's contributions. Accept it "
                "first (this is a bug in Tessera; please report it).",
                code="provenance.unknown_head",
                size=head.size,
            )
        if not merkle.verify_inclusion(
            entry.leaf_hash(),
            entry.index,
            head.size,
            list(proof) if isinstance(proof, list | tuple) else [],
            head.root_bytes,
        ):
            raise ProvenanceError(
                f"The coordinator's record of history of {head.size} entries does not "
                f"contain this site's {entry.kind} entry (number {entry.index}) as it was "
                f"recorded. {_STOP}",
                code="provenance.missing_entry",
                index=entry.index,
                kind=entry.kind,
                size=head.size,
            )

    # --- storage -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "coordinator_public_key": self._key,
            "heads": [h.to_dict() for h in self._heads],
        }

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        coordinator_public_key: Ed25519PublicKey | str | None = None,
    ) -> Witness:
        """Inverse of :meth:`to_dict`; re-checks every head's signature and their order.

        Pass the key the site pinned at enrolment as ``coordinator_public_key``: state stored
        for another coordinator is then refused rather than trusted.
        """
        if (
            not isinstance(data, Mapping)
            or set(data) != {"version", "coordinator_public_key", "heads"}
            or data["version"] != STATE_VERSION
            or not isinstance(data["heads"], list)
        ):
            raise _bad_state("it is not a saved record of tree heads from this Tessera version")
        try:
            witness = cls(data["coordinator_public_key"])
        except CryptoError as exc:
            raise _bad_state("the coordinator's key in it is damaged") from exc
        if coordinator_public_key is not None:
            expected = (
                coordinator_public_key
                if isinstance(coordinator_public_key, str)
                else public_key_b64(coordinator_public_key)
            )
            if expected != witness._key:
                raise _bad_state("it was saved for a different coordinator key")
        for item in data["heads"]:
            try:
                head = TreeHead.from_dict(item)
                head.verify(witness._key)
            except (ProvenanceError, CryptoError) as exc:
                raise _bad_state("a tree head in it is damaged or not signed") from exc
            last = witness.head
            if last is not None and head.size <= last.size:
                raise _bad_state("its tree heads are out of order")
            witness._heads.append(head)
        return witness


def _bad_state(why: str) -> ProvenanceError:
    return ProvenanceError(
        f"The saved record of the coordinator's history cannot be used: {why}. Restore it "
        "from a backup, or contact the consortium lead before taking part again.",
        code="provenance.bad_state",
    )
