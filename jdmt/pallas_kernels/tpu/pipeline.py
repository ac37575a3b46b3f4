"""The software pipeline the TPU kernels share: a ring of DMA slots.

Every kernel here streams rows between HBM and VMEM one DMA per row (rows
are scattered by ids, so no BlockSpec can fetch them). `ring` keeps
`depth - 1` of those DMAs in flight: before element t is consumed, the
DMA of element `t + depth - 1` is issued into the slot that element `t - 1`
freed. With depth 2 this is plain double-buffering; the default depth
(`tuning.ring_depth`) hides the DMA latency behind ~30 rows of work.

Each slot has its own DMA semaphore, so a wait returns exactly when that
slot's row has landed (DMAs may complete out of order; a semaphore shared
by several slots could be signalled by the wrong row).
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


def ring(
    count,
    depth: int,
    start: Callable[[Any, Any, Any], Any],
    finish: Callable[[Any, Any], None],
    carry: Any = (),
) -> Any:
    """Issue and consume `count` elements through `depth` slots.

    Args:
      count: number of elements (a traced i32 or an int).
      depth: slots (static, >= 2).
      start: `start(t, slot, carry) -> carry` issues element t's DMAs into
        `slot`. Elements are started in order 0, 1, ..., so `carry` can hold
        a cursor (the segment sum walks its runs that way).
      finish: `finish(t, slot)` waits for element t's DMAs and consumes it.
      carry: initial state threaded through the `start` calls.

    Returns:
      the final carry.
    """
    assert depth >= 2
    count = jnp.asarray(count, jnp.int32)
    ahead = depth - 1

    # one loop, so that `start` and `finish` are each traced (and compiled) once:
    # step t issues element t, then consumes element t - ahead
    def step(t, c):
        c = lax.cond(t < count, lambda c: start(t, lax.rem(t, depth), c), lambda c: c, c)

        @pl.when(t >= ahead)
        def _():
            done = t - ahead
            finish(done, lax.rem(done, depth))

        return c

    return lax.fori_loop(0, count + ahead, step, carry)
