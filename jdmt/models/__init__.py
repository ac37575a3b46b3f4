"""Dense models over looked-up embeddings: DLRM and DCNv2 (multi-tower to follow),
with sequence features pooled by `SequencePooling`."""

from jdmt.models.dcn import DCN, LowRankCross, init_dcn
from jdmt.models.dlrm import DLRM, MLP, dot_interaction, init_dlrm
from jdmt.models.sequence import SEQUENCE_POOLING, SequencePooling, stack_sequences

MODELS = ("dlrm", "dcn")
"""Model names the trainer accepts."""

__all__ = [
    "DCN", "DLRM", "LowRankCross", "MLP", "MODELS", "SEQUENCE_POOLING", "SequencePooling",
    "dot_interaction", "init_dcn", "init_dlrm", "stack_sequences",
]
