"""FlexShard tier sizes: how many hot and warm rows each flexshard table gets.

`plan_tiers` turns row statistics (`jdmt.planner.row_stats`) into the hot
and warm rows of every `flexshard` placement of a plan, under a per-device
memory budget, minimising the modeled communication time of a step
(`Topology`: bytes across hosts and inside them at their bandwidths).

The model, per table of width D and per step, for a row r that takes a
share p of the table's lookups (lam of them per global batch, a device
seeing lam / N and a host lam / H):

- *cold* (row-wise): a device or host asks for r when it looks it up at
  least once: q_dev = 1 - exp(-p lam / N), q_host = 1 - exp(-p lam / H).
  Each request moves the id, the row and its gradient (8 D + 4 bytes). With
  requests de-duplicated per host (`row_dedup="host"`) the H - 1 hosts
  other than the owner's ask across hosts and every device asks inside its
  host first; per device (`"device"`) the N - L devices off the owner's
  host ask across hosts.
- *hot* (on every device): no lookup traffic; the replicas' gradient and
  touch count (4 (D + 1) bytes) go through a hierarchical all-reduce every
  step: 2 (L - 1) / L of it per device inside hosts, 2 (H - 1) / H / L across.
- *warm* (once per host, over its devices): lookups inside the host as cold
  rows' first hop; the all-reduce over hosts moves 2 (H - 1) / H of each
  row per replica.

A row that every host looks up in every step costs about the same across
hosts cold (two hops) as replicated: both move its value to each host and
a gradient back. Replication pays against per-device requests (up to L
times fewer bytes) and for rows so hot that their requests cost more than
an all-reduce; the model says which, table by table.

Memory per device: a hot row its bytes, a warm row 1 / L of them, a cold
row 1 / N. The budget is `budget` times row-wise's footprint of all the
model's tables; the room above row-wise is split over the flexshard tables
in proportion to their row-wise footprint.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from jdmt.data.specs import FeatureSet
from jdmt.embeddings.types import OptimizerKind, Placement, ShardingType, SparseOptimizer
from jdmt.mesh import Topology
from jdmt.planner.row_stats import HeavyHitters

__all__ = ["TierChoice", "plan_tiers", "row_bytes"]


def row_bytes(dim: int, optimizer: SparseOptimizer) -> float:
    """Bytes of one row and its optimizer state."""
    acc = {OptimizerKind.ROWWISE_ADAGRAD: 1, OptimizerKind.ADAGRAD: dim, OptimizerKind.SGD: 0}[optimizer.kind]
    return 4.0 * (dim + acc)


@dataclasses.dataclass
class TierChoice:
    """One table's tiers and what the model says of them (per step, per device)."""

    table: str
    rows: int
    hot: int
    warm: int
    coverage_hot: float  # share of the sampled lookups the hot rows take
    coverage_warm: float
    memory_bytes: float  # per device, this table
    row_wise_memory_bytes: float
    cross_host_bytes: float  # modeled, per device, the rows in the summary
    row_wise_cross_host_bytes: float
    intra_host_bytes: float
    row_wise_intra_host_bytes: float

    def to_json(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}


def _costs(p, lam, dim, hosts, local, dedup):
    """Per-row (cross, intra) bytes per step summed over devices, for each tier."""
    n = hosts * local
    q_dev = -np.expm1(-p * lam / n)
    q_host = -np.expm1(-p * lam / hosts)
    req = 8.0 * dim + 4.0
    if dedup == "host" and hosts > 1 and local > 1:
        cold_x = (hosts - 1) * q_host * req
        cold_i = n * q_dev * (local - 1) / local * req
    else:
        cold_x = q_dev * (n - local) * req
        cold_i = q_dev * (local - 1) * req
    sync = 4.0 * (dim + 1)
    hot_x = np.full_like(p, 2.0 * (hosts - 1) * sync)  # n * 2 (H-1)/H / L per device
    hot_i = np.full_like(p, n * 2.0 * (local - 1) / local * sync)
    warm_x = np.full_like(p, 2.0 * (hosts - 1) * sync)  # H replicas, 2 (H-1)/H each
    warm_i = n * q_dev * (local - 1) / local * req
    return (cold_x, cold_i), (hot_x, hot_i), (warm_x, warm_i)


def _grid(hi: int) -> np.ndarray:
    """0 and about 40 geometric sizes up to hi."""
    if hi <= 0:
        return np.zeros(1, np.int64)
    g = np.unique(np.round(np.geomspace(1, hi, 40)).astype(np.int64))
    return np.concatenate([[0], g])


