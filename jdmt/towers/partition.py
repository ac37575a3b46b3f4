"""Tower partitions: which features share a tower, and which host owns it.

DMT (docs/design.md, "DMT: the tower path") puts the features of a tower on
one host, where a Tower Module lets them interact before anything crosses
hosts. This module holds the partition itself (`TowerPartition`: its
validation against a run's features and mesh, its JSON file, its quality
metrics), the features' costs the hosts balance, and the simple
partitioners (round-robin, random). The learned partitioner, which takes an
interaction matrix, is `jdmt.towers.partition_search`; measuring the
interactions of a trained model is `jdmt.train.interactions`.

Feature cost (`feature_costs`): `work` = mean ids per example x dim (the
lookups, and the ids and rows the all-to-alls carry, scale with it),
`bytes` = table bytes plus optimizer state (what a host must hold), or
`mixed` (each feature's share of total work plus its share of total bytes:
the learned partitioner's default, so memory is balanced with the work).

The JSON file (`TowerPartition.save` / `load`)::

    {"format": "jdmt-tower-partition", "version": 1, "method": "learned",
     "towers": [{"host": 0, "features": ["cat_0", "cat_3"]}, ...],
     "report": {...}}

`load` validates it against the run's features and mesh and raises
`PartitionError` (a ValueError) naming the problem: unknown features, a
feature in no tower or in two, more towers than features, an empty tower,
a host outside [0, H), or a host whose tables do not fit its memory budget.

"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from jdmt.data.specs import FeatureSet, SparseFeature
from jdmt.embeddings.types import OptimizerKind, SparseOptimizer

__all__ = [
    "COSTS",
    "FORMAT",
    "METHODS",
    "PartitionError",
    "TowerPartition",
    "adjusted_rand_index",
    "balanced_partition",
    "feature_costs",
    "labels_of",
    "pair_recall",
    "random_partition",
    "round_robin_partition",
    "tower_hosts",
]

FORMAT = "jdmt-tower-partition"
VERSION = 1
METHODS = ("balanced", "learned", "random", "round_robin")
COSTS = ("work", "bytes", "mixed")
_F32 = 4



class PartitionError(ValueError):
    """A tower partition that is malformed or does not fit the run."""


# ---------------------------------------------------------------------------------- helpers


def _names(features: FeatureSet | Sequence[str]) -> tuple[str, ...]:
    if isinstance(features, FeatureSet):
        return features.names
    names = tuple(str(n) for n in features)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise PartitionError(f"duplicate feature names: {dup}")
    return names


def _optimizer_kind(optimizer: str | OptimizerKind | SparseOptimizer) -> OptimizerKind:
    if isinstance(optimizer, SparseOptimizer):
        return optimizer.kind
    return OptimizerKind(optimizer)


def _table_bytes(f: SparseFeature, kind: OptimizerKind) -> int:
    """Bytes of a table and its optimizer state (f32)."""
    acc = {OptimizerKind.ROWWISE_ADAGRAD: f.rows, OptimizerKind.ADAGRAD: f.rows * f.dim}.get(kind, 0)
    return _F32 * (f.rows * f.dim + acc)


def _fmt_bytes(n: float) -> str:
    return f"{n:,.0f} B ({n / 2**20:,.2f} MiB)"


def tower_hosts(num_towers: int, num_hosts: int) -> tuple[int, ...]:
    """The host of each tower: `t % H` (with fewer towers than hosts, tower t on host t)."""
    if num_towers < 1 or num_hosts < 1:
        raise PartitionError(
            f"need at least one tower and one host, got {num_towers} towers, {num_hosts} hosts"
        )
    return tuple(t % num_hosts for t in range(num_towers))


def labels_of(groups: Sequence[Sequence[str]], names: Sequence[str]) -> np.ndarray:
    """i64[F]: the index of the group (or tower) holding each of `names`.

    `groups` is a tuple of name tuples: `TowerPartition.towers` or
    `SyntheticData.groups`. Every name must be in exactly one group.
    """
    where: dict[str, int] = {}
    for g, members in enumerate(groups):
        for n in members:
            if n in where:
                raise PartitionError(f"feature {n!r} is in groups {where[n]} and {g}")
            where[n] = g
    missing = [n for n in names if n not in where]
    if missing:
        raise PartitionError(f"features {missing[:5]} are in no group")
    return np.array([where[n] for n in names], np.int64)


def pair_recall(labels: Sequence[int], truth: Sequence[int]) -> float:
    """The fraction of the pairs that `truth` puts together which `labels` also
    puts together (1 when no true group is split).

    What towers must keep: with fewer towers than interacting groups a tower
    holds several groups, which the adjusted Rand index counts as an error
    and this does not. 1.0 when `truth` has no pairs.
    """
    a = np.asarray(labels)
    b = np.asarray(truth)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"labels must be two 1-D arrays of one length, got {a.shape} and {b.shape}")
    same_truth = b[:, None] == b[None, :]
    np.fill_diagonal(same_truth, False)
    if not same_truth.any():
        return 1.0
    return float(np.sum(same_truth & (a[:, None] == a[None, :])) / np.sum(same_truth))


def adjusted_rand_index(labels_a: Sequence[int], labels_b: Sequence[int]) -> float:
    """Adjusted Rand index of two clusterings of the same items (Hubert & Arabie).

    1 for identical clusterings (up to renaming the clusters), about 0 in
    expectation for independent random ones, negative below chance. With
    n_ij the contingency table, a_i and b_j its row and column sums and
    C(x) = x (x - 1) / 2:

        ARI = (sum C(n_ij) - E) / ((sum C(a_i) + sum C(b_j)) / 2 - E),
        E   = sum C(a_i) * sum C(b_j) / C(n).

    When the denominator is 0 (both clusterings put everything in one
    cluster, or both make every item its own cluster) the clusterings agree
    and the result is 1.
    """
    a = np.asarray(labels_a)
    b = np.asarray(labels_b)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"labels must be two 1-D arrays of one length, got {a.shape} and {b.shape}")
    n = a.size
    if n < 2:
        return 1.0
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), np.int64)
    np.add.at(table, (ai, bi), 1)

    def pairs(x):
        x = np.asarray(x, np.float64)
        return float(np.sum(x * (x - 1) / 2))

    index = pairs(table)
    sum_a, sum_b = pairs(table.sum(1)), pairs(table.sum(0))
    expected = sum_a * sum_b / pairs([n])
    best = (sum_a + sum_b) / 2
    if best == expected:
        return 1.0
    return (index - expected) / (best - expected)


# ---------------------------------------------------------------------------------- partition


@dataclasses.dataclass(frozen=True)
class TowerPartition:
    """Features grouped into towers, and the host that owns each tower.

    Attributes:
      towers: feature names of each tower (tower t = `towers[t]`).
      hosts: the host index of each tower (several towers may share a host).
      method: how it was made (`learned`, `random`, `round_robin`, or `file`).
      report: free-form JSON facts (interaction measure, host costs, balance,
        ...); not compared.
    """

    towers: tuple[tuple[str, ...], ...]
    hosts: tuple[int, ...]
    method: str = "file"
    report: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self):
        try:
            towers = tuple(tuple(str(n) for n in t) for t in self.towers)
            hosts = tuple(int(h) for h in self.hosts)
        except (TypeError, ValueError):
            raise PartitionError(
                "towers must be lists of feature names and hosts a list of integers"
            ) from None
        if not towers:
            raise PartitionError("a partition needs at least one tower")
        if len(hosts) != len(towers):
            raise PartitionError(f"{len(towers)} towers but {len(hosts)} host indices")
        object.__setattr__(self, "towers", towers)
        object.__setattr__(self, "hosts", hosts)
        object.__setattr__(self, "report", dict(self.report or {}))

    # ---- queries ------------------------------------------------------------------------

    @property
    def num_towers(self) -> int:
        return len(self.towers)

    @property
    def features(self) -> tuple[str, ...]:
        """All feature names, tower by tower."""
        return tuple(n for t in self.towers for n in t)

    def tower_of(self, name: str) -> int:
        for t, members in enumerate(self.towers):
            if name in members:
                return t
        raise KeyError(f"feature {name!r} is in no tower")

    def labels(self, names: Sequence[str]) -> np.ndarray:
        """i64[F]: the tower of each of `names`."""
        return labels_of(self.towers, names)

    def host_towers(self, host: int) -> tuple[int, ...]:
        return tuple(t for t, h in enumerate(self.hosts) if h == host)

    def host_loads(self, names: Sequence[str], cost: Sequence[float], num_hosts: int) -> np.ndarray:
        """f64[H]: the summed `cost` (one value per name) of each host's features."""
        c = dict(zip(names, np.asarray(cost, np.float64), strict=True))
        out = np.zeros(num_hosts)
        for members, h in zip(self.towers, self.hosts, strict=True):
            out[h] += sum(c[n] for n in members)
        return out

    # ---- validation ---------------------------------------------------------------------

    def validate(
        self,
        features: FeatureSet | Sequence[str],
        num_hosts: int,
        *,
        memory_budget: float | None = None,
        optimizer: str | OptimizerKind | SparseOptimizer = OptimizerKind.ROWWISE_ADAGRAD,
    ) -> TowerPartition:
        """Check the partition against a run's features and mesh; return self.

        Args:
          features: the run's features (a FeatureSet, needed for the memory
            check, or just their names).
          num_hosts: H of the mesh.
          memory_budget: bytes of tables and optimizer state one host may hold
            (None: not checked).
          optimizer: the sparse optimizer (its state counts against the budget).

        Raises:
          PartitionError: the message names the problem (unknown features,
            a feature in no tower or in two, more towers than features, an
            empty tower, a host outside [0, H), a host over its budget).
        """
        names = _names(features)
        known = set(names)
        if self.num_towers > len(names):
            raise PartitionError(
                f"{self.num_towers} towers for {len(names)} features: every tower needs at least "
                "one feature"
            )
        for t, members in enumerate(self.towers):
            if not members:
                raise PartitionError(f"tower {t} (host {self.hosts[t]}) is empty")
        unknown = [n for n in self.features if n not in known]
        if unknown:
            raise PartitionError(
                f"the partition names unknown features {unknown[:5]}"
                f"{'...' if len(unknown) > 5 else ''}; this run's features are "
                f"{list(names)[:8]}{'...' if len(names) > 8 else ''}"
            )
        seen: dict[str, int] = {}
        for t, members in enumerate(self.towers):
            for n in members:
                if n in seen:
                    where = f"towers {seen[n]} and {t}" if seen[n] != t else f"tower {t} twice"
                    raise PartitionError(f"feature {n!r} is in {where}")
                seen[n] = t
        missing = [n for n in names if n not in seen]
        if missing:
            raise PartitionError(
                f"features {missing[:5]}{'...' if len(missing) > 5 else ''} are in no tower "
                "(every feature must be in exactly one)"
            )
        if num_hosts < 1:
            raise PartitionError(f"num_hosts must be >= 1, got {num_hosts}")
        for t, h in enumerate(self.hosts):
            if not 0 <= h < num_hosts:
                raise PartitionError(
                    f"tower {t} is on host {h}, outside [0, {num_hosts}) for a mesh of "
                    f"{num_hosts} hosts"
                )
        if memory_budget is not None:
            if not isinstance(features, FeatureSet):
                raise PartitionError("the memory check needs the FeatureSet (rows and dims)")
            kind = _optimizer_kind(optimizer)
            for h in range(num_hosts):
                towers = self.host_towers(h)
                used = sum(_table_bytes(features[n], kind) for t in towers for n in self.towers[t])
                if used > memory_budget:
                    state = {OptimizerKind.ROWWISE_ADAGRAD: "row-wise accumulators",
                             OptimizerKind.ADAGRAD: "Adagrad accumulators"}.get(kind)
                    what = "tables" + (f" and {state}" if state else "")
                    raise PartitionError(
                        f"host {h} cannot hold its towers {list(towers)}: {_fmt_bytes(used)} of "
                        f"{what} exceed its memory budget of {_fmt_bytes(memory_budget)}"
                    )
        return self

    # ---- JSON ---------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The partition as plain JSON (see the module docstring for the format)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "method": self.method,
            "towers": [
                {"host": h, "features": list(members)}
                for members, h in zip(self.towers, self.hosts, strict=True)
            ],
            "report": _jsonable(self.report),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any] | str) -> TowerPartition:
        """Parse `to_json`'s output (a dict, or its JSON text); structure only
        (call `validate` against the run).

        Raises:
          PartitionError: not a tower partition, another version, or
            malformed towers.
        """
        if isinstance(obj, str):
            try:
                obj = json.loads(obj)
            except json.JSONDecodeError as e:
                raise PartitionError(f"not valid JSON: {e}") from None
        if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
            raise PartitionError(f"not a tower partition (expected \"format\": \"{FORMAT}\")")
        if obj.get("version") != VERSION:
            raise PartitionError(
                f"tower partition version {obj.get('version')}; this version reads {VERSION}"
            )
        towers = obj.get("towers")
        if not isinstance(towers, list):
            raise PartitionError("\"towers\" must be a list of {\"host\": H, \"features\": [...]}")
        members, hosts = [], []
        for t, entry in enumerate(towers):
            if (
                not isinstance(entry, Mapping)
                or not isinstance(entry.get("features"), list)
                or not all(isinstance(n, str) for n in entry["features"])
                or not isinstance(entry.get("host"), int)
                or isinstance(entry.get("host"), bool)
            ):
                raise PartitionError(
                    f"tower {t} must be {{\"host\": <int>, \"features\": [<names>]}}, got "
                    f"{json.dumps(entry)[:200]}"
                )
            members.append(tuple(entry["features"]))
            hosts.append(entry["host"])
        return cls(tuple(members), tuple(hosts), str(obj.get("method", "file")),
                   dict(obj.get("report") or {}))

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON file (atomically: a temporary file, then a rename)."""
        path = os.fspath(path)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f, indent=1)
            f.write("\n")
        os.replace(tmp, path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        features: FeatureSet | Sequence[str],
        num_hosts: int,
        *,
        memory_budget: float | None = None,
        optimizer: str | OptimizerKind | SparseOptimizer = OptimizerKind.ROWWISE_ADAGRAD,
    ) -> TowerPartition:
        """Read a partition file and `validate` it for the run.

        Raises:
          PartitionError: the file is missing, unreadable or malformed, or the
            partition does not fit the run (the message starts with the path).
        """
        path = os.fspath(path)
        try:
            with open(path) as f:
                text = f.read()
        except OSError as e:
            raise PartitionError(f"tower partition {path}: cannot read it ({e.strerror})") from None
        try:
            return cls.from_json(text).validate(
                features, num_hosts, memory_budget=memory_budget, optimizer=optimizer
            )
        except PartitionError as e:
            raise PartitionError(f"tower partition {path}: {e}") from None


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _normalized(
    names: Sequence[str], assign: np.ndarray, hosts: Sequence[int], method: str, report: dict
) -> TowerPartition:
    """Towers from a feature -> tower array: members in feature order, towers
    sorted by (host, first feature)."""
    towers = [[i for i in range(len(names)) if assign[i] == t] for t in range(len(hosts))]
    order = sorted(range(len(hosts)), key=lambda t: (hosts[t], towers[t][0] if towers[t] else 1 << 30))
    return TowerPartition(
        tuple(tuple(names[i] for i in towers[t]) for t in order),
        tuple(int(hosts[t]) for t in order),
        method,
        report,
    )


# ---------------------------------------------------------------------------------- costs


def feature_costs(
    features: FeatureSet,
    *,
    mean_lengths: Mapping[str, float] | None = None,
    optimizer: str | OptimizerKind | SparseOptimizer = OptimizerKind.ROWWISE_ADAGRAD,
) -> dict[str, np.ndarray]:
    """Per-feature costs (in `features` order).

    Args:
      features: the features.
      mean_lengths: mean ids per example (pooled) or valid positions
        (sequence) by name, e.g. measured from data; default `max_len`.
      optimizer: the sparse optimizer (its state counts in `bytes`).

    Returns:
      {'lookups': f64[F] mean ids per example, 'work': lookups x dim,
       'bytes': table plus optimizer-state bytes,
       'mixed': work / sum(work) + bytes / sum(bytes)}.
    """
    ml = dict(mean_lengths or {})
    unknown = set(ml) - set(features.names)
    if unknown:
        raise PartitionError(f"mean_lengths names unknown features {sorted(unknown)}")
    kind = _optimizer_kind(optimizer)
    lookups = np.array([float(ml.get(f.name, f.max_len)) for f in features.sparse])
    if np.any(~np.isfinite(lookups)) or np.any(lookups < 0):
        raise PartitionError("mean_lengths must be finite and >= 0")
    work = lookups * np.array([f.dim for f in features.sparse], np.float64)
    nbytes = np.array([_table_bytes(f, kind) for f in features.sparse], np.float64)
    mixed = work / max(work.sum(), 1e-300) + nbytes / max(nbytes.sum(), 1e-300)
    return {"lookups": lookups, "work": work, "bytes": nbytes, "mixed": mixed}


def _cost_vector(
    features: FeatureSet | Sequence[str],
    cost: str | Mapping[str, float] | Sequence[float] | np.ndarray,
    mean_lengths: Mapping[str, float] | None,
    optimizer,
) -> np.ndarray:
    names = _names(features)
    if isinstance(cost, str):
        if cost not in COSTS:
            raise PartitionError(f"unknown cost {cost!r}; available: {', '.join(COSTS)}")
        if not isinstance(features, FeatureSet):
            return np.ones(len(names))  # names only: unit costs
        c = feature_costs(features, mean_lengths=mean_lengths, optimizer=optimizer)[cost]
    elif isinstance(cost, Mapping):
        missing = [n for n in names if n not in cost]
        if missing:
            raise PartitionError(f"cost has no entry for features {missing[:5]}")
        c = np.array([float(cost[n]) for n in names])
    else:
        c = np.asarray(cost, np.float64)
        if c.shape != (len(names),):
            raise PartitionError(f"cost must have one value per feature ({len(names)}), got {c.shape}")
    if np.any(~np.isfinite(c)) or np.any(c < 0):
        raise PartitionError("feature costs must be finite and >= 0")
    return c


# ---------------------------------------------------------------------------------- partitioners


def balanced_partition(
    features: FeatureSet,
    num_towers: int | None = None,
    num_hosts: int = 1,
    *,
    cost: str | Mapping[str, float] | Sequence[float] = "bytes",
    mean_lengths: Mapping[str, float] | None = None,
    optimizer: str | OptimizerKind | SparseOptimizer = OptimizerKind.ROWWISE_ADAGRAD,
) -> TowerPartition:
    """Hosts balanced by cost, largest first (the default of `train.py --towers`).

    Features in decreasing cost (ties: feature order), each to the tower
    whose host has the least cost so far (ties: the tower with the fewest
    features, then the lowest index); while some tower is empty, only the
    empty towers are candidates, so none stays empty. With `cost='bytes'`
    (tables plus optimizer state) a host's table memory is as even as the
    tables allow: every device allocates its host's share in SPMD, so the
    heaviest host sets the memory of all of them.
    """
    names = _names(features)
    t = num_hosts if num_towers is None else num_towers
    _check_counts(len(names), t, num_hosts)
    c = _cost_vector(features, cost, mean_lengths, optimizer)
    hosts = tower_hosts(t, num_hosts)
    order = sorted(range(len(names)), key=lambda i: (-c[i], i))
    assign = np.full(len(names), -1)
    host_load = np.zeros(num_hosts)
    size = np.zeros(t, np.int64)
    for i in order:
        empty = [j for j in range(t) if size[j] == 0]
        tower = min(empty or range(t), key=lambda j: (host_load[hosts[j]], size[j], j))
        assign[i] = tower
        size[tower] += 1
        host_load[hosts[tower]] += c[i]
    report = {"num_hosts": num_hosts, "cost": cost if isinstance(cost, str) else "given",
              "host_cost_max_over_mean": round(float(host_load.max() / max(host_load.mean(), 1e-300)), 4)}
    return _normalized(names, assign, hosts, "balanced", report)


# ---------------------------------------------------------------------------------- ablations


def round_robin_partition(
    features: FeatureSet | Sequence[str], num_towers: int | None = None, num_hosts: int = 1
) -> TowerPartition:
    """Feature i goes to tower i % T (sizes differ by at most one); tower t on
    host `tower_hosts(T, H)[t]`."""
    names = _names(features)
    t = num_hosts if num_towers is None else num_towers
    _check_counts(len(names), t, num_hosts)
    assign = np.arange(len(names)) % t
    return _normalized(names, assign, tower_hosts(t, num_hosts), "round_robin", {"num_hosts": num_hosts})


def random_partition(
    features: FeatureSet | Sequence[str],
    num_towers: int | None = None,
    num_hosts: int = 1,
    seed: int = 0,
    *,
    cost: str | Mapping[str, float] | Sequence[float] | None = None,
    mean_lengths: Mapping[str, float] | None = None,
) -> TowerPartition:
    """A random balanced partition (the ablation baseline of `learned`).

    Features are shuffled (numpy's generator seeded with `seed`) and dealt in
    that order to the tower whose host has the least cost so far (ties: the
    tower with the fewest features, then the lowest index). With unit or
    equal costs (the default, `cost=None`) this gives sizes that differ by at
    most one; with `cost` ('work', 'bytes', 'mixed', or values per feature)
    the hosts' costs are balanced greedily.
    """
    names = _names(features)
    t = num_hosts if num_towers is None else num_towers
    _check_counts(len(names), t, num_hosts)
    c = np.ones(len(names)) if cost is None else _cost_vector(features, cost, mean_lengths, "rowwise_adagrad")
    hosts = tower_hosts(t, num_hosts)
    order = np.random.default_rng(seed).permutation(len(names))
    assign = np.full(len(names), -1)
    host_load = np.zeros(num_hosts)
    size = np.zeros(t, np.int64)
    for k, i in enumerate(order):
        if k < t:  # one feature per tower first: no tower stays empty
            tower = int(k)
        else:
            tower = min(range(t), key=lambda j: (host_load[hosts[j]], size[j], j))
        assign[i] = tower
        size[tower] += 1
        host_load[hosts[tower]] += c[i]
    return _normalized(names, assign, hosts, "random", {"seed": int(seed), "num_hosts": num_hosts})


def _check_counts(num_features: int, num_towers: int, num_hosts: int) -> None:
    if num_hosts < 1:
        raise PartitionError(f"num_hosts must be >= 1, got {num_hosts}")
    if num_towers < 1:
        raise PartitionError(f"num_towers must be >= 1, got {num_towers}")
    if num_towers > num_features:
        raise PartitionError(
            f"{num_towers} towers for {num_features} features: every tower needs at least one feature"
        )
