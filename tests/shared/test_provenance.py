"""The verifiable provenance log: RFC 6962 Merkle trees, signed tree heads and site witnesses."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.crypto.keys import generate_signing_key, public_key_b64
from shared.errors import CryptoError, TesseraError
from shared.provenance import LogEntry, ProvenanceError, ProvenanceLog, TreeHead, Witness, merkle
from shared.provenance.merkle import (
    EMPTY_ROOT,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root,
    verify_consistency,
    verify_inclusion,
)

COORDINATOR = generate_signing_key()
IMPOSTOR = generate_signing_key()


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def flip(data: bytes, bit: int = 0) -> bytes:
    return bytes([data[0] ^ (1 << bit)]) + data[1:]


# --- reference vectors -----------------------------------------------------------------------
# The Certificate Transparency test tree (C++ merkle_tree_test.cc, carried into the Go
# verifier tests of google/trillian and transparency-dev/merkle): eight leaf inputs, the root
# after each, and proofs between them. Leaf numbers in the proof tables are 1-based there.

CT_LEAF_INPUTS = [
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
]
CT_LEAVES = [leaf_hash(h(x)) for x in CT_LEAF_INPUTS]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION = [  # (leaf, 1-based; tree size; PATH)
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (3, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        2,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]
CT_CONSISTENCY = [  # (old size, new size, PROOF)
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]
SOME_HASH = h("abacaba000000000000000000000000000000000000000000060061e00123456")


def test_hash_primitives():
    assert hashlib.sha256(b"").digest() == EMPTY_ROOT
    assert leaf_hash(b"") == hashlib.sha256(b"\x00").digest()
    assert (
        node_hash(b"a" * 32, b"b" * 32) == hashlib.sha256(b"\x01" + b"a" * 32 + b"b" * 32).digest()
    )


@pytest.mark.parametrize("size", range(9))
def test_roots_match_the_rfc6962_reference_tree(size):
    assert root(CT_LEAVES[:size]).hex() == CT_ROOTS[size]


@pytest.mark.parametrize(("leaf", "size", "expected"), CT_INCLUSION)
def test_inclusion_proofs_match_the_reference_and_corruptions_fail(leaf, size, expected):
    index, tree_root, leaf_h = leaf - 1, h(CT_ROOTS[size]), CT_LEAVES[leaf - 1]
    proof = inclusion_proof(index, CT_LEAVES[:size])
    assert [p.hex() for p in proof] == expected
    assert verify_inclusion(leaf_h, index, size, proof, tree_root)

    # The corruption probes of the Go verifier tests: every one must fail.
    probes = [
        (leaf_h, index - 1, size, proof, tree_root),
        (leaf_h, index + 1, size, proof, tree_root),
        (leaf_h, index ^ 2, size, proof, tree_root),
        (leaf_h, index, size * 2, proof, tree_root),
        (leaf_h, index, size // 2, proof, tree_root),
        (leaf_hash(b"WrongLeaf"), index, size, proof, tree_root),
        (leaf_h, index, size, proof, EMPTY_ROOT),
        (leaf_h, index, size, proof, SOME_HASH),
        (leaf_h, index, size, [*proof, b""], tree_root),
        (leaf_h, index, size, [*proof, tree_root], tree_root),
        (leaf_h, index, size, [b"", *proof], tree_root),
        (leaf_h, index, size, [tree_root, *proof], tree_root),
        (leaf_h, index, size, proof[:-1], tree_root),
        (leaf_h, index, size, [proof[0], SOME_HASH, *proof[1:]], tree_root),
    ]
    probes += [
        (leaf_h, index, size, [*proof[:i], flip(p, 3), *proof[i + 1 :]], tree_root)
        for i, p in enumerate(proof)
    ]
    accepted = [n for n, probe in enumerate(probes) if verify_inclusion(*probe)]
    assert accepted == []


@pytest.mark.parametrize(("old", "new", "expected"), CT_CONSISTENCY)
def test_consistency_proofs_match_the_reference_and_corruptions_fail(old, new, expected):
    old_root, new_root = h(CT_ROOTS[old]), h(CT_ROOTS[new])
    proof = consistency_proof(old, CT_LEAVES[:new])
    assert [p.hex() for p in proof] == expected
    assert verify_consistency(old, new, old_root, new_root, proof)
    if not proof:
        return
    probes = [
        (old - 1, new, old_root, new_root, proof),
        (old + 1, new, old_root, new_root, proof),
        (old ^ 2, new, old_root, new_root, proof),
        (old, new * 2, old_root, new_root, proof),
        (old, new // 2, old_root, new_root, proof),
        (old, new, SOME_HASH, new_root, proof),
        (old, new, old_root, SOME_HASH, proof),
        (old, new, new_root, old_root, proof),
        (old, new, old_root, new_root, []),
        (old, new, old_root, new_root, [*proof, b""]),
        (old, new, old_root, new_root, [*proof, old_root]),
        (old, new, old_root, new_root, [*proof, new_root]),
        (old, new, old_root, new_root, [b"", *proof]),
        (old, new, old_root, new_root, [old_root, *proof]),
        (old, new, old_root, new_root, [new_root, *proof]),
        (old, new, old_root, new_root, [proof[0], *proof]),
        (old, new, old_root, new_root, proof[:-1]),
    ]
    probes += [
        (old, new, old_root, new_root, [*proof[:i], flip(p, 4), *proof[i + 1 :]])
        for i, p in enumerate(proof)
    ]
    accepted = [n for n, probe in enumerate(probes) if verify_consistency(*probe)]
    assert accepted == []


def test_consistency_edge_cases():
    a, b = leaf_hash(b"a"), leaf_hash(b"b")
    assert verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    assert verify_consistency(0, 5, EMPTY_ROOT, a, [])  # the empty tree is a prefix of all
    assert verify_consistency(1, 1, a, a, [])
    assert not verify_consistency(0, 5, a, b, [])  # ... but its root is SHA-256("")
    assert not verify_consistency(1, 1, a, b, [])  # same size, different tree
    assert not verify_consistency(1, 1, a, a, [EMPTY_ROOT])  # nothing to prove
    assert not verify_consistency(0, 1, EMPTY_ROOT, a, [EMPTY_ROOT])
    assert not verify_consistency(2, 1, a, b, [])  # history does not run backwards
    assert not verify_consistency(1, 2, a, b, [])  # a proof is needed
    assert not verify_inclusion(a, 0, 0, [], EMPTY_ROOT)
    assert verify_inclusion(a, 0, 1, [], a)
    assert not verify_inclusion(a, 1, 1, [], a)


# --- an independent reference ----------------------------------------------------------------


def reference_root(leaves: list[bytes]) -> bytes:
    """Level by level, carrying an odd last node up unchanged: equal to RFC 6962's MTH."""
    if not leaves:
        return EMPTY_ROOT
    level = list(leaves)
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        level = paired + ([level[-1]] if len(level) % 2 else [])
    return level[0]


