"""Plan files: a sharding plan on disk, checked against the model, the mesh
and the memory budget when it is read back (`train.py --plan=PATH`,
`python -m jdmt.planner --out PATH`)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from typing import Any

from jdmt.data.specs import FeatureSet
from jdmt.embeddings.layout import Layout
from jdmt.embeddings.types import Placement, SparseOptimizer, check_plan
from jdmt.mesh import MeshError, parse_mesh_spec
from jdmt.planner.search import Plan

PLAN_FORMAT = 1


class PlanFileError(ValueError):
    """A plan file that is malformed, or whose plan does not fit the model, the
    mesh or the memory budget; the message names the file and the cause."""


@dataclasses.dataclass(frozen=True)
class PlanFile:
    """A sharding plan as a file: what `train.py --plan=PATH` reads (or
    writes, when PATH does not exist) and `python -m jdmt.planner --out`
    writes.

    The JSON: `{"format": 1, "mesh": "HxL", "global_batch": B, "placements":
    {name: Placement.to_json()}, "report": Plan.report() or null}`, the
    report being the planner's account when the plan came from `auto_plan`.

    Attributes:
      placements: `{feature name: Placement}`.
      hosts, local: the mesh shape the plan is for.
      global_batch: the global batch it was made for.
      report: the planner's `Plan.report()`, or None.
      source: what error messages call the plan (`'plan PATH'` once read).
    """

    placements: dict[str, Placement]
    hosts: int
    local: int
    global_batch: int
    report: dict[str, Any] | None = None
    source: str = dataclasses.field(default="plan", compare=False)

    @classmethod
    def from_plan(cls, plan: Plan) -> PlanFile:
        """The file of an `auto_plan` result, its report included."""
        pr = plan.problem
        return cls(dict(plan.placements), pr.hosts, pr.local, pr.global_batch, plan.report())

    @property
    def memory_budget(self) -> float | None:
        """Bytes per device the planner was given (None: not a planner's plan)."""
        problem = (self.report or {}).get("problem")
        budget = problem.get("memory_budget_bytes") if isinstance(problem, dict) else None
        return float(budget) if isinstance(budget, (int, float)) else None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "mesh": f"{self.hosts}x{self.local}",
            "global_batch": self.global_batch,
            "placements": {name: p.to_json() for name, p in self.placements.items()},
            "report": self.report,
        }

    @classmethod
    def from_json(cls, obj: Any, source: str = "plan") -> PlanFile:
        """Parse `to_json`'s output.

        Raises:
          PlanFileError: a field is missing or malformed (the message names it).
        """
        if not isinstance(obj, dict):
            raise PlanFileError(f"{source}: expected a JSON object, got {type(obj).__name__}")
        if obj.get("format") != PLAN_FORMAT:
            raise PlanFileError(
                f"{source}: format {obj.get('format')!r} is not one this version reads ({PLAN_FORMAT})"
            )
        mesh = obj.get("mesh")
        if not isinstance(mesh, str):
            raise PlanFileError(f"{source}: 'mesh' must be a string 'HxL', got {mesh!r}")
        try:
            hosts, local = parse_mesh_spec(mesh)
        except MeshError as e:
            raise PlanFileError(f"{source}: {e}") from None
        batch = obj.get("global_batch")
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise PlanFileError(f"{source}: 'global_batch' must be a positive integer, got {batch!r}")
        raw = obj.get("placements")
        if not isinstance(raw, dict):
            raise PlanFileError(f"{source}: 'placements' must be an object {{table: placement}}")
        placements = {}
        for name, p in raw.items():
            try:
                placements[name] = Placement.from_json(p)
            except KeyError as e:
                raise PlanFileError(
                    f"{source}: table {name!r}: placement {p!r} has no {e.args[0]!r}") from None
            except (TypeError, ValueError) as e:
                raise PlanFileError(f"{source}: table {name!r}: bad placement {p!r}: {e}") from None
        report = obj.get("report")
        if report is not None and not isinstance(report, dict):
            raise PlanFileError(f"{source}: 'report' must be an object or null")
        return cls(placements, hosts, local, batch, report, source)

    def dumps(self) -> str:
        """The JSON text, indented, each list of numbers (a placement's
        devices) on one line."""
        text = json.dumps(self.to_json(), indent=1)
        return re.sub(r"\[\n[-+.\deE,\s]+\]", lambda m: json.dumps(json.loads(m.group())), text) + "\n"

    def write(self, path: str | os.PathLike) -> None:
        """Write the JSON to `path` atomically: into a temporary file in the
        same directory, then renamed over `path`."""
        path = os.fspath(path)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                       dir=os.path.dirname(os.path.abspath(path)))
        except OSError as e:
            raise OSError(e.errno, f"cannot write the plan file {path}: {e.strerror}") from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.dumps())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def read(cls, path: str | os.PathLike) -> PlanFile:
        """Read a plan file.

        Raises:
          OSError: it cannot be read.
          PlanFileError: it is not JSON, or not a plan.
        """
        source = f"plan {os.fspath(path)}"
        with open(path) as f:
            try:
                obj = json.load(f)
            except json.JSONDecodeError as e:
                raise PlanFileError(f"{source} is not JSON: {e}") from None
        return cls.from_json(obj, source)

    def check(
        self,
        features: FeatureSet,
        hosts: int,
        local: int,
        optimizer: SparseOptimizer = SparseOptimizer(),
        memory_budget: float | None = None,
    ) -> None:
        """Raise `PlanFileError` unless the plan places exactly the tables of
        `features`, validly, on an `hosts` x `local` mesh, within the budget.

        Args:
          features: the model's features.
          hosts, local: the run's mesh shape.
          optimizer: the run's sparse optimizer (its state takes memory).
          memory_budget: bytes of tables and optimizer state allowed per
            device, as `Layout` allocates them; None: the budget the planner
            was given (`self.memory_budget`), unchecked when that is unknown.
        """
        names = set(features.names)
        extra = [n for n in self.placements if n not in names]
        if extra:
            raise PlanFileError(f"{self.source} places tables this model does not have: {extra}")
        missing = [n for n in features.names if n not in self.placements]
        if missing:
            raise PlanFileError(f"{self.source} misses tables of this model: {missing}")
        if (self.hosts, self.local) != (hosts, local):
            raise PlanFileError(
                f"{self.source} was made for mesh {self.hosts}x{self.local}; this run's mesh is "
                f"{hosts}x{local}"
            )
        try:
            check_plan(features, self.placements, hosts * local, local)
        except ValueError as e:
            raise PlanFileError(f"{self.source} is invalid on mesh {hosts}x{local}: {e}") from None
        budget = self.memory_budget if memory_budget is None else memory_budget
        if budget is not None:
            need = Layout(features, self.placements, hosts, local).memory(optimizer).per_device_allocated
            if need > budget:
                raise PlanFileError(
                    f"{self.source} needs {need / 2**30:.4g} GiB per device for the tables and "
                    f"their {optimizer.kind.value} state, over the memory budget of "
                    f"{budget / 2**30:.4g} GiB per device"
                )

    def differences(self, features: FeatureSet, global_batch: int) -> list[str]:
        """What differs from what the plan was made for without making it
        invalid (its cost estimates assume the originals): the global batch,
        and the tables' rows or widths where the report records them."""
        out = []
        if global_batch != self.global_batch:
            out.append(f"global batch {self.global_batch} (this run: {global_batch})")
        tables = (self.report or {}).get("tables")
        tables = tables if isinstance(tables, dict) else {}
        resized = [
            f"{f.name} {t.get('rows')}x{t.get('dim')}" for f in features.sparse
            if isinstance(t := tables.get(f.name), dict) and (t.get("rows"), t.get("dim")) != (f.rows, f.dim)
        ]
        if resized:
            more = f" and {len(resized) - 3} more" if len(resized) > 3 else ""
            out.append(f"tables of other sizes: {', '.join(resized[:3])}{more}")
        return out


__all__ = ["PLAN_FORMAT", "PlanFile", "PlanFileError"]
