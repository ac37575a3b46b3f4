"""Sharded embedding collection: every table of a model, placed by a plan.

A step uses four `shard_map` stages, each a single program over the
`('host', 'local')` mesh:

    routed    = emb.route(ids, lengths)          # input distribution (ids only)
    owner_out = emb.lookup(state, routed)        # local gathers at the owners
    embs      = emb.output_dist(owner_out, lengths)   # differentiable
    ...loss(embs)... -> d loss / d owner_out    # jax.grad through the collectives
    state     = emb.apply_gradients(state, routed, d_owner_out, owner_out)

The gradient is taken with respect to the owners' lookup outputs, never the
tables: JAX transposes the output distribution's collectives, so the row
gradients arrive at the owners, where `optimizers.sparse_step` de-duplicates
them and updates the touched rows in place.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jdmt.data.specs import Combiner, FeatureSet
from jdmt.embeddings import optimizers
from jdmt.embeddings.base import Group
from jdmt.embeddings.column_wise import column_wise_shards
from jdmt.embeddings.data_parallel import DataParallelGroup
from jdmt.embeddings.row_wise import RowWiseGroup
from jdmt.embeddings.table_row_wise import TableRowWiseGroup, table_row_wise_hosts
from jdmt.embeddings.table_wise import TableWiseGroup, table_wise_shards
from jdmt.embeddings.types import (
    Placement,
    ShardingType,
    SparseOptimizer,
    check_plan,
    plan_sharding,
)
from jdmt.mesh import DEVICES, mesh_shape
from jdmt.pallas_kernels.common import Impl, resolve


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TableState:
    """A group's fused buffer and its optimizer state (global arrays)."""

    weights: jax.Array  # f32[N * R, D] sharded over devices, or f32[R, D] replicated
    accum: jax.Array | None  # f32[N * R] / f32[N * R, D] / None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Routed:
    """What the input distribution produced: ids at their owners."""

    ids: dict[str, jax.Array]  # per group, i32 local rows at the owner (-1 = none)
    out_of_range: jax.Array  # i32[] ids outside [0, rows) of non-hashed features


@dataclasses.dataclass
class Embeddings:
    """The looked-up embeddings of a batch.

    Attributes:
      pooled: f32[B, sum of dims] pooled features side by side in feature
        order (None if there are none), like TorchRec's KeyedTensor.
      sequence: `{name: f32[B, S, D]}` sequence features (zeros past each length).
      pooled_names, pooled_dims: the keys and widths of `pooled`'s blocks.
    """

    pooled: jax.Array | None
    sequence: dict[str, jax.Array]
    pooled_names: tuple[str, ...] = ()
    pooled_dims: tuple[int, ...] = ()

    def stacked(self) -> jax.Array:
        """Pooled features as f32[B, F, D] (all pooled dims must be equal)."""
        if len(set(self.pooled_dims)) != 1:
            raise ValueError(f"pooled features have different dims {self.pooled_dims}")
        return self.pooled.reshape(self.pooled.shape[0], len(self.pooled_dims), self.pooled_dims[0])

    def __getitem__(self, name: str) -> jax.Array:
        if name in self.sequence:
            return self.sequence[name]
        i = self.pooled_names.index(name)
        start = sum(self.pooled_dims[:i])
        return self.pooled[:, start : start + self.pooled_dims[i]]

    def to_dict(self) -> dict[str, jax.Array]:
        """Every feature's embedding by name (slices: avoid inside a loss over
        many features, whose gradient then pads each slice)."""
        return {n: self[n] for n in (*self.pooled_names, *self.sequence)}


jax.tree_util.register_dataclass(
    Embeddings, data_fields=["pooled", "sequence"], meta_fields=["pooled_names", "pooled_dims"]
)


class OutOfRangeIdError(ValueError):
    """Ids outside a table's rows reached the device path."""


def _family(t: ShardingType) -> str:
    return {
        ShardingType.TABLE_WISE: "tw",
        ShardingType.COLUMN_WISE: "tw",
        ShardingType.ROW_WISE: "rw",
        ShardingType.DATA_PARALLEL: "dp",
        ShardingType.TABLE_ROW_WISE: "trw",
    }[t]