def leaves_of(n: int, salt: bytes = b"") -> list[bytes]:
    return [leaf_hash(salt + i.to_bytes(4, "big")) for i in range(n)]


@given(st.integers(0, 300))
def test_root_agrees_with_the_level_by_level_reference(n):
    assert root(leaves_of(n)) == reference_root(leaves_of(n))


@settings(max_examples=150)
@given(st.data())
def test_every_inclusion_proof_verifies_and_tampering_fails(data):
    n = data.draw(st.integers(1, 140), label="size")
    index = data.draw(st.integers(0, n - 1), label="index")
    leaves = leaves_of(n)
    tree_root = root(leaves)
    proof = inclusion_proof(index, leaves)
    assert verify_inclusion(leaves[index], index, n, proof, tree_root)

    bit = data.draw(st.integers(0, 7), label="bit")
    assert not verify_inclusion(flip(leaves[index], bit), index, n, proof, tree_root)
    assert not verify_inclusion(leaves[index], index, n, proof, flip(tree_root, bit))
    if proof:
        i = data.draw(st.integers(0, len(proof) - 1), label="proof element")
        tampered = [*proof[:i], flip(proof[i], bit), *proof[i + 1 :]]
        assert not verify_inclusion(leaves[index], index, n, tampered, tree_root)
    if n > 1:
        other = data.draw(st.integers(0, n - 1).filter(lambda j: j != index), label="other")
        assert not verify_inclusion(leaves[index], other, n, proof, tree_root)
        assert not verify_inclusion(leaves[other], index, n, proof, tree_root)


