"""Communication accounting: bytes a compiled step moves, per mesh level.

`comm_report(jitted_fn, *args, mesh=mesh)` lowers and compiles the function
(`jitted_fn.lower(*args).compile().as_text()`), finds every collective in the
optimized HLO and counts, for every device, the bytes it *receives* from
every peer, split into peers on the same host and peers on other hosts.

Device numbering
----------------
The ids in `replica_groups` / `source_target_pairs` are partition ids (SPMD,
one replica; shard_map all-to-alls carry `channel_id`, the others also
`use_global_device_ids=true`, which is the same numbering here). Partition
id p runs on `mesh.devices.flat[p]` (checked against the executable's device
order when it is available, and remapped if it ever differs), so with a
`('host', 'local')` mesh of shape H x L, id p is on host `p // L`.

Byte model (what is counted)
----------------------------
Bytes received over the link from each other member of the group, from the
shapes in the program; no ring/tree algorithm is assumed and a device's own
contribution is never counted. With G the group size:

- all-to-all: per-device payload X (sum of the operands; in the tuple form
  operand i is the chunk sent to member i): X/G from each other member.
- all-gather: each device receives every peer's input chunk (sum of the
  operands): chunk bytes from each other member.
- reduce-scatter: per-device input X: X/G from each other member.
- all-reduce: modelled as reduce-scatter + all-gather: 2*X/G from each other
  member. The per-device total, 2*X*(G-1)/G, is what a bandwidth-optimal
  algorithm (ring included) moves; it is spread evenly over the peers rather
  than given to ring neighbours, so the host split does not depend on an
  algorithm XLA or NCCL may choose differently.
- collective-permute: the payload (sum of the operands) from its source, for
  each (source, target) pair with source != target.
- collective-broadcast: the payload from the group's first member.
- ragged-all-to-all: data-dependent; counted like an all-to-all of the whole
  input buffer (an upper bound) and flagged `upper_bound`.

Element type: bytes use the element type the *program* gives the
collective. XLA:CPU runs bf16/f16 collectives in f32 (converts around them),
which a GPU/TPU does not, so `comm_report` also reads the unoptimized HLO
(`lowered.as_text(dialect='hlo')`) and counts a compiled collective that
matches one there (same kind, groups and element count) in the program's
type; `Collective.compiled_dtype` then says what the compiled HLO used.
Collectives the partitioner inserts (GSPMD resharding) have no such match and
are counted as compiled (on CPU: f32 even for bf16 data).

Async pairs (`all-gather-start`/`-done`, `all-reduce-start`/`-done`,
`collective-permute-start`/`-done`, `async-start` wrapping a collective) are
counted once, at the start. Collectives inside called computations (fusions,
calls, conditionals, async wrappers, while bodies) are found by walking the
call graph from ENTRY.

Counting is per collective *in the program text*: a collective inside a
while loop (`lax.scan`, `fori_loop`) is counted once per appearance, not once
per iteration. Such collectives are flagged (`in_while`, and
`CommReport.collectives_in_while`); when XLA knows the trip count
(`known_trip_count` in the while's backend_config) it is recorded, and
`count_loop_trips=True` multiplies by it. A collective in a conditional
branch is counted as if its branch ran (flagged `in_conditional`).

Totals (`cross_host_bytes`, `intra_host_bytes`) sum over all devices, per
step; `per_device_*` is the maximum over devices of the bytes a device
receives (the bottleneck device), `mean_per_device_*` the mean.
`CommReport.projected_time_s(topology)` feeds the per-device maxima of both
levels (and the number of collectives, for latency) to
`Topology.comm_time_s`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Sequence

import numpy as np

from jdmt.comm.hlo import (
    _array_shapes,
    _attr_value,
    _bytes_of,
    _collective_kind,
    _Ctx,
    _ints,
    _Instr,
    _Module,
    _num,
    _operand_shapes,
    _parse_module,
    _shape_str,
    _walk,
    parse_replica_groups,
)
from jdmt.mesh import HOST, LOCAL, Topology, parse_mesh_spec

__all__ = [
    "Collective",
    "CommReport",
    "comm_report",
    "comm_report_compiled",
    "comm_report_from_text",
]

# --------------------------------------------------------------------------
# Public data types
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of the compiled program, with the bytes it moves."""

    kind: str  # 'all-to-all', 'all-gather', 'reduce-scatter', 'all-reduce', ...
    name: str  # HLO instruction name
    computation: str  # HLO computation holding it
    operand_shapes: tuple[str, ...]  # e.g. ('f32[16,4]',)
    result_shapes: tuple[str, ...]
    dtype: str  # element type(s) of the operands
    operand_bytes: float  # per device
    result_bytes: float  # per device
    group_size: int
    num_groups: int
    groups: tuple[tuple[int, ...], ...]  # replica groups, or (source, target) pairs
    cross_host_bytes: float  # received over all devices, from other hosts
    intra_host_bytes: float  # received over all devices, from the same host
    device_cross_host_bytes: tuple[float, ...]  # received by each device
    device_intra_host_bytes: tuple[float, ...]
    is_async: bool = False
    in_while: bool = False
    in_conditional: bool = False
    trip_count: int | None = None  # product of known enclosing trip counts
    multiplicity: int = 1  # times counted in the report's totals
    upper_bound: bool = False
    compiled_dtype: str = ""  # element type(s) in the compiled HLO, if not `dtype`

    @property
    def per_device_cross_host_bytes(self) -> float:
        return max(self.device_cross_host_bytes, default=0)

    @property
    def per_device_intra_host_bytes(self) -> float:
        return max(self.device_intra_host_bytes, default=0)

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del d["device_cross_host_bytes"], d["device_intra_host_bytes"]
        d["groups"] = [list(g) for g in self.groups]
        d["operand_shapes"] = list(self.operand_shapes)
        d["result_shapes"] = list(self.result_shapes)
        d["per_device_cross_host_bytes"] = self.per_device_cross_host_bytes
        d["per_device_intra_host_bytes"] = self.per_device_intra_host_bytes
        return d