def build_groups(
    features: FeatureSet, plan: Mapping[str, Placement], num_devices: int,
    local: int | None = None,
) -> dict[str, Group]:
    """The fused groups of a plan: tables of one sharding family, kind, width
    and length cap share one buffer per device. Depends only on the features,
    the plan and the device count (not on a mesh), so the layout of a saved
    state can be rebuilt anywhere (`dense_from_buffers`). `local` (devices
    per host) matters to table-row-wise tables only; by default it is read
    from their placements (the devices of one host)."""
    n = num_devices
    plan = {f.name: plan[f.name] for f in features.sparse}
    trw_host, trw_local = table_row_wise_hosts(plan, local)
    buckets: dict[tuple, list] = {}
    shards = {}
    for t, fn in ((ShardingType.TABLE_WISE, table_wise_shards), (ShardingType.COLUMN_WISE, column_wise_shards)):
        sub = {k: p for k, p in plan.items() if p.type is t}
        shards.update(fn(features, sub))
    for f in features.sparse:
        p = plan[f.name]
        fam = _family(p.type)
        width = f.dim // len(p.devices) if p.type is ShardingType.COLUMN_WISE else f.dim
        key = (fam, f.kind.value, width, f.max_len)
        buckets.setdefault(key, []).append(f.name)
    groups: dict[str, Group] = {}
    for (fam, kind, width, ln), names in buckets.items():
        name = f"{fam}_{kind}_d{width}_l{ln}"
        idx = [features.index(x) for x in names]
        if fam == "tw":
            group_shards = [s for x in names for s in shards[x]]
            groups[name] = TableWiseGroup(name, features, group_shards, width, n)
        elif fam == "rw":
            groups[name] = RowWiseGroup(name, features, idx, width, n)
        elif fam == "trw":
            hosts = [trw_host[x] for x in names]
            groups[name] = TableRowWiseGroup(name, features, idx, hosts, width, n, trw_local)
        else:
            groups[name] = DataParallelGroup(name, features, idx, width, n)
    return groups