@settings(max_examples=150)
@given(st.data())
def test_every_consistency_proof_verifies_and_a_rewritten_leaf_fails(data):
    new = data.draw(st.integers(1, 140), label="new size")
    old = data.draw(st.integers(0, new), label="old size")
    leaves = leaves_of(new)
    old_root, new_root = root(leaves[:old]), root(leaves)
    proof = consistency_proof(old, leaves)
    assert verify_consistency(old, new, old_root, new_root, proof)
    if old == 0:
        return
    # The coordinator rewrites an entry the old head already covered, then proves honestly
    # from its rewritten tree: nothing it can send reconciles the old root.
    j = data.draw(st.integers(0, old - 1), label="rewritten leaf")
    forged = [*leaves[:j], leaf_hash(b"forged"), *leaves[j + 1 :]]
    forged_root = root(forged)
    assert not verify_consistency(old, new, old_root, forged_root, consistency_proof(old, forged))
    assert not verify_consistency(old, new, old_root, forged_root, proof)
    if proof:
        i = data.draw(st.integers(0, len(proof) - 1), label="proof element")
        tampered = [*proof[:i], flip(proof[i]), *proof[i + 1 :]]
        assert not verify_consistency(old, new, old_root, new_root, tampered)


junk = st.one_of(
    st.none(),
    st.integers(-(2**70), 2**70),
    st.booleans(),
    st.floats(),
    st.text(max_size=4),
    st.binary(max_size=40),
    st.lists(st.binary(min_size=30, max_size=33), max_size=6),
)


@given(junk, junk, junk, junk, junk)
def test_verifiers_answer_false_and_never_raise_on_junk(a, b, c, d, e):
    assert verify_inclusion(a, b, c, d, e) in (True, False)
    assert verify_consistency(a, b, c, d, e) in (True, False)


def test_generators_refuse_what_the_log_does_not_have():
    with pytest.raises(ProvenanceError, match="no entry 3 in a log of 3 entries") as info:
        inclusion_proof(3, leaves_of(3))
    assert info.value.code == "provenance.out_of_range"
    with pytest.raises(ProvenanceError, match="cannot prove consistency with an earlier size"):
        consistency_proof(4, leaves_of(3))
    with pytest.raises(ProvenanceError, match="is not 32 bytes") as info:
        root([b"short"])
    assert info.value.code == "provenance.out_of_range"


# --- log entries and tree heads --------------------------------------------------------------


def test_entry_leaf_bytes_are_canonical_json_of_all_four_fields():
    entry = LogEntry(index=0, kind="federation.created", at=1.5, payload={"b": 1, "a": "x"})
    assert entry.leaf_bytes() == (
        b'{"at":1.5,"index":0,"kind":"federation.created","payload":{"a":"x","b":1}}'
    )
    assert entry.leaf_hash() == leaf_hash(entry.leaf_bytes())
    # An integer time is the same instant as the float, and hashes the same.
    assert LogEntry(index=0, kind="federation.created", at=3, payload={}).at == 3.0
    assert (
        LogEntry(index=0, kind="k", at=3, payload={}).leaf_bytes()
        == LogEntry(index=0, kind="k", at=3.0, payload={}).leaf_bytes()
    )


