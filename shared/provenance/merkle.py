"""Merkle tree hashing, inclusion and consistency proofs as in Certificate Transparency.

Theory of operation
-------------------
The tree is the one of RFC 6962 section 2.1 (unchanged in RFC 9162 section 2.1.1), with
SHA-256 and domain-separated leaves and nodes, so a leaf can never pass for a node::

    leaf hash     = SHA-256(0x00 || entry bytes)
    node hash     = SHA-256(0x01 || left || right)
    MTH({})       = SHA-256("")
    MTH({d0})     = leaf hash of d0
    MTH(D[n])     = node hash of MTH(D[0:k]) and MTH(D[k:n]), k the largest power of two < n

Everything here works on *leaf hashes*, so the log decides what an entry's bytes are
(canonical JSON, see :mod:`shared.provenance.log`).

Proofs are generated with the recursive definitions of RFC 6962: ``PATH`` (section 2.1.1) for
inclusion and ``PROOF``/``SUBPROOF`` (section 2.1.2) for consistency. They are verified with
the iterative algorithms of RFC 9162 sections 2.1.3.2 and 2.1.4.2, which spell out every
check (including that the proof is exactly as long as it must be). Generating and verifying
with two independent formulations is deliberate: the tests check one against the other.

The verifiers take what a peer sent and never raise: anything malformed (a hash that is not
32 bytes, a size out of range, a proof too long or too short) is simply ``False``. The
generators are called with our own log and raise ``ProvenanceError``
(``provenance.out_of_range``) when asked for something the log does not have.

Cost: generating a proof or a root hashes every leaf once, O(n). A Tessera federation logs
thousands of events, not billions, so nothing is cached here; the log caches leaf hashes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from shared.provenance.errors import ProvenanceError

__all__ = [
    "EMPTY_ROOT",
    "HASH_BYTES",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root",
    "verify_consistency",
    "verify_inclusion",
]

HASH_BYTES = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"


def leaf_hash(data: bytes) -> bytes:
    """SHA-256(0x00 || data): the hash of one entry's bytes."""
    return hashlib.sha256(_LEAF_PREFIX + bytes(data)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right): the hash of an interior node."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def _mth(leaves: Sequence[bytes], lo: int, hi: int) -> bytes:
    """MTH of ``leaves[lo:hi]`` (RFC 6962 section 2.1), without copying slices."""
    n = hi - lo
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaves[lo]
    k = _split(n)
    return node_hash(_mth(leaves, lo, lo + k), _mth(leaves, lo + k, hi))


def _check_leaf_hashes(leaf_hashes: Sequence[bytes]) -> None:
    for position, value in enumerate(leaf_hashes):
        if not isinstance(value, bytes) or len(value) != HASH_BYTES:
            raise ProvenanceError(
                f"Leaf hash {position} is not {HASH_BYTES} bytes. This is a bug in Tessera; "
                "please report it.",
                code="provenance.out_of_range",
            )


def root(leaf_hashes: Sequence[bytes]) -> bytes:
    """The Merkle tree hash over ``leaf_hashes`` (``EMPTY_ROOT`` for none)."""
    _check_leaf_hashes(leaf_hashes)
    return _mth(leaf_hashes, 0, len(leaf_hashes))


# --- generating proofs (RFC 6962 section 2.1.1 and 2.1.2) ------------------------------------


def inclusion_proof(index: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """PATH(index, D[n]): the audit path that proves leaf ``index`` is in the tree of all leaves.

    To prove inclusion in an earlier tree head of size ``m``, pass ``leaf_hashes[:m]``.
    """
    n = len(leaf_hashes)
    if not _is_size(index) or not 0 <= index < n:
        raise ProvenanceError(
            f"There is no entry {index!r} in a log of {n} entries, so it has no inclusion "
            "proof. This is a bug in Tessera; please report it.",
            code="provenance.out_of_range",
            index=index,
            size=n,
        )
    _check_leaf_hashes(leaf_hashes)
    path: list[bytes] = []
    lo, hi, m = 0, n, index
    # Walk down from the root; each level contributes the sibling subtree's hash. RFC 6962
    # lists the path leaf-to-root, so the hashes are collected top-down and reversed.
    while hi - lo > 1:
        k = _split(hi - lo)
        if m < k:
            path.append(_mth(leaf_hashes, lo + k, hi))
            hi = lo + k
        else:
            path.append(_mth(leaf_hashes, lo, lo + k))
            lo, m = lo + k, m - k
    path.reverse()
    return path


def consistency_proof(old_size: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """PROOF(old_size, D[n]): proves the first ``old_size`` leaves are a prefix of all of them.

    Empty when ``old_size`` is 0 or equals the number of leaves (nothing to prove). To prove
    consistency between two earlier heads, pass ``leaf_hashes[:new_size]``.
    """
    n = len(leaf_hashes)
    if not _is_size(old_size) or not 0 <= old_size <= n:
        raise ProvenanceError(
            f"A log of {n} entries cannot prove consistency with an earlier size of "
            f"{old_size!r}. This is a bug in Tessera; please report it.",
            code="provenance.out_of_range",
            old_size=old_size,
            size=n,
        )
    _check_leaf_hashes(leaf_hashes)
    if old_size in (0, n):
        return []
    return _subproof(old_size, leaf_hashes, 0, n, complete=True)


def _subproof(m: int, leaves: Sequence[bytes], lo: int, hi: int, *, complete: bool) -> list[bytes]:
    """SUBPROOF(m, D[lo:hi], b) of RFC 6962 section 2.1.2; ``complete`` is the flag ``b``."""
    n = hi - lo
    if m == n:
        return [] if complete else [_mth(leaves, lo, hi)]
    k = _split(n)
    if m <= k:
        return [
            *_subproof(m, leaves, lo, lo + k, complete=complete),
            _mth(leaves, lo + k, hi),
        ]
    return [
        *_subproof(m - k, leaves, lo + k, hi, complete=False),
        _mth(leaves, lo, lo + k),
    ]


# --- verifying proofs (RFC 9162 sections 2.1.3.2 and 2.1.4.2) --------------------------------


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == HASH_BYTES


def _is_path(proof: object) -> bool:
    return isinstance(proof, list | tuple) and all(_is_hash(p) for p in proof)


def verify_inclusion(
    leaf_hash: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """Whether ``proof`` shows that ``leaf_hash`` is leaf ``index`` of the tree with ``root``."""
    if not (_is_hash(leaf_hash) and _is_hash(root) and _is_path(proof)):
        return False
    if not (_is_size(index) and _is_size(tree_size)) or not 0 <= index < tree_size:
        return False
    fn, sn = index, tree_size - 1
    r = leaf_hash
    for p in proof:
        if sn == 0:
            return False  # the proof is longer than the path to the root
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                # ``fn`` is the last node of its level and has no right sibling: it moves up
                # unchanged until it becomes a right child (or reaches the top).
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """Whether ``proof`` shows that the tree ``old_root`` is a prefix of the tree ``new_root``.

    Edge cases, where RFC 9162 leaves them to the caller: equal sizes are consistent only
    with equal roots and an empty proof; the empty tree (whose root must be ``EMPTY_ROOT``)
    is a prefix of every tree, with an empty proof; a smaller new size is never consistent.
    """
    if not (_is_hash(old_root) and _is_hash(new_root) and _is_path(proof)):
        return False
    if not (_is_size(old_size) and _is_size(new_size)) or not 0 <= old_size <= new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        # The old tree is a complete subtree of the new one: its root is the proof's seed.
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root