def dense_from_buffers(
    features: FeatureSet,
    groups: Mapping[str, Group],
    num_devices: int,
    buffers: Mapping[str, tuple[np.ndarray, np.ndarray | None]],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Full per-table arrays from host copies of the fused group buffers.

    Args:
      buffers: `{group: (weights f32[global_rows, width], accumulators or
        None)}`, the global arrays of a state laid out by `groups`.
    Returns:
      `({name: f32[rows, dim]}, {name: accumulators} or None)`: row-wise
      accumulators are f32[rows], element-wise ones f32[rows, dim].
    """
    names = [f.name for f in features.sparse]
    tables = {i: np.zeros((f.rows, f.dim), np.float32) for i, f in enumerate(features.sparse)}
    accs = None
    for name, g in groups.items():
        for k, (arr, out) in enumerate(zip(buffers[name], (tables, accs))):
            if arr is None:
                continue
            arr = np.asarray(arr, np.float32)
            if k == 1 and out is None:
                per_row = arr.ndim == 1
                accs = out = {
                    i: np.zeros((f.rows,) if per_row else (f.rows, f.dim), np.float32)
                    for i, f in enumerate(features.sparse)
                }
            parts = [arr] if g.replicated else np.split(arr, num_devices)
            g.scatter_into(parts, out)
    return (
        {names[i]: t for i, t in tables.items()},
        None if accs is None else {names[i]: a for i, a in accs.items()},
    )


class ShardedEmbeddings:
    """All embedding tables of a model, sharded over a `('host','local')` mesh.

    Args:
      features: the model's feature set (one table per sparse feature).
      mesh: the jdmt mesh.
      sharding: a sharding type for all tables, a type per table, or a full
        plan (`{name: Placement}`).
      optimizer: the fused sparse optimizer.
      unique_capacity: fraction of a slot's ids that one chunk of the update
        holds as unique rows (None: all of them). A step with more unique
        rows runs more chunks: nothing is dropped; only the time changes.
        Zipf-distributed ids rarely need more than half.
      cpu_kernels: run the optimizer step of each group whose update does not
        communicate (all but column-sharded tables) as the C++ FFI kernel
        (`jdmt.embeddings.cpu_kernels`). None (default): when every device of
        the mesh is a CPU and the kernel builds; False: always the XLA path.
        Not used with Pallas kernels.
      kernel: the lookups' and updates' implementation: "xla", "pallas"
        (`jdmt.pallas_kernels`: the target's kernels; interpreted on a CPU
        mesh) or "auto" (Pallas on TPU and GPU, XLA on CPU); or a resolved
        `pallas_kernels.Impl`.
    """

    def __init__(
        self,
        features: FeatureSet,
        mesh: Mesh,
        sharding: str | ShardingType | Mapping[str, str | ShardingType | Placement] = "table_wise",
        optimizer: SparseOptimizer = SparseOptimizer(),
        *,
        unique_capacity: float | None = 0.5,
        cpu_kernels: bool | None = None,
        kernel: str | Impl = "auto",
    ):
        self.features = features
        platform = mesh.devices.flat[0].platform
        self.impl = kernel if isinstance(kernel, Impl) else resolve(kernel, platform=platform)
        if self.impl.pallas:
            if cpu_kernels:
                raise ValueError("cpu_kernels=True and Pallas kernels exclude each other")
            cpu_kernels = False
        self.unique_capacity = unique_capacity
        self.mesh = mesh
        self.num_devices = int(mesh.devices.size)
        self.local = mesh_shape(mesh)[1]
        self.optimizer = optimizer
        if cpu_kernels is None or cpu_kernels:
            from jdmt.embeddings import cpu_kernels as ck

            on_cpu = all(d.platform == "cpu" for d in mesh.devices.flat)
            if cpu_kernels and not (on_cpu and ck.available()):
                raise ValueError("cpu_kernels=True needs a CPU mesh and a built kernel: "
                                 + (ck.unavailable_reason() or "the mesh is not on CPU"))
            cpu_kernels = on_cpu and ck.available()
        self.cpu_kernels = bool(cpu_kernels)
        if isinstance(sharding, Mapping) and all(isinstance(v, Placement) for v in sharding.values()):
            plan = dict(sharding)
        else:
            plan = plan_sharding(features, self.num_devices, sharding, local=self.local)
        check_plan(features, plan, self.num_devices, self.local)
        self.plan = {f.name: plan[f.name] for f in features.sparse}
        self.groups: dict[str, Group] = build_groups(features, self.plan, self.num_devices, self.local)

    def _specs(self, leaf_spec: Callable[[Group], P]):
        return {name: leaf_spec(g) for name, g in self.groups.items()}

    def state_specs(self) -> dict[str, TableState]:
        """PartitionSpecs of the state (same tree as `init`'s output)."""
        acc = optimizers.accumulator_shape(self.optimizer, 1, 1)
        return {
            name: TableState(g.spec, g.spec if acc is not None else None)
            for name, g in self.groups.items()
        }

    def state_shardings(self):
        return jax.tree.map(lambda s: NamedSharding(self.mesh, s), self.state_specs())

    def state_shapes(self) -> dict[str, TableState]:
        """`jax.ShapeDtypeStruct`s of the state with shardings (for restores)."""
        out = {}
        for name, g in self.groups.items():
            sh = NamedSharding(self.mesh, g.spec)
            acc = optimizers.accumulator_shape(self.optimizer, g.global_rows, g.width)
            out[name] = TableState(
                jax.ShapeDtypeStruct((g.global_rows, g.width), jnp.float32, sharding=sh),
                None if acc is None else jax.ShapeDtypeStruct(acc, jnp.float32, sharding=sh),
            )
        return out

    def _shard_map(self, body, in_specs, out_specs, check_vma=True):
        return jax.shard_map(
            body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma
        )

    # ---- state ------------------------------------------------------------------------------

    def init(self, seed: int = 0) -> dict[str, TableState]:
        """Initial tables, built shard by shard on the devices (no host copy of
        any table). The values depend on (seed, feature, row, col) only, so
        every sharding plan starts from the same model."""
        scales = np.array([np.sqrt(1.0 / f.rows) for f in self.features.sparse], np.float32)

        def body(seed):
            me = lax.axis_index(DEVICES)
            out = {}
            for name, g in self.groups.items():
                w = g.init_local(seed, 0 if g.replicated else me, scales)
                acc = optimizers.init_accumulator(self.optimizer, g.local_rows, g.width)
                out[name] = TableState(w, acc)
            return out

        fn = self._shard_map(body, in_specs=(P(),), out_specs=self.state_specs())
        return jax.jit(fn)(jnp.uint32(seed))

    def from_dense(
        self,
        tables: Mapping[str, np.ndarray],
        accumulators: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, TableState]:
        """State from full host tables `{name: f32[rows, dim]}` (tests, imports).

        Each device's shard is cut from the host arrays on the process that
        owns the device.
        """
        order = [np.asarray(tables[f.name], np.float32) for f in self.features.sparse]
        for f, t in zip(self.features.sparse, order):
            if t.shape != (f.rows, f.dim):
                raise ValueError(f"table {f.name!r} has shape {t.shape}, expected {(f.rows, f.dim)}")
        acc_kind = optimizers.accumulator_shape(self.optimizer, 1, 1)
        if accumulators is not None:
            accs = [np.asarray(accumulators[f.name], np.float32) for f in self.features.sparse]
        elif acc_kind is not None:
            init = self.optimizer.initial_accumulator
            accs = [
                np.full((f.rows,) if len(acc_kind) == 1 else (f.rows, f.dim), init, np.float32)
                for f in self.features.sparse
            ]
        out = {}
        for name, g in self.groups.items():
            sh = NamedSharding(self.mesh, g.spec)

            def make(shape, piece):
                def cb(index):
                    start = index[0].start or 0
                    dev = 0 if g.replicated else start // g.local_rows
                    return piece(dev)

                return jax.make_array_from_callback(shape, sh, cb)

            w = make((g.global_rows, g.width), lambda d: g.assemble(order, d))
            acc = None
            if acc_kind is not None:
                if len(acc_kind) == 1:
                    acc = make((g.global_rows,), lambda d: g.assemble_rows(accs, d))
                else:
                    acc = make((g.global_rows, g.width), lambda d: g.assemble(accs, d))
            out[name] = TableState(w, acc)
        return out

    def to_dense(self, state: Mapping[str, TableState]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        """Full host copies of all tables and accumulators (tests, exports)."""
        host = {
            name: (_host_array(st.weights), None if st.accum is None else _host_array(st.accum))
            for name, st in state.items()
        }
        return dense_from_buffers(self.features, self.groups, self.num_devices, host)

    # ---- the four stages ----------------------------------------------------------------

    def route(self, ids: jax.Array, lengths: jax.Array) -> Routed:
        """Input distribution: ids (i32[B_global, slots], sharded over devices)
        to the devices that own their rows."""

        def body(ids, lengths):
            out, bad = {}, jnp.zeros((), jnp.int32)
            for name, g in self.groups.items():
                out[name], b = g.input_dist(ids, lengths)
                bad = bad + b
            return Routed(out, lax.psum(bad, DEVICES))

        specs = Routed(self._specs(lambda g: P(DEVICES)), P())
        return self._shard_map(body, (P(DEVICES), P(DEVICES)), specs)(ids, lengths)

    def lookup(self, state: Mapping[str, TableState], routed: Routed) -> dict[str, jax.Array]:
        """Local gathers (pooled or not) at the owners."""

        def body(weights, ids):
            return {name: g.lookup(weights[name], ids[name], self.impl)
                    for name, g in self.groups.items()}

        w = {k: v.weights for k, v in state.items()}
        # Pallas calls inside shard_map need the varying-axes check off
        # (research.md); this stage is never differentiated.
        return self._shard_map(
            body, (self._specs(lambda g: g.spec), self._specs(lambda g: P(DEVICES))),
            self._specs(lambda g: P(DEVICES)), check_vma=not self.impl.pallas,
        )(w, routed.ids)

    def output_dist(self, owner_out: Mapping[str, jax.Array], lengths: jax.Array) -> "Embeddings":
        """Embeddings back to each sample's device (differentiable).

        Returns:
          `Embeddings`: pooled features as one f32[B, sum of dims] matrix in
          feature order (TorchRec's KeyedTensor), sequence features as
          `{name: f32[B, S, D]}`.
        """
        feats = self.features.sparse
        pooled_idx = [i for i, f in enumerate(feats) if f.pooled]
        seq_names = [f.name for f in feats if not f.pooled]
        col0 = dict(zip(pooled_idx, np.cumsum([0] + [feats[i].dim for i in pooled_idx])[:-1]))
        mean = np.array([feats[i].combiner is Combiner.MEAN for i in pooled_idx])

        def body(owner_out, lengths):
            blocks, dest, seq = [], [], {}
            for name, g in self.groups.items():
                arr = g.output_dist(owner_out[name])
                if g.pooled:
                    blocks.append(arr.reshape(arr.shape[0], -1))
                    for piece in g.pieces():
                        start = col0[piece.feature] + piece.col0
                        dest.extend(range(start, start + g.width))
                else:
                    for j, piece in enumerate(g.pieces()):
                        seq.setdefault(piece.feature, []).append((piece.col0, arr[:, j]))
            pooled = None
            if blocks:
                pooled = blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=1)
                dest = np.asarray(dest)
                if not np.array_equal(dest, np.arange(dest.size)):
                    pooled = jnp.take(pooled, np.argsort(dest), axis=1)
                if mean.any():
                    col_feature = np.repeat(np.arange(len(pooled_idx)), [feats[i].dim for i in pooled_idx])
                    n = jnp.maximum(lengths[:, np.array(pooled_idx)], 1).astype(pooled.dtype)
                    scale = jnp.where(jnp.asarray(mean)[None, :], 1.0 / n, 1.0)
                    pooled = pooled * jnp.take(scale, col_feature, axis=1)
            sequence = {}
            for i, parts in sorted(seq.items()):
                parts = [a for _, a in sorted(parts, key=lambda p: p[0])]
                sequence[feats[i].name] = parts[0] if len(parts) == 1 else jnp.concatenate(parts, -1)
            return pooled, sequence

        pooled, sequence = self._shard_map(
            body, (self._specs(lambda g: P(DEVICES)), P(DEVICES)),
            (P(DEVICES) if pooled_idx else None, {n: P(DEVICES) for n in seq_names}),
        )(dict(owner_out), lengths)
        return Embeddings(
            pooled, sequence, tuple(feats[i].name for i in pooled_idx),
            tuple(feats[i].dim for i in pooled_idx),
        )

    def apply_gradients(
        self,
        state: Mapping[str, TableState],
        routed: Routed,
        owner_grads: Mapping[str, jax.Array],
        owner_out: Mapping[str, jax.Array],
        lr: jax.Array | float | None = None,
    ) -> dict[str, TableState]:
        """The fused sparse optimizer step at the owners, touched rows only.

        Same as `apply_gradients_with_stats` without the stats.
        """
        return self.apply_gradients_with_stats(state, routed, owner_grads, owner_out, lr)[0]

    def apply_gradients_with_stats(
        self,
        state: Mapping[str, TableState],
        routed: Routed,
        owner_grads: Mapping[str, jax.Array],
        owner_out: Mapping[str, jax.Array],
        lr: jax.Array | float | None = None,
    ) -> tuple[dict[str, TableState], dict[str, jax.Array]]:
        """The fused sparse optimizer step at the owners, touched rows only.

        Args:
          owner_grads: gradient of the loss w.r.t. `lookup`'s outputs.
          owner_out: `lookup`'s outputs (the update is made to depend on them,
            so the in-place write is ordered after the reads).
          lr: learning rate override (e.g. a schedule); default the optimizer's.

        Returns:
          (new state, stats): stats `{"unique_overflow": i32[]}` counts the
          (device, group) updates whose unique rows exceeded the capacity and
          needed more than one chunk (slower, never lossy).
        """
        lr = self.optimizer.lr if lr is None else lr
        opt = self.optimizer

        def body(state, ids, grads, outs, lr):
            new, over = {}, jnp.zeros((), jnp.int32)
            for name, g in self.groups.items():
                st = state[name]
                # The write must depend on this step's reads of the table, or XLA
                # keeps the old table alive by copying it (research.md).
                after = jnp.sum(outs[name]) * 0
                kid, kg = g.update_view(ids[name], grads[name] + after.astype(grads[name].dtype))
                base, most = g.slot_bounds()
                cap, agree = self._capacity(g, kid.shape[1] * kid.shape[2], most)
                w, acc, o = optimizers.sparse_step(
                    opt, st.weights, st.accum, kid, kg, base=base, max_rows=most, lr=lr,
                    row_mean_sq=g.row_mean_sq, capacity=cap, agree=agree,
                    cpu_kernel=self.cpu_kernels and not getattr(g, "communicating_update", False),
                    impl=self.impl,
                )
                new[name] = TableState(w, acc)
                over = over + o
            return new, lax.psum(over, DEVICES)

        dev = self._specs(lambda g: P(DEVICES))
        # Replicated (data-parallel) tables come out of an all-gather that JAX
        # types as varying; every replica computes the same update from the same
        # gathered ids and gradients, so they are declared replicated. This stage
        # is never differentiated, so turning the check off costs nothing.
        new, over = self._shard_map(
            body, (self.state_specs(), dev, dev, dev, P()), (self.state_specs(), P()),
            check_vma=False,
        )(dict(state), routed.ids, dict(owner_grads), dict(owner_out), jnp.asarray(lr, jnp.float32))
        return new, {"unique_overflow": over}

    def _capacity(self, g: Group, ids_per_slot: int, max_rows: int):
        """Fast-path unique-row capacity of a group's update (None: no fast
        path), and the cross-device agreement it needs, if any."""
        if self.unique_capacity is None:
            return None, None
        cap = min(max_rows, ids_per_slot, max(8, -(-int(self.unique_capacity * ids_per_slot) // 8) * 8))
        if cap >= min(max_rows, ids_per_slot):
            return None, None  # the fast path already holds every possible row
        agree = None
        if getattr(g, "communicating_update", False):
            agree = lambda over: lax.pmax(over, DEVICES)  # noqa: E731
        return cap, agree

    def forward(self, state, ids, lengths) -> Embeddings:
        """Route, look up and distribute: the embeddings of a batch."""
        return self.output_dist(self.lookup(state, self.route(ids, lengths)), lengths)

    def step(self, state, ids, lengths, loss_fn: Callable, *args, lr=None):
        """One sparse training step of the embeddings alone (dense parts are the
        caller's): `loss_fn(embs, *args) -> scalar`. Returns (loss, new state,
        gradients of `args`, out-of-range id count); `embs` is an `Embeddings`."""
        routed = self.route(ids, lengths)
        owner_out = self.lookup(state, routed)

        def f(owner_out, *args):
            return loss_fn(self.output_dist(owner_out, lengths), *args)

        loss, grads = jax.value_and_grad(f, argnums=tuple(range(1 + len(args))))(owner_out, *args)
        new_state = self.apply_gradients(state, routed, grads[0], owner_out, lr)
        return loss, new_state, grads[1:], routed.out_of_range

    def describe(self) -> list[dict]:
        """One line per group: its sharding family, tables and buffer shape."""
        return [
            {
                "group": name,
                "tables": [self.features.sparse[i].name for i in g.members],
                "local_rows": g.local_rows,
                "width": g.width,
                "replicated": g.replicated,
            }
            for name, g in self.groups.items()
        ]


def _host_array(arr: jax.Array) -> np.ndarray:
    if arr.is_fully_addressable:
        return np.asarray(jax.device_get(arr))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(arr, tiled=True))