def test_entry_payload_is_a_private_copy():
    payload = {"sites": ["a"], "counts": {"n": 1}}
    log = ProvenanceLog()
    entry = log.append("round.opened", payload, at=10.0)
    payload["sites"].append("b")
    payload["counts"]["n"] = 2
    assert entry.payload == {"sites": ["a"], "counts": {"n": 1}}
    assert log.leaf_hashes[0] == entry.leaf_hash()


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"index": -1}, "index must be a whole number from 0, not -1"),
        ({"index": True}, "index must be a whole number"),
        ({"kind": "Round Opened"}, "Invalid log entry kind 'Round Opened'"),
        ({"kind": "a\nb"}, "Invalid log entry kind"),
        ({"at": math.nan}, "time must be a finite number of seconds, not nan"),
        ({"at": "noon"}, "time must be a finite number"),
        ({"payload": [1]}, "payload of a k log entry must be a mapping, not list"),
        ({"payload": {"x": b"\x00"}}, r"cannot be logged: .*encode bytes as hex"),
        ({"payload": {"x": math.inf}}, "cannot be logged"),
        ({"payload": {"x": {1: "a"}}}, "key that is not a string"),
    ],
)
def test_invalid_entries_cannot_be_built(fields, match):
    with pytest.raises(ProvenanceError, match=match) as info:
        LogEntry(**{"index": 0, "kind": "k", "at": 1.0, "payload": {}, **fields})
    assert info.value.code == "provenance.bad_entry"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(
    index=st.integers(0, 2**40),
    at=st.floats(allow_nan=False, allow_infinity=False),
    payload=st.dictionaries(st.text(max_size=6), json_values, max_size=5),
)
def test_entries_survive_storage_byte_for_byte(index, at, payload):
    entry = LogEntry(index=index, kind="update.received", at=at, payload=payload)
    stored = json.loads(json.dumps(entry.to_dict()))
    assert LogEntry.from_dict(stored).leaf_bytes() == entry.leaf_bytes()
    assert LogEntry.from_dict(json.loads(entry.leaf_bytes())) == entry


def test_entry_from_dict_is_strict():
    with pytest.raises(ProvenanceError, match="needs exactly index, kind, at and payload") as info:
        LogEntry.from_dict({"index": 0, "kind": "k", "at": 1.0, "payload": {}, "extra": 1})
    assert info.value.code == "provenance.bad_entry"


def test_tree_head_is_signed_for_its_purpose_and_fields():
    head = TreeHead.create(COORDINATOR, size=8, root=h(CT_ROOTS[8]), timestamp=100)
    assert head.timestamp == 100.0 and head.root == CT_ROOTS[8]
    head.verify(COORDINATOR.public_key())
    head.verify(public_key_b64(COORDINATOR))
    assert TreeHead.from_dict(json.loads(json.dumps(head.to_dict()))) == head
    for changed in (
        {"size": 7},
        {"root": CT_ROOTS[7]},
        {"timestamp": 101.0},
        {"signature": head.signature[:-2] + ("AA" if head.signature[-2:] != "AA" else "BA")},
    ):
        forged = TreeHead.from_dict({**head.to_dict(), **changed})
        with pytest.raises(ProvenanceError, match="not signed by the coordinator's key") as info:
            forged.verify(COORDINATOR.public_key())
        assert info.value.code == "provenance.bad_signature"
    with pytest.raises(ProvenanceError, match="not signed by the coordinator's key"):
        head.verify(IMPOSTOR.public_key())


def test_tree_head_with_a_bad_key_text_is_our_configuration_problem():
    head = TreeHead.create(COORDINATOR, size=0, root=EMPTY_ROOT, timestamp=1.0)
    with pytest.raises(CryptoError, match="not a Tessera public key") as info:
        head.verify("not-a-key")
    assert info.value.code == "crypto.bad_public_key"


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"size": -1}, "size must be a whole number from 0"),
        ({"root": "AB" * 32}, "root must be 64 lower-case hex digits"),
        ({"root": "ab"}, "root must be 64 lower-case hex digits"),
        ({"timestamp": math.inf}, "timestamp must be a finite number"),
        ({"signature": None}, "signature must be text"),
    ],
)
def test_damaged_tree_heads_cannot_be_built(fields, match):
    good = {"size": 1, "root": "ab" * 32, "timestamp": 1.0, "signature": ""}
    with pytest.raises(ProvenanceError, match=match) as info:
        TreeHead.from_dict({**good, **fields})
    assert info.value.code == "provenance.bad_head"
    with pytest.raises(ProvenanceError, match="needs exactly size, root, timestamp and signature"):
        TreeHead.from_dict({"size": 1})


