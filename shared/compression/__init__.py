"""Update compression codecs (fp16, int8 with per-block scales, top-k with error feedback, zstd).

See :mod:`shared.compression.codecs` for the formats, error codes, error bounds and the rule
for composing with secure aggregation (quantise before masking; no top-k under masking).
"""

from shared.compression.codecs import (
    Codec,
    Compressed,
    Fp16,
    Int8,
    NoCompression,
    dequantise_int8,
    quantise_int8,
)
from shared.compression.registry import (
    KNOWN,
    get_codec,
    inner_codec,
    uses_error_feedback,
    validate_compression,
)
from shared.compression.topk import ErrorFeedback, TopK, feedback_step, keep_count

__all__ = [
    "KNOWN",
    "Codec",
    "Compressed",
    "ErrorFeedback",
    "Fp16",
    "Int8",
    "NoCompression",
    "TopK",
    "dequantise_int8",
    "feedback_step",
    "get_codec",
    "inner_codec",
    "keep_count",
    "quantise_int8",
    "uses_error_feedback",
    "validate_compression",
]
