"""One error hierarchy for all of Tessera, with stable codes.

Every error carries a ``code`` (stable, safe to send to a peer or show in a dialog) and a
message that says what to do next. Messages never hold patient data, keys or stack traces.

Tree::

    TesseraError
    ├── ProtocolError                     protocol.*
    │   ├── LocalProtocolError            we broke the rules (a bug on our side)
    │   └── RemoteProtocolError           the peer did: malformed, unknown type, bad version,
    │       │                             oversized, schema violation, unexpected in this state
    │       └── TransferError             chunked transfer: bad index, hash mismatch, size
    ├── CryptoError                       crypto.*
    │   ├── SignatureError                a signature does not verify
    │   └── KeyFileError                  a key or certificate file is missing or unreadable
    ├── IdentityError                     identity.*
    │   ├── InvitationError               invitation code malformed, unknown, used or expired
    │   └── AuthenticationError           unknown site, failed challenge
    ├── PlanError                         plan.*   (invalid plan, unknown architecture)
    ├── UpdateError                       update.* (wrong keys, shapes, dtypes, NaN/Inf, size)
    ├── DataError                         data.*   (unreadable DICOM, bad labels CSV, empty set)
    ├── StorageError                      storage.* (database or blob store)
    ├── TrainingError                     training.*
    │   └── TrainingCancelled
    ├── ConnectionFailed                  net.*    (unreachable coordinator, TLS pin mismatch)
    ├── GovernanceError                   governance.* (charter, approvals, site policy)
    ├── PrivacyError                      privacy.*
    │   ├── PrivacyParameterError         invalid accountant, budget or quantisation settings
    │   ├── PrivacyBudgetExceeded         a round would take a site past its epsilon cap
    │   ├── SecureAggregationError        privacy.secagg.*
    │   │   ├── SecretSharingError        too few, duplicate or inconsistent Shamir shares
    │   │   └── SecAggMessageRejected     forged, replayed, unexpected or unsafe messages
    │   └── HomomorphicError              privacy.he.* (CKKS keys, ciphertexts, shapes)
    │       └── HEKeyRejected             privacy.he.key_* (key distribution messages)
    ├── shared.provenance.errors.ProvenanceError  provenance.* (log rewritten, bad tree head)
    ├── ReleaseError                      release.* (a model release: version, altered or
    │                                     unsigned file, not in the provenance log)
    │
    │   defined beside the adapter that raises them (they name its settings):
    ├── coordinator.config.ConfigError    config.*, run.busy   (coordinator data directory)
    ├── coordinator.localrun.LaunchError  demo.launch          (local processes of the demo)
    ├── site_client.core.config.SiteConfigError  config.*      (site data directory)
    └── site_client.core.intake.pacs.PacsReceiverError  pacs.*  (PACS receiver settings)

``TesseraWarning`` is our warning category; tests turn it into an error.
"""

from __future__ import annotations

from typing import Any


class TesseraWarning(UserWarning):
    """Warnings Tessera raises itself (data-quality problems that were handled)."""


