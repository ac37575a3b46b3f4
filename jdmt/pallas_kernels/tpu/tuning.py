"""Block sizes of the Mosaic TPU kernels, in one place.

Nothing here has been tuned on a TPU yet (the kernels were written and
checked on a CPU-only machine): the numbers are sized from the memory
budgets below, and are the first thing to sweep on hardware.

Budgets (jax's `tpu_info`: TPU v4 and later have 1 MiB of SMEM and at least
16 MiB of VMEM per TensorCore; v2/v3's 16 KiB of SMEM are not supported):

- SMEM: each blocked ids-like operand takes at most `SMEM_BLOCK_WORDS` words
  per buffer, counted as if Mosaic padded the lane dimension of a 2-D SMEM
  block to 128 words. Pallas double-buffers a blocked input, so two such
  operands (ids and weights) use at most 4 * 64 KiB = 256 KiB.
- VMEM: a row slot `(1, D)` is counted as a whole (8, 128)-tiled vreg row,
  32 bytes per padded lane whatever the dtype, so slot buffers stay well
  under the default scoped VMEM limit whatever Mosaic's tiling.
"""

from __future__ import annotations

LANES = 128
SUBLANES = 8

SMEM_BLOCK_WORDS = 16 * 1024  # 64 KiB of i32 / f32 per SMEM block buffer
RING_BYTES = 1 << 20  # VMEM for one ring of row slots
RING_DEPTH = 32  # most row DMAs in flight per program
MIN_RING_DEPTH = 8

POOL_POSITIONS = 512  # pooled lookup: longest ids block per program (bags longer are split)
POOL_MAX_BAGS = 128  # pooled lookup: most bags per program
SEQ_ID_ROWS = 64  # sequence lookup: (rows of 128 ids) per program = 8192 positions
ROW_BLOCK = 512  # segment sum / row update: most output rows per program
ROW_BLOCK_BYTES = 2 << 20  # VMEM for one [rows, D] f32 block of those
WINDOW = 2048  # segment sum: occurrence indices held in SMEM at a time


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def cdiv(x: int, m: int) -> int:
    return -(-x // m)


def slot_bytes(dim: int) -> int:
    """Bytes of one `(1, dim)` row slot in VMEM, counted pessimistically."""
    return 4 * SUBLANES * round_up(dim, LANES)


def ring_depth(dim: int) -> int:
    """Row DMAs kept in flight per program for rows of `dim` elements."""
    depth = RING_BYTES // slot_bytes(dim)
    return max(MIN_RING_DEPTH, min(RING_DEPTH, depth))


def pool_blocks(num_bags: int, num_positions: int) -> tuple[int, int]:
    """(bags, positions) per program of the pooled lookup: the ids block is
    `[bags, positions]` in SMEM, `bags` a multiple of 8 (or all bags) and
    `positions` all of L or a multiple of 128."""
    lb = num_positions if num_positions <= POOL_POSITIONS else POOL_POSITIONS
    bn = SMEM_BLOCK_WORDS // round_up(lb, LANES)
    bn = max(SUBLANES, min(POOL_MAX_BAGS, bn // SUBLANES * SUBLANES))
    if num_bags <= bn:
        bn = num_bags  # one block: the full dimension is always a legal block
    return bn, lb


def row_block(num_rows: int, dim: int) -> int:
    """Output rows per program of `segment_sum` / `row_update`: a multiple of
    128 (the lane dimension of their `(1, rows)` SMEM blocks) or all rows."""
    bu = ROW_BLOCK_BYTES // (4 * round_up(dim, LANES))
    bu = max(LANES, min(ROW_BLOCK, bu // LANES * LANES))
    return num_rows if num_rows <= bu else bu