@dataclasses.dataclass(frozen=True)
class CommReport:
    """Bytes received per step, split by mesh level; see the module docstring."""

    hosts: int
    local: int
    collectives: tuple[Collective, ...]
    cross_host_bytes: float  # total over devices
    intra_host_bytes: float
    per_device_cross_host_bytes: float  # max over devices
    per_device_intra_host_bytes: float
    mean_per_device_cross_host_bytes: float
    mean_per_device_intra_host_bytes: float
    device_cross_host_bytes: tuple[float, ...]  # per device
    device_intra_host_bytes: tuple[float, ...]
    by_kind: dict[str, dict[str, float]]
    num_collectives: int  # collective executions counted (with multiplicity)
    collectives_in_while: int  # collectives found inside while bodies
    count_loop_trips: bool = False

    @property
    def total_bytes(self) -> float:
        return self.cross_host_bytes + self.intra_host_bytes

    def projected_time_s(self, topology: Topology) -> float:
        """Communication time of a step: per-device max bytes at each level."""
        if (topology.hosts, topology.local) != (self.hosts, self.local):
            raise ValueError(
                f"topology {topology.hosts}x{topology.local} does not match the "
                f"report's mesh {self.hosts}x{self.local}"
            )
        return topology.comm_time_s(
            self.per_device_cross_host_bytes,
            self.per_device_intra_host_bytes,
            num_collectives=self.num_collectives,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "mesh": f"{self.hosts}x{self.local}",
            "cross_host_bytes": self.cross_host_bytes,
            "intra_host_bytes": self.intra_host_bytes,
            "per_device_cross_host_bytes": self.per_device_cross_host_bytes,
            "per_device_intra_host_bytes": self.per_device_intra_host_bytes,
            "mean_per_device_cross_host_bytes": self.mean_per_device_cross_host_bytes,
            "mean_per_device_intra_host_bytes": self.mean_per_device_intra_host_bytes,
            "num_collectives": self.num_collectives,
            "collectives_in_while": self.collectives_in_while,
            "count_loop_trips": self.count_loop_trips,
            "by_kind": {k: dict(v) for k, v in self.by_kind.items()},
            "collectives": [c.to_json() for c in self.collectives],
        }

    def summary(self) -> str:
        """One line for logs."""
        s = (
            f"comm[{self.hosts}x{self.local}]: {self.num_collectives} collectives; "
            f"per device cross-host {_fmt_bytes(self.per_device_cross_host_bytes)}, "
            f"intra-host {_fmt_bytes(self.per_device_intra_host_bytes)} (max); "
            f"total cross-host {_fmt_bytes(self.cross_host_bytes)}, "
            f"intra-host {_fmt_bytes(self.intra_host_bytes)}"
        )
        if self.collectives_in_while:
            s += f"; {self.collectives_in_while} inside while loops" + (
                " (x known trip counts)" if self.count_loop_trips else " (counted once)"
            )
        return s

    def __str__(self) -> str:
        return self.summary()


