"""Plan codec names -> codecs: ``none``, ``fp16``, ``int8``, ``topk:<fraction>`` and
``topk:<fraction>+int8``, each optionally followed by ``+zstd`` (e.g. ``"int8+zstd"``), and the
plan's check of which codecs can work with its other settings (:func:`validate_compression`)."""

from __future__ import annotations

import re

from shared.compression.codecs import Codec, Compressed, Fp16, Int8, NoCompression
from shared.compression.topk import TopK
from shared.errors import PlanError

KNOWN = ("none", "fp16", "int8", "topk:<fraction>", "topk:<fraction>+int8")
"""Base names; each may end in ``+zstd``."""

_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
_PATTERN = re.compile(
    rf"(?P<base>none|fp16|int8(?:;block=(?P<block>[1-9][0-9]{{0,5}}))?"
    rf"|topk:(?P<fraction>{_NUMBER})(?P<int8>\+int8)?)(?P<zstd>\+zstd)?"
)


def _unknown(name: object, why: str = "") -> PlanError:
    known = ", ".join(f"{k!r}" for k in KNOWN)
    return PlanError(
        f"Unknown update codec {name!r}{why}. Known codecs: {known}, each optionally followed "
        "by '+zstd' (e.g. 'int8+zstd', 'topk:0.01+zstd').",
        code="plan.invalid",
    )


def get_codec(name: str) -> Codec:
    """The codec a plan names; ``get_codec(c.name) == c``. Raises ``PlanError("plan.invalid")``."""
    match = _PATTERN.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise _unknown(name)
    base = match["base"]
    codec: Codec
    if base == "none":
        codec = NoCompression()
    elif base == "fp16":
        codec = Fp16()
    elif base.startswith("int8"):
        codec = Int8(int(match["block"])) if match["block"] else Int8()
    else:
        fraction = float(match["fraction"])
        if not 0 < fraction <= 1:
            raise _unknown(name, ": the top-k fraction must be in (0, 1]")
        codec = TopK(fraction, int8_values=bool(match["int8"]))
    return Compressed(codec) if match["zstd"] else codec


def inner_codec(codec: Codec) -> Codec:
    """The codec under a ``+zstd`` wrapper (``codec`` itself when there is none)."""
    return codec.codec if isinstance(codec, Compressed) else codec


def uses_error_feedback(codec: Codec) -> bool:
    """Whether a site keeps an error-feedback residual for ``codec``: top-k only, whose
    dropped entries are most of the update (Stich et al. 2018). Rounding errors of fp16 and
    int8 are below the training noise (``benchmarks/compression.py``), so they are not
    carried over."""
    return isinstance(inner_codec(codec), TopK)


def validate_compression(codec: Codec, *, secure_aggregation: bool) -> None:
    """Refuse a codec that cannot work with secure aggregation, with the reason
    (``PlanError(plan.invalid)``, field ``compression``); the rules are those of
    :mod:`shared.compression.codecs` ("Composition with secure aggregation")."""
    if not secure_aggregation or codec.name == "none":
        return
    inner = inner_codec(codec)
    if isinstance(inner, TopK):
        why = (
            "top-k sends different coordinates from each site, masks make every coordinate "
            "non-zero so nothing stays sparse, and the chosen coordinates would reveal which "
            "parameters a site moved most"
        )
    elif isinstance(inner, Int8):
        why = (
            "each site scales its int8 values by its own per-block scales, so the masked sum "
            "of the integers means nothing, and the scales travel in clear"
        )
    elif isinstance(codec, Compressed):
        why = "masked updates look like random bytes, which zstd cannot shrink"
    else:
        why = "masked values are integers of the ring's width, so float16 saves nothing"
    raise PlanError(
        f"Compression {codec.name!r} does not work with secure aggregation: {why}. Set "
        "compression to 'none' or turn secure aggregation off.",
        code="plan.invalid",
        field="compression",
    )
