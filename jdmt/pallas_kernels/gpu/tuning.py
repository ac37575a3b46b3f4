"""Block sizes of the Mosaic GPU kernels (H100 / compute capability 9.0).

LANES         rows of a register tile: the M of the WGMMA register layout,
              the smallest tile whose per-row vectors (one value per row:
              weights, masks, accumulators) broadcast along the columns.
              One lane = one bag (pooled), one position (sequence), one
              occurrence (segment sum) or one updated row (row update).
MAX_BLOCK_COLS  widest column block of a tile. A (64, 128) f32 accumulator is
              64 registers per thread, the gathered tile another 64: wider
              dims are split into column blocks over a grid axis.
MIN_PROGRAMS  programs the pooled gather aims for (about one per SM; H100 SXM: 132): with
              few bag tiles, aligned rows are split into narrower column
              blocks so that every SM gets one.
SEQUENCE_STEPS  64-position blocks one sequence-gather program streams through
              (its double buffer is refilled while the previous block drains).
NUM_SLOTS     gather buffers in flight: 2 = fetch step t+1 while step t is
              reduced (or stored).
"""

LANES = 64
MAX_BLOCK_COLS = 128
MIN_PROGRAMS = 128
SEQUENCE_STEPS = 8
NUM_SLOTS = 2

# TMA: a GMEM -> SMEM copy issued by a warpgroup must move a multiple of
# 128 bytes (each of the 128 threads arrives on the barrier with bytes/128),
# and a copy's minor dimension must be a multiple of 16 bytes.
COPY_BYTES = 128
MINOR_BYTES = 16
