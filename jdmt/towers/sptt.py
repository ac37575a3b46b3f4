"""SPTT: the semantic-preserving tower transform of Disaggregated Multi-Tower.

Features are grouped into towers; tower t lives on host `hosts[t]` (several
towers may share a host), its tables inside that host: table-wise (one
device per table, the default) or table-row-wise (a table's rows spread
over the host's L devices; `row_wise`). Every table takes the host path
(`jdmt.embeddings.hosted`), with H hosts, L local devices and B samples
per device:

    route     every bag of a tower's feature goes to the tower's host by one
              exchange over `host` (to the peer of the same local rank, its
              *entry*; only real ids travel, behind a header of lengths);
              inside the host the entry sends a table-wise bag on to its
              owner (over `local`), which pools it, or splits a row-spread
              bag into de-duplicated row requests to the row shards and
              pools the rows itself.
    towers    device (h, l) then holds host h's towers' bags for the H*B
              samples of the devices (h', l): f32[H*B, F_t, D] per tower
              (mean-combined features, and sequences, divided by their id
              counts). Each tower's Tower Module compresses them to
              f32[H*B, C]; an all-to-all over `host` returns every sample's
              tower outputs to its own device: f32[B, T, C].

A compressing Tower Module mean-pools each sequence feature in the tower
(one more input of width D). Only the ids and the compressed outputs cross
hosts; how a host shards its tables over `local` does not change what
crosses. The backward runs the path in reverse: the Tower Modules'
gradients (by JAX) reach the entry's bags, the bags' gradients go to the
owners (`ShardedEmbeddings.update`), whose fused sparse optimizer updates
the touched rows in place.

The identity module is the flat model laid out in towers: the entry
returns each bag's pooled row to its requester, and sequences and one-id
bags ask for unique rows through the entry (`hosted`), so `forward` gives
exactly the flat path's `Embeddings`, and the tables are updated bit for
bit as the flat path updates them with the same plan (`tower_plan`). An
SPTT state is a flat state: checkpoints move between the two.
"""

from __future__ import annotations

from typing import Any, Collection, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jdmt.data.specs import FeatureSet
from jdmt.embeddings import Placement, ShardedEmbeddings, ShardingType, SparseOptimizer, routing
from jdmt.embeddings.types import host_devices
from jdmt.mesh import DEVICES, HOST, LOCAL, mesh_shape
from jdmt.towers.modules import TowerModule, init_stacked, tower_output_dim

__all__ = ["SPTT", "TowerError", "auto_row_wise", "hierarchical_all_to_all", "tower_plan"]


class TowerError(ValueError):
    """Towers that do not partition the features, or cannot be placed."""


def hierarchical_all_to_all(x: jax.Array, hosts: int, local: int) -> jax.Array:
    """The flat all-to-all over `('host', 'local')` as one over `host`, then one
    over `local` (inside `shard_map`).

    `x`'s first axis, of size H*L, indexes destination devices host-major;
    the result's indexes source devices the same way, as
    `lax.all_to_all(x, ('host', 'local'), 0, 0, tiled=True)` gives. The
    axis is reshaped into its (host, local) digits and each digit travels
    on its own mesh axis: the first hop goes to the peer with the same
    local rank on every host, the second stays inside the host. (SPTT's
    route is this exchange with the first hop cut down to the tables of
    each destination host.)
    """
    rest = x.shape[1:]
    y = x.reshape((hosts, local) + rest)
    y = lax.all_to_all(y, HOST, 0, 0, tiled=True)  # [H(src host), L(dest local), ...]
    y = lax.all_to_all(y, LOCAL, 1, 1, tiled=True)  # [H(src host), L(src local), ...]
    return y.reshape((hosts * local,) + rest)


def _table_size(features: FeatureSet, name: str) -> int:
    """Elements (rows x dim) of a table: what tower_plan balances."""
    return features[name].rows * features[name].dim


