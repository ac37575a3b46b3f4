"""The Tower Partitioner: which features share a tower, and which host owns it.

DMT (DESIGN.md, "DMT: the tower path") puts the features of a tower on one
host, where a Tower Module lets them interact before anything crosses hosts.
Features that interact strongly should therefore share a tower, and every
host should carry about the same load. This module measures how strongly
features interact in a trained flat model, groups them into towers under a
balance constraint, and reads and writes the resulting partition as JSON.

Interaction measures (both give a symmetric, non-negative f32[F, F] matrix
with a zero diagonal; larger means "keep these two together"):

* ``"hessian"`` (default; needs the trained dense model): the mixed second
  derivative of the model's logit with respect to two features' pooled
  embeddings, ``H_ij(x) = d^2 logit / de_i de_j`` (a D x D block), measured
  on held-out examples and scaled by how much each embedding varies::

      W_ij = sqrt(mean_x ||H_ij(x)||_F^2) * s_i * s_j,
      s_i  = sqrt(mean_x ||e_i(x) - mean_x e_i||^2)

  ``e_i^T H_ij e_j`` is the part of the logit that depends on features i and
  j jointly (what no sum of one-feature terms can express), so W_ij is the
  typical size of that joint effect, in logits. It works for any dense
  model (DLRM's dot interaction, DCN's cross layers). For DLRM with ReLU
  MLPs and pooled features the block is exactly ``(d logit / d z_ij) I_D``
  (the MLPs are piecewise linear), so W_ij is the trained top MLP's
  sensitivity to the interaction feature z_ij = <e_i, e_j>, times
  sqrt(D) s_i s_j. A sequence feature is perturbed by a shift of all its
  valid positions (its masked mean for mean pooling). The block norms are exact for D <= 32 (D Hessian-vector
  products per feature and example); wider embeddings use `probes` random
  sign vectors per feature (an unbiased estimate of ||H_ij||_F^2).
* ``"dot"`` (embeddings only; `interaction_matrix`): DLRM feeds its top MLP
  the dot products z_ij = <e_i, e_j>. A pair whose dot product varies
  across examples carries information to the top MLP; one whose dot
  product is constant carries none. ``W_ij = std_x <e_i, e_j> / (r_i r_j)``
  with ``r_i = sqrt(mean_x ||e_i||^2)``, so rescaling a table changes
  nothing.

On the synthetic data (`SyntheticData.groups` are the planted interaction
groups), after 600 steps of a small DLRM (12 features, 4 groups, dim 8),
within-group pairs score on average 5-9x the cross-group pairs by the
Hessian and only about 1.3-1.5x by the dot spread; the learned partition
recovers the groups exactly (adjusted Rand index 1) with the Hessian on
data seeds 0, 1 and 2, and with the dot spread on seeds 0 and 2 (0.64 on
seed 1, two towers per host); tests/test_partitioner.py checks seed 0.

Grouping (`learned_partition`): tower t lives on host `t % H` (hosts get
T // H or T // H + 1 towers; with T < H, tower t on host t). The partition
maximises
``Q = sum over towers of sum_{i != j in tower} (W_ij - g k_i k_j / 2m)``
(k_i = sum_j W_ij, 2m = sum_i k_i). With one tower per host (T <= H), g = 0:
Q is the interaction kept inside towers, i.e. it minimises the interaction
cut between towers, which is what compressing towers lose; the host caps
below keep the towers balanced. With several towers per host, g = 1: Q is
the modularity (the weight inside towers beyond what random grouping with
the same degrees would give), whose null model keeps a tower from
swallowing the other towers of its host. Subject to

* every tower holds at least one feature;
* each host's cost (sum of its features' costs) is at most
  ``cap = (1 + balance_tolerance) * total cost / hosts used``. When no
  assignment can reach that cap (e.g. 26 equal features on 8 hosts), the
  cap is relaxed to the makespan of a greedy (LPT) assignment, and the
  report says so (`tolerance_met` false, `cap_used`);
* optionally, each host's table memory (tables plus optimizer state) is at
  most `memory_budget` bytes.

It starts from spectral clustering into T clusters (the k leading
eigenvectors of the normalised affinity D^-1/2 W D^-1/2, row-normalised,
k-means with a farthest-point start), repaired to a feasible assignment;
from finer spectral clusterings (k = T+1 .. 3T+8) whose clusters are packed
whole into the towers (a tower holding several interacting groups: single
moves cannot carry a group across a balanced split); and from a greedy
balanced assignment. From each, steepest-ascent local search over single
moves and pairwise swaps runs to a local optimum, and the best result is
kept. Everything is deterministic. On the default synthetic data (26
features, 6 planted groups) with 2 towers on 2 hosts, modularity alone
split one group (pairs kept 0.93, AUC 0.7284 at 600 steps with `dot`
towers); the cut objective keeps every group whole.

Feature cost (`feature_costs`): `work` = mean ids per example x dim (the
lookups, and the ids and rows the all-to-alls carry, scale with it; the
default balance cost), `bytes` = table bytes plus optimizer state (what a
host must hold), or `mixed` (each feature's share of total work plus its
share of total bytes).

The JSON file (`TowerPartition.save` / `load`)::

    {"format": "jdmt-tower-partition", "version": 1, "method": "learned",
     "towers": [{"host": 0, "features": ["cat_0", "cat_3"]}, ...],
     "report": {...}}

`load` validates it against the run's features and mesh and raises
`PartitionError` (a ValueError) naming the problem: unknown features, a
feature in no tower or in two, more towers than features, an empty tower,
a host outside [0, H), or a host whose tables do not fit its memory budget.

Command line (a flat checkpoint in, a partition file out)::

    python -m jdmt.towers.partitioner --checkpoint-dir ck --towers 4 --mesh 2x4 \
        --out partition.json [--method learned|random|round_robin]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from jdmt.data.specs import FeatureSet, Kind, SparseFeature
from jdmt.embeddings.types import OptimizerKind, SparseOptimizer

__all__ = [
    "FORMAT",
    "MEASURES",
    "METHODS",
    "PartitionError",
    "TowerPartition",
    "adjusted_rand_index",
    "feature_costs",
    "features_from_json",
    "hessian_interaction",
    "interaction_from_trainer",
    "interaction_matrix",
    "labels_of",
    "pair_recall",
    "learned_partition",
    "main",
    "make_partition",
    "mean_lengths_from_trainer",
    "partition_from_trainer",
    "pooled_embeddings",
    "random_partition",
    "restore_trainer",
    "round_robin_partition",
    "tower_hosts",
]

FORMAT = "jdmt-tower-partition"
VERSION = 1
METHODS = ("learned", "random", "round_robin")
MEASURES = ("hessian", "dot")
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


# ---------------------------------------------------------------------------------- learned


def _check_interaction(interaction: np.ndarray, f: int) -> np.ndarray:
    w = np.asarray(interaction, np.float64)
    if w.shape != (f, f):
        raise PartitionError(f"interaction must be [{f}, {f}] (one row per feature), got {w.shape}")
    if not np.all(np.isfinite(w)):
        raise PartitionError("interaction holds NaN or infinite values")
    w = np.maximum((w + w.T) / 2, 0.0)
    np.fill_diagonal(w, 0.0)
    return w


def _spectral_labels(w: np.ndarray, k: int) -> np.ndarray:
    """k clusters of the graph `w` (Ng, Jordan & Weiss), deterministic."""
    f = len(w)
    if k <= 1:
        return np.zeros(f, np.int64)
    deg = w.sum(1)
    inv = 1.0 / np.sqrt(deg + 1e-12 * max(deg.max(), 1e-300))
    a = inv[:, None] * w * inv[None, :]
    _, vecs = np.linalg.eigh(a)
    x = vecs[:, -k:]
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    # Farthest-point start: the highest-degree feature, then the farthest from
    # the centres so far (distances do not depend on eigenvector signs).
    centres = [int(np.argmax(deg))]
    d2 = np.sum((x - x[centres[0]]) ** 2, 1)
    for _ in range(1, k):
        nxt = int(np.argmax(d2))
        centres.append(nxt)
        d2 = np.minimum(d2, np.sum((x - x[nxt]) ** 2, 1))
    c = x[centres].copy()
    labels = np.full(f, -1)
    for _ in range(100):
        new = np.argmin(np.sum((x[:, None, :] - c[None]) ** 2, -1), 1)
        if np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            if np.any(labels == j):
                c[j] = x[labels == j].mean(0)
    return labels


def _modularity(w: np.ndarray, assign: np.ndarray) -> float:
    """Newman's modularity of the grouping `assign` of the graph `w` (diagonal ignored)."""
    w = w.copy()
    np.fill_diagonal(w, 0.0)
    k = w.sum(1)
    two_m = k.sum()
    if two_m <= 0:
        return 0.0
    same = assign[:, None] == assign[None, :]
    return float(np.sum((w - np.outer(k, k) / two_m)[same]) / two_m)


