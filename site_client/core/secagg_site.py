"""A site's part in one securely aggregated round: checks, keys, shares, masking. No I/O.

Theory of operation: the coordinator's signed ``SecAggSetup`` opens an attempt; this site
checks it (signed by the pinned coordinator key, for a plan it was invited to with secure
aggregation, with the quantiser bound the plan implies, its own key among the sites') and then
drives ``shared.privacy.secagg.SecAggSite`` through advertise -> share -> mask -> unmask
(Bonawitz et al., CCS 2017). The update the worker trained is protected here, before it is
masked: clipped, and with client-level DP, noised with this site's share of the noise
(``shared.privacy.secagg_plan.noise_share``). The participant moves the messages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.aggregation import layout_of
from shared.crypto.keys import b64url_encode
from shared.crypto.signing import verify
from shared.errors import SecAggMessageRejected
from shared.plan import TrainingPlan
from shared.privacy.client_dp import ClientDP, clip_and_noise, secure_rng
from shared.privacy.quantise import clip_l2
from shared.privacy.secagg import EncryptedShares, SecAggSite
from shared.privacy.secagg_plan import (
    BITS,
    SETUP_PURPOSE,
    flatten,
    noise_share,
    quantiser_clip,
    unflatten,
)
from shared.protocol.messages import (
    SecAggKeys,
    SecAggSetup,
    SecAggShares,
    SecAggUnmask,
    SecAggUnmaskResponse,
)

__all__ = ["SiteSecAgg"]


class SiteSecAgg:
    """One attempt of one securely aggregated round, at this site."""

    def __init__(
        self,
        setup: SecAggSetup,
        plan: Mapping[str, Any],
        *,
        site_id: str,
        signing_key: Ed25519PrivateKey,
        coordinator_key: str,
        rng: np.random.Generator | None = None,
    ) -> None:
        verify(coordinator_key, SETUP_PURPOSE, setup.signed_fields(), setup.signature)
        config = setup.secagg_config()
        self.plan = TrainingPlan.from_dict(dict(plan))
        own = b64url_encode(signing_key.public_key().public_bytes_raw())
        q = config.quantiser
        secure = self.plan.secure_aggregation and self.plan.secagg_clip_norm is not None
        expected = (
            quantiser_clip(self.plan, config.vector_length, config.threshold) if secure else 0
        )
        if (
            not secure
            or config.round != setup.round
            or not config.run_id.startswith(setup.run_id + ":")
            or site_id not in config.sites
            or setup.site_keys.get(site_id) != own
            or set(setup.site_keys) != set(config.sites)
            or q.bits != BITS
            or q.max_sites != len(config.sites)
            or not math.isclose(q.clip_norm, expected, rel_tol=1e-9)
        ):
            raise SecAggMessageRejected(
                "The coordinator's secure-aggregation setup does not match the approved plan "
                "or this site's key; nothing was sent. Tell the consortium lead.",
                code="privacy.secagg.unsafe_request",
            )
        self.run_id, self.round, self.config = setup.run_id, setup.round, config
        self._rng = rng
        self.site = SecAggSite(
            config,
            site=site_id,
            signing_key=signing_key,
            site_keys=dict(setup.site_keys),
            coordinator_key=coordinator_key,
        )
        self.shares: tuple[EncryptedShares, ...] | None = None
        self.masked = False

    def advertise(self) -> SecAggKeys:
        ad = self.site.advertise()
        return SecAggKeys(run_id=self.run_id, round=self.round, advertisements=[ad.fields()])

    def share(self, msg: SecAggKeys) -> SecAggShares:
        dealt = self.site.share(msg.to_secagg())
        return SecAggShares(
            run_id=self.run_id, round=self.round, shares=[m.fields() for m in dealt]
        )

    def take_shares(self, msg: SecAggShares) -> None:
        self.shares = msg.to_secagg()

    def protect(self, update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The update as it will be summed: with client-level DP, clipped and noised with
        this site's share; then clipped to the quantiser's bound (float32, as trained)."""
        dp = self.plan.dp
        if isinstance(dp, ClientDP):
            share = noise_share(dp, self.config.threshold)
            clip_and_noise(update, share, self._rng or secure_rng())
        layout = layout_of(update)
        vector = clip_l2(flatten(update, layout), self.config.quantiser.clip_norm)
        return unflatten(vector, layout)

    def mask(self, protected: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], bytes]:
        """The signed ``MaskedInput`` fields and the masked vector's little-endian bytes."""
        if self.shares is None:
            raise SecAggMessageRejected(
                "The other sites' shares have not arrived; nothing can be masked yet.",
                code="privacy.secagg.unexpected",
            )
        vector = flatten(protected, layout_of(protected))
        message, masked = self.site.mask(vector, self.shares)
        self.masked = True
        dtype = np.dtype(self.config.quantiser.dtype).newbyteorder("<")
        return message.fields(), masked.astype(dtype, copy=False).tobytes()

    def unmask(self, msg: SecAggUnmask) -> SecAggUnmaskResponse:
        response = self.site.unmask(msg.to_secagg())
        return SecAggUnmaskResponse(
            run_id=self.run_id, round=self.round, response=response.fields()
        )
