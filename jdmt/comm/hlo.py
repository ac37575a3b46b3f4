"""Reading compiled (or unoptimized) HLO text: the parts `jdmt.comm` needs.

A small regex/bracket parser, not a full HLO grammar. It gives:

- `_parse_module(text)`: computations, their instructions (name, result
  type, opcode, operands, attribute text) and the ENTRY computation.
- `_walk(module)`: every collective reachable from ENTRY through the call
  graph (fusions, calls, conditionals, async wrappers, while bodies), once
  per call site, with its context (`_Ctx`: async, inside a while loop and
  its known trip count, inside a conditional branch). Async pairs are found
  once, at the start.
- Shapes and bytes: `_array_shapes`, `_operand_shapes`, `_bytes_of` (bytes
  per element from `_DTYPE_BYTES`).
- Replica groups: `parse_replica_groups` reads every form XLA prints
  (explicit, empty, iota, mesh axes with device ids and sub-axes) into
  lists of partition ids.

What is counted, and how, is in `jdmt.comm.report`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence

import numpy as np

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

