"""What the four Mosaic GPU kernels share: how a row is fetched, register
layouts, and the interpret switch.

Rows are gathered by TMA (`plgpu.copy_gmem_to_smem`), one copy per row into
one row of a shared-memory tile, all copies of a step arriving on one
barrier. In this JAX version a warpgroup's copy must move a multiple of 128
bytes, so a row is fetched in one of two ways (`RowPlan`):

- aligned (`D * itemsize % 128 == 0`, e.g. f32 D = 32, 64, 128; bf16 D = 64,
  128): from the table itself, `table[r, c*B:(c+1)*B]`, in column blocks of
  B <= 128 that divide D.
- flat (any other D: 4, 16, 60, 100, ...): from the table viewed as 1-D
  (`table.reshape(-1)`, a free bitcast, never a copy), a window of
  W = D rounded up to 128 bytes starting at `r * D` (D > 128 columns: several
  windows, one per column block). The window holds row r and the head of the
  next rows; only the first D columns are used (kernel outputs are W wide
  and sliced to D in XLA). The windows of the last `tail_rows` rows would
  run past the end of the table: those rows are fetched from `tail`, a copy
  of just those rows padded with zeros (ceil((W - D) / D) rows, at most a
  couple of KB), so no copy ever reads out of bounds. The 1-D view is
  indexed in int32: rows * D < 2**31.

Register tiles are (64, B) in the WGMMA layout (`plgpu.Layout.WGMMA`), per-row
vectors (64,) in its row reduction, per-column vectors (B,) in its column
reduction. The Mosaic GPU interpreter does not know layout casts or
`plgpu.load`, so `Ops` drops them when interpreting: the arithmetic is the
same, only the layout annotations differ.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.pallas.mosaic_gpu.interpret.params import (  # not re-exported in jax 0.10
    InterpretGPUParams,
)
from jaxlib.mlir.dialects import math as mlir_math

from jdmt.pallas_kernels.gpu import tuning

WGMMA = plgpu.Layout.WGMMA
ROW = WGMMA.reduce(1)  # (64,): one value per tile row
COL = WGMMA.reduce(0)  # (B,): one value per tile column

_INT32_MAX = 2**31 - 1


def interpret_params(interpret):
    """The `interpret=` of a Mosaic GPU kernel from a jdmt interpret setting.

    False or None: compile for the GPU. True: the Mosaic GPU interpreter with
    default parameters (uninitialised shared memory reads as NaN, out of
    bounds copies raise). An `InterpretGPUParams`: used as given. Pallas'
    generic interpreter (`interpret=True` of `pallas_call`) cannot run these
    kernels: it has no rule for TMA copies or barriers.
    """
    if interpret is None or interpret is False:
        return False
    if interpret is True:
        return InterpretGPUParams()
    if isinstance(interpret, InterpretGPUParams):
        return interpret
    raise TypeError(
        "the GPU kernels take interpret=False, True or an InterpretGPUParams "
        f"(jax._src.pallas.mosaic_gpu.interpret.params), got {interpret!r}")


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class RowPlan:
    """How rows of one f[rows, dim] operand are fetched and tiled.

    Attributes:
      rows, dim, dtype: the operand.
      block: columns per tile (a multiple of 128 bytes and of 8).
      num_blocks: column blocks (a grid axis of every kernel).
      flat: fetch windows of the 1-D view (see the module docstring).
      tail_rows: the last rows fetched from the zero-padded tail (flat only).
    """

    rows: int
    dim: int
    dtype: jnp.dtype
    block: int
    num_blocks: int
    flat: bool
    tail_rows: int

    @property
    def width(self) -> int:
        """Padded columns of a kernel output (num_blocks * block >= dim)."""
        return self.num_blocks * self.block

    @property
    def overrun(self) -> int:
        return self.width - self.dim

    @property
    def num_operands(self) -> int:
        return 2 if self.flat else 1

    def operands(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """The arrays a kernel reads rows from: (x,) or (flat view, tail)."""
        if not self.flat:
            return (x,)
        flat = x.reshape(-1)
        return (flat, self.tail(flat))

    def tail(self, flat: jax.Array) -> jax.Array:
        """The last `tail_rows` rows, then zeros: every window fits."""
        start = (self.rows - self.tail_rows) * self.dim
        pad = jnp.zeros((self.overrun,), flat.dtype)
        return jnp.concatenate([lax.slice(flat, (start,), (flat.shape[0],)), pad])

    def fetch(self, srcs, r, c, dst, barrier) -> None:
        """Start the copy of columns block c of row r into dst (block,).

        srcs: this plan's operand refs; r, c: int32 scalars, 0 <= r < rows.
        Arrives once on `barrier` (with the copied bytes)."""
        off = c * self.block
        if not self.flat:
            plgpu.copy_gmem_to_smem(srcs[0].at[r, pl.ds(off, self.block)], dst, barrier)
            return
        flat, tail = srcs
        first_tail = self.rows - self.tail_rows

        @pl.when(r < first_tail)
        def _():
            plgpu.copy_gmem_to_smem(flat.at[pl.ds(r * self.dim + off, self.block)], dst, barrier)

        @pl.when(r >= first_tail)
        def _():
            at = (r - first_tail) * self.dim + off
            plgpu.copy_gmem_to_smem(tail.at[pl.ds(at, self.block)], dst, barrier)


def plan_rows(rows: int, dim: int, dtype, *, min_programs: int = 1, row_tiles: int = 1) -> RowPlan:
    """The `RowPlan` of an f[rows, dim] operand.

    With `row_tiles` tiles of 64 rows, aligned rows are cut into narrower
    column blocks (down to 128 bytes) until there are `min_programs`
    programs, so that small batches still fill the GPU."""
    dtype = jnp.dtype(dtype)
    if rows < 1 or dim < 1:
        raise ValueError(f"need at least one row and one column, got [{rows}, {dim}]")
    unit = tuning.COPY_BYTES // dtype.itemsize  # elements per 128 bytes
    max_block = max(unit, tuning.MAX_BLOCK_COLS // unit * unit)
    if dim % unit == 0:
        blocks = [b for b in range(unit, max_block + 1, unit) if dim % b == 0]
        block = blocks.pop()
        while blocks and row_tiles * (dim // block) < min_programs:
            block = blocks.pop()
        return RowPlan(rows, dim, dtype, block, dim // block, False, 0)
    padded = round_up(dim, unit)
    num_blocks = -(-padded // max_block)
    block = round_up(-(-dim // num_blocks), unit)
    overrun = num_blocks * block - dim
    tail_rows = min(rows, -(-overrun // dim))
    if rows * dim + overrun > _INT32_MAX:
        raise ValueError(_too_large(rows, dim, dtype))
    return RowPlan(rows, dim, dtype, block, num_blocks, True, tail_rows)


def _too_large(rows: int, dim: int, dtype) -> str:
    """The GPU kernels' one size limit: rows whose bytes are not a multiple of
    128 are fetched from the operand's 1-D view, indexed in int32."""
    return (f"the GPU kernels fetch rows of {dim * jnp.dtype(dtype).itemsize} bytes from a "
            f"[{rows}, {dim}] {jnp.dtype(dtype).name} operand's 1-D view, whose indices must fit "
            f"in int32 (rows * dim < 2**31); shard the table over more devices, or use a dim "
            f"whose rows are a multiple of 128 bytes")


