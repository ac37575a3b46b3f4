"""The exchange primitive: padded (CPU), the ragged op's definition
(`emulated`), and what the training step exports for GPU and TPU: every
exchange of ids, rows and gradients a `ragged_all_to_all`, no padded
all-to-all of them."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jdmt.data import SyntheticData, make_features
from jdmt.embeddings import ShardedEmbeddings, SparseOptimizer
from jdmt.embeddings.exchange import broadcast, exchange, payload_bytes
from jdmt.mesh import DEVICES, HOST, LOCAL
from jdmt.towers.partition import round_robin_partition
from jdmt.towers.sptt import SPTT

AXES = [(HOST, LOCAL), (LOCAL, HOST), (HOST,), (LOCAL,)]


def _reference(x, sizes, axis_devices):
    """What each device receives: block s = the first sizes[s][me] rows peer s sent."""
    n, g, cap = x.shape[:3]
    out = np.zeros_like(x)
    for me in range(n):
        group = axis_devices[me]
        for s_pos, src in enumerate(group):
            k = sizes[src][group.index(me)]
            out[me, s_pos, :k] = x[src, group.index(me), :k]
    return out


def _groups(axis, hosts=2, local=4):
    """For each flat device, the flat devices of its group in `axis` order."""
    out = []
    for d in range(hosts * local):
        h, l = divmod(d, local)
        if axis == (HOST, LOCAL):
            out.append([i for i in range(hosts * local)])
        elif axis == (LOCAL, HOST):
            out.append([hh * local + ll for ll in range(local) for hh in range(hosts)])
        elif axis == (HOST,):
            out.append([hh * local + l for hh in range(hosts)])
        else:
            out.append([h * local + ll for ll in range(local)])
    return out


@pytest.mark.parametrize("axis", AXES, ids=lambda a: "+".join(a))
@pytest.mark.parametrize("mode", ["padded", "emulated"])
def test_exchange_delivers_each_peer_its_rows(mesh24, axis, mode):
    groups = _groups(axis)
    g = len(groups[0])
    cap = 5
    rng = np.random.default_rng(len(axis))
    x = rng.standard_normal((8, g, cap, 3)).astype(np.float32)
    sizes = rng.integers(0, cap + 1, (8, g)).astype(np.int32)
    spec = P(DEVICES)

    def body(x, sizes):
        y, recv = exchange(x[0], sizes[0], axis, mode=mode)
        return y[None], recv[None]

    y, recv = jax.jit(jax.shard_map(body, mesh=mesh24, in_specs=(spec, spec), out_specs=(spec, spec)))(
        x, sizes)
    want = _reference(x, sizes, groups)
    np.testing.assert_array_equal(np.asarray(y), want)
    for me in range(8):
        assert [int(v) for v in recv[me]] == [int(sizes[src][groups[me].index(me)]) for src in groups[me]]


@pytest.mark.parametrize("mode", ["padded", "emulated"])
def test_broadcast_sends_one_list_to_everyone(mesh24, mode):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 100, (8, 6)).astype(np.int32)
    sizes = np.arange(8, dtype=np.int32) % 7

    def body(x, n):
        y, recv = broadcast(x[0], n[0], DEVICES, mode=mode, fill=-1)
        return y[None], recv[None]

    y, recv = jax.jit(jax.shard_map(body, mesh=mesh24, in_specs=(P(DEVICES),) * 2,
                                    out_specs=(P(DEVICES),) * 2))(x, sizes)
    for me in range(8):
        assert list(np.asarray(recv[me])) == list(sizes)
        for s in range(8):
            row = np.asarray(y[me, s])
            assert list(row[: sizes[s]]) == list(x[s, : sizes[s]]) and np.all(row[sizes[s]:] == -1)


def test_payload_counts_other_devices_by_level(mesh24):
    """Rows to peers on other hosts are cross-host, to the same host intra,
    to oneself nothing."""
    peer_host = np.array([0, 0, 0, 0, 1, 1, 1, 1], np.int32)
    sizes = jnp.arange(8, dtype=jnp.int32)
    cross, intra = payload_bytes(sizes, 10.0, peer_host, jnp.int32(0), jnp.int32(2))
    assert float(cross) == 10.0 * (4 + 5 + 6 + 7)
    assert float(intra) == 10.0 * (0 + 1 + 3)


FEATS = make_features(6, [50, 37, 20, 23, 64, 9], 8, [3, 2, 1, 3, 2, 1], combiner="mean", num_dense=2)
_RAGGED = re.compile(r"custom_call @ragged_all_to_all\(")


def _export(fn, args, platform):
    return jax.export.export(
        jax.jit(fn), platforms=[platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")],
    )(*args).mlir_module()


def _exchanges(text):
    """(ragged all-to-alls, operand types of the plain all-to-alls)."""
    plain = []
    for line in text.splitlines():
        if "stablehlo.all_to_all" in line:
            m = re.search(r":\s*\((tensor<[^>]*>)", line)
            plain.append(m.group(1) if m else line)
    return len(_RAGGED.findall(text)), plain


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("path", ["table_wise", "row_wise", "sptt_identity", "sptt_linear"])
def test_exported_step_exchanges_are_ragged(mesh24, platform, path):
    """The training step of the embeddings, exported for GPU and TPU: every
    exchange of ids, rows or gradients is a `ragged_all_to_all` (sizes
    computed on the device); a plain all-to-all only carries the i32 sizes
    of one, one per slice of a block (or, with Tower Modules, their
    fixed-size outputs)."""
    opt = SparseOptimizer(lr=0.1)
    kw = dict(kernel="xla", cpu_kernels=False, exchange="auto")
    b = SyntheticData(FEATS, seed=0).batch(0, 32)
    ids, lengths = jnp.asarray(b.ids), jnp.asarray(b.lengths)
    if path.startswith("sptt"):
        part = round_robin_partition(FEATS, 2, 2)
        module = path.split("_")[1]
        sp = SPTT(FEATS, mesh24, part.towers, part.hosts, opt, module=module,
                  tower_dim=None if module == "identity" else 4, **kw)
        emb, params = sp.emb, sp.init_params(0)
    else:
        sp, emb, params = None, ShardedEmbeddings(FEATS, mesh24, path, opt, **kw), {}
    emb.fit_caps(4, emb.measure(b.ids, b.lengths))

    def step(params, state, ids, lengths):
        acts, ctx, st = emb.forward(state, ids, lengths)
        if sp is not None and not sp.identity:
            loss = lambda p, a: jnp.sum(jnp.tanh(sp.tower_outputs(p, a)))  # noqa: E731
        else:
            loss = lambda p, a: jnp.sum(jnp.tanh(a.pooled)) + sum(  # noqa: E731
                jnp.sum(q) for q in a.sequence.values())
        gp, ga = jax.grad(loss, (0, 1))(params, acts)
        return gp, emb.update(state, ctx, ga, ids, lengths)[0]

    text = _export(step, (params, emb.init(0), ids, lengths), platform)
    ragged, plain = _exchanges(text)
    assert ragged >= 3, (ragged, plain)  # at least ids out, rows back, gradients out
    for t in plain:
        sizes = re.fullmatch(r"tensor<\d+(x[1-4])?xi32>", t)  # [G] or [G, K slices]
        tower_out = sp is not None and not sp.identity and t.endswith("xf32>")
        assert sizes or tower_out, t
    # on CPU the same step runs the padded exchange: no ragged op is left
    cpu = jax.jit(step).lower(params, emb.init(0), ids, lengths).as_text()
    assert "ragged_all_to_all" not in cpu
