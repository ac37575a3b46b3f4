"""Pallas kernels for embedding lookups and fused sparse updates, each beside
its XLA reference (same signature, same validator).

    pooled_lookup     weighted sum / mean of each bag's rows      (custom VJP)
    sequence_lookup   the rows of every position, [N, S, D]       (custom VJP)
    row_gradients     backward: de-duplicated row gradients (sort in XLA,
                      `segment_sum` kernel for the runs)
    sparse_update     row-wise Adagrad / Adagrad / SGD on the touched rows,
                      in place

`kernel="pallas"` runs the kernel of a target: `tpu/` (Mosaic TPU) or `gpu/`
(Mosaic GPU), chosen from the backend or given; on CPU the kernels run in
interpret mode. `kernel="xla"` runs the reference. See `common.py`.
"""

from jdmt.pallas_kernels.common import Impl, Kernel, resolve
from jdmt.pallas_kernels.pooled_lookup import pooled_lookup, pooled_lookup_reference
from jdmt.pallas_kernels.row_gradients import (
    row_gradients,
    row_gradients_reference,
    segment_sum,
    segment_sum_reference,
)
from jdmt.pallas_kernels.sequence_lookup import sequence_lookup, sequence_lookup_reference
from jdmt.pallas_kernels.sparse_update import sparse_update, sparse_update_reference

__all__ = [
    "Impl",
    "Kernel",
    "pooled_lookup",
    "pooled_lookup_reference",
    "resolve",
    "row_gradients",
    "row_gradients_reference",
    "segment_sum",
    "segment_sum_reference",
    "sequence_lookup",
    "sequence_lookup_reference",
    "sparse_update",
    "sparse_update_reference",
]