class _Search:
    """Local search over tower assignments under host caps (see `learned_partition`)."""

    def __init__(self, w, cost, mem, hosts, num_hosts, cap, budget, resolution=1.0):
        self.w = w
        f = len(w)
        k = w.sum(1)
        two_m = k.sum()
        self.b = w - (resolution * np.outer(k, k) / two_m if two_m > 0 else 0.0)
        np.fill_diagonal(self.b, 0.0)
        self.cost, self.mem = cost, mem
        self.hosts = np.asarray(hosts)
        self.num_hosts = num_hosts
        self.t = len(hosts)
        self.cap, self.budget = cap, budget
        self.slack = 1e-9 * max(cost.sum(), 1e-300)
        self.mslack = 1e-9 * max(mem.sum(), 1.0)
        self.eps = 1e-10 * max(np.abs(self.b).sum(), 1e-300)
        self.f = f

    # loads ---------------------------------------------------------------------------------
    def loads(self, assign):
        hf = self.hosts[assign]
        return (np.bincount(hf, self.cost, self.num_hosts), np.bincount(hf, self.mem, self.num_hosts))

    def feasible(self, assign) -> bool:
        load, mem = self.loads(assign)
        sizes = np.bincount(assign, minlength=self.t)
        return bool(
            np.all(sizes > 0) and np.all(load <= self.cap + self.slack)
            and (self.budget is None or np.all(mem <= self.budget + self.mslack))
        )

    def objective(self, assign) -> float:
        same = assign[:, None] == assign[None, :]
        return float(np.sum(self.b[same]))

    # greedy start ----------------------------------------------------------------------------
    def greedy(self) -> np.ndarray:
        """Largest cost first, each to the least-loaded host with memory room
        (empty towers first); its makespan is always reachable."""
        assign = np.full(self.f, -1)
        load = np.zeros(self.num_hosts)
        mem = np.zeros(self.num_hosts)
        size = np.zeros(self.t, np.int64)
        for i in sorted(range(self.f), key=lambda i: (-self.cost[i], -self.mem[i], i)):
            best = None
            for tw in range(self.t):
                h = self.hosts[tw]
                if self.budget is not None and mem[h] + self.mem[i] > self.budget + self.mslack:
                    continue
                key = (size[tw] > 0, load[h] + self.cost[i], size[tw], tw)
                if best is None or key < best[0]:
                    best = (key, tw)
            if best is None:
                raise PartitionError(
                    f"no host has memory left for feature {i} ({_fmt_bytes(self.mem[i])}) "
                    f"within the budget of {_fmt_bytes(self.budget)} per host"
                )
            tw = best[1]
            assign[i] = tw
            size[tw] += 1
            load[self.hosts[tw]] += self.cost[i]
            mem[self.hosts[tw]] += self.mem[i]
        if np.any(size == 0):  # more towers than the greedy filled: impossible when T <= F
            raise PartitionError("could not give every tower a feature")
        return assign

    # spectral start ---------------------------------------------------------------------------
    def from_clusters(self, labels: np.ndarray) -> np.ndarray | None:
        """Pack whole clusters into the towers: largest cost first, each to a
        still-empty tower while there are some (least-loaded host first), else
        to a tower on the least-loaded host; then repair caps and empty
        towers. None if the repair gets stuck.

        With more clusters than towers a tower holds several of them: moving
        one feature at a time cannot carry an interacting group across a
        balanced split (each single move overloads a host), packing the
        groups whole can.
        """
        k = int(labels.max()) + 1
        ccost = np.bincount(labels, self.cost, k)
        order = sorted(range(k), key=lambda j: (-ccost[j], int(np.flatnonzero(labels == j)[0])
                                                 if np.any(labels == j) else 1 << 30))
        load = np.zeros(self.num_hosts)
        size = np.zeros(self.t, np.int64)
        slot = np.zeros(k, np.int64)
        for j in order:
            tw = min(range(self.t), key=lambda s: (size[s] > 0, load[self.hosts[s]], s))
            slot[j] = tw
            size[tw] += 1
            load[self.hosts[tw]] += ccost[j]
        return self.repair(slot[labels])

    def repair(self, assign: np.ndarray) -> np.ndarray | None:
        assign = assign.copy()
        for _ in range(4 * self.f * self.t + 10):
            sizes = np.bincount(assign, minlength=self.t)
            load, mem = self.loads(assign)
            over_c = load > self.cap + self.slack
            over_m = (mem > self.budget + self.mslack) if self.budget is not None else np.zeros_like(over_c)
            empty = np.flatnonzero(sizes == 0)
            if not empty.size and not over_c.any() and not over_m.any():
                return assign
            s = self._sums(assign)
            best = None
            for i in range(self.f):
                a = assign[i]
                if sizes[a] < 2:
                    continue
                ha = self.hosts[a]
                if empty.size:
                    targets = empty
                elif over_c[ha] or over_m[ha]:
                    if self.cost[i] <= 0 and not over_m[ha]:
                        continue
                    targets = np.flatnonzero(self.hosts != ha)
                else:
                    continue
                for tw in targets:
                    h = self.hosts[tw]
                    if h != ha:
                        if load[h] + self.cost[i] > self.cap + self.slack:
                            continue
                        if self.budget is not None and mem[h] + self.mem[i] > self.budget + self.mslack:
                            continue
                    gain = s[i, tw] - s[i, a]
                    if best is None or gain > best[0] + self.eps:
                        best = (gain, i, tw)
            if best is None:
                return None
            assign[best[1]] = best[2]
        return None

    # local search ----------------------------------------------------------------------------
    def _sums(self, assign):
        onehot = np.zeros((self.f, self.t))
        onehot[np.arange(self.f), assign] = 1.0
        return self.b @ onehot  # [F, T]: sum of B to each tower's members

    def improve(self, assign: np.ndarray) -> np.ndarray:
        assign = assign.copy()
        idx = np.arange(self.f)
        for _ in range(50 * self.f + 100):
            s = self._sums(assign)
            sizes = np.bincount(assign, minlength=self.t)
            load, mem = self.loads(assign)
            ha = self.hosts[assign]  # [F] host of each feature
            own = s[idx, assign]
            move = s - own[:, None]  # [F, T]
            # moves: keep the source non-empty; a new host must stay within caps
            ok = (sizes[assign] >= 2)[:, None] & (np.arange(self.t)[None, :] != assign[:, None])
            other = self.hosts[None, :] != ha[:, None]
            fits = load[self.hosts][None, :] + self.cost[:, None] <= self.cap + self.slack
            if self.budget is not None:
                fits &= mem[self.hosts][None, :] + self.mem[:, None] <= self.budget + self.mslack
            ok &= ~other | fits
            mg = np.where(ok, move, -np.inf)
            # swaps i <-> j between different towers
            sg = move[:, assign] + move[:, assign].T - 2 * self.b  # [F, F]
            diff = assign[:, None] != assign[None, :]
            cross = ha[:, None] != ha[None, :]
            dc = self.cost[:, None] - self.cost[None, :]  # i's host gains c_j - c_i ... see below
            # after swapping i (host hi) and j (host hj): hi gets + c_j - c_i, hj gets + c_i - c_j
            fit_s = (load[ha][:, None] - dc <= self.cap + self.slack) & (
                load[ha][None, :] + dc <= self.cap + self.slack
            )
            if self.budget is not None:
                dm = self.mem[:, None] - self.mem[None, :]
                fit_s &= (mem[ha][:, None] - dm <= self.budget + self.mslack) & (
                    mem[ha][None, :] + dm <= self.budget + self.mslack
                )
            oks = diff & np.triu(np.ones((self.f, self.f), bool), 1) & (~cross | fit_s)
            sg = np.where(oks, sg, -np.inf)
            bm, bs = mg.max(), sg.max()
            if max(bm, bs) <= self.eps:
                return assign
            if bm >= bs:
                i, tw = np.unravel_index(int(np.argmax(mg)), mg.shape)
                assign[i] = tw
            else:
                i, j = np.unravel_index(int(np.argmax(sg)), sg.shape)
                assign[i], assign[j] = assign[j], assign[i]
        return assign


