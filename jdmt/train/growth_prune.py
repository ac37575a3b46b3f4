"""Alternate model growth and pruning of the dense network (arXiv 2105.01064; the design is ours).

A run follows a schedule of phases, e.g. ``dense:200,prune0.5:400,grow:300,prune0.5:300,dense:300``:

* ``dense:N``   N steps of the full model.
* ``pruneF:N``  the fraction F of the hidden units of every prunable group is
  removed at the phase's first step and N steps train the smaller model: its
  matrices are physically smaller (one more compiled step), not masked.
* ``grow:N``    the removed units return at the phase's first step and N steps
  train the full model.

Counts are steps, or percentages of ``--steps`` (``dense:10%,...``), in which
case the phases are rounded to whole steps that add up to the run. ``default``
is `PRESETS['default']`. A pruned phase follows a full one and is followed by
``grow``; a run always ends full.

Prunable groups (`unit_groups`): each hidden layer of the bottom and top MLPs
(not the bottom MLP's output, which is the embedding width, nor the logit),
each DCN cross layer's low-rank dimension, and the hidden layer (``mlp``) or
each cross layer's low-rank dimension (``dcn``) of the Tower Modules, per
tower. A Tower Module's output C is what crosses hosts and stays.

Importance of a unit: the product of the L2 norms of its incoming weights
(kernel column and bias) and of its outgoing weights (the next kernel's row),
`importance`, from the parameters at the phase's first step; the least
important `round(F * units)` of every group go (stable order: ties keep the
lower index). A unit that feeds nothing (zero outgoing weights) has importance
0 and goes first.

What a pruned phase keeps: the kept units' parameters and optimizer state,
gathered into smaller arrays (`gather`). The removed units' parameters wait
in a full-shaped copy and return with ``grow`` (`scatter` then `grow`):

* the kept units' parameters and optimizer state exactly as trained;
* a returning unit's incoming weights as they were when it left, its
  outgoing weights zero, so the function (and the loss) does not change at
  the boundary;
* every optimizer-state entry of a returning unit's incoming or outgoing
  weights as the optimizer initialises a new parameter (Adam: zero moments;
  Adagrad: its initial accumulator); step counts are shared and go on.

Checkpoints always hold the full-shaped state (the pruned phase's values
scattered in) and the kept indices (`meta`), so a run resumed in the middle of
a pruned phase continues bit-exactly, and any checkpoint restores into a run
without growth and pruning.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdmt.train.state import TrainState

__all__ = [
    "PRESETS",
    "GrowthPruneRun",
    "Phase",
    "ScheduleError",
    "UnitGroup",
    "flops_summary",
    "gather",
    "grow",
    "importance",
    "parse_schedule",
    "pruned_model",
    "pruned_tower_module",
    "regrow",
    "resume_state",
    "scatter",
    "select",
    "step_flops",
    "unit_groups",
]

PRESETS = {
    # 60% of the steps with a quarter of the units, in two phases; the last 15% full.
    "default": "dense:10%,prune0.75:30%,grow:15%,prune0.75:30%,grow:15%",
}

_ITEM = re.compile(r"^(dense|grow|prune(?P<frac>[0-9]*\.?[0-9]+))(?::(?P<n>[0-9]+)(?P<pct>%?))?$")


class ScheduleError(ValueError):
    """A growth-prune schedule that cannot run (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase of a schedule: `steps` steps from step `start` (0-based).

    Attributes:
      kind: 'dense', 'prune' or 'grow'.
      fraction: the fraction of every group's units removed (prune), else 0.
    """

    kind: str
    fraction: float
    start: int
    steps: int

    @property
    def end(self) -> int:
        return self.start + self.steps

    @property
    def pruned(self) -> bool:
        return self.kind == "prune"

    @property
    def label(self) -> str:
        return f"prune{self.fraction:g}" if self.pruned else self.kind

    def to_json(self) -> dict:
        return {"kind": self.kind, "fraction": self.fraction, "start": self.start, "steps": self.steps}


def parse_schedule(text: str, steps: int) -> tuple[Phase, ...]:
    """The phases of `text` (a schedule or a preset name) for a run of `steps`.

    Raises:
      ScheduleError: unknown items or presets, fractions outside (0, 1), counts
        that do not add up to `steps` (or percentages to 100), phases rounded
        to no steps, a pruned phase not after a full one, ``grow`` not after a
        pruned phase, ``dense`` right after a pruned one, or a pruned end.
    """
    if steps < 1:
        raise ScheduleError(f"growth-prune needs steps >= 1, got {steps}")
    spec = PRESETS.get(text, text)
    if text == "default" and steps < 5:  # too short for its five phases
        spec = ("dense:1", "prune0.75:1,grow:1", "dense:1,prune0.75:1,grow:1",
                "dense:1,prune0.75:2,grow:1")[steps - 1]
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise ScheduleError(f"empty growth-prune schedule {text!r}; e.g. "
                            f"{PRESETS['default']!r} or a preset: {', '.join(PRESETS)}")
    parsed = []
    for it in items:
        m = _ITEM.match(it)
        if m is None or m.group("n") is None:
            raise ScheduleError(
                f"growth-prune item {it!r} is not KIND:STEPS or KIND:PERCENT% with KIND one of "
                f"dense, grow, pruneF (0 < F < 1); presets: {', '.join(PRESETS)}")
        kind = "prune" if m.group("frac") is not None else m.group(1)
        frac = float(m.group("frac")) if kind == "prune" else 0.0
        if kind == "prune" and not 0.0 < frac < 1.0:
            raise ScheduleError(f"growth-prune item {it!r}: the pruned fraction must be in (0, 1)")
        parsed.append((kind, frac, int(m.group("n")), bool(m.group("pct"))))
    pct = {p[3] for p in parsed}
    if len(pct) > 1:
        raise ScheduleError(f"growth-prune schedule {spec!r} mixes steps and percentages")
    counts = [p[2] for p in parsed]
    if pct == {True}:
        if sum(counts) != 100:
            raise ScheduleError(f"growth-prune percentages add up to {sum(counts)}%, not 100%: {spec!r}")
        if steps < len(counts):
            raise ScheduleError(
                f"growth-prune schedule {spec!r} has {len(counts)} phases, more than the run's "
                f"{steps} steps; give more steps or fewer phases")
        edges = np.round(np.cumsum([0] + counts) * steps / 100).astype(int)
        for i in range(1, len(edges) - 1):  # every phase at least one step
            edges[i] = max(edges[i], edges[i - 1] + 1)
        for i in range(len(edges) - 2, 0, -1):
            edges[i] = min(edges[i], edges[i + 1] - 1)
        counts = list(np.diff(edges))
    elif sum(counts) != steps:
        raise ScheduleError(f"growth-prune phases add up to {sum(counts)} steps, but the run has {steps}: "
                            f"{spec!r} (or give percentages, e.g. dense:50%,...)")
    phases, start = [], 0
    for i, ((kind, frac, _, _), n) in enumerate(zip(parsed, counts)):
        if n < 1:
            raise ScheduleError(f"growth-prune item {items[i]!r} has no steps")
        prev = phases[-1] if phases else None
        if kind == "grow" and (prev is None or not prev.pruned):
            raise ScheduleError(f"growth-prune item {items[i]!r}: grow returns pruned units, so it "
                                "follows a prune phase")
        if kind == "dense" and prev is not None and prev.pruned:
            raise ScheduleError(f"growth-prune item {items[i]!r} follows a pruned phase: write grow:N "
                                "(the pruned units return then)")
        if kind == "prune" and prev is not None and prev.pruned:
            raise ScheduleError(f"growth-prune item {items[i]!r} follows a pruned phase: grow first")
        phases.append(Phase(kind, frac, start, int(n)))
        start += int(n)
    if phases[-1].pruned:
        raise ScheduleError(f"growth-prune schedule {spec!r} ends pruned: a run ends with the full "
                            "model (end with grow:N)")
    return tuple(phases)


def phase_index(phases: Sequence[Phase], step: int) -> int:
    """The index of the phase that holds 0-based `step` (the last one past the end)."""
    for i, p in enumerate(phases):
        if step < p.end:
            return i
    return len(phases) - 1


# ---- unit groups ---------------------------------------------------------------------------

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class UnitGroup:
    """Units removed and returned together: one hidden layer's units, or one
    cross layer's low-rank dimension.

    Attributes:
      name: e.g. 'bottom/0', 'top/1', 'cross_2', 'towers/hidden', 'towers/cross_0'.
      size: the full number of units.
      batch: leading stacked dimensions of every weight (Tower Modules:
        (hosts, towers per host), each tower choosing its own units), else ().
      incoming: (parameter path, axis after the batch dims) of the weights
        into a unit (its kernel column, its bias).
      outgoing: the same of the weights out of a unit (the next kernel's row).
    """

    name: str
    size: int
    batch: tuple[int, ...]
    incoming: tuple[tuple[Path, int], ...]
    outgoing: tuple[tuple[Path, int], ...]


def _mlp_groups(name: str, hidden: Sequence[int], prefix: Path) -> list[UnitGroup]:
    p = prefix + (name,)
    return [
        UnitGroup(f"{'/'.join(p)}/{i}", int(w), (),
                  ((p + (f"dense_{i}", "kernel"), 1), (p + (f"dense_{i}", "bias"), 0)),
                  ((p + (f"dense_{i + 1}", "kernel"), 0),))
        for i, w in enumerate(hidden)
    ]


def _cross_groups(layers: int, rank: int, prefix: Path, batch=()) -> list[UnitGroup]:
    return [
        UnitGroup("/".join(prefix + (f"cross_{i}",)), int(rank), tuple(batch),
                  ((prefix + (f"cross_{i}", "V", "kernel"), 1),),
                  ((prefix + (f"cross_{i}", "U", "kernel"), 0),))
        for i in range(layers)
    ]


def unit_groups(model, tower_module=None, tower_batch: tuple[int, int] | None = None) -> list[UnitGroup]:
    """The prunable groups of `model` (a `DLRM` or `DCN`) and, with
    compressing towers, of `tower_module` stacked `[*tower_batch, ...]`.

    Without a tower module the parameters are the model's own tree; with
    one they are `{"model": ..., "towers": ..., "adapter": ...}`."""
    prefix: Path = () if tower_module is None else ("model",)
    groups = _mlp_groups("bottom", model.bottom, prefix) + _mlp_groups("top", model.top, prefix)
    if hasattr(model, "cross_layers"):
        groups += _cross_groups(model.cross_layers, model.low_rank, prefix)
    if tower_module is not None:
        t, b = ("towers",), tuple(tower_batch)
        if tower_module.kind == "mlp":
            groups.append(UnitGroup("towers/hidden", tower_module.hidden, b,
                                    ((t + ("hidden", "kernel"), 1), (t + ("hidden", "bias"), 0)),
                                    ((t + ("proj", "kernel"), 0),)))
        elif tower_module.kind == "dcn":
            groups += _cross_groups(tower_module.cross_layers, tower_module.low_rank, t, b)
    return groups


def kept_count(size: int, fraction: float) -> int:
    """Units a group of `size` keeps when `fraction` of them are removed (at least 1)."""
    return max(1, size - int(round(fraction * size)))


def pruned_model(model, groups: Sequence[UnitGroup], keep: dict[str, np.ndarray]):
    """`model` (DLRM/DCN) with the kept units' widths (cross layers share one rank)."""
    def width(name, full):
        return int(keep[name].shape[-1]) if name in keep else full

    updates = {
        "bottom": tuple(width(g, w) for g, w in zip(_names(groups, "bottom"), model.bottom)),
        "top": tuple(width(g, w) for g, w in zip(_names(groups, "top"), model.top)),
    }
    if hasattr(model, "cross_layers") and model.cross_layers:
        ranks = {width(g, model.low_rank) for g in _names(groups, "cross_")}
        if len(ranks) != 1:
            raise ValueError(f"DCN cross layers keep different ranks {sorted(ranks)}; they share one")
        updates["low_rank"] = ranks.pop()
    return model.clone(**updates)


def pruned_tower_module(module, keep: dict[str, np.ndarray]):
    """The Tower Module with the kept widths (None stays None)."""
    if module is None:
        return None
    if module.kind == "mlp" and "towers/hidden" in keep:
        return module.clone(hidden=int(keep["towers/hidden"].shape[-1]))
    ranks = {int(v.shape[-1]) for k, v in keep.items() if k.startswith("towers/cross_")}
    if module.kind == "dcn" and ranks:
        return module.clone(low_rank=ranks.pop())
    return module


def _names(groups, head: str) -> list[str]:
    """Names of the model's groups whose path part after an optional 'model/' starts with `head`."""
    out = []
    for g in groups:
        n = g.name[len("model/"):] if g.name.startswith("model/") else g.name
        if n.startswith(head) and not g.name.startswith("towers/"):
            out.append(g.name)
    return out


# ---- importance and selection --------------------------------------------------------------

def _get(tree, path: Path):
    for k in path:
        tree = tree[k]
    return tree


def _unit_sq(a: np.ndarray, axis: int, nbatch: int) -> np.ndarray:
    """Sum of squares per unit along `axis` (after `nbatch` batch dims): [*batch, size]."""
    a = np.moveaxis(np.asarray(a, np.float64), nbatch + axis, -1)
    return np.sum(np.square(a), axis=tuple(range(nbatch, a.ndim - 1)))


def importance(params, group: UnitGroup) -> np.ndarray:
    """f64[*batch, size]: ||incoming weights||_2 * ||outgoing weights||_2 of every unit
    (host numpy parameters)."""
    nb = len(group.batch)
    inc = sum(_unit_sq(_get(params, p), ax, nb) for p, ax in group.incoming)
    out = sum(_unit_sq(_get(params, p), ax, nb) for p, ax in group.outgoing)
    return np.sqrt(inc) * np.sqrt(out)


def select(params, groups: Sequence[UnitGroup], fraction: float) -> dict[str, np.ndarray]:
    """The kept units of every group: i32[*batch, k], ascending, the most important
    `kept_count` of each (ties: the lower index stays)."""
    keep = {}
    for g in groups:
        imp = importance(params, g)
        k = kept_count(g.size, fraction)
        order = np.argsort(-imp, axis=-1, kind="stable")[..., :k]
        keep[g.name] = np.sort(order, axis=-1).astype(np.int32)
    return keep


# ---- gather, scatter, grow -----------------------------------------------------------------

class _Ops:
    """The slicing of one parameter: ((axis, kept i32[*batch, k], n_batch), ...). A pytree leaf."""

    __slots__ = ("ops",)

    def __init__(self, ops=()):
        self.ops = tuple(ops)


def _ops_tree(params, groups: Sequence[UnitGroup], keep: dict[str, np.ndarray]):
    """A tree shaped like `params` whose leaves are `_Ops` (empty for unpruned leaves)."""
    by_path: dict[Path, list] = {}
    for g in groups:
        idx = jnp.asarray(keep[g.name])
        for path, ax in g.incoming + g.outgoing:
            by_path.setdefault(path, []).append((ax, idx, len(g.batch), any(path == p for p, _ in g.outgoing)))
    missing = [p for p in by_path if not _has(params, p)]
    if missing:
        raise KeyError(f"growth-prune: the parameters have no {'/'.join(missing[0])}")

    def leaf(path, _):
        return _Ops(by_path.get(tuple(getattr(k, "key", str(k)) for k in path), ()))

    return jax.tree_util.tree_map_with_path(leaf, params)


def _has(tree, path) -> bool:
    try:
        _get(tree, path)
        return True
    except (KeyError, TypeError):
        return False


def _batched(f, nbatch: int):
    for _ in range(nbatch):
        f = jax.vmap(f)
    return f


def _take(a, ax: int, idx, nb: int):
    return _batched(lambda a, i: jnp.take(a, i, axis=ax), nb)(a, idx)


def _put(a, ax: int, idx, nb: int, v):
    return _batched(lambda a, i, v: a.at[(slice(None),) * ax + (i,)].set(v), nb)(a, idx, v)


def _gather_leaf(a, ops: _Ops):
    for ax, idx, nb, _ in ops.ops:
        a = _take(a, ax, idx, nb)
    return a


def _scatter_leaf(full, sub, ops: Sequence):
    if not ops:
        return sub
    (ax, idx, nb, _), rest = ops[0], ops[1:]
    return _put(full, ax, idx, nb, _scatter_leaf(_take(full, ax, idx, nb), sub, rest))


def _returning(shape, ops: _Ops, outgoing_only: bool):
    """bool[shape]: entries of a returning unit's weights (only its outgoing ones
    if `outgoing_only`), or None when there are none."""
    mask = None
    for ax, idx, nb, is_out in ops.ops:
        if outgoing_only and not is_out:
            continue
        size = shape[nb + ax]
        kept = _batched(lambda i: jnp.zeros((size,), bool).at[i].set(True), nb)(idx)  # [*batch, size]
        kept = jnp.moveaxis(kept.reshape(kept.shape + (1,) * (len(shape) - nb - 1)), nb, nb + ax)
        m = jnp.broadcast_to(~kept, shape)
        mask = m if mask is None else mask | m
    return mask


class _Tup:
    """Several trees' leaves at one position (a pytree leaf)."""

    __slots__ = ("xs",)

    def __init__(self, xs):
        self.xs = xs


def _opt_map(tx, f_param, f_other, ops, *states):
    """Maps the optimizer states `states` (same structure) leaf by leaf:
    `f_param(*leaves, ops)` on their parameter-shaped parts, `f_other(*leaves)`
    on the rest (step counts)."""
    tup = jax.tree.map(lambda *xs: _Tup(xs), *states)
    return optax.tree_map_params(tx, lambda t, o: f_param(*t.xs, o), tup, ops,
                                 transform_non_params=lambda t: f_other(*t.xs))


def gather(tx: optax.GradientTransformation, params, opt_state, groups, keep):
    """The kept units' (params, opt_state): every pruned weight physically smaller."""
    ops = _ops_tree(params, groups, keep)
    small = jax.tree.map(_gather_leaf, params, ops)
    return small, _opt_map(tx, _gather_leaf, lambda a: a, ops, opt_state)


def scatter(tx: optax.GradientTransformation, full, small, groups, keep):
    """`full` (params, opt_state) with the kept units' entries replaced by
    `small`'s (a pruned phase's state written back; the removed units' entries
    stay as they were). Step counts come from `small`, which went on counting."""
    (fp, fo), (sp, so) = full, small
    ops = _ops_tree(fp, groups, keep)
    put = lambda f, s, o: _scatter_leaf(f, s, o.ops)  # noqa: E731
    return jax.tree.map(put, fp, sp, ops), _opt_map(tx, put, lambda f, s: s, ops, fo, so)


# Optimizer-state fields that are second-moment (scale) estimates: a returning
# unit keeps its own from before it left (optax's adam/adamw `nu`, adagrad's
# `sum_of_squares`, rmsprop's `nu`).
SECOND_MOMENTS = frozenset({"nu", "sum_of_squares"})


def _second_moment_flags(opt_state):
    """`opt_state`'s structure with True at the leaves under a SECOND_MOMENTS field."""
    def flag(path, _):
        names = {getattr(k, "name", getattr(k, "key", None)) for k in path}
        return bool(names & SECOND_MOMENTS)
    return jax.tree_util.tree_map_with_path(flag, opt_state)


def grow(tx: optax.GradientTransformation, params, opt_state, groups, keep):
    """The full (params, opt_state) after the removed units return: their
    outgoing weights zero (the function is the pruned one); for their weights,
    the optimizer's first moments (and any other state) as `tx.init` gives a
    new parameter, but its second-moment estimates (`SECOND_MOMENTS`) as they
    were when the unit left. Kept units are unchanged.

    Why the second moments: Adam's first step on a fresh (zero) state moves
    every returning weight by about the learning rate whatever its gradient
    (the update is m / sqrt(v) with both from one gradient), so the units
    that return all at once jolt the function; with their old scale
    estimates the first steps are about a tenth of that and grow as the
    first moments fill (measured on the MLPerf DCN network: the loss rose
    for ~30 steps after growth with fresh state)."""
    ops = _ops_tree(params, groups, keep)

    def zero_out(a, o):
        m = _returning(a.shape, o, outgoing_only=True)
        return a if m is None else jnp.where(m, jnp.zeros_like(a), a)

    new_params = jax.tree.map(zero_out, params, ops)

    def reset(a, init, second, o):
        m = _returning(a.shape, o, outgoing_only=False)
        return a if m is None or second else jnp.where(m, init, a)

    opt = _opt_map(tx, reset, lambda a, init, second: a, ops, opt_state, tx.init(new_params),
                   _second_moment_flags(opt_state))
    return new_params, opt


def describe(groups: Sequence[UnitGroup], keep: dict[str, np.ndarray] | None) -> str:
    """'bottom/0 64->32, top/0 128->64, ...' (full -> kept)."""
    return ", ".join(
        f"{g.name} {g.size}->{g.size if keep is None else int(keep[g.name].shape[-1])}" for g in groups)


def keep_to_json(keep: dict[str, np.ndarray]) -> dict[str, Any]:
    return {k: np.asarray(v).tolist() for k, v in keep.items()}


def keep_from_json(d: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.int32) for k, v in d.items()}


def regrow(trainer, state, keep_json: dict):
    """A full-shaped state checkpointed in a pruned phase, restored by a run
    without that schedule: the removed units return (`grow`), so the model is
    the function the pruned phase trained."""
    sptt = trainer.sptt
    tower = None if sptt is None or sptt.identity else sptt.module
    groups = unit_groups(trainer.model, tower, None if tower is None else (sptt.hosts, sptt.t_max))
    keep = keep_from_json(keep_json)
    if set(keep) != {g.name for g in groups}:
        raise ScheduleError(f"the checkpoint's pruned units are of groups {sorted(keep)}, "
                            f"this model has {sorted(g.name for g in groups)}")
    fn = lambda p, o: grow(trainer.tx, p, o, groups, keep)  # noqa: E731
    shapes = jax.eval_shape(fn, state.params, state.opt_state)
    params, opt_state = jax.jit(fn, out_shardings=trainer._dense_shardings(shapes))(
        state.params, state.opt_state)
    return TrainState(params, opt_state, state.tables)


def step_flops(compiled) -> float | None:
    """The compiled program's FLOPs (`cost_analysis()`), or None where the backend gives none."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    flops = None if not ca else ca.get("flops")
    return None if flops is None or flops < 0 else float(flops)


class GrowthPruneRun:
    """A trainer's growth-prune schedule as it runs: which units a pruned phase
    keeps, the full-shaped state they were gathered from, and what each phase cost.

    The trainer calls `enter` before every step (a no-op inside a phase),
    `full_state` to checkpoint, `meta`/`resume` to carry the kept units
    across a restart, and `report` for the summary.

    Args:
      trainer: the `Trainer`; its `model` (and the Tower Module its
        `_logits` uses) are swapped for the pruned ones during a pruned phase.
      schedule: a schedule or preset name (`parse_schedule`).
    """

    def __init__(self, trainer, schedule: str):
        self.trainer = trainer
        self.schedule = schedule
        self.phases = parse_schedule(schedule, trainer.config.steps)
        self.full_model = trainer.model
        sptt = trainer.sptt
        self.full_tower = None if sptt is None or sptt.identity else sptt.module
        batch = None if self.full_tower is None else (sptt.hosts, sptt.t_max)
        self.groups = unit_groups(self.full_model, self.full_tower, batch)
        if not self.groups:
            raise ScheduleError("growth-prune: the model has no prunable units (no hidden layers)")
        self.keep: dict[str, np.ndarray] | None = None
        self.full = None  # (params, opt_state) full-shaped, while pruned
        self.current: int | None = None  # the phase being trained
        self.phase_steps: dict[int, list[float]] = {}
        self.phase_sig: dict[int, str] = {}
        self.phase_widths: dict[int, str] = {}
        self.transitions: list[dict] = []

    # ---- what runs -----------------------------------------------------------------------

    @property
    def signature(self) -> str:
        """The widths the current step runs with ('full', or the kept counts)."""
        if self.keep is None:
            return "full"
        return ",".join(f"{g.name}={self.keep[g.name].shape[-1]}" for g in self.groups)

    def widths(self) -> str:
        return describe(self.groups, self.keep)

    def _swap(self) -> None:
        t = self.trainer
        if self.keep is None:
            t.model, t.tower_module = self.full_model, self.full_tower
        else:
            t.model = pruned_model(self.full_model, self.groups, self.keep)
            t.tower_module = pruned_tower_module(self.full_tower, self.keep)

    def _jit(self, fn, *args):
        """`fn(*args)` jitted with the dense state's shardings on its output."""
        shapes = jax.eval_shape(fn, *args)
        return jax.jit(fn, out_shardings=self.trainer._dense_shardings(shapes))(*args)

    def _gather(self, params, opt_state):
        keep, tx = self.keep, self.trainer.tx
        return self._jit(lambda p, o: gather(tx, p, o, self.groups, keep), params, opt_state)

    def _scatter(self, params, opt_state):
        keep, tx = self.keep, self.trainer.tx
        return self._jit(lambda f, s: scatter(tx, f, s, self.groups, keep), self.full, (params, opt_state))

    def changes_at(self, step: int) -> bool:
        """True when `enter(state, step)` would prune or grow the state (or
        `step` starts another phase of the same widths)."""
        return phase_index(self.phases, step) != self.current

    def enter(self, state, step: int):
        """`state` ready for 0-based `step`: pruned or grown if `step` starts
        another phase (or resumes into one), unchanged otherwise."""
        from jdmt.mesh import host_numpy

        i = phase_index(self.phases, step)
        if i == self.current:
            return state
        target = self.phases[i]
        params, opt_state = state.params, state.opt_state
        what = None
        if self.keep is not None:  # the pruned phase is over: its units return
            full_p, full_o = self._scatter(params, opt_state)
            keep, tx = self.keep, self.trainer.tx
            params, opt_state = self._jit(lambda p, o: grow(tx, p, o, self.groups, keep), full_p, full_o)
            self.keep, self.full = None, None
            what = "grow"
        if target.pruned and self.keep is None:
            host = jax.tree.map(host_numpy, params)
            self.keep = select(host, self.groups, target.fraction)
            self.full = (params, opt_state)
            params, opt_state = self._gather(params, opt_state)
            what = "prune"
        self.current = i
        self._swap()
        if what is not None:
            self.transitions.append({"step": step, "to": target.label, "widths": self.widths()})
            if jax.process_index() == 0:
                print(f"jdmt: growth-prune: step {step}: {target.label} for {target.end - step} steps "
                      f"({self.widths()})", file=sys.stderr)
        return TrainState(params, opt_state, state.tables)

    def record(self, step: int, seconds: float) -> None:
        """One step's time (without compiling), for the per-phase report."""
        i = phase_index(self.phases, step)
        self.phase_steps.setdefault(i, []).append(seconds)
        self.phase_sig[i] = self.signature
        self.phase_widths[i] = self.widths()

    # ---- checkpoints ---------------------------------------------------------------------

    def full_state(self, state):
        """`state` full-shaped, as checkpoints hold it (a pruned phase's values scattered in)."""
        if self.keep is None:
            return state
        params, opt_state = self._scatter(state.params, state.opt_state)
        return TrainState(params, opt_state, state.tables)

    def meta(self) -> dict:
        return {"schedule": self.schedule, "phase": self.current,
                "keep": None if self.keep is None else keep_to_json(self.keep)}

    def resume(self, state, meta: dict | None):
        """A restored full-shaped `state` as the checkpointed run had it: gathered
        to the kept units if it was saved in a pruned phase of this schedule
        (`enter` then goes on with it; another schedule's pruned units return
        first)."""
        keep = None if not meta else meta.get("keep")
        if keep is None:
            return state
        self.keep = keep_from_json(keep)
        names = {g.name for g in self.groups}
        if set(self.keep) != names:
            raise ScheduleError(f"the checkpoint's pruned units are of groups {sorted(self.keep)}, "
                                f"this model has {sorted(names)}")
        same = meta.get("schedule") is not None and parse_schedule(
            meta["schedule"], self.trainer.config.steps) == self.phases
        self.current = meta.get("phase") if same else -1
        self.full = (state.params, state.opt_state)
        params, opt_state = self._gather(state.params, state.opt_state)
        self._swap()
        return TrainState(params, opt_state, state.tables)

    # ---- report --------------------------------------------------------------------------

    def report(self, step_flops: dict[str, float | None], global_batch: int) -> list[dict]:
        """Per phase: kind, steps, widths, the compiled step's FLOPs, median step time, examples/s."""
        out = []
        for i, p in enumerate(self.phases):
            times = self.phase_steps.get(i, [])
            sig = "full" if not p.pruned else self.phase_sig.get(i)
            med = float(np.median(times)) if times else None
            widths = self.phase_widths.get(i, None if p.pruned else describe(self.groups, None))
            out.append({**p.to_json(), "label": p.label, "widths": widths,
                        "step_flops": step_flops.get(sig) if sig else None,
                        "steps_timed": len(times),
                        "step_time_ms_median": None if med is None else 1e3 * med,
                        "examples_per_sec": None if not med else global_batch / med})
        return out


def resume_state(trainer, state, saved: dict | None):
    """A restored state as this run continues it: gathered to a pruned
    phase's units (`GrowthPruneRun.resume`), or, in a run without growth
    and pruning, the units a pruned checkpoint left out returned (`regrow`)."""
    if trainer.gp is not None:
        return trainer.gp.resume(state, saved)
    if saved and saved.get("keep") is not None:
        if jax.process_index() == 0:
            print("jdmt: the checkpoint was saved in a pruned phase; its removed units return "
                  "(outgoing weights zero) for this full-model run", file=sys.stderr)
        return regrow(trainer, state, saved["keep"])
    return state


def flops_summary(trainer, history: dict) -> dict[str, Any]:
    """The run's training FLOPs (compiled steps' `cost_analysis`, summed over
    the devices) against the same steps of the full model, and the
    growth-prune phases' report. Custom calls (the C++ CPU kernels) count 0."""
    # cost_analysis counts one device's SPMD program: the mesh does N of them.
    n = trainer.emb.num_devices
    flops = {w: None if v is None else v * n for w, v in history["step_flops"].items()}
    counts = history["steps_by_width"]
    full = flops.get("full")
    known = all(flops.get(w) is not None for w in counts)
    run = sum(c * flops[w] for w, c in counts.items()) if known else None
    dense = full * sum(counts.values()) if full is not None else None
    out: dict[str, Any] = {"dense_train_flops": run, "dense_train_flops_unpruned": dense,
                           "growth_prune": None}
    if trainer.gp is None:
        return out
    phases = trainer.gp.report(flops, trainer.config.global_batch)
    full_ms = [p["step_time_ms_median"] for p in phases
               if not p["kind"] == "prune" and p["step_time_ms_median"] is not None]
    ref = float(np.median(full_ms)) if full_ms else None
    saved_s = sum(p["steps_timed"] * (ref - p["step_time_ms_median"]) / 1e3 for p in phases
                  if p["kind"] == "prune" and ref is not None and p["step_time_ms_median"] is not None)
    out["growth_prune"] = {
        "schedule": trainer.config.growth_prune,
        "phases": phases,
        "transitions": trainer.gp.transitions,
        "flops_saving": None if not run or not dense else 1.0 - run / dense,
        "time_saved_s": saved_s,
        "full_step_time_ms_median": ref,
    }
    return out