def plan_like(base: RowPlan, rows: int, dtype) -> RowPlan:
    """The plan of another [rows, base.dim] operand tiled with base's column
    blocks (so one program sees the same columns of both). `dtype` must be at
    least as wide as base's (f32 grads or accumulators beside a table)."""
    dtype = jnp.dtype(dtype)
    assert base.block * dtype.itemsize % tuning.COPY_BYTES == 0, (base, dtype)
    if not base.flat:
        return RowPlan(rows, base.dim, dtype, base.block, base.num_blocks, False, 0)
    if rows * base.dim + base.overrun > _INT32_MAX:
        raise ValueError(_too_large(rows, base.dim, dtype))
    tail_rows = min(rows, -(-base.overrun // base.dim))
    return RowPlan(rows, base.dim, dtype, base.block, base.num_blocks, True, tail_rows)


def writable(dim: int, dtype) -> bool:
    """Whether a TMA store can write exactly one row of `dim` columns
    (its minor dimension must be a multiple of 16 bytes)."""
    return dim * jnp.dtype(dtype).itemsize % tuning.MINOR_BYTES == 0


class Ops:
    """Layout-annotated loads and constants; plain ones when interpreting."""

    def __init__(self, interpret: bool):
        self.interpret = bool(interpret)

    def load(self, ref, layout):
        if self.interpret:
            return ref[...]
        # optimized=False: rows written by TMA into an untiled tile may not
        # have a bank-conflict-free register transfer; a slower one is fine.
        return plgpu.load(ref, (), layout=layout, optimized=False)

    def cast(self, x, layout):
        return x if self.interpret else plgpu.layout_cast(x, layout)

    def sqrt(self, x, layout):
        """Correctly rounded sqrt (`math.sqrt`, i.e. `sqrt.rn.f32`, like XLA).

        Pallas' Lane lowering has no rule for `lax.sqrt_p` in this JAX (only
        rsqrt), so the compiled kernel inlines Mosaic GPU's pointwise sqrt."""
        if self.interpret:
            return jnp.sqrt(x)

        @plgpu.inline_mgpu(arg_types=(layout,),
                           return_type=plgpu.ShapeDtypeStruct(x.shape, x.dtype, layout=layout))
        def sqrt(ctx, v):
            del ctx
            return v._pointwise(mlir_math.sqrt)

        return sqrt(x)

    def zeros(self, cols: int):
        """f32[64, cols] zeros in the tile layout (a loop carry needs one)."""
        return self.cast(jnp.zeros((tuning.LANES, cols), jnp.float32), WGMMA)

    def lane_iota(self):
        """i32[64]: the row index of the tile, as a per-row vector."""
        return self.cast(lax.broadcasted_iota(jnp.int32, (tuning.LANES,), 0), ROW)


def per_row(v, cols: int):
    """Broadcast a per-row vector (64,) to the tile (64, cols)."""
    return lax.broadcast_in_dim(v, (tuning.LANES, cols), (0,))


def per_col(v):
    """Broadcast a per-column vector (B,) to the tile (64, B)."""
    return lax.broadcast_in_dim(v, (tuning.LANES, v.shape[0]), (1,))


def pad_rows(x: jax.Array, rows: int, value) -> jax.Array:
    """x padded along axis 0 to `rows` with `value`."""
    extra = rows - x.shape[0]
    if extra == 0:
        return x
    pad = [(0, extra)] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, pad, constant_values=value)


def num_tiles(n: int) -> int:
    return max(1, math.ceil(n / tuning.LANES))


__all__ = [
    "COL",
    "InterpretGPUParams",
    "Ops",
    "ROW",
    "RowPlan",
    "WGMMA",
    "interpret_params",
    "num_tiles",
    "pad_rows",
    "per_col",
    "per_row",
    "plan_like",
    "plan_rows",
    "round_up",
    "writable",
]