def learned_partition(
    features: FeatureSet | Sequence[str],
    interaction: np.ndarray,
    num_towers: int | None = None,
    num_hosts: int = 1,
    *,
    cost: str | Mapping[str, float] | Sequence[float] = "work",
    balance_tolerance: float = 0.1,
    mean_lengths: Mapping[str, float] | None = None,
    memory_budget: float | None = None,
    optimizer: str | OptimizerKind | SparseOptimizer = OptimizerKind.ROWWISE_ADAGRAD,
) -> TowerPartition:
    """Group strongly interacting features into towers, balancing the hosts.

    Args:
      features: the features (a FeatureSet for costs and memory; names alone
        give every feature a unit cost).
      interaction: f[F, F] interaction strengths in `features` order
        (`interaction_matrix`, `hessian_interaction`); symmetrised, negative
        values and the diagonal ignored.
      num_towers: T (default: one per host).
      num_hosts: H of the target mesh; tower t is on host `tower_hosts(T, H)[t]`.
      cost: what to balance: 'work' (mean ids x dim), 'bytes', 'mixed' (see
        `feature_costs`), or values per feature (mapping or sequence).
      balance_tolerance: each host's cost may exceed the mean over the hosts
        used by this fraction (relaxed, and reported, if unreachable).
      mean_lengths: measured mean ids per example by feature (for 'work').
      memory_budget: bytes of tables plus optimizer state a host may hold
        (None: unlimited).
      optimizer: the sparse optimizer (its state counts as memory).

    Returns:
      The partition, `method='learned'`; its report holds the host costs,
      the cap, the imbalance (max over mean host cost), whether the tolerance
      was met, the modularity and the fraction of interaction inside towers.

    Raises:
      PartitionError: more towers than features, a bad interaction matrix,
        or tables that do not fit the hosts' memory.
    """
    names = _names(features)
    f = len(names)
    t = num_hosts if num_towers is None else int(num_towers)
    _check_counts(f, t, num_hosts)
    if not balance_tolerance >= 0:
        raise PartitionError(f"balance_tolerance must be >= 0, got {balance_tolerance}")
    w = _check_interaction(interaction, f)
    c = _cost_vector(features, cost, mean_lengths, optimizer)
    if isinstance(features, FeatureSet):
        kind = _optimizer_kind(optimizer)
        mem = np.array([_table_bytes(x, kind) for x in features.sparse], np.float64)
    else:
        if memory_budget is not None:
            raise PartitionError("a memory budget needs the FeatureSet (rows and dims)")
        mem = np.zeros(f)
    hosts = tower_hosts(t, num_hosts)
    used_hosts = min(t, num_hosts)
    cap = (1.0 + balance_tolerance) * c.sum() / used_hosts
    # One tower per host: the hosts' caps balance the towers, and what a split
    # loses is the interaction cut between towers, so the search keeps the most
    # interaction inside towers. Several towers on a host: modularity, whose
    # null model keeps one tower from swallowing the others of its host.
    resolution = 0.0 if t <= num_hosts else 1.0
    search = _Search(w, c, mem, hosts, num_hosts, cap, memory_budget, resolution)
    greedy = search.greedy()
    greedy_load = search.loads(greedy)[0].max()
    if greedy_load > search.cap + search.slack:
        search.cap = float(greedy_load)  # the tolerance is out of reach: use the greedy makespan
    # T clusters, and finer clusterings packed whole: towers that hold several groups.
    starts = [search.from_clusters(_spectral_labels(w, k)) for k in range(t, min(f, 3 * t + 8) + 1)]
    starts = [s for s in starts if s is not None] + [greedy]
    best, best_q = None, -np.inf
    for s in starts:
        a = search.improve(s)
        q = search.objective(a)
        if q > best_q + search.eps:
            best, best_q = a, q
    assert search.feasible(best), "internal error: the local search left the feasible set"
    load, memload = search.loads(best)
    same = best[:, None] == best[None, :]
    mean = c.sum() / used_hosts
    report = {
        "num_hosts": num_hosts,
        "cost": cost if isinstance(cost, str) else "custom",
        "balance_tolerance": balance_tolerance,
        "host_cost": load.tolist(),
        "host_memory_bytes": memload.tolist(),
        "cap": float(cap),
        "cap_used": float(search.cap),
        "imbalance": float(load.max() / mean) if mean > 0 else 1.0,
        "tolerance_met": bool(load.max() <= cap + search.slack),
        "objective": "interaction kept" if resolution == 0 else "modularity",
        "modularity": float(_modularity(w, best)),
        "within_fraction": float(w[same].sum() / w.sum()) if w.sum() > 0 else 0.0,
    }
    part = _normalized(names, best, hosts, "learned", report)
    if memory_budget is not None:
        part.validate(features, num_hosts, memory_budget=memory_budget, optimizer=optimizer)
    return part


