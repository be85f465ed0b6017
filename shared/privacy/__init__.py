"""Privacy maths (pure, no I/O): the RDP accountant and secure-aggregation primitives.

- ``accountant``: epsilon of the sampled Gaussian mechanism (as Opacus computes it) and a
  site's ``PrivacyBudget``.
- ``quantise``: clipping and fixed-point encoding in Z_{2**bits}.
- ``prg``: AES-256-CTR mask expansion.
- ``shamir``: t-of-n secret sharing of 32-byte secrets.
- ``secagg``: one round of dropout-tolerant secure aggregation (Bonawitz et al., CCS 2017),
  ``SecAggSite`` and ``SecAggServer``.
- ``client_dp`` and ``dp_sgd``: client-level DP of a site's update, and example-level DP-SGD
  settings and accounting (training itself is in ``shared.training``).
- ``homomorphic``: CKKS aggregation building blocks (TenSEAL), imported on demand;
  ``he_rounds``: how a homomorphically encrypted round uses them at both ends.
"""

from shared.privacy.accountant import (
    DEFAULT_ORDERS,
    PrivacyBudget,
    SampledGaussian,
    compute_rdp,
    epsilon_from_rdp,
    get_epsilon,
)
from shared.privacy.quantise import Quantiser, clip_l2
from shared.privacy.secagg import SecAggConfig, SecAggServer, SecAggSite

__all__ = [
    "DEFAULT_ORDERS",
    "PrivacyBudget",
    "Quantiser",
    "SampledGaussian",
    "SecAggConfig",
    "SecAggServer",
    "SecAggSite",
    "clip_l2",
    "compute_rdp",
    "epsilon_from_rdp",
    "get_epsilon",
]
