"""SPTT: the semantic-preserving tower transform of Disaggregated Multi-Tower.

Features are grouped into towers; tower t lives on host `hosts[t]` (several
towers may share a host), its tables placed table-wise on that host's local
devices. One step, with H hosts, L local devices and B samples per device:

    route     ids -> their owners: an all-to-all over `host` (to the peer of
              the same local rank on the tower's host), then one over `local`
              (to the owner inside that host). The ids arrive arranged exactly
              as the flat table-wise all-to-all arranges them.
    lookup    the owners gather and pool their rows (the flat path's lookup).
    towers    the pooled rows go back over `local` only: device (h, l) then
              holds host h's towers' embeddings for the H*B samples of the
              devices (h', l), f32[H*B, F_t, D] per tower. Each tower's Tower
              Module compresses them to f32[H*B, C]; an all-to-all over `host`
              returns every sample's tower outputs to its own device:
              f32[B, T, C].

Only the compressed outputs (and the ids) cross hosts. Backward runs the same
path transposed; the row gradients end at the owners, whose fused sparse
optimizer updates the touched rows in place (`ShardedEmbeddings`, whose
tables, initial values, update and checkpoint layout SPTT shares: an SPTT
state is a table-wise state with a tower-consistent plan).

Semantic preservation: with the identity Tower Module, `flat_embeddings`
returns exactly the flat path's pooled embeddings f32[B, F, D] (features
permuted back into feature order), and their gradients reach the same rows.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jdmt.data.specs import Combiner, FeatureSet
from jdmt.embeddings import Placement, Routed, ShardedEmbeddings, ShardingType, SparseOptimizer
from jdmt.embeddings.table_wise import TableWiseGroup
from jdmt.mesh import DEVICES, HOST, LOCAL, mesh_shape
from jdmt.towers.modules import TowerModule, init_stacked, tower_output_dim

__all__ = ["SPTT", "TowerError", "hierarchical_all_to_all", "tower_plan"]


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
    local rank on every host, the second stays inside the host.
    """
    rest = x.shape[1:]
    y = x.reshape((hosts, local) + rest)
    y = lax.all_to_all(y, HOST, 0, 0, tiled=True)  # [H(src host), L(dest local), ...]
    y = lax.all_to_all(y, LOCAL, 1, 1, tiled=True)  # [H(src host), L(src local), ...]
    return y.reshape((hosts * local,) + rest)


def tower_plan(
    features: FeatureSet, towers: Sequence[Sequence[str]], hosts_of_towers: Sequence[int], local: int
) -> dict[str, Placement]:
    """Table-wise owners inside each tower's host: largest tables first, each on
    the local device of that host with the fewest bytes so far."""
    load: dict[tuple[int, int], int] = {}
    plan = {}
    pairs = [(name, h) for names, h in zip(towers, hosts_of_towers) for name in names]
    by_size = sorted(pairs, key=lambda p: (-features[p[0]].rows * features[p[0]].dim, p[0]))
    for name, h in by_size:
        l = min(range(local), key=lambda j: (load.get((h, j), 0), j))
        load[(h, l)] = load.get((h, l), 0) + features[name].rows * features[name].dim
        plan[name] = Placement(ShardingType.TABLE_WISE, (h * local + l,))
    return plan


