"""Feature specs, synthetic data, the Criteo reader and table presets."""

from jdmt.data.criteo import (
    CriteoData,
    CriteoFormatError,
    CriteoReader,
    CriteoStats,
    criteo_features,
    hash_category,
)
from jdmt.data.presets import mlperf_dcnv2_features, synthetic_default_features
from jdmt.data.specs import (
    BadBatchError,
    Batch,
    Combiner,
    FeatureSet,
    Kind,
    SparseFeature,
    check_batch,
    make_features,
)
from jdmt.data.synthetic import SyntheticData, splitmix64

__all__ = [
    "Batch",
    "BadBatchError",
    "Combiner",
    "CriteoData",
    "CriteoFormatError",
    "CriteoReader",
    "CriteoStats",
    "FeatureSet",
    "Kind",
    "SparseFeature",
    "SyntheticData",
    "check_batch",
    "criteo_features",
    "hash_category",
    "make_features",
    "mlperf_dcnv2_features",
    "splitmix64",
    "synthetic_default_features",
]