def auto_row_wise(
    features: FeatureSet, towers: Sequence[Sequence[str]], hosts_of_towers: Sequence[int], local: int
) -> frozenset[str]:
    """The tables `row_wise='auto'` spreads over their host's devices: those
    bigger than an even share of their host's tower tables, (sum of the
    host's table sizes) / L, which no table-wise placement can balance.
    None with one device per host."""
    if local < 2:
        return frozenset()
    total: dict[int, int] = {}
    for names, h in zip(towers, hosts_of_towers):
        total[h] = total.get(h, 0) + sum(_table_size(features, n) for n in names)
    return frozenset(
        n for names, h in zip(towers, hosts_of_towers) for n in names
        if _table_size(features, n) * local > total[h]
    )


def tower_plan(
    features: FeatureSet,
    towers: Sequence[Sequence[str]],
    hosts_of_towers: Sequence[int],
    local: int,
    row_wise: Collection[str] | str = (),
) -> dict[str, Placement]:
    """Owners inside each tower's host.

    Tables in `row_wise` (`'auto'`: `auto_row_wise`) are table-row-wise over
    the L devices of their tower's host; the others table-wise, largest
    first, each on the local device of that host with the fewest bytes so
    far (a row-wise table adds 1/L of its bytes to each of its devices).
    """
    if isinstance(row_wise, str):
        row_wise = auto_row_wise(features, towers, hosts_of_towers, local)
    load: dict[tuple[int, int], float] = {}
    plan = {}
    pairs = [(name, h) for names, h in zip(towers, hosts_of_towers) for name in names]
    for name, h in pairs:
        if name in row_wise:
            plan[name] = Placement(ShardingType.TABLE_ROW_WISE, host_devices(h, local))
            for l in range(local):
                load[(h, l)] = load.get((h, l), 0) + _table_size(features, name) / local
    by_size = sorted(
        (p for p in pairs if p[0] not in row_wise), key=lambda p: (-_table_size(features, p[0]), p[0])
    )
    for name, h in by_size:
        l = min(range(local), key=lambda j: (load.get((h, j), 0), j))
        load[(h, l)] = load.get((h, l), 0) + _table_size(features, name)
        plan[name] = Placement(ShardingType.TABLE_WISE, (h * local + l,))
    return plan