def make_partition(
    method: str,
    features: FeatureSet | Sequence[str],
    num_towers: int | None = None,
    num_hosts: int = 1,
    *,
    interaction: np.ndarray | None = None,
    seed: int = 0,
    **kwargs,
) -> TowerPartition:
    """Dispatch to `learned_partition` (needs `interaction`), `random_partition`
    or `round_robin_partition`; `kwargs` go to `learned_partition`."""
    if method == "learned":
        if interaction is None:
            raise PartitionError("the learned partitioner needs an interaction matrix")
        return learned_partition(features, interaction, num_towers, num_hosts, **kwargs)
    if method == "random":
        return random_partition(features, num_towers, num_hosts, seed)
    if method == "round_robin":
        return round_robin_partition(features, num_towers, num_hosts)
    raise PartitionError(f"unknown partitioner {method!r}; available: {', '.join(METHODS)}")


# ---------------------------------------------------------------------------------- measures


def interaction_matrix(pooled: np.ndarray) -> np.ndarray:
    """The "dot" measure: how much each pair's dot product varies over examples.

    Args:
      pooled: f[N, F, D] pooled embeddings of N examples (e.g.
        `pooled_embeddings`), N >= 2.
    Returns:
      f32[F, F]: `std_n <e_ni, e_nj> / (r_i r_j)`, `r_i = sqrt(mean_n |e_ni|^2)`
      (0 for a feature whose embeddings are all zero); zero diagonal.
    """
    e = np.asarray(pooled, np.float64)
    if e.ndim != 3 or e.shape[0] < 2:
        raise ValueError(f"pooled must be [N >= 2, F, D], got shape {e.shape}")
    if not np.all(np.isfinite(e)):
        raise ValueError("pooled embeddings hold NaN or infinite values")
    f = e.shape[1]
    mean = np.zeros((f, f))
    sq = np.zeros((f, f))
    n = e.shape[0]
    for lo in range(0, n, 4096):  # chunks bound the [n, F, F] temporary
        dots = np.einsum("nid,njd->nij", e[lo:lo + 4096], e[lo:lo + 4096])
        mean += dots.sum(0)
        sq += np.square(dots).sum(0)
    mean /= n
    std = np.sqrt(np.maximum(sq / n - np.square(mean), 0.0))
    r = np.sqrt(np.mean(np.sum(np.square(e), -1), 0))
    denom = np.outer(r, r)
    w = np.divide(std, denom, out=np.zeros_like(std), where=denom > 0)
    np.fill_diagonal(w, 0.0)
    return w.astype(np.float32)


