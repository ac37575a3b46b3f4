"""Mosaic GPU kernels (H100, compute capability 9.0) of the embedding
operations, one module per operation; the shared row-fetch machinery is in
`rows.py`, block sizes in `tuning.py`.

    pooled_gather     weighted sum of each bag's rows           [N, D]
    sequence_gather   the row of every position (DMA only)      [N, S, D]
    segment_sum       de-duplicated backward: runs of gradient rows summed
    row_update        row-wise Adagrad / Adagrad / SGD, in place

Each takes canonical inputs (see the wrappers in `jdmt/pallas_kernels/`)
and `interpret`: False compiles for the GPU (`plgpu.kernel` / `pl.kernel`
on a `plgpu.Mesh`, the `mosaic_gpu_v2` custom call); True or an
`InterpretGPUParams` runs the Mosaic GPU interpreter on CPU, which simulates
shared memory, TMA copies and barriers.
"""

from jdmt.pallas_kernels.gpu.pooled_gather import pooled_gather
from jdmt.pallas_kernels.gpu.row_update import row_update
from jdmt.pallas_kernels.gpu.segment_sum import segment_sum
from jdmt.pallas_kernels.gpu.sequence_gather import sequence_gather

__all__ = ["pooled_gather", "row_update", "segment_sum", "sequence_gather"]