class SPTT:
    """Tower-owned embedding tables with the two-hop exchange and Tower Modules.

    Args:
      features: the feature set (pooled and sequence features of one width).
      mesh: the `('host', 'local')` mesh.
      towers: feature names per tower; together every sparse feature once.
      hosts: the host of each tower.
      optimizer: the fused sparse optimizer of the tables.
      module: Tower Module kind (`TOWER_MODULES`).
      tower_dim: C of the compressing modules (identity: none).
      row_wise: tables sharded table-row-wise over their tower's host (the
        others are table-wise on one of its devices), or `'auto'`: those
        bigger than an even share of their host (`auto_row_wise`).
      cpu_kernels, kernel, exchange, bag_features, table_dtype: passed to
        `ShardedEmbeddings`.

    Attributes:
      emb: the `ShardedEmbeddings` of the tower plan (state, update, checkpoints).
      tower_inputs: per tower, the features its Tower Module reads (in
        `towers` order; every feature: sequences are mean-pooled in the tower).
      row_wise: the table-row-wise tables, in feature order.
      out_dim: C, each tower's output width (0 for the identity module).

    Raises:
      TowerError: towers that do not partition the features, an empty
        tower, a host outside the mesh, more towers than features, mixed
        widths, or unknown `row_wise` tables.
    """

    def __init__(
        self,
        features: FeatureSet,
        mesh: Mesh,
        towers: Sequence[Sequence[str]],
        hosts: Sequence[int],
        optimizer: SparseOptimizer = SparseOptimizer(),
        *,
        module: str = "identity",
        tower_dim: int | None = None,
        row_wise: Collection[str] | str = (),
        cpu_kernels: bool | None = None,
        kernel: str = "auto",
        exchange: str = "auto",
        bag_features=None,
        table_dtype="f32",
    ):
        self.features = features
        self.mesh = mesh
        self.hosts, self.local = mesh_shape(mesh)
        self.towers = tuple(tuple(t) for t in towers)
        self.tower_hosts = tuple(int(h) for h in hosts)
        self._validate(row_wise)
        self.dim = features.sparse[0].dim
        tower_output_dim(module, 1, self.dim, tower_dim)  # a bad module or C fails here
        self.module_kind = module
        plan = tower_plan(features, self.towers, self.tower_hosts, self.local, row_wise)
        self.row_wise = tuple(n for n in features.names if plan[n].type is ShardingType.TABLE_ROW_WISE)
        self.emb = ShardedEmbeddings(features, mesh, plan, optimizer, cpu_kernels=cpu_kernels,
                                     kernel=kernel, exchange=exchange, bag_features=bag_features,
                                     host_features=features.names, towers=not self.identity,
                                     table_dtype=table_dtype)
        self.tower_inputs = tuple(tuple(t) for t in self.towers)
        self.f_max = max(1, max(len(t) for t in self.tower_inputs))
        self.out_dim = 0 if self.identity else tower_output_dim(module, self.f_max, self.dim, tower_dim)
        self.module = None if self.identity else TowerModule(module, self.out_dim)
        self._layout()

    # ---- construction -----------------------------------------------------------------
    def _validate(self, row_wise: Collection[str] | str) -> None:
        names = [n for t in self.towers for n in t]
        known = set(self.features.names)
        if len(self.towers) > len(self.features.sparse):
            raise TowerError(
                f"{len(self.towers)} towers for {len(self.features.sparse)} features: "
                "every tower needs at least one feature"
            )
        if len(self.tower_hosts) != len(self.towers):
            raise TowerError(f"{len(self.towers)} towers but {len(self.tower_hosts)} hosts given")
        if any(not t for t in self.towers):
            raise TowerError(f"tower {[len(t) for t in self.towers].index(0)} is empty")
        unknown = sorted(set(names) - known)
        if unknown:
            raise TowerError(f"towers name unknown features: {unknown[:5]}")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise TowerError(f"features in more than one tower: {twice[:5]}")
        missing = [n for n in self.features.names if n not in set(names)]
        if missing:
            raise TowerError(f"features in no tower: {missing[:5]}")
        bad = [h for h in self.tower_hosts if not 0 <= h < self.hosts]
        if bad:
            raise TowerError(f"tower hosts {bad} are outside the mesh's {self.hosts} hosts")
        dims = sorted({f.dim for f in self.features.sparse})
        if len(dims) != 1:
            raise TowerError(f"the towers' features must share one width, got {dims}")
        if isinstance(row_wise, str):
            if row_wise != "auto":
                raise TowerError(f"row_wise must be 'auto' or feature names, got {row_wise!r}")
        elif sorted(set(row_wise) - known):
            raise TowerError(f"row_wise names unknown features: {sorted(set(row_wise) - known)[:5]}")

    @property
    def identity(self) -> bool:
        return self.module_kind == "identity"

    def _layout(self) -> None:
        """Static tables: where each tower input sits among its host's bags,
        the tower slots of each host, and the return's tower order."""
        h = self.hosts
        host = self.emb.host
        if self.identity:  # the identity module's forward is the flat embeddings
            self.t_max, self.slot_index, self.slot_tower, self.tower_take = 1, None, None, None
            return
        by_host = [[t for t, hh in enumerate(self.tower_hosts) if hh == x] for x in range(h)]
        self.t_max = max(1, max(len(v) for v in by_host))
        idx = np.full((h, self.t_max, self.f_max), host.jmax, np.int32)  # jmax: a zero slot
        slot_tower = np.full((h, self.t_max), -1, np.int32)
        for x, ts in enumerate(by_host):
            for j, t in enumerate(ts):
                slot_tower[x, j] = t
                for i, name in enumerate(self.tower_inputs[t]):
                    hh, slot = host.slot_of[self.features.index(name)]
                    assert hh == x
                    idx[x, j, i] = slot
        self.slot_index = idx
        self.slot_inverse = routing.inverse_index(idx.reshape(h, -1), host.jmax)  # the gradient's gather
        # every host's towers take all its slots in order (e.g. one tower per host): a reshape
        tf = self.t_max * self.f_max
        self.slots_in_order = tf == host.jmax and np.array_equal(
            idx.reshape(h, -1), np.broadcast_to(np.arange(tf), (h, tf)))
        self.slot_tower = slot_tower
        # After the return all-to-all a device holds [H * T_max] tower slots; the
        # global tower order picks them.
        pos = {int(t): x * self.t_max + j for x in range(h) for j, t in enumerate(slot_tower[x]) if t >= 0}
        self.tower_take = np.array([pos[t] for t in range(len(self.towers))], np.int32)
        self.tower_inverse = routing.inverse_index(self.tower_take[None], h * self.t_max)[0]

    # ---- parameters ----------------------------------------------------------------------

    @property
    def param_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(HOST))

    def stacked_params(self, seed: int = 0) -> Any:
        """Tower Module parameters, stacked [H, T_max, ...] (traceable; place them
        with `param_sharding`). Tower t's values depend on (seed, t) only.
        The identity module has none."""
        if self.identity:
            return {}
        return init_stacked(self.module, seed, jnp.asarray(self.slot_tower), self.f_max, self.dim)

    def init_params(self, seed: int = 0) -> Any:
        """`stacked_params`, computed on the devices and sharded over `host`."""
        fn = lambda: self.stacked_params(seed)  # noqa: E731
        shapes = jax.eval_shape(fn)
        return jax.jit(fn, out_shardings=jax.tree.map(lambda _: self.param_sharding, shapes))()

    # ---- the step ------------------------------------------------------------------------

    def forward(self, state, ids, lengths, weights=None):
        """`emb.forward`: the identity module's `Embeddings` at the requesters,
        or a compressing module's inputs, the bags pooled at the entries
        (`weights`: the batch's per-sample weights, for weighted features)."""
        return self.emb.forward(state, ids, lengths, weights)

    def update(self, state, ctx, grads, ids, lengths, weights=None, *, lr=None, skip=False, seed=None):
        """`emb.update` with the gradients of `forward`'s outputs."""
        return self.emb.update(state, ctx, grads, ids, lengths, weights, lr=lr, skip=skip, seed=seed)

    def tower_outputs(self, params: Any, entry: jax.Array, module: TowerModule | None = None, *,
                      inside: bool = False) -> jax.Array:
        """Tower Module outputs of every sample: f32[B_global, T, C], towers in
        partition order (differentiable in `params` and `entry`).

        Args:
          entry: `forward`'s output with a compressing module: the bags pooled
            at the entries, f32[N * H, B, J, D] (mean features averaged).
          module: the Tower Module `params` are of (default: this SPTT's; a
            growth-prune phase passes a pruned one).
          inside: called inside a `shard_map` over the mesh, on this device's
            blocks (params [1, T_max, ...], entry [H, B, J, D]); returns this
            device's samples' outputs f32[B, T, C].
        """
        if self.identity:
            raise TowerError("the identity Tower Module has no outputs to compute: its forward "
                             "returns the flat embeddings")
        h = self.hosts
        module = self.module if module is None else module

        def body(params, x):
            me = lax.axis_index(HOST)
            b, d = x.shape[1], x.shape[3]
            if self.slots_in_order:
                x = x.reshape(h, b, self.t_max, self.f_max, d)
            else:  # [H, B, T_max, F_max, D]; no slot feeds two towers, so the gradient is a gather
                # too (autodiff's own: a scatter-add into a zero buffer of x's size)
                x = routing.one_to_one_take(x, jnp.asarray(self.slot_index)[me],
                                            jnp.asarray(self.slot_inverse)[me], 2)
            x = jnp.transpose(x, (2, 0, 1, 3, 4)).reshape(self.t_max, h * b, self.f_max, d)
            p = jax.tree.map(lambda a: a[0], params)  # this host's towers [T_max, ...]
            y = jax.vmap(lambda pt, xt: module.apply({"params": pt}, xt))(p, x)
            y = jnp.transpose(y.reshape(self.t_max, h, b, -1), (1, 0, 2, 3))  # [H(dest), T_max, B, C]
            y = lax.all_to_all(y, HOST, 0, 0, tiled=True)  # [H(tower host), T_max, B, C]
            y = routing.one_to_one_take(y.reshape(h * self.t_max, b, -1), jnp.asarray(self.tower_take),
                                        jnp.asarray(self.tower_inverse), 0)  # [T, B, C]
            return jnp.transpose(y, (1, 0, 2))

        if inside:
            return body(params, entry)
        param_specs = jax.tree.map(lambda _: P(HOST), params)
        return jax.shard_map(
            body, mesh=self.mesh, in_specs=(param_specs, P(DEVICES)), out_specs=P(DEVICES),
        )(params, entry)