def _host(x) -> np.ndarray:
    """A global array as host numpy (gathered over processes if needed)."""
    import jax

    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _eval_inputs(trainer, state, num_batches: int | None, max_examples: int | None) -> dict:
    """Held-out inputs of the model with their looked-up embeddings, on the host.

    Returns {'dense' [N, nd], 'lengths' [N, F], 'pooled' [N, Fp, D],
    'pooled_names', 'seq' [N, Fs, S, D] or None, 'seq_lengths' [N, Fs] or None}.
    """
    import jax

    n_batches = trainer.config.eval_batches if num_batches is None else int(num_batches)
    if n_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {n_batches}")
    seq_names = tuple(trainer.seq_names)
    forward = jax.jit(trainer.emb.forward)
    pooled_names = ()
    out = {"dense": [], "lengths": [], "pooled": [], "seq": []}
    count = 0
    for i in range(n_batches):
        hb = trainer._host_eval_batch(i)
        b = trainer.device_batch(hb)
        embs = forward(state.tables, b.ids, b.lengths)[0]
        pooled_names = embs.pooled_names
        pooled = _host(embs.pooled)
        out["pooled"].append(pooled.reshape(pooled.shape[0], len(pooled_names), -1))
        if seq_names:
            seqs = [_host(embs.sequence[n]) for n in seq_names]
            s_max = max(x.shape[1] for x in seqs)
            out["seq"].append(np.stack(
                [np.pad(x, ((0, 0), (0, s_max - x.shape[1]), (0, 0))) for x in seqs], axis=1))
        out["dense"].append(np.asarray(hb.dense, np.float32))
        out["lengths"].append(np.asarray(hb.lengths, np.int32))
        count += hb.dense.shape[0]
        if max_examples is not None and count >= max_examples:
            break
    cut = slice(0, max_examples)
    res = {k: np.concatenate(v)[cut] for k, v in out.items() if k != "seq"}
    res["pooled_names"] = pooled_names
    if seq_names:
        res["seq"] = np.concatenate(out["seq"])[cut]
        res["seq_lengths"] = res["lengths"][:, np.asarray(trainer.seq_index)]
    else:
        res["seq"] = res["seq_lengths"] = None
    return res


