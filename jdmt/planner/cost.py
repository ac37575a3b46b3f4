"""What a sharding plan costs: memory, lookup work and communication per device.

The planner (`jdmt.planner.search`) only ever asks a `CostModel` one
question: what does this (possibly partial) plan cost on each device?
`AnalyticCostModel` answers it from the shapes of the programs that
`jdmt.embeddings` actually runs; a learned model fitted to measured lookups
(a later issue) can answer the same question with the same `PlanCost`.

The analytic model
------------------
Notation: N = H * L devices, B = global batch / N (local batch), a table of R
rows and width D with an id cap P (`max_len`) and a mean of p ids per bag
(`pooling`, default P), 4-byte ids and f32 rows, `a(D)` the optimizer state
bytes per row (row-wise Adagrad 4, Adagrad 4*D, SGD 0).

It mirrors `collection.build_groups`: tables of one family (table-wise and
column-wise shards are one family), kind, shard width and id cap share one
fused buffer and one collective per direction, and both are padded:

- memory (allocated, per device): every device allocates each group's fused
  buffer at the largest per-device row count of the group (table-wise: the
  most rows any device owns in it; row-wise: the sum of ceil(R/N) blocks;
  table-row-wise: the most, over hosts, of the sum of the host's tables'
  ceil(R/L) blocks; data-parallel: all rows) times (4 D + a(D)).
  `used_bytes` is the unpadded share of each device, reported for
  explanation only. Activations and workspace are not counted: leave room
  for them in the budget.
- communication, bytes each device *receives* from each peer per step, as
  `jdmt.comm` counts a compiled step (K = the group's slots per device, the
  most shards any device owns in it; T = tables in a row-wise or data-parallel
  group; O = 4 D for a pooled output, 4 P D for a sequence):
    table/column-wise: forward all-to-all of ids K B P 4 and of outputs K B O,
      backward all-to-all of output gradients K B O; with row-wise Adagrad
      and split tables, an all-reduce of the row statistics of the update
      (2 X / N, X = 4 * split tables * unique_fraction * N B P).
    row-wise: forward all-gather of ids B T P 4 and reduce-scatter of the
      partial outputs B T O, backward all-gather of gradients B T O.
    data-parallel: nothing forward or backward; the update all-gathers ids
      and output gradients, B T (4 P + O).
    table-row-wise (K = the most tables any host holds in the group): its
      collectives run over one mesh axis only, so the bytes are counted per
      level, not per peer. Across hosts (all-to-alls over `host`, H - 1
      peers): forward ids K B P 4 and outputs K B O, backward gradients
      K B O, from each peer host. Inside a host (over `local`, L - 1 peers):
      forward all-gather of ids H K B P 4 and reduce-scatter of partials
      H K B O, backward all-gather of gradients H K B O, from each peer.
  Bytes from peers on another host (`Topology.host_of`: device d is on host
  d // L) count as cross-host, the rest as intra-host, and the time is
  `Topology.comm_time_s(cross, intra, collectives)`. Every collective here
  has equal chunks and every device takes part, so every device receives
  the same;
  the padding (K) is real traffic, so spreading a group's tables evenly
  over the devices is what cuts it.
- lookup work (per device, bytes of memory traffic over `memory_bw`): per id
  at the device, the forward read of its row (4 D) and the update's read and
  write of row and optimizer state (`unique_fraction` * 2 (4 D + a(D))),
  each access rounded up to whole `access_bytes`; plus `id_bytes` per id
  position processed in each of the forward gather and the update's sort,
  padding included. Ids at the device: N B p at the owner of a table-wise
  or column shard, B p on each row-wise device (ids assumed spread evenly
  over the row blocks), N B p / L on each device of a table-row-wise
  table's host, and on each data-parallel replica B p forward and
  all N B p in the update (every replica applies it). Id positions: K N B P
  per table-wise or table-row-wise group and pass on every device, N B P
  per row-wise table, B P + N B P per data-parallel table.

Not modelled: the dense model (its cost does not depend on the plan),
activations, skewed ids (hot rows in one row-wise block), overlap of
communication with compute. The constants are defaults to be replaced by
measurements; the byte counts are exact for the current collection (tests
check them against the compiled step and `build_groups`).

The step cost is the bottleneck: the largest lookup time plus communication
time over the devices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np

from jdmt.data.specs import FeatureSet, SparseFeature
from jdmt.embeddings.optimizers import accumulator_shape
from jdmt.embeddings.types import OptimizerKind, Placement, ShardingType, SparseOptimizer
from jdmt.mesh import Topology

DEFAULT_MEMORY_BUDGET = 16 * 2**30  # bytes per device
PHASES = ("forward", "backward", "update")
_F32 = 4  # bytes per embedding value and per id


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """Everything a plan is made for.

    Attributes:
      features: the model's features (one table each).
      hosts, local: the mesh shape (H, L).
      global_batch: examples per step over all devices.
      optimizer: the fused sparse optimizer (its state takes memory).
      topology: bandwidths; default `Topology(hosts, local)` (TorchRec's).
      memory_budget: bytes of tables and optimizer state allowed per device.
      pooling: mean ids per bag (or valid positions per sequence) by feature
        name, if known from data; default `max_len`.
    """

    features: FeatureSet
    hosts: int
    local: int
    global_batch: int
    optimizer: SparseOptimizer = SparseOptimizer()
    topology: Topology | None = None
    memory_budget: float = DEFAULT_MEMORY_BUDGET
    pooling: Mapping[str, float] | None = None

    def __post_init__(self):
        if self.hosts < 1 or self.local < 1 or self.global_batch < 1:
            raise ValueError("hosts, local and global_batch must be >= 1")
        if not isinstance(self.optimizer, SparseOptimizer):
            object.__setattr__(self, "optimizer", SparseOptimizer(kind=OptimizerKind(self.optimizer)))
        if self.topology is None:
            object.__setattr__(self, "topology", Topology(self.hosts, self.local))
        if (self.topology.hosts, self.topology.local) != (self.hosts, self.local):
            raise ValueError(
                f"topology {self.topology.hosts}x{self.topology.local} does not match "
                f"the mesh {self.hosts}x{self.local}"
            )
        if self.memory_budget <= 0:
            raise ValueError("memory_budget must be > 0 bytes")
        pooling = dict(self.pooling or {})
        unknown = set(pooling) - set(self.features.names)
        if unknown:
            raise KeyError(f"pooling names unknown features: {sorted(unknown)}")
        for name, p in pooling.items():
            if not 0 < p <= self.features[name].max_len:
                raise ValueError(f"pooling of {name!r} must be in (0, max_len], got {p}")
        object.__setattr__(self, "pooling", pooling)

    @property
    def num_devices(self) -> int:
        return self.hosts * self.local

    @property
    def local_batch(self) -> float:
        return self.global_batch / self.num_devices

    def mean_ids(self, f: SparseFeature) -> float:
        """Mean ids per bag (pooled) or valid positions (sequence)."""
        return float(self.pooling.get(f.name, f.max_len))

    def state_bytes_per_row(self, width: int) -> int:
        """Bytes of one row of a `width`-wide shard plus its optimizer state."""
        acc = accumulator_shape(self.optimizer, 1, width)
        return _F32 * width + (0 if acc is None else _F32 * math.prod(acc))

    @functools.cached_property
    def peers(self) -> tuple[np.ndarray, np.ndarray]:
        """(f64[N] peers of each device on other hosts, f64[N] on its host)."""
        host = np.arange(self.num_devices) // self.local
        cross = np.array([np.sum(host != h) for h in host], np.float64)
        return cross, self.num_devices - 1.0 - cross

    def to_json(self) -> dict[str, Any]:
        t = self.topology
        return {
            "mesh": f"{self.hosts}x{self.local}",
            "global_batch": self.global_batch,
            "optimizer": self.optimizer.kind.value,
            "memory_budget_bytes": float(self.memory_budget),
            "topology": {
                "intra_host_bw": t.intra_host_bw, "cross_host_bw": t.cross_host_bw,
                "latency_s": t.latency_s,
            },
            "pooling": dict(self.pooling),
        }


@dataclasses.dataclass(frozen=True, eq=False)
class PlanCost:
    """Estimated per-device cost of a plan (arrays indexed by flat device).

    Attributes:
      memory_bytes: f64[N] allocated tables and optimizer state (with the
        fused buffers' padding): what the budget limits.
      used_bytes: f64[N] the device's own shards, without padding.
      lookup_s: f64[N] time of the local lookups and updates.
      cross_host_bytes, intra_host_bytes: f64[3, N] bytes received per
        phase (`PHASES`: forward, backward, update) from peers on other hosts
        / on the same host.
      comm_s: f64[N] communication time of the step.
      num_collectives: collectives per step.
    """

    memory_bytes: np.ndarray
    used_bytes: np.ndarray
    lookup_s: np.ndarray
    cross_host_bytes: np.ndarray
    intra_host_bytes: np.ndarray
    comm_s: np.ndarray
    num_collectives: int

    @property
    def device_s(self) -> np.ndarray:
        """Lookup plus communication time of each device."""
        return self.lookup_s + self.comm_s

    @property
    def step_s(self) -> float:
        """The bottleneck: the slowest device's time. What the planner minimises."""
        return float(self.device_s.max(initial=0.0))

    @property
    def balance(self) -> float:
        """Sum of squared device times: breaks ties between equal bottlenecks."""
        return float(np.sum(self.device_s**2))

    @property
    def peak_memory(self) -> float:
        return float(self.memory_bytes.max(initial=0.0))

    def fits(self, budget: float) -> bool:
        return self.peak_memory <= budget

    def key(self) -> tuple[float, float]:
        """Order of plans: bottleneck, then balance."""
        return (self.step_s, self.balance)

    def to_json(self, topology: Topology | None = None) -> dict[str, Any]:
        """Step cost and one entry per device (JSON-able)."""
        devices = []
        for d in range(self.memory_bytes.shape[0]):
            row = {
                "device": d,
                "memory_bytes": float(self.memory_bytes[d]),
                "used_bytes": float(self.used_bytes[d]),
                "lookup_s": float(self.lookup_s[d]),
                "comm_s": float(self.comm_s[d]),
                "total_s": float(self.device_s[d]),
                "cross_host_bytes": float(self.cross_host_bytes[:, d].sum()),
                "intra_host_bytes": float(self.intra_host_bytes[:, d].sum()),
            }
            if topology is not None:
                row["host"] = topology.host_of(d)
            devices.append(row)
        return {
            "step_s": self.step_s,
            "peak_memory_bytes": self.peak_memory,
            "num_collectives": self.num_collectives,
            "bytes_by_phase": {
                ph: {"cross_host": float(self.cross_host_bytes[i].max(initial=0.0)),
                     "intra_host": float(self.intra_host_bytes[i].max(initial=0.0))}
                for i, ph in enumerate(PHASES)
            },
            "devices": devices,
        }


@runtime_checkable
class CostModel(Protocol):
    """Estimates what a plan costs. Placements may cover only some tables
    (the search grows plans table by table); missing tables cost nothing."""

    def evaluate(self, problem: Problem, placements: Mapping[str, Placement]) -> PlanCost: ...

    def to_json(self) -> dict[str, Any]: ...


@dataclasses.dataclass
class _Group:
    """A fused group being costed: slots and rows per device, or tables."""

    family: str
    kind_pooled: bool
    width: int
    max_len: int
    slots: np.ndarray | None = None  # tw: shards per device; trw: tables per host
    rows: np.ndarray | None = None  # tw: rows per device; trw: row blocks per host
    tables: int = 0  # rw/dp: member tables; tw: tables split into columns
    local_rows: int = 0  # rw/dp: rows of the fused buffer


@dataclasses.dataclass(frozen=True)
class AnalyticCostModel:
    """The analytic model of the module docstring.

    Attributes:
      memory_bw: bytes/s of the lookups' row reads and writes on one device
        (random rows reach well under the peak bandwidth: about a quarter of
        an H100's HBM peak; TorchRec's estimator uses a similar figure).
      id_bytes: memory traffic charged per id position a device processes
        per pass (index reads, the update's sort and segment sums).
      unique_fraction: fraction of a step's ids that are distinct rows (the
        rows the update reads and writes); also sizes the column-wise
        row-statistics all-reduce, like `ShardedEmbeddings(unique_capacity=)`.
      access_bytes: granularity of memory accesses: a row's read (or its
        optimizer state's) costs whole accesses (GPU sectors are 32 bytes),
        so very narrow column shards are not free.
    """

    memory_bw: float = 900e9
    id_bytes: float = 16.0
    unique_fraction: float = 0.5
    access_bytes: int = 32

    def __post_init__(self):
        if self.memory_bw <= 0 or self.id_bytes < 0 or not 0 < self.unique_fraction <= 1:
            raise ValueError("memory_bw > 0, id_bytes >= 0 and 0 < unique_fraction <= 1 needed")
        if self.access_bytes < 1:
            raise ValueError("access_bytes must be >= 1")

    def _traffic(self, nbytes: float) -> float:
        """Memory traffic of reading `nbytes` of one row: whole accesses."""
        return -(-nbytes // self.access_bytes) * self.access_bytes if nbytes else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"name": "analytic", **dataclasses.asdict(self)}

    def _row_work(self, problem: Problem, width: int) -> float:
        """Memory traffic per id of a `width`-wide shard: the forward read,
        and the update's read and write of row and state (distinct ids only)."""
        state = problem.state_bytes_per_row(width) - _F32 * width
        update = 2 * self.unique_fraction * (self._traffic(_F32 * width) + self._traffic(state))
        return self._traffic(_F32 * width) + update

    def evaluate(self, problem: Problem, placements: Mapping[str, Placement]) -> PlanCost:
        n, b, u = problem.num_devices, problem.local_batch, self.unique_fraction
        topo = problem.topology
        work = np.zeros(n)  # bytes of memory traffic per device
        used = np.zeros(n)
        groups: dict[tuple, _Group] = {}
        for f in problem.features.sparse:
            p = placements.get(f.name)
            if p is None:
                continue
            ids = problem.mean_ids(f)
            if p.type in (ShardingType.TABLE_WISE, ShardingType.COLUMN_WISE):
                w = f.dim // len(p.devices)
                g = groups.get(("tw", f.pooled, w, f.max_len))
                if g is None:
                    g = groups[("tw", f.pooled, w, f.max_len)] = _Group(
                        "tw", f.pooled, w, f.max_len, np.zeros(n, np.int64), np.zeros(n, np.int64))
                row = problem.state_bytes_per_row(w)
                owners = p.devices[0] if len(p.devices) == 1 else list(p.devices)
                g.slots[owners] += 1
                g.rows[owners] += f.rows
                used[owners] += f.rows * row
                work[owners] += n * b * ids * self._row_work(problem, w)
                g.tables += len(p.devices) > 1
            elif p.type is ShardingType.TABLE_ROW_WISE:
                ln, hosts = problem.local, problem.hosts
                g = groups.get(("trw", f.pooled, f.dim, f.max_len))
                if g is None:
                    g = groups[("trw", f.pooled, f.dim, f.max_len)] = _Group(
                        "trw", f.pooled, f.dim, f.max_len, np.zeros(hosts, np.int64),
                        np.zeros(hosts, np.int64))
                h = p.devices[0] // ln
                block = -(-f.rows // ln)
                g.slots[h] += 1
                g.rows[h] += block
                row = problem.state_bytes_per_row(f.dim)
                devs = list(p.devices)
                used[devs] += np.clip(f.rows - block * np.arange(ln), 0, block) * row
                work[devs] += n * b * ids / ln * self._row_work(problem, f.dim)
            else:
                fam = "rw" if p.type is ShardingType.ROW_WISE else "dp"
                g = groups.setdefault((fam, f.pooled, f.dim, f.max_len),
                                      _Group(fam, f.pooled, f.dim, f.max_len))
                g.tables += 1
                row = problem.state_bytes_per_row(f.dim)
                if fam == "rw":
                    block = -(-f.rows // n)
                    g.local_rows += block
                    used += np.clip(f.rows - block * np.arange(n), 0, block) * row
                    work += b * ids * self._row_work(problem, f.dim)
                    work += 2 * n * b * f.max_len * self.id_bytes
                else:
                    g.local_rows += f.rows
                    used += f.rows * row
                    read = self._traffic(_F32 * f.dim)  # forward: the local batch only
                    work += b * ids * read + n * b * ids * (self._row_work(problem, f.dim) - read)
                    work += (1 + n) * b * f.max_len * self.id_bytes

        memory = 0.0
        per_peer = np.zeros(len(PHASES))  # bytes each device receives from each peer
        # hierarchical collectives (over `host` or `local` only): bytes each
        # device receives across / inside hosts, the same on every device
        cross_h, intra_h = np.zeros(len(PHASES)), np.zeros(len(PHASES))
        collectives = 0
        rowwise = problem.optimizer.kind is OptimizerKind.ROWWISE_ADAGRAD
        for g in groups.values():
            out = _F32 * g.width * (1 if g.kind_pooled else g.max_len)
            ids = _F32 * g.max_len
            if g.family == "tw":
                k = int(g.slots.max())
                memory += int(g.rows.max()) * problem.state_bytes_per_row(g.width)
                work += 2 * k * n * b * g.max_len * self.id_bytes
                per_peer += (k * b * (ids + out), k * b * out, 0.0)
                collectives += 3
                if rowwise and g.tables:
                    unique = u * n * b * g.max_len
                    per_peer[2] += 2 * _F32 * g.tables * unique / n
                    collectives += 1
            elif g.family == "trw":
                hosts, ln = problem.hosts, problem.local
                k = int(g.slots.max())
                memory += max(1, int(g.rows.max())) * problem.state_bytes_per_row(g.width)
                work += 2 * k * n * b * g.max_len * self.id_bytes
                # all-to-alls over `host`: K B per peer host (ids + outputs, then gradients)
                cross_h += (hosts - 1) * k * b * np.array([ids + out, out, 0.0])
                # all-gather of ids, reduce-scatter of partials, all-gather of
                # gradients over `local`: H K B per local peer
                intra_h += (ln - 1) * hosts * k * b * np.array([ids + out, out, 0.0])
                collectives += 6
            elif g.family == "rw":
                memory += g.local_rows * problem.state_bytes_per_row(g.width)
                per_peer += (g.tables * b * (ids + out), g.tables * b * out, 0.0)
                collectives += 3
            else:
                memory += g.local_rows * problem.state_bytes_per_row(g.width)
                per_peer += (0.0, 0.0, g.tables * b * (ids + out))
                collectives += 2

        cross_peers, intra_peers = problem.peers
        cross = per_peer[:, None] * cross_peers[None, :] + cross_h[:, None]
        intra = per_peer[:, None] * intra_peers[None, :] + intra_h[:, None]
        comm = topo.comm_time_s(cross.sum(0), intra.sum(0), collectives)
        return PlanCost(
            memory_bytes=np.full(n, memory, np.float64),
            used_bytes=used,
            lookup_s=work / self.memory_bw,
            cross_host_bytes=cross,
            intra_host_bytes=intra,
            comm_s=comm,
            num_collectives=collectives,
        )


__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "PHASES",
    "AnalyticCostModel",
    "CostModel",
    "PlanCost",
    "Problem",
]
