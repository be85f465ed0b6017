"""Aggregation maths: update validation and streaming, order-independent FedAvg (pure, no I/O)."""

from shared.aggregation.fedavg import FedAvgAccumulator, UpdateStream, fedavg_reference
from shared.aggregation.validation import BLOCK, TensorLayout, layout_of, validate_update

__all__ = [
    "BLOCK",
    "FedAvgAccumulator",
    "TensorLayout",
    "UpdateStream",
    "fedavg_reference",
    "layout_of",
    "validate_update",
]
