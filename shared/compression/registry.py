"""Plan codec names -> codecs: ``none``, ``fp16``, ``int8``, ``topk:<fraction>`` and
``topk:<fraction>+int8``, each optionally followed by ``+zstd`` (e.g. ``"int8+zstd"``)."""

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
