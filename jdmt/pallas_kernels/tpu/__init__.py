"""Mosaic TPU kernels: ids in SMEM, table rows moved by DMA, double-buffered.

    pooled_gather    out[n] = sum_l w[n, l] * table[ids[n, l]]
    sequence_gather  out[n, s] = table[ids[n, s]] (0 for id -1)
    segment_sum      out[u] = sum over the run [begin[u], end[u]) of scale * grads[src]
    row_update       row-wise Adagrad / Adagrad / SGD on the listed rows, in place

Each takes canonical inputs (the wrappers in `jdmt.pallas_kernels` validate
and canonicalise) and `interpret` (False, True or `pltpu.InterpretParams`).
The XLA references are `pooled_gather_xla`, `sequence_gather_xla`,
`segment_sum_xla` and `row_update_xla`. Shared pieces: `pipeline.ring` (the
DMA ring) and `tuning` (block sizes and memory budgets).
"""

from jdmt.pallas_kernels.tpu.pooled_gather import pooled_gather
from jdmt.pallas_kernels.tpu.row_update import row_update
from jdmt.pallas_kernels.tpu.segment_sum import segment_sum
from jdmt.pallas_kernels.tpu.sequence_gather import sequence_gather

__all__ = ["pooled_gather", "row_update", "segment_sum", "sequence_gather"]