def _feature_vectors(trainer, inputs: dict) -> np.ndarray:
    """f32[N, F, D] in feature order: pooled embeddings, and sequence
    features' masked means."""
    names = trainer.features.names
    n = inputs["pooled"].shape[0]
    d = inputs["pooled"].shape[-1]
    out = np.zeros((n, len(names), d), np.float32)
    for k, name in enumerate(inputs["pooled_names"]):
        out[:, names.index(name)] = inputs["pooled"][:, k]
    if inputs["seq"] is not None:
        seq, sl = inputs["seq"], inputs["seq_lengths"]
        mask = np.arange(seq.shape[2])[None, None, :] < sl[:, :, None]
        mean = (seq * mask[..., None]).sum(2) / np.maximum(sl, 1)[..., None]
        for k, name in enumerate(trainer.seq_names):
            out[:, names.index(name)] = mean[:, k]
    return out


def pooled_embeddings(trainer, state, num_batches: int | None = None,
                      max_examples: int | None = None) -> np.ndarray:
    """f32[N, F, D]: a trained flat model's embeddings of held-out examples.

    Args:
      trainer: a `jdmt.train.Trainer` (the flat model's).
      state: its `TrainState` (trained, or restored from a checkpoint).
      num_batches: eval batches to use (default `config.eval_batches`).
      max_examples: stop after this many examples.

    Features are in `trainer.features` order; pooled features give their
    pooled embedding, sequence features the mean over their valid positions.
    """
    return _feature_vectors(trainer, _eval_inputs(trainer, state, num_batches, max_examples))


def mean_lengths_from_trainer(trainer, num_batches: int | None = None) -> dict[str, float]:
    """Mean ids per example (valid positions of sequences) by feature, from the
    trainer's eval batches (for `feature_costs`)."""
    n = trainer.config.eval_batches if num_batches is None else int(num_batches)
    lengths = np.concatenate([trainer._host_eval_batch(i).lengths for i in range(n)])
    return {name: float(v) for name, v in zip(trainer.features.names, lengths.mean(0), strict=True)}


def hessian_interaction(
    trainer,
    state,
    *,
    num_batches: int | None = None,
    max_examples: int = 1024,
    probes: int | None = None,
    chunk: int = 64,
    seed: int = 0,
) -> np.ndarray:
    """The "hessian" measure (module docstring): f32[F, F] in feature order.

    Args:
      trainer, state: the trained flat model (`jdmt.train.Trainer`, `TrainState`).
      num_batches: eval batches to draw examples from (default all of the config's).
      max_examples: examples to average over.
      probes: random sign probes per feature and example; None: exact block
        norms when D <= 32, else 16 probes.
      chunk: examples per jitted call.
      seed: the probes' seed (the result is deterministic for a seed).
    """
    import jax
    import jax.numpy as jnp

    inputs = _eval_inputs(trainer, state, num_batches, max_examples)
    names = trainer.features.names
    f = len(names)
    n, _, d = inputs["pooled"].shape
    pidx = np.array([names.index(x) for x in inputs["pooled_names"]], np.int32)
    sidx = np.array([names.index(x) for x in trainer.seq_names], np.int32)
    has_seq = inputs["seq"] is not None
    params = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), state.params)
    model = trainer.model

    def logit(u, params, dense, pooled, seq, seq_len):
        """Logit of one example with feature k's input shifted by u[k]."""
        args = [dense[None], (pooled + u[pidx])[None]]
        if has_seq:
            mask = (jnp.arange(seq.shape[1])[None, :] < seq_len[:, None])[..., None]
            args += [(seq + u[sidx][:, None, :] * mask)[None], seq_len[None]]
        return model.apply({"params": params}, *args)[0]

    exact = probes is None and d <= 32
    k = d if exact else int(probes or 16)
    if k < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")

    def block_sq(params, dense, pooled, seq, seq_len, vecs):
        """f[F, F]: sum over probes of ||H_ij v||^2 (i: output block, j: probed)."""
        u0 = jnp.zeros((f, d), jnp.float32)
        grad = jax.grad(logit)

        def hvp(j, v):
            tangent = jnp.zeros((f, d), jnp.float32).at[j].set(v)
            return jax.jvp(lambda u: grad(u, params, dense, pooled, seq, seq_len), (u0,), (tangent,))[1]

        def per_feature(j, vs):  # vs [k, D]
            hv = jax.vmap(lambda v: hvp(j, v))(vs)  # [k, F, D]
            return jnp.sum(jnp.square(hv), axis=(0, 2))  # [F]

        cols = jax.vmap(per_feature)(jnp.arange(f), vecs)  # [F(j), F(i)]
        return cols.T

    batched = jax.jit(jax.vmap(block_sq, in_axes=(None, 0, 0, 0, 0, 0)))
    rng = np.random.default_rng(seed)
    total = np.zeros((f, f))
    seq_all = inputs["seq"] if has_seq else np.zeros((n, 1, 1, d), np.float32)
    sl_all = inputs["seq_lengths"] if has_seq else np.zeros((n, 1), np.int32)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        m = hi - lo
        if exact:
            vecs = np.broadcast_to(np.eye(d, dtype=np.float32), (m, f, d, d))
        else:
            vecs = rng.choice(np.array([-1.0, 1.0], np.float32), size=(m, f, k, d))
        # pad to a whole chunk so one compiled shape serves every call
        pad = chunk - m

        def padded(x):
            return np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x

        out = batched(
            params, padded(inputs["dense"][lo:hi]), padded(inputs["pooled"][lo:hi]),
            padded(seq_all[lo:hi]), padded(sl_all[lo:hi]), padded(np.ascontiguousarray(vecs)),
        )
        total += np.asarray(out, np.float64)[:m].sum(0)
    hsq = total / n / (1 if exact else k)
    vec = _feature_vectors(trainer, inputs)
    spread = np.sqrt(np.mean(np.sum(np.square(vec - vec.mean(0)), -1), 0))
    w = np.sqrt(hsq) * np.outer(spread, spread)
    w = (w + w.T) / 2
    np.fill_diagonal(w, 0.0)
    return w.astype(np.float32)