def _fmt_bytes(b: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(b) >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:g} B"


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------


def comm_report(jitted_fn, *args, mesh, count_loop_trips: bool = False, **kwargs) -> CommReport:
    """Compile `jitted_fn(*args, **kwargs)` and account its collectives on `mesh`.

    `jitted_fn` may also be a `jax.stages.Lowered` or `Compiled` (then no
    arguments are needed). `mesh` is a `('host', 'local')` Mesh or an `'HxL'`
    spec / `(H, L)` pair. `count_loop_trips` multiplies collectives inside
    while loops by their known trip count (default: counted once).
    """
    lowered = None
    if hasattr(jitted_fn, "as_text") and hasattr(jitted_fn, "runtime_executable"):
        compiled = jitted_fn  # already compiled
    else:
        if hasattr(jitted_fn, "compile") and not hasattr(jitted_fn, "lower"):
            lowered = jitted_fn  # Lowered
        else:
            lowered = jitted_fn.lower(*args, **kwargs)
        compiled = lowered.compile()
    return comm_report_compiled(compiled, mesh, lowered=lowered, count_loop_trips=count_loop_trips)


def comm_report_compiled(compiled, mesh, *, lowered=None, count_loop_trips: bool = False) -> CommReport:
    """Account the collectives of an already compiled program (no recompile).

    Pass the `Lowered` it came from, if at hand, so collectives are counted in
    the program's element types (see the module docstring).
    """
    program_text = None
    if lowered is not None:
        try:
            program_text = lowered.as_text(dialect="hlo")
        except Exception:  # pragma: no cover - older/newer API
            program_text = None
    order = _partition_to_mesh_position(compiled, mesh)
    return comm_report_from_text(
        compiled.as_text(), mesh, count_loop_trips=count_loop_trips, partition_to_position=order,
        program_hlo_text=program_text,
    )


def comm_report_from_text(
    hlo_text: str,
    mesh,
    *,
    count_loop_trips: bool = False,
    partition_to_position: Sequence[int] | None = None,
    program_hlo_text: str | None = None,
) -> CommReport:
    """Account the collectives of an HLO module's text on an H x L mesh.

    `partition_to_position[p]` is the index in `mesh.devices.flat` of the
    device running partition p (identity by default). `program_hlo_text` is
    the unoptimized HLO of the same program (`lowered.as_text(dialect='hlo')`):
    a compiled collective that matches one there (same kind, groups and
    element count) is counted in the program's element type (XLA:CPU runs
    bf16/f16 collectives in f32; the program's type is what a GPU/TPU sends).
    """
    hosts, local = _mesh_hw(mesh)
    n = hosts * local
    module = _parse_module(hlo_text)
    found = _walk(module)
    program = _program_collectives(program_hlo_text, n) if program_hlo_text else []
    if partition_to_position is None:
        pos = np.arange(n)
    else:
        pos = np.asarray(list(partition_to_position), dtype=np.int64)
        if pos.shape != (n,) or sorted(pos.tolist()) != list(range(n)):
            raise ValueError(f"partition_to_position must be a permutation of range({n})")

    collectives: list[Collective] = []
    dev_cross = np.zeros(n)
    dev_intra = np.zeros(n)
    by_kind: dict[str, dict[str, float]] = {}
    num = 0
    in_while = 0
    for instr, ctx in found:
        c = _account(instr, module, ctx, hosts, local, pos, count_loop_trips, program)
        collectives.append(c)
        m = c.multiplicity
        dev_cross += m * np.asarray(c.device_cross_host_bytes, dtype=np.float64)
        dev_intra += m * np.asarray(c.device_intra_host_bytes, dtype=np.float64)
        k = by_kind.setdefault(c.kind, {"cross_host_bytes": 0, "intra_host_bytes": 0, "count": 0})
        k["cross_host_bytes"] = _num(k["cross_host_bytes"] + m * c.cross_host_bytes)
        k["intra_host_bytes"] = _num(k["intra_host_bytes"] + m * c.intra_host_bytes)
        k["count"] += m
        num += m
        in_while += int(c.in_while)

    return CommReport(
        hosts=hosts,
        local=local,
        collectives=tuple(collectives),
        cross_host_bytes=_num(dev_cross.sum()),
        intra_host_bytes=_num(dev_intra.sum()),
        per_device_cross_host_bytes=_num(dev_cross.max(initial=0.0)),
        per_device_intra_host_bytes=_num(dev_intra.max(initial=0.0)),
        mean_per_device_cross_host_bytes=_num(dev_cross.mean()),
        mean_per_device_intra_host_bytes=_num(dev_intra.mean()),
        device_cross_host_bytes=tuple(_num(v) for v in dev_cross),
        device_intra_host_bytes=tuple(_num(v) for v in dev_intra),
        by_kind=by_kind,
        num_collectives=num,
        collectives_in_while=in_while,
        count_loop_trips=count_loop_trips,
    )


