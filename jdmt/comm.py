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

from jdmt.mesh import HOST, LOCAL, Topology, parse_mesh_spec

__all__ = [
    "Collective",
    "CommReport",
    "comm_report",
    "comm_report_compiled",
    "comm_report_from_text",
    "parse_replica_groups",
]

# Bytes per element, by HLO primitive type.
_DTYPE_BYTES = {
    "pred": 1, "s1": 0.125, "u1": 0.125, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5,
    "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
    "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
    "f4e2m1fn": 0.5, "f8e8m0fnu": 1, "f8e4m3": 1, "f8e4m3fn": 1, "f8e4m3b11fnuz": 1,
    "f8e4m3fnuz": 1, "f8e5m2": 1, "f8e5m2fnuz": 1, "f8e3m4": 1,
    "token": 0, "opaque": 0,
}

_KINDS = (
    "all-to-all", "all-gather", "reduce-scatter", "all-reduce",
    "collective-permute", "collective-broadcast", "ragged-all-to-all",
)
_START = {"all-gather-start": "all-gather", "all-reduce-start": "all-reduce",
          "collective-permute-start": "collective-permute"}

_ARRAY_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,\s]*)\]")
_COMMENT = re.compile(r"/\*.*?\*/")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
# `%name (params) -> type {` (compiled) or `name {` (unoptimized HLO).
_COMP_HEADER = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\b[^=]*\{\s*$")
_OPCODE = re.compile(r"\s*([a-z][a-z0-9\-]*)\(")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)"?')


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
# HLO text parsing
# --------------------------------------------------------------------------


@dataclasses.dataclass
class _Instr:
    name: str
    computation: str
    type_str: str
    opcode: str
    operands: list[str]
    attrs: str


@dataclasses.dataclass
class _Module:
    computations: dict[str, list[_Instr]]
    entry: str | None
    types: dict[str, str]  # instruction name -> result type string


