"""What a sharding plan costs: memory, lookup work and communication per device.

The planner (`jdmt.planner.search`) only ever asks a `CostModel` one
question: what does this (possibly partial) plan cost on each device?
`AnalyticCostModel` answers it from what `jdmt.embeddings` does for the
plan; a learned model fitted to measured steps can answer the same question
with the same `PlanCost`. Tables the placements leave out cost nothing.

The analytic model
------------------
Notation: N = H * L devices (device d is on host d // L), B = global batch
/ N (the local batch), a table of R rows and width D, id cap P (`max_len`),
p ids per bag (`Problem.mean_ids`: the mean length, pooled, or valid
positions, sequence), u = `unique_fraction`, 4-byte ids and f32 rows,
`a(w)` the optimizer state bytes of a w-wide row (row-wise Adagrad 4,
Adagrad 4 w, SGD 0).

Memory (`jdmt.embeddings.layout.Layout`, exactly). A table is cut into
pieces: table-wise one (w = D) on its device, column-wise one per shard (w =
D / shards) on each shard's device, row-wise one whose row r lives on device
r % N, table-row-wise one whose row r lives on device r % L of its host.
Each device keeps one storage buffer per width w holding the rows it owns
of every piece of that width; one SPMD program means one shape on every
device, so every device allocates the largest device's row count of that
width, rounded up to `ROW_ALIGN` rows (at least one block), times
4 w + a(w). Data-parallel tables add all their rows to a replicated buffer
per width on every device. `memory_bytes` is that allocation (what the
budget limits), `used_bytes` the rows each device owns
(`Layout.memory().per_device_allocated` and `.per_device_owned`).
Activations and exchange buffers are not counted: leave room for them.

Communication: the expected *payload* of every exchange, the bytes a device
receives from each peer, split into peers on other hosts (cross-host) and on
its own host (intra-host); what a device sends to itself is free. Three
phases (`PHASES`): forward, backward (gradients to the owners), update.
Routes, per table (`jdmt.embeddings.flat`, `.hosted`, `.collection`):

- *bags* (pooled features with P > 1 whose piece is whole on one device:
  table-wise, each column shard): every device sends the owner, per bag, a
  4-byte length and its real ids (4 B (1 + p) per piece; a weighted bag's
  ids carry a 4-byte weight each: 4 B (1 + 2 p)); the owner pools and
  returns one row per bag (4 w B); backward, one gradient row per bag goes
  back (4 w B).
- *unique rows* (row-wise pieces, sequence features, one-id bags): a device
  asks each owner once per distinct row, U = u B p requests of 4 B per
  table, spread evenly over the S row shards that hold rows (S = 1 for a
  whole piece, min(R, N) row-wise); each owner returns 4 w per request, and
  backward receives 4 w per request.
- *row-wise in two hops* (`row_dedup="host"`, the default on meshes with
  H > 1 and L > 1): a device sends its U = u B p unique requests to the
  device of its host with the owner's local rank (4 B, 4 w back, 4 w of
  gradient); that device merges its host's requests and asks each owner
  on another host for u_h L B p / S rows (u_h = `host_unique_fraction`),
  4 B out, 4 w back, 4 w of gradient.
- *table-row-wise* (the host path, table on host h): a pooled bag (P > 1)
  goes first to its *entry*, the device of host h with the requester's
  local rank, over `host` (4 B (1 + p), free when the requester is on h);
  the entry de-duplicates the ids of the H B bags it holds, U_e = u H B p,
  asks each of the S = min(R, L) row shards inside the host for U_e / S
  rows (4 B out, 4 w back), and returns one row per bag over `host`
  (4 w B); backward, the gradient row per bag goes to the entry and the
  entry sends each row shard 4 w per unique row. Sequence features and
  one-id bags ask for unique rows: the requester's U = u B p requests go to
  the entry (4 B, over `host`), which forwards the H requesters' H U / S to
  each row shard; rows return the same way (4 w each hop), and gradients
  follow them backward.
- *data-parallel*: lookups are local; the update sends each device's U =
  u B p unique rows with their summed gradients, 4 (w + 1) per row, to every
  other device.
- column-wise shards with row-wise Adagrad: the update adds the shards'
  squared gradients with an all-reduce of f32[tables, min(R, N B P)] per
  storage width (a fixed size, not a payload), charged as a ring all-reduce
  (2 X / N from each peer).

u is the fraction of the ids in one request (a requester's ids to one owner,
or an entry's for its host) that are distinct (`ShardedEmbeddings` reports
it: `stats["ids_unique"] / stats["ids_requested"]`); ids are assumed spread
evenly over the row shards (no hot shard). `comm_s` is
`Topology.comm_time_s(cross, intra, num_collectives)`, and
`num_collectives` counts the step's exchanges, size exchanges and
all-reduces as the embeddings issue them.

This is the traffic of GPU and TPU steps, whose exchanges are ragged
all-to-alls (`lax.ragged_all_to_all`): the wire carries the payload. On CPU
the exchanges run as all-to-alls padded to each block's capacity; that
padding (and the capacities, which depend on the data seen) is not
modelled.

Lookup work (bytes of memory traffic per device, over `memory_bw`): only
what is routed to the device. An owner reads the rows it serves (every id
of the bags it pools, each unique row it is asked for); whoever gets rows
back unique (the requester, or a table-row-wise entry) reads one per id to
pool or place them; a data-parallel replica reads its own ids' rows; the
update reads and writes each unique row it applies and its optimizer state
(2 (4 w + a(w))), each access rounded up to whole `access_bytes`. On top,
`id_bytes` per id a device handles: its own ids routed, ids received and
looked up, gradient positions sorted by the update. An owner applies
u times the id positions it receives as unique rows (data-parallel
replicas apply every device's unique rows).

Not modelled: the dense model (its cost does not depend on the plan),
activations, skewed ids (hot rows in one row shard), the overlap of
communication with compute, and the small scalar all-reduces of a step's
statistics. The constants are defaults to be replaced by measurements.

The step cost is the bottleneck: the largest lookup plus communication time
over the devices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np

from jdmt.data.specs import FeatureSet, SparseFeature
from jdmt.embeddings.layout import ROW_ALIGN
from jdmt.embeddings.optimizers import accumulator_shape
from jdmt.embeddings.types import (
    OptimizerKind,
    Placement,
    ShardingType,
    SparseOptimizer,
    check_plan,
)
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
      memory_bytes: f64[N] tables and optimizer state each device allocates
        (the storage buffers, as `Layout` sizes them): what the budget limits.
      used_bytes: f64[N] the bytes of the rows each device owns.
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

    @property
    def allocated(self) -> float:
        """Bytes allocated over all devices (tables and optimizer state)."""
        return float(self.memory_bytes.sum())

    @property
    def owned(self) -> float:
        """Bytes of the rows the devices own (no alignment, no SPMD padding)."""
        return float(self.used_bytes.sum())

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


@dataclasses.dataclass(frozen=True)
class AnalyticCostModel:
    """The analytic model of the module docstring.

    Attributes:
      memory_bw: bytes/s of the lookups' row reads and writes on one device
        (random rows reach well under the peak bandwidth: about a quarter of
        an H100's HBM peak; TorchRec's estimator uses a similar figure).
      id_bytes: memory traffic charged per id a device handles (routing,
        index reads, the update's sort and segment sums).
      unique_fraction: fraction of the ids of one request (a requester's ids
        to one owner, or a table-row-wise entry's for its host) that are
        distinct rows: it sizes the unique-row exchanges, the rows an owner
        reads for them and the rows the update reads and writes
        (`ShardedEmbeddings` measures it: `ids_unique / ids_requested`).
      access_bytes: granularity of memory accesses: a row's read (or its
        optimizer state's) costs whole accesses (GPU sectors are 32 bytes),
        so very narrow column shards are not free.
      row_dedup: the route of row-wise tables, as `ShardedEmbeddings`'
        `row_dedup`: "host" (two hops, one request per host and row across
        hosts, on meshes with H > 1 and L > 1) or "device" (direct).
      host_unique_fraction: with "host", the fraction of a host's ids (to
        the owners of one local rank) that are distinct rows: it sizes the
        cross-host hop (`ids_unique_host / ids_requested`). None: the same
        as `unique_fraction` (no gain from merging a host's requests assumed).
    """

    memory_bw: float = 900e9
    id_bytes: float = 16.0
    unique_fraction: float = 0.5
    access_bytes: int = 32
    row_dedup: str = "host"
    host_unique_fraction: float | None = None

    def __post_init__(self):
        if self.memory_bw <= 0 or self.id_bytes < 0 or not 0 < self.unique_fraction <= 1:
            raise ValueError("memory_bw > 0, id_bytes >= 0 and 0 < unique_fraction <= 1 needed")
        if self.row_dedup not in ("host", "device"):
            raise ValueError(f"row_dedup must be 'host' or 'device', got {self.row_dedup!r}")
        if self.host_unique_fraction is not None and not 0 < self.host_unique_fraction <= 1:
            raise ValueError("0 < host_unique_fraction <= 1 needed")
        if self.access_bytes < 1:
            raise ValueError("access_bytes must be >= 1")

    def _traffic(self, nbytes: float) -> float:
        """Memory traffic of reading `nbytes` of one row: whole accesses."""
        return -(-nbytes // self.access_bytes) * self.access_bytes if nbytes else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"name": "analytic", **dataclasses.asdict(self)}

    def evaluate(self, problem: Problem, placements: Mapping[str, Placement]) -> PlanCost:
        return _Costing(self, problem).run(placements)


class _Costing:
    """One evaluation: bytes[phase, receiver, sender], memory and work."""

    def __init__(self, model: AnalyticCostModel, problem: Problem):
        self.model = model
        self.problem = problem
        self.n, self.hosts, self.local = problem.num_devices, problem.hosts, problem.local
        self.b = problem.local_batch
        self.u = model.unique_fraction
        self.u_host = model.host_unique_fraction or model.unique_fraction
        self.two_hop = model.row_dedup == "host" and self.hosts > 1 and self.local > 1
        self.ib = model.id_bytes
        # bytes[phase, to, from], and terms added to it at the end: what every
        # device sends device d (to_dev), what d sends every device (from_dev),
        # what every device sends every other (pairs)
        self.bytes = np.zeros((len(PHASES), self.n, self.n))
        self.to_dev = np.zeros((len(PHASES), self.n))
        self.from_dev = np.zeros((len(PHASES), self.n))
        self.pairs = np.zeros(len(PHASES))
        # ... what each requester (h', l) sends entry (h, l) and gets from it, by h
        self.to_entry = np.zeros((len(PHASES), self.hosts))
        self.from_entry = np.zeros((len(PHASES), self.hosts))
        self.work = np.zeros(self.n)  # memory traffic per device
        self.work_all = 0.0  # ... and on every device
        self.owned: dict[int, np.ndarray] = {}  # width -> rows owned per device
        self.dp_rows: dict[int, int] = {}  # width -> replicated rows
        self.used = np.zeros(self.n)
        self._row_bytes: dict[int, int] = {}
        self._apply: dict[int, float] = {}
        # exchanges by route, for `num_collectives`
        self.flat_bags: set[int] = set()
        self.flat_rows: set[int] = set()
        self.hop_rows: set[int] = set()
        self.host_widths: set[int] = set()
        self.host_bag_widths: set[int] = set()
        self.host_row_widths: set[int] = set()
        self.split: dict[int, list[SparseFeature]] = {}  # width -> column-split tables

    # ---- per-row costs --------------------------------------------------------------------

    def row_bytes(self, w: int) -> int:
        """Bytes of a w-wide row and its optimizer state."""
        if w not in self._row_bytes:
            self._row_bytes[w] = self.problem.state_bytes_per_row(w)
        return self._row_bytes[w]

    def read(self, w: int) -> float:
        """Traffic of reading one w-wide row."""
        return self.model._traffic(_F32 * w)

    def apply(self, w: int) -> float:
        """Traffic of the update of one unique row: read and write row and state."""
        if w not in self._apply:
            self._apply[w] = 2 * (self.read(w) + self.model._traffic(self.row_bytes(w) - _F32 * w))
        return self._apply[w]

    # ---- memory ---------------------------------------------------------------------------

    def own(self, device, w: int, rows) -> None:
        """Device(s) `device` own(s) `rows` more rows of width w."""
        if w not in self.owned:
            self.owned[w] = np.zeros(self.n, np.int64)
        self.owned[w][device] += rows
        self.used[device] += rows * self.row_bytes(w)

    # ---- routes ---------------------------------------------------------------------------

    def bags(self, owner: int, w: int, p: float, weighted: bool = False) -> None:
        """Every device's bags of one piece to its owner, one row per bag back
        (`weighted`: a weight beside each id)."""
        b = self.b
        self.to_dev[0, owner] += _F32 * b * (1 + (2 if weighted else 1) * p)  # lengths, ids (and weights)
        self.from_dev[0, owner] += _F32 * w * b  # pooled rows
        self.to_dev[1, owner] += _F32 * w * b  # gradient rows
        ids = self.n * b * p
        self.work_all += self.ib * b * p  # each requester routes its ids
        # the owner unpacks and pools every id, sorts them for the update and
        # applies the unique rows
        self.work[owner] += ids * (2 * self.ib + self.read(w)) + self.u * ids * self.apply(w)
        self.flat_bags.add(w)

    def rows(self, devices: list[int], w: int, p: float) -> None:
        """Unique rows of every device's ids, asked of the row shards `devices`."""
        per = self.u * self.b * p / len(devices)  # requests from each device to each shard
        if len(devices) == self.n:  # every device a shard: the same between all pairs
            self.pairs[0] += _F32 * (1 + w) * per
            self.pairs[1] += _F32 * w * per
        else:
            for d in devices:
                self.to_dev[0, d] += _F32 * per
                self.from_dev[0, d] += _F32 * w * per
                self.to_dev[1, d] += _F32 * w * per
        self.work_all += self.b * p * (self.ib + self.read(w))  # de-duplicate, pool the rows back
        self.work[devices] += self.n * per * (2 * self.ib + self.read(w) + self.apply(w))
        self.flat_rows.add(w)

    def rows_two_hop(self, devices: list[int], w: int, p: float) -> None:
        """Unique rows of row shards `devices` in two hops (`embeddings.two_hop`):
        each requester's U = u B p requests go to the device of its host with
        the owner's local rank; that device asks each owner on another host
        for the u_h L B p / S unique rows of its host, once."""
        b, h, ln = self.b, self.hosts, self.local
        d = np.asarray(devices)
        s = len(d)
        frac = np.bincount(d % ln, minlength=ln) / s  # a requester's share to each local rank
        big_u = self.u * b * p
        m1 = np.kron(np.eye(h), np.broadcast_to(frac[:, None], (ln, ln)))  # [to entry, from requester]
        x = self.u_host * ln * b * p / s
        m2 = np.zeros((self.n, self.n))  # [to owner, from entry]
        for hh in range(h):
            m2[d, hh * ln + d % ln] = 1.0
        self.bytes[0] += _F32 * big_u * m1 + _F32 * w * big_u * m1.T + _F32 * x * m2 + _F32 * w * x * m2.T
        self.bytes[1] += _F32 * w * big_u * m1 + _F32 * w * x * m2
        self.work_all += b * p * (self.ib + self.read(w))  # de-duplicate, pool the rows back
        self.work += big_u * ln * np.tile(frac, h) * (2 * self.ib + self.read(w))  # merge, hand rows back
        self.work[d] += h * x * (2 * self.ib + self.read(w) + self.apply(w))
        self.hop_rows.add(w)

    def hosted(self, host: int, shards: int, w: int, p: float, bag: bool, weighted: bool = False) -> None:
        """A table-row-wise table on `host`, rows on its first `shards` devices
        (`weighted`: a bag's ids carry their weights to the entry)."""
        b, h, ln, u = self.b, self.hosts, self.local, self.u
        # the hop over `host`: entry (host, l) serves the requesters (h', l)
        sent = b * (1 + (2 if weighted else 1) * p) if bag else u * b * p  # ids (lengths, weights)
        back = b if bag else u * b * p  # rows per requester
        self.to_entry[0, host] += _F32 * sent
        self.from_entry[0, host] += _F32 * w * back
        self.to_entry[1, host] += _F32 * w * back
        # inside the host: each entry asks each row shard for `per` rows
        per = u * h * b * p / shards
        owners = slice(host * ln, host * ln + shards)
        entries = slice(host * ln, (host + 1) * ln)
        self.bytes[0, owners, entries] += _F32 * per
        self.bytes[0, entries, owners] += _F32 * w * per
        self.bytes[1, owners, entries] += _F32 * w * per
        self.work_all += self.ib * b * p  # each requester routes its ids
        if bag:  # the entry unpacks, de-duplicates and pools the H B bags
            self.work[entries] += h * b * p * (self.ib + self.read(w))
            self.host_bag_widths.add(w)
        else:  # the requester pools its rows, the entry forwards the requests
            self.work_all += b * p * self.read(w)
            self.work[entries] += u * h * b * p * self.ib
            self.host_row_widths.add(w)
        served = ln * per
        self.work[owners] += served * (2 * self.ib + self.read(w) + self.apply(w))
        self.host_widths.add(w)

    def replicated(self, w: int, p: float) -> None:
        """A data-parallel table: local lookups, unique rows broadcast in the update."""
        b, n, u = self.b, self.n, self.u
        self.pairs[2] += _F32 * (w + 1) * u * b * p
        self.work_all += b * p * (2 * self.ib + self.read(w)) + n * u * b * p * (self.ib + self.apply(w))

    # ---- the plan -------------------------------------------------------------------------

    def run(self, placements: Mapping[str, Placement]) -> PlanCost:
        pr = self.problem
        n, ln = self.n, self.local
        placed = [f for f in pr.features.sparse if f.name in placements]
        for f in placed:
            _check(f, placements[f.name], n, ln)
        for f in placed:
            pl = placements[f.name]
            p = pr.mean_ids(f)
            bag = f.pooled and f.max_len > 1  # `ShardedEmbeddings`' default bag features
            t = pl.type
            if t is ShardingType.DATA_PARALLEL:
                self.dp_rows[f.dim] = self.dp_rows.get(f.dim, 0) + f.rows
                self.used += f.rows * self.row_bytes(f.dim)
                self.replicated(f.dim, p)
            elif t in (ShardingType.TABLE_WISE, ShardingType.COLUMN_WISE):
                w = f.dim // len(pl.devices)
                for d in pl.devices:
                    self.own(d, w, f.rows)
                    if bag:
                        self.bags(d, w, p, f.weighted)
                    else:
                        self.rows([d], w, p)
                if len(pl.devices) > 1 and pr.optimizer.kind is OptimizerKind.ROWWISE_ADAGRAD:
                    self.split.setdefault(w, []).append(f)
            else:  # row-wise over all devices, table-row-wise over one host's
                devs = list(pl.devices)
                s = len(devs)
                self.own(devs, f.dim, np.maximum(0, (f.rows - np.arange(s) + s - 1) // s))
                shards = devs[: min(s, f.rows)]  # the shards holding rows get the ids
                if t is ShardingType.ROW_WISE and self.two_hop:
                    self.rows_two_hop(shards, f.dim, p)
                elif t is ShardingType.ROW_WISE:
                    self.rows(shards, f.dim, p)
                else:
                    self.hosted(devs[0] // ln, len(shards), f.dim, p, bag, f.weighted)
        for w, tables in self.split.items():
            # the row statistics' all-reduce, f32[tables, min(R, N B P)]
            x = _F32 * len(tables) * max(min(f.rows, n * self.b * f.max_len) for f in tables)
            self.pairs[2] += 2 * x / n
        self.bytes += self.to_dev[:, :, None] + self.from_dev[:, None, :] + self.pairs[:, None, None]
        if self.host_widths:  # [phase, to host, to local, from host, from local], same local
            v = self.bytes.reshape(len(PHASES), self.hosts, ln, self.hosts, ln)
            ranks = np.arange(ln)
            for ph in range(len(PHASES)):
                v[ph][:, ranks, :, ranks] += self.to_entry[ph][None, :, None] + self.from_entry[ph][None, None, :]

        # what each device receives, by the sender's host; sending to oneself is free
        idx = np.arange(n)
        self.bytes[:, idx, idx] = 0.0
        host = idx // ln
        other = host[:, None] != host[None, :]
        cross = np.where(other[None], self.bytes, 0.0).sum(2)
        intra = np.where(other[None], 0.0, self.bytes).sum(2)
        collectives = self.collectives()
        alloc = sum(_aligned_rows(r) * self.row_bytes(w) for w, r in self.owned.items())
        alloc += sum(r * self.row_bytes(w) for w, r in self.dp_rows.items())
        return PlanCost(
            memory_bytes=np.full(n, float(alloc)),
            used_bytes=self.used,
            lookup_s=(self.work + self.work_all) / self.model.memory_bw,
            cross_host_bytes=cross,
            intra_host_bytes=intra,
            comm_s=pr.topology.comm_time_s(cross.sum(0), intra.sum(0), collectives),
            num_collectives=collectives,
        )

    def collectives(self) -> int:
        """The step's collectives, as `ShardedEmbeddings` issues them: per flat
        width, bags and unique rows each take a size exchange and three
        exchanges; two-hop row-wise rows twice that (eight); the host path one hop of bags (two) and per width their
        return (two), the in-host unique rows (four) and the forwarded host
        rows (eight); each data-parallel width two broadcasts (four); each
        column-split width one all-reduce."""
        c = 4 * (len(self.flat_bags) + len(self.flat_rows)) + 8 * len(self.hop_rows)
        if self.host_bag_widths:
            c += 2 + 2 * len(self.host_widths) + 4 * len(self.host_bag_widths)
        c += 8 * len(self.host_row_widths)
        c += 4 * len(self.dp_rows) + len(self.split)
        return c


@functools.lru_cache(maxsize=1 << 14)
def _check(f: SparseFeature, placement: Placement, n: int, local: int) -> None:
    """`check_plan` of one table's placement (the search asks again and again)."""
    check_plan(FeatureSet((f,), num_dense=0), {f.name: placement}, n, local)


def _aligned_rows(owned: np.ndarray) -> int:
    """Rows every device allocates for one width (`Layout.rows`)."""
    most = max(1, int(owned.max(initial=0)))
    return -(-most // ROW_ALIGN) * ROW_ALIGN


__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "PHASES",
    "AnalyticCostModel",
    "CostModel",
    "PlanCost",
    "Problem",
]