# --- the coordinator's log -------------------------------------------------------------------

EVENTS = [
    ("federation.created", {"name": "Nordic chest X-ray"}),
    ("charter.published", {"version": 1, "sha256": "11" * 32}),
    ("site.enrolled", {"site": "st-olav", "public_key": "k1"}),
    ("site.enrolled", {"site": "haukeland", "public_key": "k2"}),
    ("charter.signed", {"site": "st-olav", "version": 1}),
    ("charter.signed", {"site": "haukeland", "version": 1}),
    ("plan.registered", {"plan_hash": "22" * 32}),
    ("plan.approved", {"site": "st-olav", "plan_hash": "22" * 32}),
    ("plan.approved", {"site": "haukeland", "plan_hash": "22" * 32}),
    ("round.opened", {"run": "r1", "round": 1}),
    ("update.received", {"run": "r1", "round": 1, "site": "st-olav", "sha256": "33" * 32}),
    ("update.received", {"run": "r1", "round": 1, "site": "haukeland", "sha256": "44" * 32}),
    ("aggregate.computed", {"run": "r1", "round": 1, "inputs": ["33" * 32, "44" * 32]}),
]


def build_log(events=EVENTS) -> ProvenanceLog:
    log = ProvenanceLog()
    for n, (kind, payload) in enumerate(events):
        log.append(kind, payload, at=1000.0 + n)
    return log


def test_log_answers_with_the_merkle_functions():
    log = build_log()
    assert len(log) == log.size == len(EVENTS)
    assert [e.index for e in log.entries] == list(range(len(EVENTS)))
    leaves = [e.leaf_hash() for e in log.entries]
    assert list(log.leaf_hashes) == leaves
    assert log.root() == root(leaves) and log.root(5) == root(leaves[:5])
    assert log.inclusion(3, 9) == inclusion_proof(3, leaves[:9])
    assert log.consistency(5, 9) == consistency_proof(5, leaves[:9])
    head = log.head(COORDINATOR, now=2000.0, size=9)
    assert (head.size, head.root, head.timestamp) == (9, root(leaves[:9]).hex(), 2000.0)
    head.verify(COORDINATOR.public_key())


def test_log_is_rebuilt_from_stored_entries():
    log = build_log()
    stored = json.loads(json.dumps([e.to_dict() for e in log.entries]))
    rebuilt = ProvenanceLog(LogEntry.from_dict(d) for d in stored)
    assert rebuilt.root() == log.root() and rebuilt.entries == log.entries


def test_log_refuses_entries_out_of_order():
    entries = list(build_log().entries)
    with pytest.raises(ProvenanceError, match=r"entry 2 is missing \(found 3") as info:
        ProvenanceLog([*entries[:2], *entries[3:]])
    assert info.value.code == "provenance.bad_entry"
    with pytest.raises(ProvenanceError, match="out of order: entry 0 is missing"):
        ProvenanceLog([entries[1], entries[0]])


def test_log_refuses_sizes_it_does_not_have():
    log = build_log()
    for call in (
        lambda: log.root(len(EVENTS) + 1),
        lambda: log.head(COORDINATOR, 1.0, size=-1),
        lambda: log.inclusion(0, len(EVENTS) + 1),
        lambda: log.consistency(2, len(EVENTS) + 1),
    ):
        with pytest.raises(ProvenanceError, match="cannot answer for a size of") as info:
            call()
        assert info.value.code == "provenance.out_of_range"
    with pytest.raises(ProvenanceError, match="no entry 5 in a log of 5 entries"):
        log.inclusion(5, 5)


# --- the site's witness ----------------------------------------------------------------------


def rebuilt_with(events) -> ProvenanceLog:
    """What a dishonest coordinator does: rebuild the log from changed events."""
    return build_log(events)


def observed_witness(log: ProvenanceLog, size: int) -> Witness:
    witness = Witness(COORDINATOR.public_key())
    witness.observe(log.head(COORDINATOR, now=1.0, size=size), [])
    return witness


