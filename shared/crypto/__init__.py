"""Keys, signatures and TLS pinning (see DESIGN.md, "Identity and trust").

* :mod:`shared.crypto.keys`: Ed25519 identities and their 0600 key files.
* :mod:`shared.crypto.signing`: domain-separated signatures over canonical JSON.
* :mod:`shared.crypto.tls`: self-signed coordinator certificates, pinned by fingerprint.

Text encodings: public keys and signatures are URL-safe base64 without padding; certificate
fingerprints are 64 lower-case hex digits.
"""

from __future__ import annotations

from shared.crypto.keys import (
    generate_signing_key,
    key_fingerprint,
    load_private_key,
    public_key_b64,
    public_key_from_b64,
    save_private_key,
)
from shared.crypto.signing import sign, signing_payload, verify

__all__ = [
    "generate_signing_key",
    "key_fingerprint",
    "load_private_key",
    "public_key_b64",
    "public_key_from_b64",
    "save_private_key",
    "sign",
    "signing_payload",
    "verify",
]
