"""safetensors codec: round trips, deterministic bytes, and hostile input."""

from __future__ import annotations

import hashlib
import json
import re
import struct

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shared.errors import UpdateError
from shared.tensors import decode_tensors, encode_parts, encode_tensors, tensor_digest

names = st.text(min_size=1, max_size=20).filter(lambda s: s != "__metadata__")
float32_arrays = hnp.arrays(
    dtype=np.float32,
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
    elements=st.floats(width=32, allow_nan=True, allow_infinity=True),
)
tensor_dicts = st.dictionaries(names, float32_arrays, max_size=6)


def _identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
        for k in a
    )


def _payload(header: dict[str, object], data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@given(tensor_dicts)
def test_round_trip_is_bit_exact(arrays: dict[str, np.ndarray]) -> None:
    decoded = decode_tensors(encode_tensors(arrays))
    assert _identical(decoded, arrays)
    assert all(a.flags.writeable for a in decoded.values())


@given(tensor_dicts)
def test_bytes_do_not_depend_on_insertion_order(arrays: dict[str, np.ndarray]) -> None:
    reordered = dict(reversed(list(arrays.items())))
    assert encode_tensors(arrays) == encode_tensors(reordered)


@given(tensor_dicts)
def test_reference_parser_reads_our_bytes(arrays: dict[str, np.ndarray]) -> None:
    assert _identical(safetensors.numpy.load(encode_tensors(arrays)), arrays)


@given(st.dictionaries(st.from_regex(r"[A-Za-z0-9_.:/-]{1,20}", fullmatch=True), float32_arrays))
def test_float32_payloads_are_byte_for_byte_the_reference_serialisers(
    arrays: dict[str, np.ndarray],
) -> None:
    # encode_tensors writes float32 payloads itself (one copy instead of two); a byte of
    # difference would give the same model another digest than older versions do.
    expected = safetensors.numpy.save(arrays)
    assert encode_tensors(arrays) == expected
    parts = encode_parts(arrays)
    assert parts is not None and b"".join(parts) == expected


def test_other_payloads_are_left_to_safetensors() -> None:
    assert encode_parts({"a": np.zeros(2, np.float64)}) is None
    assert encode_parts({"é": np.zeros(2, np.float32)}) is None  # JSON escapes differ
    arrays = {"é": np.zeros(2, np.float32), "b": np.ones(3, np.float64)}
    assert encode_tensors(arrays) == safetensors.numpy.save(arrays)


def test_decoding_without_a_copy_gives_views_writable_only_in_a_mutable_buffer() -> None:
    data = encode_tensors({"a": np.arange(4, dtype=np.float32), "b": np.ones(2, np.float32)})
    assert not any(a.flags.writeable for a in decode_tensors(data, copy=False).values())
    buffer = bytearray(data)
    views = decode_tensors(buffer, copy=False)
    views["a"][0] = 7.0  # written into the buffer itself
    assert decode_tensors(bytes(buffer))["a"].tolist() == [7.0, 1.0, 2.0, 3.0]
    assert decode_tensors(data)["a"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_mixed_dtypes_and_non_contiguous_input() -> None:
    arrays = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2],
        "q": np.array([-5, 7], dtype=np.int64),
        "big_endian": np.array([1.5, -2.0], dtype=">f8"),
        "scalar": np.array(3.0, dtype=np.float16),
    }
    decoded = decode_tensors(encode_tensors(arrays))
    for name, array in arrays.items():
        assert decoded[name].dtype == array.dtype.newbyteorder("=")
        assert np.array_equal(decoded[name], array)


def test_digest_is_sha256_of_the_bytes() -> None:
    data = encode_tensors({"a": np.ones(3, np.float32)})
    assert tensor_digest(data) == hashlib.sha256(data).hexdigest()


def test_encode_rejects_object_arrays_and_reserved_name() -> None:
    with pytest.raises(UpdateError, match="dtype object, which cannot be sent"):
        encode_tensors({"a": np.array([object()])})
    with pytest.raises(UpdateError, match="'__metadata__' is not allowed"):
        encode_tensors({"__metadata__": np.zeros(1, np.float32)})


GOOD = encode_tensors({"a": np.arange(4, dtype=np.float32), "b": np.ones((2, 2), np.float32)})


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "shorter than the 8-byte header length"),
        (b"\x01\x02\x03", "shorter than the 8-byte header length"),
        (struct.pack("<Q", 2**63) + b"{}", "header length exceeds the payload"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "not valid UTF-8 JSON"),
        (struct.pack("<Q", 5) + b"[1,2]", "not a JSON object"),
        (GOOD[:-1], "data section length does not match"),
        (GOOD + b"\x00", "data section length does not match"),
        (_payload({"a": 1}), "is not {dtype, shape, data_offsets}"),
        (_payload({"a": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}}), "BF16"),
        (_payload({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}), "shape"),
        (_payload({"a": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}}), "shape"),
        (_payload({"a": {"dtype": "F32", "shape": [1] * 40, "data_offsets": [0, 4]}}), "shape"),
        (
            _payload({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(4)),
            "range",
        ),
        (_payload({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}), "offsets"),
        (
            _payload(
                {
                    "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                },
                bytes(4),
            ),
            "gap or overlaps",
        ),
        (
            _payload({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)),
            "gap or overlaps",
        ),
        (_payload({"__metadata__": {"k": 1}}), "metadata is not a map of strings"),
        (struct.pack("<Q", 17) + b'{"a":1,"a":2}    ', "duplicate name 'a'"),
        (struct.pack("<Q", 9) + b'{"a":NaN}', "non-JSON number NaN"),
        (struct.pack("<Q", 20_000) + b"[" * 20_000, "not valid UTF-8 JSON"),
    ],
)
def test_garbage_raises_update_error(data: bytes, reason: str) -> None:
    pattern = r"^Tensor payload is malformed \(.*" + re.escape(reason)
    with pytest.raises(UpdateError, match=pattern) as info:
        decode_tensors(data)
    assert info.value.code == "update.malformed"


def test_metadata_of_strings_is_accepted_and_dropped() -> None:
    data = safetensors.numpy.save({"a": np.zeros(2, np.float32)}, metadata={"format": "np"})
    assert list(decode_tensors(data)) == ["a"]


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_update_error(data: bytes) -> None:
    try:
        decode_tensors(data)
    except UpdateError as exc:
        assert exc.code == "update.malformed"


@settings(max_examples=300)
@given(st.integers(0, len(GOOD) - 1), st.integers(0, 255), st.integers(0, len(GOOD)))
def test_corrupted_payloads_raise_only_update_error(index: int, value: int, cut: int) -> None:
    data = bytearray(GOOD)
    data[index] = value
    for candidate in (bytes(data), bytes(data[:cut])):
        try:
            decoded = decode_tensors(candidate)
        except UpdateError as exc:
            assert exc.code == "update.malformed"
        else:
            assert all(isinstance(a, np.ndarray) for a in decoded.values())