def test_honest_rounds_are_accepted_and_contributions_found():
    log = build_log()
    witness = Witness(public_key_b64(COORDINATOR))
    assert witness.head is None
    previous = 0
    for size in (3, 6, 6, 10, len(EVENTS)):
        head = log.head(COORDINATOR, now=float(size), size=size)
        witness.observe(head, log.consistency(previous, size))
        assert witness.head == head
        previous = size
    assert [h.size for h in witness.heads] == [3, 6, 10, len(EVENTS)]
    own = [e for e in log.entries if e.payload.get("site") == "st-olav"]
    for entry in own:
        witness.check_inclusion(entry, log.inclusion(entry.index))
    # ... and against the earlier head that covered the enrolment.
    enrolment = own[0]
    witness.check_inclusion(enrolment, log.inclusion(enrolment.index, 6), witness.heads[1])


def test_a_repeated_answer_for_the_same_tree_is_accepted_whatever_its_proof():
    """Two head requests sent from the same old head get two answers with the same proof;
    the second arrives when the witness already holds that tree: nothing changed."""
    log = build_log()
    witness = observed_witness(log, size=6)
    head = log.head(COORDINATOR, now=2.0, size=10)
    witness.observe(head, log.consistency(6, 10))
    again = log.head(COORDINATOR, now=3.0, size=10)
    witness.observe(again, log.consistency(6, 10))  # a proof from 6, as asked
    assert [h.size for h in witness.heads] == [6, 10] and witness.head == again
    # a different tree of the same size is still caught
    events = list(EVENTS)
    events[8] = ("plan.approved", {"site": "haukeland", "plan_hash": "99" * 32})
    forged = rebuilt_with(events).head(COORDINATOR, now=4.0, size=10)
    with pytest.raises(ProvenanceError) as exc:
        witness.observe(forged, log.consistency(6, 10))
    assert exc.value.code == "provenance.rewritten"


def test_a_rewritten_earlier_entry_is_caught_by_the_consistency_check():
    """The bar of the issue: rewriting history that a site saw cannot go unnoticed."""
    honest = build_log()
    witness = observed_witness(honest, size=10)
    seen = witness.to_dict()

    # The coordinator quietly swaps haukeland's plan approval for one of another plan,
    # rebuilds the log and signs a fresh head, with an honest proof of its new tree.
    events = list(EVENTS)
    events[8] = ("plan.approved", {"site": "haukeland", "plan_hash": "99" * 32})
    forged = rebuilt_with(events)
    new_head = forged.head(COORDINATOR, now=2.0)
    new_head.verify(COORDINATOR.public_key())  # properly signed: the key is not the problem
    with pytest.raises(
        ProvenanceError,
        match=r"record of history changed.*Stop taking part .* contact the consortium lead",
    ) as info:
        witness.observe(new_head, forged.consistency(10))
    assert info.value.code == "provenance.rewritten"
    assert info.value.fields == {"old_size": 10, "new_size": len(EVENTS)}
    assert witness.to_dict() == seen  # nothing was accepted
    # The honest proof does not help the forger either.
    with pytest.raises(ProvenanceError, match="record of history changed"):
        witness.observe(new_head, honest.consistency(10))
    # Nor does keeping the size the same.
    with pytest.raises(ProvenanceError, match="record of history changed") as info:
        witness.observe(forged.head(COORDINATOR, now=3.0, size=10), [])
    assert info.value.code == "provenance.rewritten"


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_any_rewrite_under_a_seen_head_is_caught(data):
    seen = data.draw(st.integers(1, len(EVENTS)), label="seen size")
    target = data.draw(st.integers(0, seen - 1), label="rewritten entry")
    later = data.draw(st.integers(seen, len(EVENTS)), label="new size")
    witness = observed_witness(build_log(), seen)
    events = list(EVENTS)
    events[target] = (events[target][0], {**events[target][1], "forged": True})
    forged = rebuilt_with(events)
    with pytest.raises(ProvenanceError, match="record of history changed") as info:
        witness.observe(forged.head(COORDINATOR, 2.0, later), forged.consistency(seen, later))
    assert info.value.code == "provenance.rewritten"


