"""Site identity: invitation codes and enrolment tokens (see DESIGN.md, "Identity and trust")."""

from __future__ import annotations

from shared.identity.invitation import (
    Invitation,
    decode_invitation,
    encode_invitation,
    is_expired,
    new_token,
    token_digest,
    token_matches,
)

__all__ = [
    "Invitation",
    "decode_invitation",
    "encode_invitation",
    "is_expired",
    "new_token",
    "token_digest",
    "token_matches",
]
