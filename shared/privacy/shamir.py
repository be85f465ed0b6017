"""t-of-n Shamir secret sharing of 32-byte secrets over GF(2**521 - 1).

Theory of operation
-------------------
Shamir 1979, "How to Share a Secret": the secret is the constant term of a random polynomial
of degree ``threshold - 1`` over a prime field; share ``x`` is the polynomial's value at
``x``. Any ``threshold`` shares give the polynomial back (Lagrange interpolation at 0); fewer
say nothing about the secret, whatever the holder's computing power. Secure aggregation
(Bonawitz et al., CCS 2017) shares each site's self-mask seed and mask key this way so the
coordinator can remove the masks of a site that drops out, but only with the help of
``threshold`` other sites.

The field is GF(p) with p = 2**521 - 1, a Mersenne prime comfortably above 2**256, so any
32-byte secret is one field element. Coefficients are drawn uniformly by rejection from
``randbytes`` (the OS's CSPRNG unless a test passes its own).

Reconstruction refuses rather than guesses: fewer than ``threshold`` distinct shares, two
different values for one ``x``, shares made for different thresholds, or values out of the
field raise :class:`~shared.errors.SecretSharingError`. Shares beyond the threshold are not
ignored: each must lie on the polynomial the first ``threshold`` give, so a single forged
share among more than ``threshold`` is detected. (With exactly ``threshold`` shares a forged
one changes the result; callers check the result against a commitment, as
``shared.privacy.secagg`` does with public keys and self-mask commitments.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from shared.errors import PrivacyParameterError, SecretSharingError

__all__ = ["PRIME", "SECRET_BYTES", "Share", "reconstruct", "split"]

PRIME = 2**521 - 1
SECRET_BYTES = 32
MAX_SHARES = 65535
_FIELD_BYTES = (PRIME.bit_length() + 7) // 8


@dataclass(frozen=True, slots=True)
class Share:
    """The polynomial's value ``y`` at ``x`` (1..65535), for a ``threshold``-of-n split."""

    x: int
    y: int
    threshold: int

    def to_fields(self) -> dict[str, int | str]:
        """JSON-safe fields (``y`` as hex), for signed or encrypted messages."""
        return {"x": self.x, "y": format(self.y, "x"), "t": self.threshold}

    @classmethod
    def from_fields(cls, fields: object) -> Share:
        """Inverse of :meth:`to_fields`; raises ``SecretSharingError`` on anything else."""
        try:
            if not isinstance(fields, dict) or set(fields) != {"x", "y", "t"}:
                raise ValueError
            x, y_hex, t = fields["x"], fields["y"], fields["t"]
            if not (isinstance(x, int) and isinstance(t, int) and isinstance(y_hex, str)):
                raise ValueError
            if isinstance(x, bool) or isinstance(t, bool) or len(y_hex) > 2 * _FIELD_BYTES:
                raise ValueError
            y = int(y_hex, 16)
            if format(y, "x") != y_hex:
                raise ValueError
        except ValueError:
            raise SecretSharingError(
                "A secret share is malformed. It was not used; if this keeps happening, check "
                "that every site runs the same Tessera version.",
                code="privacy.secagg.bad_share",
            ) from None
        return cls(x=x, y=y, threshold=t)


def _check_split_args(threshold: int, count: int) -> None:
    for name, value in (("threshold", threshold), ("count", count)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise PrivacyParameterError(
                f"The share {name} must be a whole number, not {value!r}.",
                code="privacy.bad_threshold",
            )
    if not 1 <= threshold <= count <= MAX_SHARES:
        raise PrivacyParameterError(
            f"A {threshold}-of-{count} split is impossible: need 1 <= threshold <= count <= "
            f"{MAX_SHARES}.",
            code="privacy.bad_threshold",
        )


def _random_field_element(randbytes: Callable[[int], bytes]) -> int:
    excess = 8 * _FIELD_BYTES - PRIME.bit_length()
    while True:
        value = int.from_bytes(randbytes(_FIELD_BYTES), "big") >> excess
        if value < PRIME:
            return value


def split(
    secret: bytes,
    *,
    threshold: int,
    count: int,
    randbytes: Callable[[int], bytes] = os.urandom,
) -> tuple[Share, ...]:
    """``count`` shares of ``secret`` (32 bytes) at x = 1..count; any ``threshold`` recover it."""
    if not isinstance(secret, bytes | bytearray) or len(secret) != SECRET_BYTES:
        raise PrivacyParameterError(
            f"Only {SECRET_BYTES}-byte secrets are shared. This is a bug in Tessera; please "
            "report it.",
            code="privacy.bad_secret",
        )
    _check_split_args(threshold, count)
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [_random_field_element(randbytes) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, count + 1):
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares.append(Share(x=x, y=y, threshold=threshold))
    return tuple(shares)


def _interpolate(points: list[tuple[int, int]], at: int) -> int:
    """The value at ``at`` of the polynomial through ``points`` (Lagrange, mod PRIME)."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def reconstruct(shares: Iterable[Share]) -> bytes:
    """The 32-byte secret from at least ``threshold`` consistent shares."""
    by_x: dict[int, int] = {}
    thresholds = set()
    for share in shares:
        if not isinstance(share, Share):
            raise SecretSharingError(
                f"Expected secret shares, got {type(share).__name__}. This is a bug in "
                "Tessera; please report it.",
                code="privacy.secagg.bad_share",
            )
        if not (1 <= share.x <= MAX_SHARES and 0 <= share.y < PRIME and share.threshold >= 1):
            raise SecretSharingError(
                "A secret share is out of range: it was not made by Tessera's split or was "
                "changed on the way.",
                code="privacy.secagg.bad_share",
            )
        if by_x.setdefault(share.x, share.y) != share.y:
            raise SecretSharingError(
                f"Two different shares claim position {share.x}: at least one is forged or "
                "corrupted, so the secret cannot be trusted.",
                code="privacy.secagg.inconsistent_shares",
            )
        thresholds.add(share.threshold)
    if len(thresholds) > 1:
        raise SecretSharingError(
            f"These shares come from different splits (thresholds {sorted(thresholds)}), so "
            "they do not belong together.",
            code="privacy.secagg.inconsistent_shares",
        )
    threshold = thresholds.pop() if thresholds else 0
    if not by_x or len(by_x) < threshold:
        raise SecretSharingError(
            f"Too few shares to recover the secret: {len(by_x)} distinct shares, but "
            f"{max(threshold, 1)} are needed. Wait for more sites to answer.",
            code="privacy.secagg.too_few_shares",
            have=len(by_x),
            need=threshold,
        )
    points = sorted(by_x.items())
    basis, extra = points[:threshold], points[threshold:]
    for x, y in extra:
        if _interpolate(basis, x) != y:
            raise SecretSharingError(
                f"The shares do not agree (share {x} is off the polynomial the others "
                "define): at least one is forged or corrupted.",
                code="privacy.secagg.inconsistent_shares",
            )
    secret = _interpolate(basis, 0)
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise SecretSharingError(
            "The shares give a value that no 32-byte secret has: at least one is forged or "
            "corrupted.",
            code="privacy.secagg.inconsistent_shares",
        )
    return secret.to_bytes(SECRET_BYTES, "big")