def interaction_from_trainer(trainer, state, measure: str = "hessian", **kwargs) -> np.ndarray:
    """f32[F, F] interaction of a trained flat model by `measure` ('hessian' or 'dot')."""
    if measure == "hessian":
        return hessian_interaction(trainer, state, **kwargs)
    if measure == "dot":
        return interaction_matrix(pooled_embeddings(trainer, state, **kwargs))
    raise PartitionError(f"unknown interaction measure {measure!r}; available: {', '.join(MEASURES)}")


def partition_from_trainer(
    trainer,
    state,
    num_towers: int | None = None,
    num_hosts: int | None = None,
    *,
    method: str = "learned",
    measure: str = "hessian",
    seed: int = 0,
    balance_tolerance: float = 0.1,
    cost: str = "work",
    memory_budget: float | None = None,
    measure_kwargs: Mapping[str, Any] | None = None,
) -> TowerPartition:
    """A partition of a trained flat model's features for `num_hosts` hosts
    (default: the trainer's mesh), by `method`. Costs use the mean lengths of
    the trainer's eval batches; the report records the measure (learned)."""
    h = trainer.hosts if num_hosts is None else int(num_hosts)
    fs = trainer.features
    opt = trainer.emb.optimizer
    if method != "learned":
        part = make_partition(method, fs, num_towers, h, seed=seed)
        if memory_budget is not None:
            part.validate(fs, h, memory_budget=memory_budget, optimizer=opt)
        return part
    w = interaction_from_trainer(trainer, state, measure, **dict(measure_kwargs or {}))
    part = learned_partition(
        fs, w, num_towers, h, cost=cost, balance_tolerance=balance_tolerance,
        mean_lengths=mean_lengths_from_trainer(trainer), memory_budget=memory_budget, optimizer=opt,
    )
    report = {**part.report, "measure": measure, "interaction": w.round(6).tolist()}
    return dataclasses.replace(part, report=report)


# ---------------------------------------------------------------------------------- checkpoints


def features_from_json(obj: Mapping[str, Any]) -> FeatureSet:
    """The inverse of `jdmt.train.checkpoint.features_json`."""
    return FeatureSet(
        tuple(SparseFeature(**{**f, "kind": Kind(f["kind"])}) for f in obj["sparse"]),
        num_dense=int(obj["num_dense"]),
    )


