"""Aggregation maths: update validation and streaming, order-independent FedAvg (pure, no I/O)."""

from shared.aggregation.fedavg import FedAvgAccumulator, UpdateStream, fedavg_reference
from shared.aggregation.fedbn import local_keys, merge_local, norm_layer_keys, split_update
from shared.aggregation.robust import coordinate_median, trimmed_mean
from shared.aggregation.server_opt import (
    ServerOptConfig,
    ServerOptState,
    initial_state,
    server_step,
)
from shared.aggregation.strategies import (
    AGGREGATIONS,
    FedAvgConfig,
    FedBNConfig,
    FedProxConfig,
    MedianConfig,
    StrategyConfig,
    TrimmedMeanConfig,
    aggregate_deltas,
    apply_aggregate,
    fedavg,
    fedavg_weights,
    keeps_norm_layers_local,
    local_training_options,
    make_strategy,
    validate_strategy,
)
from shared.aggregation.validation import BLOCK, TensorLayout, layout_of, validate_update

__all__ = [
    "AGGREGATIONS",
    "BLOCK",
    "FedAvgAccumulator",
    "FedAvgConfig",
    "FedBNConfig",
    "FedProxConfig",
    "MedianConfig",
    "ServerOptConfig",
    "ServerOptState",
    "StrategyConfig",
    "TensorLayout",
    "TrimmedMeanConfig",
    "UpdateStream",
    "aggregate_deltas",
    "apply_aggregate",
    "coordinate_median",
    "fedavg",
    "fedavg_reference",
    "fedavg_weights",
    "initial_state",
    "keeps_norm_layers_local",
    "layout_of",
    "local_keys",
    "local_training_options",
    "make_strategy",
    "merge_local",
    "norm_layer_keys",
    "server_step",
    "split_update",
    "trimmed_mean",
    "validate_strategy",
    "validate_update",
]