# --------------------------------------------------------------------------
# Mesh helpers
# --------------------------------------------------------------------------


def _mesh_hw(mesh) -> tuple[int, int]:
    if hasattr(mesh, "shape") and hasattr(mesh, "devices"):
        shape = dict(mesh.shape)
        if HOST in shape and LOCAL in shape and len(shape) == 2:
            return int(shape[HOST]), int(shape[LOCAL])
        raise ValueError(f"mesh axes must be ('{HOST}', '{LOCAL}'), got {tuple(shape)}")
    return parse_mesh_spec(mesh)


def _partition_to_mesh_position(compiled, mesh) -> list[int] | None:
    """Index in mesh.devices.flat of the device running each partition.

    Partition p runs on the executable's p-th device; jit over a mesh uses
    `mesh.devices.flat` as its device assignment, so this is the identity,
    but it is checked (single process only: otherwise not all devices are
    visible here).
    """
    if not hasattr(mesh, "devices"):
        return None
    try:
        devices = list(compiled.runtime_executable().local_devices())
    except Exception:  # pragma: no cover - API moved
        return None
    flat = list(mesh.devices.flat)
    if len(devices) != len(flat):
        return None  # multi-process, or a program not over the whole mesh
    where = {d: i for i, d in enumerate(flat)}
    if not all(d in where for d in devices):
        return None
    return [where[d] for d in devices]


# --------------------------------------------------------------------------
# The byte model
# --------------------------------------------------------------------------


