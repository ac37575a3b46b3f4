"""The dense gradients' all-reduce, by mesh level.

Under `jit` alone XLA reduces the replicated parameters' gradients with one
all-reduce over every device of the mesh; how its bytes cross hosts is the
collective library's choice (gloo on CPU runs a ring over all devices, so
two of its links cross hosts and each carries about twice the gradients).
`hierarchical_psum` spells the reduction out by level, as NCCL and Horovod
do across nodes: a reduce-scatter inside each host (over `local`), an
all-reduce of each device's 1/L share across hosts (over `host`), an
all-gather inside the host. A device sends across hosts 2 (H-1)/H of 1/L
of the gradients; the rest of the traffic stays on the host's fast links.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from jdmt.mesh import HOST, LOCAL

__all__ = ["DENSE_ALLREDUCE", "hierarchical_psum"]

DENSE_ALLREDUCE = ("hierarchical", "xla")


def hierarchical_psum(tree, hosts: int, local: int, *, over_hosts: bool = True):
    """The sum of `tree` over the mesh (inside `shard_map`), level by level.

    Args:
      tree: a pytree of f32 arrays (one device's partial gradients).
      hosts, local: the mesh's shape (`host` x `local`).
      over_hosts: False: sum over `local` only (parameters sharded over
        `host`, such as the Tower Modules').

    Returns:
      the summed tree, the same on every device of the sum. All leaves
      travel as one flat vector (one collective per level).
    """
    flat, unravel = ravel_pytree(tree)
    if flat.size == 0:
        return tree
    n = flat.shape[0]
    if not (over_hosts and hosts > 1):  # inside the host only
        return unravel(lax.psum(flat, LOCAL)) if local > 1 else tree
    if local == 1:  # one device per host: one all-reduce across hosts
        return unravel(lax.psum(flat, HOST))
    pad = (-n) % local
    v = jnp.pad(flat, (0, pad)) if pad else flat
    v = lax.psum_scatter(v, LOCAL, scatter_dimension=0, tiled=True)  # this device's 1/L, summed in the host
    v = lax.psum(v, HOST)
    v = lax.all_gather(v, LOCAL, axis=0, tiled=True)
    return unravel(v[:n] if pad else v)