def test_a_removed_entry_breaks_consistency_and_inclusion():
    honest = build_log()
    witness = observed_witness(honest, size=len(EVENTS))
    removed = honest.entries[10]  # st-olav's update
    forged = rebuilt_with(EVENTS[:10] + EVENTS[11:] + [("round.opened", {"run": "r1", "round": 2})])
    assert forged.size == honest.size
    with pytest.raises(ProvenanceError, match="record of history changed") as info:
        witness.observe(forged.head(COORDINATOR, 2.0), forged.consistency(len(EVENTS)))
    assert info.value.code == "provenance.rewritten"

    # A site that only ever sees the forged log cannot find its update in it.
    fresh = observed_witness(forged, size=forged.size)
    with pytest.raises(
        ProvenanceError, match=r"does not contain this site's update\.received"
    ) as info:
        fresh.check_inclusion(removed, forged.inclusion(10))
    assert info.value.code == "provenance.missing_entry"
    assert info.value.fields == {"index": 10, "kind": "update.received", "size": forged.size}


def test_two_swapped_entries_break_consistency_and_inclusion():
    honest = build_log()
    witness = observed_witness(honest, size=len(EVENTS))
    events = list(EVENTS)
    events[10], events[11] = events[11], events[10]
    forged = rebuilt_with(events)
    with pytest.raises(ProvenanceError, match="record of history changed") as info:
        witness.observe(forged.head(COORDINATOR, 2.0), forged.consistency(len(EVENTS)))
    assert info.value.code == "provenance.rewritten"

    fresh = observed_witness(forged, size=forged.size)
    for index in (10, 11):
        with pytest.raises(ProvenanceError, match="does not contain this site's") as info:
            fresh.check_inclusion(honest.entries[index], forged.inclusion(index))
        assert info.value.code == "provenance.missing_entry"
    # The same entries with their indexes swapped as well are refused too (the index is hashed).
    with pytest.raises(ProvenanceError, match="does not contain"):
        fresh.check_inclusion(honest.entries[10], forged.inclusion(11))


def test_a_shrunk_log_is_refused():
    log = build_log()
    witness = observed_witness(log, size=10)
    with pytest.raises(
        ProvenanceError, match=r"got shorter: this site saw 10 entries, .* now shows 8"
    ) as info:
        witness.observe(log.head(COORDINATOR, 2.0, size=8), [])
    assert info.value.code == "provenance.shrunk"
    assert witness.head is not None and witness.head.size == 10


def test_a_head_signed_by_another_key_is_refused():
    log = build_log()
    witness = Witness(COORDINATOR.public_key())
    with pytest.raises(ProvenanceError, match="not signed by the coordinator's key") as info:
        witness.observe(log.head(IMPOSTOR, now=1.0), [])
    assert info.value.code == "provenance.bad_signature"
    assert witness.head is None
    witness.observe(log.head(COORDINATOR, now=1.0, size=5), [])
    with pytest.raises(ProvenanceError, match="It was not accepted") as info:
        witness.observe(log.head(IMPOSTOR, now=2.0), log.consistency(5))
    assert info.value.code == "provenance.bad_signature"
    assert witness.head is not None and witness.head.size == 5


def test_a_head_with_a_changed_size_is_refused():
    log = build_log()
    witness = observed_witness(log, size=5)
    head = log.head(COORDINATOR, 2.0)
    lying = TreeHead.from_dict({**head.to_dict(), "size": head.size + 1})
    with pytest.raises(ProvenanceError, match="not signed by the coordinator's key") as info:
        witness.observe(lying, log.consistency(5))
    assert info.value.code == "provenance.bad_signature"


def test_a_bad_consistency_proof_is_refused_as_a_rewrite():
    log = build_log()
    witness = observed_witness(log, size=5)
    proof = log.consistency(5)
    for bad in ([], proof[:-1], [flip(proof[0]), *proof[1:]], "not a proof"):
        with pytest.raises(ProvenanceError, match="could not prove otherwise") as info:
            witness.observe(log.head(COORDINATOR, 2.0), bad)
        assert info.value.code == "provenance.rewritten"