def _matching(s: str, i: int) -> int:
    """Index of the bracket closing s[i] (quote-aware)."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = [pairs[s[i]]]
    j = i + 1
    quote = False
    while j < len(s):
        ch = s[j]
        if quote:
            if ch == "\\":
                j += 1
            elif ch == '"':
                quote = False
        elif ch == '"':
            quote = True
        elif ch in pairs:
            stack.append(pairs[ch])
        elif ch == stack[-1]:
            stack.pop()
            if not stack:
                return j
        j += 1
    raise ValueError(f"unbalanced brackets in HLO: {s[i:i + 80]!r}")


def _split_top(s: str, sep: str = ",") -> list[str]:
    out, depth, start, quote = [], 0, 0, False
    for j, ch in enumerate(s):
        if quote:
            if ch == '"':
                quote = False
            continue
        if ch == '"':
            quote = True
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            out.append(s[start:j])
            start = j + 1
    out.append(s[start:])
    return [p.strip() for p in out if p.strip()]


def _parse_instr(line: str, computation: str) -> _Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    name, rest = m.group(1), m.group(2).lstrip()
    if not rest:
        return None
    if rest[0] == "(":
        end = _matching(rest, 0)
        type_str, rest = rest[: end + 1], rest[end + 1 :]
    else:
        parts = rest.split(None, 1)
        if len(parts) < 2:
            return None
        type_str, rest = parts
    om = _OPCODE.match(rest)
    if not om:
        return None
    opcode = om.group(1)
    open_i = om.end() - 1
    close_i = _matching(rest, open_i)
    operands = _split_top(rest[open_i + 1 : close_i])
    attrs = rest[close_i + 1 :]
    return _Instr(name, computation, type_str, opcode, operands, attrs)


def _parse_module(text: str) -> _Module:
    comps: dict[str, list[_Instr]] = {}
    types: dict[str, str] = {}
    entry = None
    current = None
    for raw in text.splitlines():
        line = _COMMENT.sub("", raw).rstrip()
        if not line.strip():
            continue
        if current is None:
            h = _COMP_HEADER.match(line)
            if h:
                current = h.group(2)
                comps[current] = []
                if h.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        ins = _parse_instr(line, current)
        if ins is not None:
            comps[current].append(ins)
            types[ins.name] = ins.type_str
    return _Module(comps, entry, types)


def _attr_value(attrs: str, key: str) -> str | None:
    """The raw value of `key=...` in an attribute list (balanced brackets)."""
    for m in re.finditer(r"(?:^|[\s,])" + re.escape(key) + r"=", attrs):
        i = m.end()
        if i >= len(attrs):
            return ""
        if attrs[i] in "{([":
            # iota/mesh replica groups may continue after the first bracket
            end = _matching(attrs, i)
            return attrs[i : end + 1] + _tail_for_groups(attrs, end + 1, key)
        j = i
        while j < len(attrs) and attrs[j] not in ", ":
            if attrs[j] in "{([":
                j = _matching(attrs, j)
            j += 1
        val = attrs[i:j]
        if key == "replica_groups" and val.startswith("mesh"):
            return val + _tail_for_groups(attrs, j, key)
        return val
    return None


def _tail_for_groups(attrs: str, j: int, key: str) -> str:
    """Rest of an iota (`[2,4]<=[8]T(1,0)`) or mesh-axes replica group value."""
    if key != "replica_groups":
        return ""
    m = re.match(r"<=\[[\d,\s]*\](?:T\([\d,\s]*\))?", attrs[j:])
    if m:
        return m.group(0)
    # mesh[...], device_ids=(...) {axes}
    out = ""
    m = re.match(r",\s*device_ids=", attrs[j:])
    if m:
        k = j + m.end()
        if k < len(attrs) and attrs[k] == "(":
            end = _matching(attrs, k)
            out += attrs[j : end + 1]
            j = end + 1
    m = re.match(r"\s*\{", attrs[j:])
    if m:
        k = j + m.end() - 1
        end = _matching(attrs, k)
        out += attrs[j : end + 1]
    return out


def _called(ins: _Instr) -> list[tuple[str, str]]:
    """(role, computation) pairs called by an instruction."""
    out: list[tuple[str, str]] = []
    attrs = ins.attrs
    for key in ("calls", "to_apply", "body", "condition", "true_computation", "false_computation"):
        v = _attr_value(attrs, key)
        if v:
            for name in re.findall(r"%?([\w.\-]+)", v):
                out.append((key, name))
    for key in ("branch_computations", "called_computations"):
        v = _attr_value(attrs, key)
        if v:
            for name in re.findall(r"%([\w.\-]+)", v) or re.findall(r"([\w.\-]+)", v):
                out.append((key, name))
    return out


@dataclasses.dataclass(frozen=True)
class _Ctx:
    is_async: bool = False
    in_while: bool = False
    in_conditional: bool = False
    trip_count: int | None = 1


def _collective_kind(opcode: str) -> str | None:
    if opcode in _KINDS:
        return opcode
    return _START.get(opcode)


def _walk(module: _Module) -> list[tuple[_Instr, _Ctx]]:
    """Collectives reachable from ENTRY, once per call site, with context."""
    found: list[tuple[_Instr, _Ctx]] = []
    visited: set[str] = set()
    calls_of: dict[int, list[tuple[str, str]]] = {}
    reaches: dict[str, bool] = {}

    def called(ins):
        if id(ins) not in calls_of:
            calls_of[id(ins)] = _called(ins)
        return calls_of[id(ins)]

    def has_collective(comp: str, stack: tuple[str, ...] = ()) -> bool:
        # whether a collective is reachable from `comp` (memoised: fusions and
        # reducers called from thousands of sites are read once)
        if comp in reaches:
            return reaches[comp]
        if comp not in module.computations or comp in stack:
            return False
        out = False
        for ins in module.computations[comp]:
            if _collective_kind(ins.opcode):
                out = True
                break
            if any(has_collective(c, stack + (comp,)) for _, c in called(ins)):
                out = True
                break
        reaches[comp] = out
        return out

    def visit(comp: str, ctx: _Ctx, stack: tuple[str, ...]):
        if comp not in module.computations or comp in stack:
            return
        visited.add(comp)
        if not has_collective(comp):
            return
        for ins in module.computations[comp]:
            if _collective_kind(ins.opcode):
                found.append((ins, ctx))
                continue
            if ins.opcode in ("async-update", "async-done") or ins.opcode.endswith("-done"):
                continue  # the matching start was counted
            calls = called(ins)
            if not calls:
                continue
            if ins.opcode == "while":
                m = _TRIP.search(ins.attrs)
                trip = None if (m is None or ctx.trip_count is None) else ctx.trip_count * int(m.group(1))
                sub = dataclasses.replace(ctx, in_while=True, trip_count=trip)
            elif ins.opcode == "conditional":
                sub = dataclasses.replace(ctx, in_conditional=True)
            elif ins.opcode == "async-start":
                sub = dataclasses.replace(ctx, is_async=True)
            else:
                sub = ctx
            for _, callee in calls:
                visit(callee, sub, stack + (comp,))

    if module.entry is not None:
        visit(module.entry, _Ctx(), ())
    # Anything not reachable from ENTRY (should not happen): count once.
    for comp, instrs in module.computations.items():
        if comp not in visited:
            for ins in instrs:
                if _collective_kind(ins.opcode):
                    found.append((ins, _Ctx()))
    return found


# --------------------------------------------------------------------------
# Shapes and bytes
# --------------------------------------------------------------------------


def _array_shapes(type_str: str) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for dt, dims in _ARRAY_SHAPE.findall(type_str):
        if dt not in _DTYPE_BYTES:
            continue
        shape = tuple(int(d) for d in dims.replace(" ", "").split(",") if d)
        out.append((dt, shape))
    return out


def _bytes_of(shapes: Iterable[tuple[str, tuple[int, ...]]]) -> float:
    total = 0.0
    for dt, shape in shapes:
        total += _DTYPE_BYTES[dt] * float(np.prod(shape, dtype=np.float64))
    return _num(total)


def _shape_str(dt: str, shape: tuple[int, ...]) -> str:
    return f"{dt}[{','.join(map(str, shape))}]"


def _operand_shapes(ins: _Instr, module: _Module) -> list[tuple[str, tuple[int, ...]]]:
    shapes = []
    for op in ins.operands:
        inline = _array_shapes(op.split("%")[0]) if "%" in op else []
        if inline:
            shapes.extend(inline)
            continue
        name = op.split()[-1].lstrip("%")
        t = module.types.get(name)
        if t is None:
            raise ValueError(f"operand {op!r} of {ins.name} has no known shape")
        shapes.extend(_array_shapes(t))
    return shapes


def _num(x):
    x = float(x)
    return int(x) if x.is_integer() else x


def _fmt_bytes(b: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(b) >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:g} B"


# --------------------------------------------------------------------------
# Replica groups
# --------------------------------------------------------------------------


def _ints(s: str) -> list[int]:
    return [int(v) for v in re.findall(r"-?\d+", s)]


def _iota(reshape: Sequence[int], perm: Sequence[int] | None) -> np.ndarray:
    a = np.arange(int(np.prod(reshape))).reshape(reshape)
    if perm:
        a = a.transpose(perm)
    return a.reshape(-1)


def _parse_device_ids(s: str, n: int) -> np.ndarray:
    s = s.strip()
    m = re.fullmatch(r"\[([\d,\s]+)\](?:T\(([\d,\s]+)\))?", s)
    if m:
        dims = _ints(m.group(1))
        if int(np.prod(dims)) == n:
            perm = _ints(m.group(2)) if m.group(2) else None
            return _iota(dims, perm)
    vals = _ints(s)
    if len(vals) > n:
        vals = vals[-n:]  # a printed '[dims]' prefix
    if sorted(vals) != list(range(n)):
        raise ValueError(f"cannot parse mesh device_ids {s!r} for {n} devices")
    return np.asarray(vals)


def parse_replica_groups(value: str | None, num_devices: int) -> list[list[int]]:
    """Replica groups of an HLO attribute value, as lists of partition ids.

    Forms: explicit `{{0,1},{2,3}}`; empty `{}` (all devices); iota
    `[G,S]<=[dims]T(perm)`; mesh axes `mesh['a'=2,'b'=4] {'b'}`, optionally
    with `, device_ids=(...)` and sub-axes `'a':(pre)size`.
    """
    n = num_devices
    if value is None:
        return [list(range(n))]
    v = value.strip()
    if v.startswith("{"):
        inner = v[1:-1].strip()
        if not inner:
            return [list(range(n))]
        groups = [_ints(g) for g in re.findall(r"\{([^{}]*)\}", inner)]
        groups = [g for g in groups if g] or [list(range(n))]
        return groups
    m = re.fullmatch(r"\[([\d,\s]+)\]<=\[([\d,\s]+)\](?:T\(([\d,\s]+)\))?", v)
    if m:
        gdims = _ints(m.group(1))
        ids = _iota(_ints(m.group(2)), _ints(m.group(3)) if m.group(3) else None)
        if len(gdims) != 2:
            raise ValueError(f"iota replica groups must be [groups,size]: {v!r}")
        return ids.reshape(gdims).tolist()
    if v.startswith("mesh"):
        return _mesh_axes_groups(v, n)
    raise ValueError(f"unrecognised replica_groups {value!r}")


def _mesh_axes_groups(v: str, n: int) -> list[list[int]]:
    m = re.match(r"mesh\[([^\]]*)\]", v)
    if not m:
        raise ValueError(f"unrecognised mesh replica groups {v!r}")
    names, sizes = [], []
    for part in _split_top(m.group(1)):
        name, size = part.rsplit("=", 1)
        names.append(name.strip().strip("'\""))
        sizes.append(int(size))
    rest = v[m.end():]
    total = int(np.prod(sizes))
    if total != n:
        raise ValueError(f"mesh replica groups over {total} devices, expected {n}: {v!r}")
    dm = re.match(r"\s*,\s*device_ids=\(", rest)
    if dm:
        k = dm.end() - 1
        end = _matching(rest, k)
        dev = _parse_device_ids(rest[k + 1 : end], n)
        rest = rest[end + 1 :]
    else:
        dev = np.arange(n)
    am = re.search(r"\{([^{}]*)\}", rest)
    axes = _split_top(am.group(1)) if am else []
    # Coordinates of each mesh position; a group = positions that agree on
    # everything except the grouped (sub-)axes.
    coords = np.stack(np.unravel_index(np.arange(n), sizes), axis=1)  # [n, ndim]
    key = coords.copy()
    for a in axes:
        am2 = re.fullmatch(r"['\"]?(.+?)['\"]?(?::\((\d+)\)(\d+))?", a.strip())
        name = am2.group(1)
        if name not in names:
            raise ValueError(f"axis {name!r} not in mesh {names} ({v!r})")
        d = names.index(name)
        if am2.group(2):
            pre, size = int(am2.group(2)), int(am2.group(3))
        else:
            pre, size = 1, sizes[d]
        # Shardy sub-axis 'a':(pre)size: the axis splits major-to-minor into
        # [pre, size, rest]; members differ only in the middle part.
        stride = sizes[d] // (pre * size)
        sub = (coords[:, d] // stride) % size
        key[:, d] -= sub * stride
    groups: dict[tuple, list[int]] = {}
    for p in range(n):
        groups.setdefault(tuple(key[p]), []).append(int(dev[p]))
    return list(groups.values())


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