def restore_trainer(
    checkpoint_dir: str | os.PathLike,
    mesh=None,
    *,
    step: int | None = None,
    data: str = "synthetic",
    data_seed: int = 0,
    eval_batches: int = 4,
    eval_batch_size: int = 1024,
    source=None,
):
    """Rebuild a flat model's `Trainer` from a checkpoint's layout and restore it.

    Args:
      checkpoint_dir: a `train.py --checkpoint-dir`.
      mesh: the mesh to restore onto (any; default: the checkpoint's own
        `HxL`, which needs that many devices).
      step: the checkpoint (default: the newest).
      data: the run's data source (`synthetic`, `mlperf`, `criteo:PATH`):
        the examples the interactions are measured on.
      data_seed: the synthetic data's seed (train.py's `--seed`): ids are
        drawn per seed, so another seed mostly hits untrained rows.
      eval_batches, eval_batch_size: the held-out examples to use.
      source: a data source object to use instead of `data` (e.g. the very
        `SyntheticData` the run trained on); its features must be the
        checkpoint's.

    Returns:
      (trainer, state, meta) with the checkpoint's meta.

    Raises:
      CheckpointError: no checkpoint in the directory, or one that does not restore.
    """
    from jdmt.mesh import make_mesh
    from jdmt.train import CheckpointError, Checkpointer, Trainer, TrainConfig

    if not os.path.isdir(os.fspath(checkpoint_dir)):
        raise CheckpointError(f"checkpoint directory {os.fspath(checkpoint_dir)} does not exist")
    ckpt = Checkpointer(checkpoint_dir, asynchronous=False)
    try:
        s = ckpt.latest_step() if step is None else int(step)
        if s is None:
            raise CheckpointError(f"no checkpoint in {ckpt.directory}")
        if s not in ckpt.all_steps():
            raise CheckpointError(f"no checkpoint {s} in {ckpt.directory} (have {ckpt.all_steps()})")
        layout = ckpt.meta(s)["layout"]
        model = layout["model"]
        fs = features_from_json(layout["features"])
        if mesh is None:
            mesh = make_mesh("x".join(str(v) for v in layout["mesh"]))
        cfg = TrainConfig(
            mesh="x".join(str(v) for v in mesh.devices.shape),
            model=model["name"],
            data=data,
            steps=1,
            global_batch=eval_batch_size,
            eval_batch_size=eval_batch_size,
            eval_batches=eval_batches,
            embedding_dim=int(model["embedding_dim"]),
            bottom_mlp=tuple(model["bottom_mlp"]),
            top_mlp=tuple(model["top_mlp"]),
            sequence_pooling=model.get("sequence_pooling", "mean"),
            embedding_optimizer=layout["embedding_optimizer"],
            optimizer=layout["dense_optimizer"],
            features=fs,
            seed=data_seed,
            data_seed=data_seed,
            progress=False,
            towers=0,
        )
        trainer = Trainer(cfg, mesh, source)
        state, meta = trainer.restore(ckpt, s)
    finally:
        ckpt.close()
    return trainer, state, meta


# ---------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jdmt.towers.partitioner",
        description="Group a flat model's features into DMT towers and write the partition JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint-dir", required=True,
                   help="a flat run's train.py --checkpoint-dir (features and model come from it)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--mesh", required=True, help="the DMT run's mesh HxL (H hosts own the towers)")
    p.add_argument("--towers", type=int, default=0, help="number of towers (0: one per host)")
    p.add_argument("--out", required=True, help="where to write the partition JSON")
    p.add_argument("--method", choices=METHODS, default="learned")
    p.add_argument("--measure", choices=MEASURES, default="hessian",
                   help="interaction measure of the learned partitioner")
    p.add_argument("--cost", choices=COSTS, default="work", help="what the hosts balance")
    p.add_argument("--balance-tolerance", type=float, default=0.1,
                   help="a host's cost may exceed the mean by this fraction")
    p.add_argument("--host-memory-gib", type=float, default=None,
                   help="memory budget of one host for tables and optimizer state (default: not checked)")
    p.add_argument("--data", default="synthetic",
                   help="the flat run's data source (synthetic, mlperf, criteo:PATH): examples to measure on")
    p.add_argument("--seed", type=int, default=0,
                   help="the flat run's --seed (the synthetic data's seed); also the random partitioner's")
    p.add_argument("--eval-batches", type=int, default=4, help="held-out batches to measure on")
    p.add_argument("--batch-size", type=int, default=1024, help="examples per held-out batch")
    p.add_argument("--max-examples", type=int, default=1024,
                   help="examples the hessian measure averages over")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (2: bad flags, 1: failure)."""
    p = _parser()
    args = p.parse_args(argv)
    from jdmt.mesh import MeshError, make_mesh, parse_mesh_spec, prepare_devices

    try:
        hosts, _ = parse_mesh_spec(args.mesh)
    except MeshError as e:
        p.error(f"--mesh: {e}")
    if args.towers < 0:
        p.error(f"--towers must be >= 0, got {args.towers}")
    if not args.balance_tolerance >= 0:
        p.error(f"--balance-tolerance must be >= 0, got {args.balance_tolerance}")
    towers = args.towers or hosts
    budget = None if args.host_memory_gib is None else args.host_memory_gib * 2**30
    try:
        prepare_devices(args.mesh)
        trainer, state, _ = restore_trainer(
            args.checkpoint_dir, make_mesh(args.mesh), step=args.step, data=args.data,
            data_seed=args.seed, eval_batches=args.eval_batches, eval_batch_size=args.batch_size,
        )
        part = partition_from_trainer(
            trainer, state, towers, hosts, method=args.method, measure=args.measure,
            seed=args.seed, balance_tolerance=args.balance_tolerance, cost=args.cost,
            memory_budget=budget,
            measure_kwargs={"max_examples": args.max_examples} if args.measure == "hessian" else None,
        )
        part.save(args.out)
    except (ValueError, OSError) as e:  # PartitionError, CheckpointError, MeshError are ValueErrors
        print(f"partitioner: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    costs = feature_costs(trainer.features, mean_lengths=mean_lengths_from_trainer(trainer),
                          optimizer=trainer.emb.optimizer)[args.cost]
    loads = part.host_loads(trainer.features.names, costs, hosts)
    print(f"{args.method} partition: {part.num_towers} towers on {hosts} hosts -> {args.out}")
    for t, (members, h) in enumerate(zip(part.towers, part.hosts, strict=True)):
        print(f"  tower {t} (host {h}): {', '.join(members)}")
    print(f"  host {args.cost} cost: {', '.join(f'{x:,.1f}' for x in loads)} "
          f"(max/mean {loads.max() / max(loads.mean(), 1e-300):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
