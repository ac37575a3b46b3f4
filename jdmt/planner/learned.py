"""Placement with the neural cost model: greedy, then local search (NeuroShard-style).

A device's time is the neural model's seconds for the pieces it holds
(`neural.NeuralCostModel`: encodings summed per device, then the head) plus
the analytic communication time of the bytes it receives
(`cost.AnalyticCostModel`'s routes, bandwidths of the `Topology`, latency
left out). Both are kept per device as the plan grows, so a candidate's
effect on every device is a few vector operations:

1. Tables by decreasing cost alone; each takes the candidate - table-wise on
   any device, column-wise into 2, 4 or 8 shards on the least busy devices,
   row-wise, table-row-wise on any host, data-parallel (tables of at most
   an eighth of the budget) - that gives the lowest (bottleneck, sum of
   squares) and fits the memory budget (the SPMD allocation: per width, the
   largest device's rows on every device). If a table then fits nowhere,
   the greedy reruns with the largest tables first.
2. Local search, from the greedy plan and from each start the caller gives
   (e.g. the greedy baselines): a table of the bottleneck device moves to
   the device, or to the sharding, that lowers the bottleneck most, while it
   does. The best predicted plan wins, so it is never predicted worse than
   a start.

FlexShard tiers are not candidates here (`--row-tiers` adds them to a
plan's row-wise sequence tables).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Mapping, Sequence

import numpy as np

from jdmt.embeddings.optimizers import accumulator_shape
from jdmt.embeddings.types import Placement, ShardingType, SparseOptimizer
from jdmt.mesh import Topology
from jdmt.planner.cost import AnalyticCostModel, Problem, _Costing
from jdmt.planner.measure import Piece, device_pieces
from jdmt.planner.neural import NeuralCostModel, piece_features
from jdmt.planner.search import PlanningError
from jdmt.planner.tablesets import TableSpec, features_of, pooling_of

COLUMN_SHARDS = (2, 4, 8)


@dataclasses.dataclass
class _Cand:
    enc: np.ndarray  # H: the piece's encoding
    comm: np.ndarray  # f64[N] comm seconds added to each device, owner at device 0 (table-wise)
    width: int
    rows: int  # rows the piece adds on each device holding it


class LearnedPlanner:
    """Plans tables on a `hosts x local` mesh with a fitted cost model."""

    def __init__(self, model: NeuralCostModel, hosts: int, local: int, global_batch: int, *,
                 optimizer: SparseOptimizer = SparseOptimizer(), topology: Topology | None = None,
                 memory_budget: float, analytic: AnalyticCostModel | None = None):
        self.model = model
        self.hosts, self.local, self.n = hosts, local, hosts * local
        self.global_batch = global_batch
        self.optimizer = optimizer
        self.topology = topology or Topology(hosts, local)
        self.budget = float(memory_budget)
        self.analytic = analytic or AnalyticCostModel()
        self.row_dedup = self.analytic.row_dedup
        host = np.arange(self.n) // local
        loc = np.arange(self.n) % local
        # perm[d, x]: the device whose role for owner 0 is x's role for owner d
        self.perm = ((host[None, :] - host[:, None]) % hosts) * local + (loc[None, :] - loc[:, None]) % local
        self._comm_cache: dict = {}
        self.row_bytes = _RowBytes(optimizer)

    # ---- per-table candidates --------------------------------------------------------------

    def _comm(self, t: TableSpec, placement: Placement, dim: int) -> np.ndarray:
        """f64[N] comm seconds (no latency) each device gets from one table alone."""
        key = (placement.type, placement.devices, dim, t.max_len > 1, round(t.pooling, 3), t.rows >= self.n)
        if key not in self._comm_cache:
            spec = dataclasses.replace(t, name="x", dim=dim)
            pr = Problem(features_of([spec]), self.hosts, self.local, self.global_batch,
                         optimizer=self.optimizer, topology=self.topology, memory_budget=1e30,
                         pooling=pooling_of([spec]))
            c = _Costing(self.analytic, pr).run({"x": placement})
            tp = self.topology
            self._comm_cache[key] = (c.cross_host_bytes.sum(0) / tp.cross_host_bw
                                     + c.intra_host_bytes.sum(0) / tp.intra_host_bw)
        return self._comm_cache[key]

    def candidates(self, t: TableSpec) -> list[tuple[str, int, _Cand]]:
        """(kind, shards, candidate) of a table, each with its piece's encoding,
        its comm seconds per device (table-wise and column shards: owner at
        device 0; table-row-wise: on host 0) and rows per device holding it."""
        out = []
        tw = Placement(ShardingType.TABLE_WISE, (0,))
        piece = device_pieces([t], {t.name: tw}, self.hosts, self.local, self.global_batch,
                              row_dedup=self.row_dedup)[0]
        out.append(("table_wise", 1, self._cand(piece, self._comm(t, tw, t.dim), t.dim, t.rows)))
        for k in COLUMN_SHARDS:
            if k <= self.n and t.dim % k == 0 and t.dim // k >= 4:
                w = t.dim // k
                pc = [Piece(p.rows, w, p.bags, p.pooling, p.alpha, p.seed) for p in piece]
                out.append(("column_wise", k, self._cand(pc, self._comm(t, tw, w), w, t.rows)))
        everyone = tuple(range(self.n))
        rw = Placement(ShardingType.ROW_WISE, everyone)
        pieces = device_pieces([t], {t.name: rw}, self.hosts, self.local, self.global_batch,
                               row_dedup=self.row_dedup)
        out.append(("row_wise", self.n, self._cand(pieces[0], self._comm(t, rw, t.dim), t.dim,
                                                   -(-t.rows // min(t.rows, self.n)))))
        if self.local > 1 and self.hosts > 1:  # one host's devices; with one host it is row-wise
            trw = Placement(ShardingType.TABLE_ROW_WISE, tuple(range(self.local)))
            pieces = device_pieces([t], {t.name: trw}, self.hosts, self.local, self.global_batch)
            out.append(("table_row_wise", self.local, self._cand(
                pieces[0], self._comm(t, trw, t.dim), t.dim, -(-t.rows // min(t.rows, self.local)))))
        if t.rows * self.row_bytes[t.dim] <= self.budget / 8:  # replicas of small tables only
            dp = Placement(ShardingType.DATA_PARALLEL, everyone)
            pieces = device_pieces([t], {t.name: dp}, self.hosts, self.local, self.global_batch)
            out.append(("data_parallel", self.n, self._cand(pieces[0], self._comm(t, dp, t.dim), t.dim,
                                                            t.rows)))
        return out

    def _cand(self, pieces: list[Piece], comm, width, rows) -> _Cand:
        if pieces:
            enc = self.model.encode(piece_features(pieces[0]))
        else:
            enc = np.zeros(self.model.encoding_size, np.float32)
        return _Cand(enc, np.asarray(comm, np.float64), width, rows)

    # ---- the search ------------------------------------------------------------------------

    def plan(self, tables: Sequence[TableSpec], *, time_limit: float = 4.0,
             starts: Mapping[str, Mapping[str, Placement]] | None = None) -> tuple[dict[str, Placement], dict]:
        """(placements, info).

        The greedy (tables in decreasing cost alone; if one then fits nowhere,
        largest table first) and each plan of `starts` (e.g. the greedy
        baselines) that fits the budget are improved by the local search
        (sharing `time_limit` seconds); the plan with the lowest predicted
        (bottleneck, sum of squares) wins, so under this cost model it is
        never worse than a start."""
        t0 = time.perf_counter()
        cands = {t.name: self.candidates(t) for t in tables}
        t_cands = time.perf_counter() - t0
        self.alone = {t.name: min(float(self.model.head(c.enc) + c.comm.max()) for _, _, c in cands[t.name])
                      for t in tables}
        options: dict[str, dict] = {}
        try:
            options["greedy"] = self._greedy(tables, cands, by_size=False)
        except PlanningError as e:
            try:
                options["greedy"] = self._greedy(tables, cands, by_size=True)
            except PlanningError:
                if not starts:
                    raise e from None
        t_greedy = time.perf_counter() - t0 - t_cands
        for name, plan in (starts or {}).items():
            chosen = self._choices(plan, cands)
            if chosen is not None:
                options[name] = chosen
        if not options:
            raise PlanningError(f"no plan of {len(tables)} tables fits {self.budget:,.0f} bytes per device")
        best, report = None, {}
        left = max(0.0, time_limit - (time.perf_counter() - t0))
        for i, (name, chosen) in enumerate(options.items()):
            self._load(chosen, cands)
            if self.peak_memory() > self.budget:
                report[name] = "over the memory budget"
                continue
            before = float(self.device_s().max())
            deadline = time.perf_counter() + left / len(options)
            chosen, moves = self._improve(chosen, cands, deadline)
            dev = self.device_s()
            key = (float(dev.max()), float(np.sum(dev**2)))
            report[name] = {"predicted_s": before, "improved_s": key[0], "moves": moves}
            if best is None or key < best[0]:
                best = (key, name, dict(chosen))
        if best is None:
            raise PlanningError(f"no plan of {len(tables)} tables fits {self.budget:,.0f} bytes per device")
        _, start, chosen = best
        self._load(chosen, cands)
        placements = {}
        for t in tables:
            kind, devs = chosen[t.name]
            placements[t.name] = Placement(ShardingType(kind), tuple(sorted(devs)))
        dev = self.device_s()
        info = {"plan_s": time.perf_counter() - t0, "candidates_s": t_cands, "greedy_s": t_greedy,
                "start": start, "starts": report, "predicted_step_s": float(dev.max()),
                "predicted_device_s": dev.tolist(), "peak_memory_bytes": self.peak_memory()}
        return placements, info

    def _reset(self) -> None:
        self.enc = np.zeros((self.n, self.model.encoding_size))  # f64: moves add and subtract
        self.comm = np.zeros(self.n)
        self.rows: dict[int, np.ndarray] = {}

    def _load(self, chosen, cands) -> None:
        self._reset()
        for name, choice in chosen.items():
            self._apply(cands[name], choice, +1)

    def _choices(self, plan: Mapping[str, Placement], cands) -> dict | None:
        """A plan as (kind, devices) choices, or None if it uses a sharding
        this planner has no candidate for (e.g. a column split it does not try)."""
        out = {}
        for name, cs in cands.items():
            p = plan.get(name)
            if p is None:
                return None
            kind = p.type.value
            ok = any(k == kind and (kind != "column_wise" or kk == len(p.devices)) for k, kk, _ in cs)
            if not ok:
                return None
            out[name] = (kind, tuple(p.devices))
        return out

    def _greedy(self, tables, cands, by_size: bool) -> dict:
        self._reset()
        if by_size:
            order = sorted(tables, key=lambda t: (-t.rows * self.row_bytes[t.dim], t.name))
        else:
            order = sorted(tables, key=lambda t: (-self.alone[t.name], t.name))
        chosen: dict[str, tuple[str, tuple[int, ...]]] = {}
        for t in order:
            best = self._best(cands[t.name])
            if best is None:
                raise PlanningError(f"table {t.name!r} ({t.rows} rows x {t.dim}) fits nowhere in "
                                    f"{self.budget:,.0f} bytes per device", t.name)
            self._apply(cands[t.name], best, +1)
            chosen[t.name] = best
        return {t.name: chosen[t.name] for t in tables}

    def _improve(self, chosen: dict, cands, deadline: float) -> tuple[dict, int]:
        """Moves a table of the bottleneck device to its best choice while the
        (bottleneck, sum of squares) falls."""
        chosen = dict(chosen)
        moves = 0
        while time.perf_counter() < deadline:
            dev = self.device_s()
            worst = int(dev.argmax())
            base = (float(dev.max()), float(np.sum(dev**2)))
            improved = False
            on_worst = [name for name, (k, devs) in chosen.items() if worst in devs]
            on_worst.sort(key=lambda name: -self.alone[name])
            for name in on_worst:
                if time.perf_counter() >= deadline:
                    break
                old = chosen[name]
                self._apply(cands[name], old, -1)
                best = self._best(cands[name])
                if best is not None and best != old:
                    self._apply(cands[name], best, +1)
                    d2 = self.device_s()
                    key = (float(d2.max()), float(np.sum(d2**2)))
                    if key[0] < base[0] * (1 - 1e-9) or (key[0] <= base[0] * (1 + 1e-12)
                                                          and key[1] < base[1] * (1 - 1e-9)):
                        chosen[name] = best
                        moves += 1
                        improved = True
                        break
                    self._apply(cands[name], best, -1)
                self._apply(cands[name], old, +1)
            if not improved:
                break
        return chosen, moves

    def device_s(self) -> np.ndarray:
        return self.model.head(self.enc) + self.comm

    def peak_memory(self) -> float:
        """Bytes every device allocates (per width, the largest device's rows)."""
        return sum(float(r.max()) * self.row_bytes[w] for w, r in self.rows.items())

    def _options(self, kind: str, k: int, now: np.ndarray) -> list[tuple[int, ...]]:
        """Device sets a non-table-wise candidate may take (`now`: the devices' times)."""
        if kind in ("row_wise", "data_parallel"):
            return [tuple(range(self.n))]
        if kind == "table_row_wise":
            return [tuple(range(h * self.local, (h + 1) * self.local)) for h in range(self.hosts)]
        # column shards: the least busy devices
        return [tuple(sorted(int(d) for d in np.argsort(now, kind="stable")[:k]))]

    def _effect(self, c: _Cand, kind: str, devs: tuple[int, ...]):
        """f64[N]: the comm seconds a placement adds to each device."""
        if kind in ("row_wise", "data_parallel"):
            return c.comm
        if kind == "table_row_wise":  # the vector of host 0, moved to the table's host
            return c.comm[self.perm[devs[0]]]
        comm = np.zeros(self.n)
        for d in devs:
            comm += c.comm[self.perm[d]]
        return comm

    def _best(self, cands):
        """The best (kind, devices) for a table given the current state, or None.
        Every candidate's changed devices go through the model in one call."""
        n = self.n
        base = self.model.head(self.enc)
        now = base + self.comm
        peak_now = self.peak_memory()
        idx = np.arange(n)
        trials, blocks, at0 = [], [], 0
        for kind, k, c in cands:
            for devs in ((None,) if kind == "table_wise" else self._options(kind, k, now)):
                at = idx if devs is None else list(devs)
                trials.append((kind, c, devs, at, at0))
                blocks.append(self.enc[at] + c.enc)
                at0 += len(at)
        heads = self.model.head(np.concatenate(blocks))
        best_key, best = None, None
        for kind, c, devs, at, start in trials:
            rb = self.row_bytes[c.width]
            r = self.rows.get(c.width)
            r = np.zeros(n) if r is None else r
            rmax = float(r.max())
            h = heads[start:start + len(at)]
            if devs is None:  # table-wise, every owner at once: row d is the times with it on d
                dev = now[None, :] + c.comm[self.perm]
                dev[idx, idx] = h + self.comm + c.comm[0]
                ok = peak_now - rmax * rb + np.maximum(rmax, r + c.rows) * rb <= self.budget
                if not ok.any():
                    continue
                mx = np.where(ok, dev.max(1), np.inf)
                sq = (dev**2).sum(1)
                d = int(np.lexsort((sq, mx))[0])
                key, cand = (mx[d], sq[d]), (kind, (d,))
            else:
                if peak_now - rmax * rb + max(rmax, float((r[at] + c.rows).max())) * rb > self.budget:
                    continue
                dev = now + self._effect(c, kind, devs)
                dev[at] += h - base[at]
                key, cand = (dev.max(), float((dev**2).sum())), (kind, devs)
            if best_key is None or key < best_key:
                best_key, best = key, cand
        return best

    def _apply(self, cands, choice, sign: int) -> None:
        kind, devs = choice
        c = next(c for k, kk, c in cands if k == kind and (kind != "column_wise" or kk == len(devs)))
        self.enc[list(devs)] += sign * c.enc
        self.comm += sign * self._effect(c, kind, devs)
        r = self.rows.setdefault(c.width, np.zeros(self.n))
        r[list(devs)] += sign * c.rows


class _RowBytes(dict):
    """width -> bytes of a row and its optimizer state."""

    def __init__(self, optimizer):
        super().__init__()
        self.optimizer = optimizer

    def __missing__(self, w):
        acc = accumulator_shape(self.optimizer, 1, w)
        self[w] = 4 * w + (0 if acc is None else 4 * int(np.prod(acc)))
        return self[w]


def tables_of(features, pooling: Mapping[str, float] | None = None, alpha: float = 1.05) -> list[TableSpec]:
    """A `FeatureSet`'s tables as the learned planner sees them: pooled
    features with their mean ids per bag (`pooling`, default `max_len`) and
    the ids' Zipf exponent.

    Raises:
      ValueError: a sequence or weighted feature (their routes are not
        modelled here yet).
    """
    seq = [f.name for f in features.sparse if not f.pooled]
    if seq:
        raise ValueError(f"the learned planner does not model sequence features yet ({', '.join(seq)}); "
                         "plan them with the analytic planner")
    weighted = [f.name for f in features.sparse if f.weighted]
    if weighted:
        raise ValueError(f"the learned planner does not model weighted features yet ({', '.join(weighted)}); "
                         "plan them with the analytic planner")
    pooling = pooling or {}
    return [TableSpec(f.name, f.rows, f.dim, float(pooling.get(f.name, f.max_len)), alpha)
            for f in features.sparse]


def learned_plan(tables: Sequence[TableSpec], hosts: int, local: int, global_batch: int,
                 model: NeuralCostModel, *, memory_budget: float, optimizer=SparseOptimizer(),
                 topology: Topology | None = None, time_limit: float = 4.0,
                 starts: Mapping[str, Mapping[str, Placement]] | None = None):
    """(placements, info): the learned planner's plan of `tables` (`LearnedPlanner.plan`)."""
    return LearnedPlanner(model, hosts, local, global_batch, optimizer=optimizer, topology=topology,
                          memory_budget=memory_budget).plan(tables, time_limit=time_limit, starts=starts)


def learned_auto_plan(features, hosts: int, local: int, global_batch: int, model: NeuralCostModel, *,
                      optimizer: SparseOptimizer = SparseOptimizer(), topology: Topology | None = None,
                      memory_budget: float, pooling: Mapping[str, float] | None = None,
                      alpha: float = 1.05, analytic: AnalyticCostModel | None = None,
                      time_limit: float = 4.0):
    """`auto_plan`'s counterpart with the learned planner: a `search.Plan` of
    a `FeatureSet` (pooled features), whose `cost` and baselines are rated by
    the analytic model (so `summary()` and `table()` compare like with like)
    and whose `stats` hold the learned planner's own prediction and search.
    The local search also starts from the greedy baselines' plans."""
    from jdmt.planner.search import Plan, baseline_plans

    analytic = analytic or AnalyticCostModel()
    problem = Problem(features, hosts, local, global_batch, optimizer=optimizer, topology=topology,
                      memory_budget=memory_budget, pooling=pooling)
    baselines = baseline_plans(problem)
    starts = {k: v for k, v in baselines.items() if not isinstance(v, str)}
    placements, info = learned_plan(tables_of(features, problem.pooling, alpha), hosts, local, global_batch,
                                    model, memory_budget=memory_budget, optimizer=optimizer,
                                    topology=problem.topology, time_limit=time_limit, starts=starts)
    rated = {k: (v if isinstance(v, str) else analytic.evaluate(problem, v)) for k, v in baselines.items()}
    stats = {"planner": "learned", "cost_model_backend": model.backend,
             "cost_model_global_batch": model.meta.get("global_batch"),
             **{k: v for k, v in info.items() if k != "predicted_device_s"}}
    return Plan(placements, analytic.evaluate(problem, placements), problem, analytic, rated, stats)


def learned_note(plan, source: str) -> str:
    """A line (or two) on a `learned_auto_plan` plan: the learned model's own
    prediction, the start that won, the planning time."""
    st = plan.stats
    note = (f"learned planner ({source}, fitted on {st['cost_model_backend']}): predicted embedding "
            f"step {st['predicted_step_s'] * 1e3:.3f} ms from the {st['start']} start, planned in "
            f"{st['plan_s']:.2f} s; the table's costs are the analytic model's")
    fitted = st.get("cost_model_global_batch")
    if fitted and fitted != plan.problem.global_batch:
        note += (f"\nnote: the cost model was measured at global batch {fitted}, not "
                 f"{plan.problem.global_batch}: its seconds extrapolate")
    return note


__all__ = ["COLUMN_SHARDS", "LearnedPlanner", "learned_auto_plan", "learned_note", "learned_plan",
           "tables_of"]