def plan_tiers(
    features: FeatureSet,
    plan: Mapping[str, Placement],
    stats: Mapping[str, HeavyHitters],
    topology: Topology,
    *,
    global_batch_lookups: Mapping[str, float],
    optimizer: SparseOptimizer = SparseOptimizer(),
    budget: float = 1.25,
    row_dedup: str = "host",
) -> tuple[dict[str, Placement], list[TierChoice]]:
    """Hot and warm rows for every flexshard placement of `plan`.

    Args:
      stats: each flexshard table's row summary (`row_statistics`).
      global_batch_lookups: each table's lookups per global batch (lam).
      budget: per-device memory budget as a multiple of row-wise's
        footprint of all the model's tables (>= 1).

    Returns (the plan with the tiers filled in, one `TierChoice` per
    flexshard table).
    """
    if budget < 1.0:
        raise ValueError(f"the memory budget must be at least row-wise's footprint (1.0), got {budget}")
    h, ln = topology.hosts, topology.local
    n = h * ln
    feats = {f.name: f for f in features.sparse}
    rw_total = sum(f.rows * row_bytes(f.dim, optimizer) / n for f in features.sparse)
    flex = [name for name, p in plan.items() if p.type is ShardingType.FLEXSHARD]
    flex_rw = {t: feats[t].rows * row_bytes(feats[t].dim, optimizer) / n for t in flex}
    room = (budget - 1.0) * rw_total
    out = dict(plan)
    report = []
    for t in flex:
        f = feats[t]
        rb = row_bytes(f.dim, optimizer)
        share = room * flex_rw[t] / max(sum(flex_rw.values()), 1e-30)
        s = stats[t]
        keys, counts = s.top(min(s.keys.size, f.rows))
        p = counts / max(s.total, 1)
        lam = float(global_batch_lookups[t])
        (cx, ci), (hx, hi), (wx, wi) = _costs(p, lam, f.dim, h, ln, row_dedup)
        bw_x, bw_i = topology.cross_host_bw, topology.intra_host_bw

        def time_of(x, i):
            return x / n / bw_x + i / n / bw_i

        cold_t = np.concatenate([[0.0], np.cumsum(time_of(cx, ci))])  # prefix sums over rows by rank
        hot_t = np.concatenate([[0.0], np.cumsum(time_of(hx, hi))])
        warm_t = np.concatenate([[0.0], np.cumsum(time_of(wx, wi))])
        k = keys.size
        hot_cost = rb * (1.0 - 1.0 / n)  # extra bytes per device over the row's cold share
        warm_cost = rb * (1.0 / ln - 1.0 / n)
        best = (cold_t[k], 0, 0)
        for nh in _grid(min(k, int(share // max(hot_cost, 1e-30)))):
            left = share - nh * hot_cost
            wmax = k - nh if warm_cost <= 0 else min(k - nh, int(left // warm_cost))
            for nw in _grid(max(0, wmax)):
                tt = hot_t[nh] + (warm_t[nh + nw] - warm_t[nh]) + (cold_t[k] - cold_t[nh + nw])
                if tt < best[0] - 1e-15:
                    best = (tt, int(nh), int(nw))
        _, nh, nw = best
        hot_rows = np.sort(keys[:nh])
        warm_rows = np.sort(keys[nh : nh + nw])
        out[t] = Placement(ShardingType.FLEXSHARD, plan[t].devices, tuple(hot_rows), tuple(warm_rows))
        tot = max(s.total, 1)
        x = float(hx[:nh].sum() + wx[nh : nh + nw].sum() + cx[nh + nw :].sum()) / n
        i = float(hi[:nh].sum() + wi[nh : nh + nw].sum() + ci[nh + nw :].sum()) / n
        report.append(TierChoice(
            table=t, rows=f.rows, hot=nh, warm=nw,
            coverage_hot=float(counts[:nh].sum()) / tot, coverage_warm=float(counts[nh : nh + nw].sum()) / tot,
            memory_bytes=rb * (nh + -(-nw // ln) + -(-(f.rows - nh - nw) // n)),
            row_wise_memory_bytes=rb * -(-f.rows // n),
            cross_host_bytes=x, row_wise_cross_host_bytes=float(cx.sum()) / n,
            intra_host_bytes=i, row_wise_intra_host_bytes=float(ci.sum()) / n,
        ))
    return out, report