class SPTT:
    """Tower-owned embedding tables with the hierarchical exchange and Tower Modules.

    Args:
      features: the feature set (pooled features of one width).
      mesh: the `('host', 'local')` mesh.
      towers: feature names per tower; together every sparse feature once.
      hosts: the host of each tower.
      optimizer: the fused sparse optimizer of the tables.
      module: Tower Module kind (`TOWER_MODULES`).
      tower_dim: C of the compressing modules (identity: F_max * D).
      cpu_kernels: passed to `ShardedEmbeddings`.

    Raises:
      TowerError: towers that do not partition the features, an empty
        tower, a host outside the mesh, more towers than features, sequence
        features or mixed widths.
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
        cpu_kernels: bool | None = None,
    ):
        self.features = features
        self.mesh = mesh
        self.hosts, self.local = mesh_shape(mesh)
        self.towers = tuple(tuple(t) for t in towers)
        self.tower_hosts = tuple(int(h) for h in hosts)
        self._validate()
        self.dim = features.sparse[0].dim
        self.emb = ShardedEmbeddings(
            features, mesh, tower_plan(features, self.towers, self.tower_hosts, self.local),
            optimizer, cpu_kernels=cpu_kernels,
        )
        self._layout()
        self.module_kind = module
        self.out_dim = tower_output_dim(module, self.f_max, self.dim, tower_dim)
        self.module = TowerModule(module, self.out_dim)

    # ---- construction -----------------------------------------------------------------

    def _validate(self) -> None:
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
        seq = [f.name for f in self.features.sparse if not f.pooled]
        if seq:
            raise TowerError(f"SPTT carries pooled features only; sequence features: {seq[:5]}")
        dims = sorted({f.dim for f in self.features.sparse})
        if len(dims) != 1:
            raise TowerError(f"the towers' features must share one width, got {dims}")

    def _layout(self) -> None:
        """Static tables: where each tower feature sits among its host's slots."""
        groups = self.emb.groups
        self.group_names = tuple(groups)
        for g in groups.values():
            assert isinstance(g, TableWiseGroup)
        # Slot position of (group, owner device, slot k) in the per-host slot axis
        # [sum over groups of L * K_g]; the owner's local rank is its digit.
        base, where = 0, {}
        for name, g in groups.items():
            for d, shards in enumerate(g.by_device):
                for k, s in enumerate(shards):
                    where[self.features.sparse[s.feature].name] = base + (d % self.local) * g.slots + k
            base += self.local * g.slots
        self.num_slots = base  # index `base` is an all-zero slot (padding)
        # Per group, i32[N, K]: whether the table in a device's slot is mean-pooled.
        self.mean_slots = {
            name: np.array([
                [self.features.sparse[s.feature].combiner is Combiner.MEAN for s in shards]
                + [False] * (g.slots - len(shards))
                for shards in g.by_device
            ])
            for name, g in groups.items()
        }
        by_host = [[t for t, h in enumerate(self.tower_hosts) if h == hh] for hh in range(self.hosts)]
        self.t_max = max(1, max(len(v) for v in by_host))
        self.f_max = max(len(t) for t in self.towers)
        idx = np.full((self.hosts, self.t_max, self.f_max), self.num_slots, np.int32)
        slot_tower = np.full((self.hosts, self.t_max), -1, np.int32)
        for h, ts in enumerate(by_host):
            for j, t in enumerate(ts):
                slot_tower[h, j] = t
                for i, name in enumerate(self.towers[t]):
                    idx[h, j, i] = where[name]
        self.slot_index = idx
        self.slot_tower = slot_tower
        # After the return all-to-all a device holds [H * T_max] tower slots; the
        # global tower order picks them.
        pos = {int(t): h * self.t_max + j for h in range(self.hosts) for j, t in
               enumerate(slot_tower[h]) if t >= 0}
        self.tower_take = np.array([pos[t] for t in range(len(self.towers))], np.int32)
        # Identity outputs in tower order -> feature order.
        flat_pos = {
            name: t * self.f_max + i for t, names in enumerate(self.towers) for i, name in enumerate(names)
        }
        self.feature_take = np.array([flat_pos[n] for n in self.features.names], np.int32)

    # ---- parameters ----------------------------------------------------------------------

    @property
    def param_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(HOST))

    def stacked_params(self, seed: int = 0) -> Any:
        """Tower Module parameters, stacked [H, T_max, ...] (traceable; place them
        with `param_sharding`). Tower t's values depend on (seed, t) only."""
        return init_stacked(self.module, seed, jnp.asarray(self.slot_tower), self.f_max, self.dim)

    def init_params(self, seed: int = 0) -> Any:
        """`stacked_params`, computed on the devices and sharded over `host`."""
        fn = lambda: self.stacked_params(seed)  # noqa: E731
        shapes = jax.eval_shape(fn)
        return jax.jit(fn, out_shardings=jax.tree.map(lambda _: self.param_sharding, shapes))()

    # ---- the step's stages -------------------------------------------------------------

    def route(self, ids: jax.Array, lengths: jax.Array) -> Routed:
        """Ids to their owners by the hierarchical all-to-all (host, then local)."""
        groups = self.emb.groups

        def body(ids, lengths):
            out, bad = {}, jnp.zeros((), jnp.int32)
            for name, g in groups.items():
                send, b = g.send_ids(ids, lengths)
                out[name] = hierarchical_all_to_all(send, self.hosts, self.local)
                bad = bad + b
            return Routed(out, lax.psum(bad, DEVICES))

        specs = Routed({n: P(DEVICES) for n in groups}, P())
        return jax.shard_map(body, mesh=self.mesh, in_specs=(P(DEVICES), P(DEVICES)),
                             out_specs=specs)(ids, lengths)

    def lookup(self, state, routed: Routed) -> dict[str, jax.Array]:
        return self.emb.lookup(state, routed)

    def tower_outputs(self, params: Any, owner_out: Mapping[str, jax.Array], routed: Routed) -> jax.Array:
        """Tower Module outputs of every sample: f32[B_global, T, C] (differentiable
        in `params` and `owner_out`); towers in partition order."""
        groups, mean = self.emb.groups, self.mean_slots
        H, L = self.hosts, self.local

        def body(params, owner_out, ids):
            me = lax.axis_index(DEVICES)
            blocks = []
            for name, g in groups.items():
                x = owner_out[name]  # [N(src), K, B, D] pooled sums at the owner
                if mean[name].any():
                    n = jnp.maximum(jnp.sum(ids[name] >= 0, axis=-1), 1).astype(x.dtype)
                    scale = jnp.where(jnp.asarray(mean[name])[me][None, :, None], 1.0 / n, 1.0)
                    x = x * scale[..., None]
                k, b, d = x.shape[1:]
                x = x.reshape(H, L, k, b, d)
                x = lax.all_to_all(x, LOCAL, 1, 1, tiled=True)  # [H(src host), L(owner), K, B, D]
                blocks.append(x.reshape(H, L * k, b, d))
            b, d = blocks[0].shape[2:]
            blocks.append(jnp.zeros((H, 1, b, d), blocks[0].dtype))
            slots = jnp.concatenate(blocks, axis=1)  # [H, S + 1, B, D]
            idx = jnp.asarray(self.slot_index)[lax.axis_index(HOST)]  # [T_max, F_max]
            x = slots[:, idx]  # [H, T_max, F_max, B, D]
            x = jnp.transpose(x, (1, 0, 3, 2, 4)).reshape(self.t_max, H * b, self.f_max, d)
            p = jax.tree.map(lambda a: a[0], params)  # this host's towers [T_max, ...]
            y = jax.vmap(lambda pt, xt: self.module.apply({"params": pt}, xt))(p, x)
            y = jnp.transpose(y.reshape(self.t_max, H, b, -1), (1, 0, 2, 3))  # [H(dest), T_max, B, C]
            y = lax.all_to_all(y, HOST, 0, 0, tiled=True)  # [H(tower host), T_max, B, C]
            y = y.reshape(H * self.t_max, b, -1)[self.tower_take]  # [T, B, C]
            return jnp.transpose(y, (1, 0, 2))

        param_specs = jax.tree.map(lambda _: P(HOST), params)
        return jax.shard_map(
            body, mesh=self.mesh,
            in_specs=(param_specs, {n: P(DEVICES) for n in groups}, {n: P(DEVICES) for n in groups}),
            out_specs=P(DEVICES),
        )(params, dict(owner_out), dict(routed.ids))

    def flat_embeddings(self, tower_out: jax.Array) -> jax.Array:
        """Identity-module outputs f32[B, T, F_max * D] -> the flat path's pooled
        embeddings f32[B, F, D] in feature order."""
        if self.module_kind != "identity":
            raise TowerError("flat_embeddings needs the identity Tower Module")
        b = tower_out.shape[0]
        x = tower_out.reshape(b, len(self.towers) * self.f_max, self.dim)
        return jnp.take(x, self.feature_take, axis=1)

    def apply_gradients(self, state, routed: Routed, owner_grads, owner_out, lr=None):
        """The owners' fused sparse update (as the flat table-wise path)."""
        return self.emb.apply_gradients(state, routed, owner_grads, owner_out, lr)