def _account(
    ins: _Instr,
    module: _Module,
    ctx: _Ctx,
    hosts: int,
    local: int,
    pos: np.ndarray,
    count_loop_trips: bool,
    program: list | None = None,
) -> Collective:
    n = hosts * local
    kind = _collective_kind(ins.opcode)
    is_async = ctx.is_async or ins.opcode.endswith("-start")
    op_shapes = _operand_shapes(ins, module)
    if kind == "ragged-all-to-all":
        op_shapes = op_shapes[:1]  # input buffer; the rest are output/offsets
    res_shapes = _array_shapes(ins.type_str)
    compiled_dtypes = sorted({dt for dt, _ in op_shapes}) or sorted({dt for dt, _ in res_shapes})
    if program:
        want = _program_dtype(kind, _groups_key(ins, kind, n), _elements(op_shapes), program)
        if want is not None and [want] != compiled_dtypes:
            op_shapes = [(want, s) for _, s in op_shapes]
            res_shapes = [(want if dt in compiled_dtypes else dt, s) for dt, s in res_shapes]
    x = _bytes_of(op_shapes)
    host_of = pos // local  # partition id -> host

    cross = np.zeros(n)
    intra = np.zeros(n)

    def check(ids: Iterable[int]):
        for i in ids:
            if not 0 <= i < n:
                raise ValueError(
                    f"{ins.name}: device id {i} outside the {hosts}x{local} mesh "
                    "(is the mesh passed the one the program was compiled for?)"
                )

    if kind == "collective-permute":
        pairs = [tuple(p) for p in (_ints(g) for g in re.findall(
            r"\{([^{}]*)\}", (_attr_value(ins.attrs, "source_target_pairs") or "{}")[1:-1]))]
        pairs = [p for p in pairs if len(p) == 2]
        check(i for p in pairs for i in p)
        for s, t in pairs:
            if s == t:
                continue
            if host_of[s] == host_of[t]:
                intra[pos[t]] += x
            else:
                cross[pos[t]] += x
        groups = pairs
        gsize = 2 if pairs else 1
        ngroups = len(pairs)
    else:
        groups = parse_replica_groups(_attr_value(ins.attrs, "replica_groups"), n)
        check(i for g in groups for i in g)
        gsize = max((len(g) for g in groups), default=1)
        ngroups = len(groups)
        for g in groups:
            size = len(g)
            if size <= 1:
                continue
            if kind in ("all-to-all", "ragged-all-to-all", "reduce-scatter"):
                per_peer = x / size
            elif kind == "all-gather":
                per_peer = x
            elif kind == "all-reduce":
                per_peer = 2 * x / size
            elif kind == "collective-broadcast":
                per_peer = None
            else:  # pragma: no cover
                raise AssertionError(kind)
            hs = host_of[np.asarray(g)]
            if per_peer is None:  # broadcast from g[0]
                for d, h in zip(g[1:], hs[1:]):
                    if h == hs[0]:
                        intra[pos[d]] += x
                    else:
                        cross[pos[d]] += x
                continue
            for d, h in zip(g, hs):
                same = int(np.sum(hs == h)) - 1
                other = size - 1 - same
                intra[pos[d]] += per_peer * same
                cross[pos[d]] += per_peer * other

    mult = 1
    if count_loop_trips and ctx.in_while and ctx.trip_count is not None:
        mult = ctx.trip_count
    dtypes = sorted({dt for dt, _ in op_shapes}) or sorted({dt for dt, _ in res_shapes})
    compiled_dtype = "" if dtypes == compiled_dtypes else ",".join(compiled_dtypes)
    return Collective(
        kind=kind,
        name=ins.name,
        computation=ins.computation,
        operand_shapes=tuple(_shape_str(*s) for s in op_shapes),
        result_shapes=tuple(_shape_str(*s) for s in res_shapes),
        dtype=",".join(dtypes),
        operand_bytes=x,
        result_bytes=_bytes_of(res_shapes),
        group_size=gsize,
        num_groups=ngroups,
        groups=tuple(tuple(int(i) for i in g) for g in groups),
        cross_host_bytes=_num(cross.sum()),
        intra_host_bytes=_num(intra.sum()),
        device_cross_host_bytes=tuple(_num(v) for v in cross),
        device_intra_host_bytes=tuple(_num(v) for v in intra),
        is_async=is_async,
        in_while=ctx.in_while,
        in_conditional=ctx.in_conditional,
        trip_count=ctx.trip_count if ctx.in_while else None,
        multiplicity=mult,
        upper_bound=(kind == "ragged-all-to-all"),
        compiled_dtype=compiled_dtype,
    )


# --------------------------------------------------------------------------
# Program (unoptimized) element types
# --------------------------------------------------------------------------


def _elements(shapes) -> int:
    return int(sum(int(np.prod(s, dtype=np.int64)) for _, s in shapes))


def _groups_key(ins: _Instr, kind: str, n: int):
    if kind == "collective-permute":
        v = _attr_value(ins.attrs, "source_target_pairs") or "{}"
        return frozenset(tuple(_ints(g)) for g in re.findall(r"\{([^{}]*)\}", v[1:-1]))
    try:
        groups = parse_replica_groups(_attr_value(ins.attrs, "replica_groups"), n)
    except ValueError:
        return None
    return frozenset(frozenset(g) for g in groups)


def _program_collectives(text: str, n: int) -> list[list]:
    """[kind, groups key, elements, dtype, used] of the unoptimized program."""
    try:
        module = _parse_module(text)
        out = []
        for ins, _ in _walk(module):
            kind = _collective_kind(ins.opcode)
            shapes = _operand_shapes(ins, module)
            if kind == "ragged-all-to-all":
                shapes = shapes[:1]
            dts = {dt for dt, _ in shapes}
            if len(dts) != 1:
                continue
            out.append([kind, _groups_key(ins, kind, n), _elements(shapes), dts.pop(), False])
        return out
    except Exception:  # the program text is only a hint: never fail on it
        return []


def _program_dtype(kind, groups, elements, program) -> str | None:
    for entry in program:
        if not entry[4] and entry[0] == kind and entry[1] == groups and entry[2] == elements:
            entry[4] = True
            return entry[3]
    return None