class TesseraError(Exception):
    """Root of all Tessera errors. ``code`` is stable; ``fields`` hold structured context."""

    code: str = "tessera.error"

    def __init__(self, message: str, *, code: str | None = None, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.fields = fields

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"


# --- protocol -------------------------------------------------------------------------


class ProtocolError(TesseraError):
    code = "protocol.error"


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol does not allow (a bug on our side)."""

    code = "protocol.local"


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid. Reply with an ``error`` message and drop it."""

    code = "protocol.malformed"


class TransferError(RemoteProtocolError):
    code = "protocol.transfer"


# --- crypto ---------------------------------------------------------------------------


class CryptoError(TesseraError):
    code = "crypto.error"


class SignatureError(CryptoError):
    code = "crypto.bad_signature"


class KeyFileError(CryptoError):
    code = "crypto.key_file"


# --- identity -------------------------------------------------------------------------


class IdentityError(TesseraError):
    code = "identity.error"


class InvitationError(IdentityError):
    code = "identity.invitation"


class AuthenticationError(IdentityError):
    code = "identity.authentication"


# --- plans, updates, data -------------------------------------------------------------


class PlanError(TesseraError):
    code = "plan.invalid"


class UpdateError(TesseraError):
    """A model update that must not be used: wrong keys, shapes, dtypes, NaN/Inf, size."""

    code = "update.invalid"


class DataError(TesseraError):
    code = "data.invalid"


class StorageError(TesseraError):
    code = "storage.error"


class TrainingError(TesseraError):
    code = "training.failed"


class TrainingCancelled(TrainingError):
    code = "training.cancelled"


class ConnectionFailed(TesseraError):
    code = "net.unreachable"


class GovernanceError(TesseraError):
    """Consortium terms or approvals do not allow this: no charter, an unsigned or refused
    plan, a plan below a site's policy. The message says who must do what."""

    code = "governance.error"


# --- privacy ----------------------------------------------------------------------------


class PrivacyError(TesseraError):
    """Differential privacy or secure aggregation cannot go ahead as asked."""

    code = "privacy.error"


class PrivacyParameterError(PrivacyError):
    """Invalid privacy settings: a noise multiplier, sample rate, delta, bound or threshold."""

    code = "privacy.bad_parameter"


class PrivacyBudgetExceeded(PrivacyError):
    """A round would take a site past the largest epsilon its policy accepts."""

    code = "privacy.budget_exceeded"


class SecureAggregationError(PrivacyError):
    """A secure-aggregation round cannot complete (Bonawitz et al., CCS 2017)."""

    code = "privacy.secagg"


class SecretSharingError(SecureAggregationError):
    """Shamir shares that cannot give the secret back: too few, duplicate or inconsistent."""

    code = "privacy.secagg.shares"


class SecAggMessageRejected(SecureAggregationError):
    """A secure-aggregation message that must not be used.

    Codes: ``privacy.secagg.forged`` (signature, key or ciphertext does not match),
    ``privacy.secagg.replayed`` (already seen, or bound to another run, round or site),
    ``privacy.secagg.unexpected`` (not allowed in this state), ``privacy.secagg.unsafe_request``
    (an unmasking request that would reveal both masks of one site).
    """

    code = "privacy.secagg.rejected"


class HomomorphicError(PrivacyError):
    """Homomorphic-encryption aggregation (CKKS) cannot use what it was given.

    Codes: ``privacy.he.key_rejected`` (a sealed key blob that does not open: wrong key, other
    run, altered), ``privacy.he.malformed`` (bytes that are not our ciphertext or context),
    ``privacy.he.shape_mismatch`` (encrypted updates of different lengths or packings),
    ``privacy.he.secret_key`` (a secret key where none may be, or none where one is needed),
    ``privacy.he.bad_parameter`` (invalid CKKS parameters, weights or values).
    """

    code = "privacy.he"


class HEKeyRejected(HomomorphicError):
    """A message of the CKKS key distribution that must not be used; the state machine that
    refused it changed nothing (``coordinator.he_keys``, ``site_client.core.he_keys_site``).

    Codes: ``privacy.he.key_forged`` (a signature that does not verify, or a message in
    another site's name), ``privacy.he.key_replayed`` (a second copy, or bound to another run
    or attempt), ``privacy.he.key_unexpected`` (not allowed in this state or from this
    sender, or too late), ``privacy.he.key_mismatch`` (signed content that disagrees with what
    was published: a site's identity key, the key site's exchange key, the public context or
    its digest), ``privacy.he.key_unusable`` (an X25519 key no agreement can be made with) and
    ``privacy.he.key_rejected`` (a sealed key that does not open, as in ``HomomorphicError``).
    """

    code = "privacy.he.key_rejected"


# --- releases ---------------------------------------------------------------------------


class ReleaseError(TesseraError):
    """A model release that must not be made or used.

    Codes: ``release.bad_version`` (not X.Y), ``release.duplicate_version`` (already published),
    ``release.unknown`` (no release with that version), ``release.missing_file`` and
    ``release.bad_file`` (a part of the release folder is absent or unreadable), and, when a
    site checks a release, what was altered: ``release.bad_signature`` (the manifest),
    ``release.weights_mismatch``, ``release.model_card_mismatch``, ``release.plan_mismatch``,
    ``release.charter_mismatch``, ``release.bad_tree_head`` (its signature),
    ``release.tree_head_mismatch`` (another head than the manifest names) and
    ``release.not_in_log`` (the release entry or its inclusion proof does not match the head);
    ``release.no_saliency`` (the model has no feature map to draw a saliency map from).
    """

    code = "release.error"
