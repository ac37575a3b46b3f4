"""SPTT: the semantic-preserving tower transform of Disaggregated Multi-Tower.

Features are grouped into towers; tower t lives on host `hosts[t]` (several
towers may share a host), its tables sharded over that host's local devices:
table-wise (one device per table, the default) or table-row-wise (a table's
rows spread over the host's L devices; `row_wise`). One step, with H hosts, L
local devices and B samples per device:

    route     ids -> the tower's host by one all-to-all over `host` (to the
              peer of the same local rank), which carries per destination host
              only that host's tables' ids, packed side by side: i32[H, B, Q],
              Q the most id positions (sum of the tables' id caps) of any host;
              inside the host, an all-to-all over `local` to a table-wise
              table's owner, or an all-gather over `local` for a row-wise one
              (each device keeps the ids of its row block). The ids arrive
              arranged exactly as the flat path's table-wise (or
              table-row-wise) input distribution arranges them.
    lookup    the owners gather their rows: pooled sums, or sequences
              f32[.., S, D] (the flat path's lookup).
    towers    the rows go back over `local` only: an all-to-all from a
              table-wise owner, a reduce-scatter (`psum_scatter`) of a
              row-wise table's partial sums. Device (h, l) then holds host h's
              towers' embeddings for the H*B samples of the devices (h', l):
              f32[H*B, F_t, D] per tower, mean-combined features divided by
              their id counts. Each tower's Tower Module compresses them to
              f32[H*B, C]; an all-to-all over `host` returns every sample's
              tower outputs to its own device: f32[B, T, C].

Sequence features f32[B, S, D] take the same route and lookup. A compressing
Tower Module must not ship S*D values per sample across hosts: it pools a
sequence inside the tower (the mean over its valid ids, reduced at the owner
before the reduce-scatter or the all-to-all over `local`), which then is one
more tower input of width D. The identity module returns them unchanged:
`flat_sequences` carries each sequence from the tower's host to its sample's
device by an all-to-all over `host` (per host, that host's sequence tables),
so the model pools it as on the flat path (mean or attention).

Only the compressed outputs (and the ids) cross hosts, and how a host shards
its tables over `local` does not change what crosses. Backward runs the same
path transposed (all-to-alls, all-gathers for the reduce-scatters); the row
gradients end at the owners, whose fused sparse optimizer updates the
touched rows in place (`ShardedEmbeddings`, whose tables, initial values,
update and checkpoint layout SPTT shares: an SPTT state is a flat state with
a tower-consistent plan, `tower_plan`).

Semantic preservation: with the identity Tower Module, `flat_embeddings`
returns exactly the flat path's pooled embeddings f32[B, F, D] (features
permuted back into feature order), `flat_sequences` its sequences
`{name: f32[B, S, D]}`, and their gradients reach the same rows, bit for bit
against the flat path with the same plan (all table-wise: the flat
table-wise path).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Collection, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jdmt.data.specs import Combiner, FeatureSet
from jdmt.embeddings import Placement, Routed, ShardedEmbeddings, ShardingType, SparseOptimizer
from jdmt.embeddings.base import Group
from jdmt.embeddings.table_row_wise import TableRowWiseGroup
from jdmt.embeddings.table_wise import TableWiseGroup
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


def _table_bytes(features: FeatureSet, name: str) -> int:
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
        total[h] = total.get(h, 0) + sum(_table_bytes(features, n) for n in names)
    return frozenset(
        n for names, h in zip(towers, hosts_of_towers) for n in names
        if _table_bytes(features, n) * local > total[h]
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
                load[(h, l)] = load.get((h, l), 0) + _table_bytes(features, name) / local
    by_size = sorted(
        (p for p in pairs if p[0] not in row_wise), key=lambda p: (-_table_bytes(features, p[0]), p[0])
    )
    for name, h in by_size:
        l = min(range(local), key=lambda j: (load.get((h, j), 0), j))
        load[(h, l)] = load.get((h, l), 0) + _table_bytes(features, name)
        plan[name] = Placement(ShardingType.TABLE_WISE, (h * local + l,))
    return plan


@dataclasses.dataclass(frozen=True)
class _Bucket:
    """Groups whose ids share one shape [.., B, P] (kind, width, id cap): their
    ids cross hosts in one all-to-all, per destination host that host's tables.

    Attributes:
      groups: the groups' names.
      members: feature index of each column of the groups' ids side by side.
      host_slots: per host, the features (indices) of its slots, K of them at most.
      send_take: i32[H, K] the column of each host slot (len(members) = none).
    """

    groups: tuple[str, ...]
    members: tuple[int, ...]
    host_slots: tuple[tuple[int, ...], ...]
    send_take: np.ndarray

    @property
    def slots(self) -> int:
        return self.send_take.shape[1]


class SPTT:
    """Tower-owned embedding tables with the hierarchical exchange and Tower Modules.

    Args:
      features: the feature set (pooled and sequence features of one width).
      mesh: the `('host', 'local')` mesh.
      towers: feature names per tower; together every sparse feature once.
      hosts: the host of each tower.
      optimizer: the fused sparse optimizer of the tables.
      module: Tower Module kind (`TOWER_MODULES`).
      tower_dim: C of the compressing modules (identity: F_max * D, F_max
        the most pooled features of a tower).
      row_wise: tables sharded table-row-wise over their tower's host (the
        others are table-wise on one of its devices), or `'auto'`: those
        bigger than an even share of their host (`auto_row_wise`).
      cpu_kernels, kernel: passed to `ShardedEmbeddings`.

    Attributes:
      emb: the `ShardedEmbeddings` of the tower plan (state, update, checkpoints).
      tower_inputs: per tower, the features its Tower Module reads (in
        `towers` order): all of them, or with the identity module the pooled ones.
      row_wise: the table-row-wise tables, in feature order.
      out_dim: C, each tower's output width.
      pooled_names, sequence_names: the features `flat_embeddings` and
        `flat_sequences` return, in feature order.

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
                                     kernel=kernel)
        self._layout()
        self.out_dim = tower_output_dim(module, self.f_max, self.dim, tower_dim)
        self.module = TowerModule(module, self.out_dim)

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
        """Static tables: the host slots of the route, where each tower input
        sits in its host's view, and the inverse permutations."""
        groups, feats, H, L = self.emb.groups, self.features.sparse, self.hosts, self.local
        host_of = {self.features.index(n): h for names, h in zip(self.towers, self.tower_hosts)
                   for n in names}
        for g in groups.values():
            assert isinstance(g, (TableWiseGroup, TableRowWiseGroup)), type(g)

        # The route: buckets of groups with one id shape; per host, its tables' slots.
        by_key: dict[tuple, list[str]] = {}
        for name, g in groups.items():
            by_key.setdefault((g.kind, g.width, g.max_len), []).append(name)
        self.buckets: list[_Bucket] = []
        self.host_slot: dict[int, int] = {}  # feature -> its slot among its host's (in its bucket)
        for names in by_key.values():
            members = tuple(f for n in names for f in groups[n].members)
            per_host = [sorted(f for f in members if host_of[f] == h) for h in range(H)]
            k = max(1, max(len(v) for v in per_host))
            take = np.full((H, k), len(members), np.int32)
            for h, fs in enumerate(per_host):
                for j, f in enumerate(fs):
                    take[h, j] = members.index(f)
                    self.host_slot[f] = j
            self.buckets.append(_Bucket(tuple(names), members, tuple(tuple(v) for v in per_host), take))
        # The host all-to-all's packing: the buckets' sends i32[H(dest), B, K_b * P_b]
        # side by side are W columns (W = none); destination h takes its own
        # tables' columns, Q_h of them, padded to Q. The receiver unpacks.
        widths = [b.slots * groups[b.groups[0]].max_len for b in self.buckets]
        starts = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
        w_all = int(starts[-1])
        cols = [[int(starts[i]) + j * groups[b.groups[0]].max_len + p
                 for i, b in enumerate(self.buckets)
                 for j in range(len(b.host_slots[h]))
                 for p in range(groups[b.groups[0]].max_len)] for h in range(H)]
        q = max(1, max(len(c) for c in cols))
        self.id_pack = np.full((H, q), w_all, np.int32)  # dest h: column of each packed position
        self.id_unpack = np.full((H, w_all), q, np.int32)  # at h: packed position of each column
        for h, c in enumerate(cols):
            self.id_pack[h, : len(c)] = c
            self.id_unpack[h, c] = np.arange(len(c))
        self.id_widths = widths
        # Inside the host: per group, the host slot each owner slot reads.
        self.owner_take: dict[str, np.ndarray] = {}
        for b in self.buckets:
            for name in b.groups:
                g = groups[name]
                if isinstance(g, TableWiseGroup):  # i32[H, L, K]: device (h, l)'s slot k
                    t = np.full((H, L, g.slots), b.slots, np.int32)
                    for d, shards in enumerate(g.by_device):
                        for k, s in enumerate(shards):
                            t[d // L, d % L, k] = self.host_slot[s.feature]
                else:  # i32[H, K]: host h's slot k
                    t = np.full((H, g.slots), b.slots, np.int32)
                    for h, ts in enumerate(g.by_host):
                        for k, m in enumerate(ts):
                            t[h, k] = self.host_slot[g.members[m]]
                self.owner_take[name] = t
        # Per table-wise group, i32[H, L, K]: first row of each owner slot's table.
        self.row_offsets = {name: g.slot_tables()[1].reshape(H, L, g.slots)
                            for name, g in groups.items() if isinstance(g, TableWiseGroup)}

        # A host's view of a group, [H(src host), V, B, ...]: V = L * K slots
        # (owner's local rank, then its slot) table-wise, K row-wise.
        def view_slots(g: Group) -> list[tuple[int, int]]:
            """(position in the view, feature) of every table of the group."""
            if isinstance(g, TableWiseGroup):
                return [((d % L) * g.slots + k, s.feature)
                        for d, shards in enumerate(g.by_device) for k, s in enumerate(shards)]
            return [(k, g.members[m]) for ts in g.by_host for k, m in enumerate(ts)]

        def view_size(g: Group) -> int:
            return (L if isinstance(g, TableWiseGroup) else 1) * g.slots

        # Tower inputs: every feature (sequences pooled in the tower), or with
        # the identity module the pooled ones (sequences go by `flat_sequences`).
        self.tower_inputs = tuple(
            tuple(n for n in t if feats[self.features.index(n)].pooled or not self.identity)
            for t in self.towers
        )
        self.tower_groups = tuple(n for n, g in groups.items() if g.pooled or not self.identity)
        base, where = 0, {}
        for name in self.tower_groups:
            for pos, f in view_slots(groups[name]):
                where[feats[f].name] = base + pos
            base += view_size(groups[name])
        self.num_slots = base  # index `base` is an all-zero slot (padding)
        # Per tower group, bool[N, K] (table-wise) or bool[H, K] (row-wise):
        # whether the table in a slot is averaged over its ids.
        self.mean_slots = {}
        for name in self.tower_groups:
            g = groups[name]
            mean = lambda f: feats[f].combiner is Combiner.MEAN or not feats[f].pooled  # noqa: E731
            if isinstance(g, TableWiseGroup):
                rows = [[mean(s.feature) for s in sh] for sh in g.by_device]
            else:
                rows = [[mean(g.members[m]) for m in ts] for ts in g.by_host]
            self.mean_slots[name] = np.array([r + [False] * (g.slots - len(r)) for r in rows])
        by_host = [[t for t, h in enumerate(self.tower_hosts) if h == hh] for hh in range(H)]
        self.t_max = max(1, max(len(v) for v in by_host))
        self.f_max = max(1, max(len(t) for t in self.tower_inputs))
        idx = np.full((H, self.t_max, self.f_max), self.num_slots, np.int32)
        slot_tower = np.full((H, self.t_max), -1, np.int32)
        for h, ts in enumerate(by_host):
            for j, t in enumerate(ts):
                slot_tower[h, j] = t
                for i, name in enumerate(self.tower_inputs[t]):
                    idx[h, j, i] = where[name]
        self.slot_index = idx
        self.slot_tower = slot_tower
        # After the return all-to-all a device holds [H * T_max] tower slots; the
        # global tower order picks them.
        pos = {int(t): h * self.t_max + j for h in range(H) for j, t in
               enumerate(slot_tower[h]) if t >= 0}
        self.tower_take = np.array([pos[t] for t in range(len(self.towers))], np.int32)
        # Identity outputs in tower order -> pooled features in feature order.
        flat_pos = {name: t * self.f_max + i for t, names in enumerate(self.tower_inputs)
                    for i, name in enumerate(names)}
        self.pooled_names = tuple(f.name for f in feats if f.pooled)
        self.feature_take = np.array([flat_pos[n] for n in self.pooled_names], np.int32)

        # Identity sequences: per sequence bucket, the view position of each
        # host slot (i32[H, K], the bucket's view size = none).
        self.sequence_names = tuple(f.name for f in feats if not f.pooled)
        self.sequence_take: dict[int, np.ndarray] = {}
        for i, b in enumerate(self.buckets):
            if not self.identity or groups[b.groups[0]].pooled:
                continue
            base, where = 0, {}
            for name in b.groups:
                for pos, f in view_slots(groups[name]):
                    where[f] = base + pos
                base += view_size(groups[name])
            take = np.full((H, b.slots), base, np.int32)
            for h, fs in enumerate(b.host_slots):
                for j, f in enumerate(fs):
                    take[h, j] = where[f]
            self.sequence_take[i] = take

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
        """Ids to their owners: one all-to-all over `host` carrying each host
        its tables' ids (packed: `id_pack`), then one over `local` (table-wise)
        or an all-gather over `local` (row-wise). `Routed` as the flat path's
        for the same plan."""
        groups, H, L = self.emb.groups, self.hosts, self.local

        def body(ids, lengths):
            h = lax.axis_index(HOST)
            bad = jnp.zeros((), jnp.int32)
            sends = []
            for b in self.buckets:
                gids = []
                for name in b.groups:
                    gid, n = groups[name].member_ids(ids, lengths)  # [B, T_g, P]
                    gids.append(gid)
                    bad = bad + n
                gid = jnp.concatenate(gids + [jnp.full_like(gids[0][:, :1], -1)], axis=1)
                send = gid[:, b.send_take]  # [B, H(dest), K, P]
                sends.append(jnp.transpose(send, (1, 0, 2, 3)).reshape(H, send.shape[0], -1))
            cat = jnp.concatenate(sends + [jnp.full_like(sends[0][:, :, :1], -1)], axis=2)
            packed = jnp.take_along_axis(cat, jnp.asarray(self.id_pack)[:, None, :], axis=2)
            recv = lax.all_to_all(packed, HOST, 0, 0, tiled=True)  # [H(src), B, Q]
            recv = jnp.concatenate([recv, jnp.full_like(recv[:, :, :1], -1)], axis=2)
            cols = jnp.take(recv, jnp.asarray(self.id_unpack)[h], axis=2)  # [H, B, W]
            out, start = {}, 0
            for b, width in zip(self.buckets, self.id_widths):
                part = cols[:, :, start : start + width]
                start += width
                part = part.reshape(H, part.shape[1], b.slots, -1)  # [H(src), B, K, P]
                recv = jnp.transpose(part, (0, 2, 1, 3))  # [H(src), K, B, P]
                recv = jnp.concatenate([recv, jnp.full_like(recv[:, :1], -1)], axis=1)
                for name in b.groups:
                    g, take = groups[name], jnp.asarray(self.owner_take[name])[h]
                    if isinstance(g, TableWiseGroup):
                        x = recv[:, take]  # [H(src host), L(owner), K, B, P] table rows
                        off = jnp.asarray(self.row_offsets[name])[h][None, :, :, None, None]
                        x = jnp.where(x >= 0, x + off, -1)
                        x = lax.all_to_all(x, LOCAL, 1, 1, tiled=True)  # [H, L(src local), K, B, P]
                        out[name] = x.reshape((H * L,) + x.shape[2:])  # [N(src), K, B, P]
                    else:
                        out[name] = g.row_blocks(recv[:, take])  # [L(src), H(src), K, B, P]
            return Routed(out, lax.psum(bad, DEVICES))

        specs = Routed({n: P(DEVICES) for n in groups}, P())
        return jax.shard_map(body, mesh=self.mesh, in_specs=(P(DEVICES), P(DEVICES)),
                             out_specs=specs)(ids, lengths)

    def lookup(self, state, routed: Routed) -> dict[str, jax.Array]:
        return self.emb.lookup(state, routed)

    def _view(self, name: str, x: jax.Array, ids: jax.Array, pool: bool) -> jax.Array:
        """Inside `shard_map`: a group's lookup outputs at the owners -> its tables'
        rows at the tower host's devices, f32[H(src host), V, B, (S,) D].

        Table-wise (x f32[N(src), K, B, (S,) D]): an all-to-all over `local`,
        V = L * K. Row-wise (x f32[L(src), H(src), K, B, (S,) D], partial
        sums): a reduce-scatter over `local`, V = K. Mean-combined pooled
        tables are divided by their id counts; with `pool`, sequences are
        summed over S and divided by theirs (their mean over valid ids).
        """
        g = self.emb.groups[name]
        tw = isinstance(g, TableWiseGroup)
        count = None
        if not g.pooled and pool:
            x = jnp.sum(x, axis=-2)
        if g.pooled or pool:
            mean = self.mean_slots[name]
            if mean.any():
                count = jnp.sum(ids >= 0, axis=-1).astype(x.dtype)  # ids' count per (sample, slot)
                me = lax.axis_index(DEVICES) if tw else lax.axis_index(HOST)
                flags = jnp.asarray(mean)[me][:, None]  # [K, 1]
        if tw:
            if count is not None:  # x [N, K, B, D], whole sums at the owner
                x = x * jnp.where(flags, 1.0 / jnp.maximum(count, 1), 1.0)[..., None]
            k, rest = x.shape[1], x.shape[2:]
            x = x.reshape((self.hosts, self.local, k) + rest)
            x = lax.all_to_all(x, LOCAL, 1, 1, tiled=True)  # [H(src host), L(owner), K, B, ...]
            return x.reshape((self.hosts, self.local * k) + rest)
        x = lax.psum_scatter(x, LOCAL, scatter_dimension=0, tiled=True)[0]  # [H, K, B, ...]
        if count is not None:  # the ids of one sample are spread over the row blocks
            count = lax.psum_scatter(count, LOCAL, scatter_dimension=0, tiled=True)[0]  # [H, K, B]
            x = x * jnp.where(flags, 1.0 / jnp.maximum(count, 1), 1.0)[..., None]
        return x

    def tower_outputs(self, params: Any, owner_out: Mapping[str, jax.Array], routed: Routed) -> jax.Array:
        """Tower Module outputs of every sample: f32[B_global, T, C] (differentiable
        in `params` and `owner_out`); towers in partition order. A tower's
        inputs are its features (`tower_inputs`): with a compressing module
        every one, sequences mean-pooled in the tower; with the identity module
        the pooled ones (sequences: `flat_sequences`)."""
        names = self.tower_groups
        H = self.hosts
        if not names:
            raise TowerError("no tower has a pooled feature: the identity towers carry "
                             "sequences only (flat_sequences)")

        def body(params, owner_out, ids):
            blocks = [self._view(n, owner_out[n], ids[n], pool=True) for n in names]  # [H, V, B, D]
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
        dev = {n: P(DEVICES) for n in names}
        return jax.shard_map(
            body, mesh=self.mesh, in_specs=(param_specs, dev, dev), out_specs=P(DEVICES),
        )(params, {n: owner_out[n] for n in names}, {n: routed.ids[n] for n in names})

    def flat_embeddings(self, tower_out: jax.Array) -> jax.Array:
        """Identity-module outputs f32[B, T, F_max * D] -> the flat path's pooled
        embeddings f32[B, F, D] (the pooled features, in feature order)."""
        if not self.identity:
            raise TowerError("flat_embeddings needs the identity Tower Module")
        b = tower_out.shape[0]
        x = tower_out.reshape(b, len(self.towers) * self.f_max, self.dim)
        return jnp.take(x, self.feature_take, axis=1)

    def flat_sequences(self, owner_out: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """The identity towers' sequence features at their samples' devices: the
        flat path's `{name: f32[B_global, S, D]}` (zeros past each length;
        differentiable in `owner_out`). Each travels from its owner to the
        tower's host device that serves its sample (over `local`), through the
        identity module, and home by an all-to-all over `host`.

        Raises:
          TowerError: a compressing Tower Module (it pools the sequences in
            the tower: they are among `tower_outputs`).
        """
        if not self.identity:
            raise TowerError(
                f"flat_sequences needs the identity Tower Module; {self.module_kind!r} towers "
                "pool their sequence features (see tower_outputs)"
            )
        names = tuple(n for i in self.sequence_take for n in self.buckets[i].groups)
        if not names:
            return {}
        feats = self.features.sparse

        def body(owner_out):
            h = lax.axis_index(HOST)
            out = {}
            for i, take in self.sequence_take.items():
                b = self.buckets[i]
                blocks = [self._view(n, owner_out[n], None, pool=False) for n in b.groups]
                blocks.append(jnp.zeros_like(blocks[0][:, :1]))
                view = jnp.concatenate(blocks, axis=1)  # [H(src host), V + 1, B, S, D]
                y = view[:, jnp.asarray(take)[h]]  # [H(src host), K, B, S, D] host h's tables
                y = lax.all_to_all(y, HOST, 0, 0, tiled=True)  # [H(tower host), K, B, S, D]
                for hh, fs in enumerate(b.host_slots):
                    for j, f in enumerate(fs):
                        out[feats[f].name] = y[hh, j]
            return {n: out[n] for n in self.sequence_names}

        dev = {n: P(DEVICES) for n in names}
        return jax.shard_map(
            body, mesh=self.mesh, in_specs=(dev,),
            out_specs={n: P(DEVICES) for n in self.sequence_names},
        )({n: owner_out[n] for n in names})

    def apply_gradients(self, state, routed: Routed, owner_grads, owner_out, lr=None):
        """The owners' fused sparse update (as the flat path's)."""
        return self.emb.apply_gradients(state, routed, owner_grads, owner_out, lr)

