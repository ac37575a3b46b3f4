"""The dense gradients' all-reduce by mesh level (`jdmt.train.allreduce`):
the same sums as one all-reduce, 1/L of the gradients across hosts, and the
same training as XLA's own all-reduce."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from jdmt import cpu_malloc
from jdmt.comm import comm_report
from jdmt.mesh import DEVICES, LOCAL, make_mesh
from jdmt.train import train_and_evaluate
from jdmt.train.allreduce import hierarchical_psum

from test_train import tiny_config


@pytest.mark.parametrize("spec", ["2x4", "4x2", "1x8", "8x1"])
def test_hierarchical_psum_is_the_psum(spec):
    mesh = make_mesh(spec)
    h, ln = (int(x) for x in spec.split("x"))
    rng = np.random.default_rng(0)
    # integers in f32: every order of the sum is exact; 7 + 3 * 5 values: padded to L
    tree = {"a": rng.integers(-50, 50, (8, 7)).astype(np.float32),
            "b": rng.integers(-50, 50, (8, 3, 5)).astype(np.float32)}

    def body(t):
        t = jax.tree.map(lambda x: x[0], t)
        return (jax.tree.map(lambda x: x[None], hierarchical_psum(t, h, ln)),
                jax.tree.map(lambda x: x[None], hierarchical_psum(t, h, ln, over_hosts=False)),
                jax.tree.map(lambda x: lax.psum(x, DEVICES)[None], t),
                jax.tree.map(lambda x: lax.psum(x, LOCAL)[None], t))

    got, local, want, want_local = jax.jit(jax.shard_map(
        body, mesh=mesh, in_specs=P(DEVICES), out_specs=P(DEVICES), check_vma=False))(tree)
    for k in tree:
        np.testing.assert_array_equal(got[k], want[k])
        np.testing.assert_array_equal(local[k], want_local[k])


def test_hierarchical_psum_sends_one_lth_across_hosts(mesh24):
    n = 1000  # f32 values per device
    x = jnp.ones((8, n), jnp.float32)

    def run(fn):
        f = jax.jit(jax.shard_map(fn, mesh=mesh24, in_specs=P(DEVICES), out_specs=P(DEVICES),
                                  check_vma=False))
        return comm_report(f, x, mesh=mesh24)

    hier = run(lambda v: hierarchical_psum(v[0], 2, 4)[None])
    across = [c for c in hier.collectives if c.cross_host_bytes > 0]
    assert [c.kind for c in across] == ["all-reduce"]
    assert across[0].group_size == 2 and across[0].operand_bytes == 4 * n / 4  # this device's 1/L
    flat = run(lambda v: lax.psum(v[0], DEVICES)[None])
    assert hier.cross_host_bytes < flat.cross_host_bytes


@pytest.mark.parametrize("towers", [None, 2])
def test_training_matches_xla_all_reduce(mesh24, towers):
    kw = dict(steps=5) if towers is None else dict(steps=5, towers=towers, tower_module="linear", tower_dim=4)
    runs = {m: train_and_evaluate(tiny_config(dense_allreduce=m, **kw), mesh24)
            for m in ("xla", "hierarchical")}
    x, h = runs["xla"], runs["hierarchical"]
    assert h["dense_allreduce"] == "hierarchical" and x["dense_allreduce"] == "xla"
    # the summary and the start-up line say what malloc runs with (this process: 8 devices)
    assert h["malloc"] == cpu_malloc.state() and f"malloc: {h['malloc']}" in h["path"]
    # the same sums in another order: float32 rounding apart
    np.testing.assert_allclose(h["train_loss"], x["train_loss"], rtol=2e-6)
    assert h["cross_host_bytes_per_step"] < x["cross_host_bytes_per_step"]