def test_inclusion_needs_a_head_the_witness_accepted():
    log = build_log()
    witness = Witness(COORDINATOR.public_key())
    entry = log.entries[2]
    with pytest.raises(ProvenanceError, match="has not accepted any record") as info:
        witness.check_inclusion(entry, log.inclusion(2))
    assert info.value.code == "provenance.unknown_head"
    witness.observe(log.head(COORDINATOR, 1.0, size=5), [])
    unseen = log.head(COORDINATOR, 2.0)
    with pytest.raises(ProvenanceError, match="was not checked by this site before") as info:
        witness.check_inclusion(entry, log.inclusion(2), unseen)
    assert info.value.code == "provenance.unknown_head"
    # An entry after the accepted head is not (yet) in it.
    with pytest.raises(ProvenanceError, match="number 7") as info:
        witness.check_inclusion(log.entries[7], log.inclusion(7))
    assert info.value.code == "provenance.missing_entry"
    # A changed payload is not the entry that was recorded.
    changed = LogEntry(index=2, kind=entry.kind, at=entry.at, payload={**entry.payload, "x": 1})
    with pytest.raises(ProvenanceError, match="as it was recorded") as info:
        witness.check_inclusion(changed, log.inclusion(2, 5))
    assert info.value.code == "provenance.missing_entry"


def test_witness_state_survives_storage_and_keeps_checking():
    log = build_log()
    witness = observed_witness(log, size=4)
    witness.observe(log.head(COORDINATOR, 2.0, size=9), log.consistency(4, 9))
    stored = json.loads(json.dumps(witness.to_dict()))
    restored = Witness.from_dict(stored, coordinator_public_key=COORDINATOR.public_key())
    assert restored.heads == witness.heads
    assert restored.coordinator_public_key == public_key_b64(COORDINATOR)
    restored.observe(log.head(COORDINATOR, 3.0), log.consistency(9))
    forged = rebuilt_with([("federation.created", {"name": "other"}), *EVENTS[1:]])
    again = Witness.from_dict(json.loads(json.dumps(witness.to_dict())))
    with pytest.raises(ProvenanceError, match="record of history changed"):
        again.observe(forged.head(COORDINATOR, 3.0), forged.consistency(9))


def test_damaged_witness_state_is_refused():
    log = build_log()
    witness = observed_witness(log, size=4)
    witness.observe(log.head(COORDINATOR, 2.0, size=9), log.consistency(4, 9))
    good = witness.to_dict()
    first, second = good["heads"]
    cases = [
        ({**good, "version": 2}, "not a saved record of tree heads"),
        ({**good, "heads": "x"}, "not a saved record of tree heads"),
        ({k: v for k, v in good.items() if k != "heads"}, "not a saved record"),
        ({**good, "coordinator_public_key": "x"}, "coordinator's key in it is damaged"),
        ({**good, "heads": [{**first, "root": "00" * 32}]}, "damaged or not signed"),
        ({**good, "heads": [{**first, "size": "4"}]}, "damaged or not signed"),
        ({**good, "heads": [second, first]}, "out of order"),
        ({**good, "coordinator_public_key": public_key_b64(IMPOSTOR)}, "damaged or not signed"),
    ]
    for state, match in cases:
        with pytest.raises(ProvenanceError, match=match) as info:
            Witness.from_dict(state)
        assert info.value.code == "provenance.bad_state"
        assert "contact the consortium lead" in info.value.message
    with pytest.raises(ProvenanceError, match="saved for a different coordinator key") as info:
        Witness.from_dict(good, coordinator_public_key=IMPOSTOR.public_key())
    assert info.value.code == "provenance.bad_state"


def test_provenance_errors_are_tessera_errors():
    assert issubclass(ProvenanceError, TesseraError)
    assert ProvenanceError("x").code == "provenance.error"
    assert merkle.HASH_BYTES == 32
