"""`python -m jdmt.planner`: plan the sharding of a feature preset on a mesh
without training; print the plan and write the plan file `train.py --plan` loads.

    python -m jdmt.planner --features mlperf --mesh 8x8 --global-batch 65536 --out plan.json
    python train.py --data=mlperf --mesh=8x8 --batch-size=65536 --plan=plan.json

The features are the ones `train.py` builds from the same settings
(`--data=synthetic|mlperf`, `--rows-per-table` for mlperf, `--embedding-dim`,
`--sequence-features`, `--sequence-len`), and the plan is the one
`--sharding=auto` makes: `auto_plan` with the analytic cost model, bags
holding the synthetic data's mean share of their cap, on a `Topology` of the
mesh shape. Exit status: 0, 2 for bad flags, 1 when no plan fits the budget
or the file cannot be written.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Sequence

from jdmt.data.presets import mlperf_dcnv2_features, synthetic_default_features
from jdmt.data.specs import FeatureSet
from jdmt.embeddings.types import OptimizerKind
from jdmt.mesh import MeshError, parse_mesh_spec
from jdmt.planner.cost import DEFAULT_MEMORY_BUDGET, AnalyticCostModel
from jdmt.planner.planfile import PlanFile
from jdmt.planner.search import Plan, PlanningError, auto_plan, pooling_from_fraction

MEAN_LEN_FRAC = 0.5
"""Mean ids per bag over its cap in `SyntheticData` (its default
`mean_len_frac`), which `train.py --sharding=auto` plans with."""

MLPERF_MAX_ROWS = 100_000
"""Default row cap of the MLPerf tables: `train.py --data=mlperf`'s."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line naming the problem (no usage block), exit status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _mesh(text: str) -> tuple[int, int]:
    try:
        return parse_mesh_spec(text)
    except MeshError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _number(cast, least: float, what: str, strict: bool = False):
    """An argparse type: a finite `cast` number of at least `least` (above it, `strict`)."""

    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(v) or v < least or (strict and v == least):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m jdmt.planner",
        description="Plan the sharding of a feature preset on a mesh without training; print "
        "the plan and write the plan file that train.py --plan=PATH loads.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--features", choices=("synthetic", "mlperf"), default="synthetic",
                   help="feature preset: train.py's default synthetic set, or the 26 MLPerf "
                   "DLRM-DCNv2 tables (train.py --data=mlperf)")
    p.add_argument("--mlperf-max-rows", metavar="N", type=_number(int, 0, "an integer >= 0"),
                   default=MLPERF_MAX_ROWS,
                   help="mlperf: cap on each table's rows (train.py's --rows-per-table); 0: "
                   "MLPerf's full sizes (five tables of 40M rows)")
    p.add_argument("--embedding-dim", metavar="D", type=_number(int, 1, "a positive integer"), default=16,
                   help="width of every table (train.py's --embedding-dim)")
    p.add_argument("--sequence-features", metavar="N", type=_number(int, 0, "an integer >= 0"), default=0,
                   help="synthetic: sequence features appended to the set (train.py's)")
    p.add_argument("--sequence-len", metavar="S", type=_number(int, 1, "a positive integer"), default=20,
                   help="synthetic: positions of every sequence feature")
    p.add_argument("--mesh", metavar="HxL", type=_mesh, required=True,
                   help="device mesh HOSTSxLOCAL, e.g. 8x8 (8 hosts of 8 devices)")
    p.add_argument("--global-batch", metavar="B", type=_number(int, 1, "a positive integer"), required=True,
                   help="examples per step over all devices (train.py's --batch-size)")
    p.add_argument("--optimizer", choices=[k.value for k in OptimizerKind],
                   default=OptimizerKind.ROWWISE_ADAGRAD.value,
                   help="the tables' sparse optimizer, whose state takes memory "
                   "(train.py's --embedding-optimizer)")
    p.add_argument("--memory-budget-gib", metavar="GIB", default=DEFAULT_MEMORY_BUDGET / 2**30,
                   type=_number(float, 0, "a positive number", strict=True),
                   help="tables and optimizer state allowed per device, GiB")
    p.add_argument("--row-dedup", choices=("host", "device"), default="host",
                   help="route of row-wise tables the cost model assumes (train.py's --row-dedup)")
    p.add_argument("--memory-slack", metavar="F", type=_number(float, 0, "a number >= 0"), default=0.02,
                   help="after the search, move tables where that lowers the memory allocated "
                   "over all devices while the estimated step stays within this fraction of "
                   "the searched plan's (default 0.02, train.py's; 0: off)")
    p.add_argument("--cost-model", metavar="PATH", default=None,
                   help="plan with the learned planner and this fitted cost model "
                   "(python -m jdmt.planner.neural) instead of the analytic search")
    p.add_argument("--alpha", type=_number(float, 0, "a number >= 0"), default=1.05,
                   help="--cost-model: Zipf exponent of the ids (train.py's synthetic data: 1.05)")
    p.add_argument("--out", metavar="PATH", default=None,
                   help="write the plan file here (atomically), for train.py --plan=PATH")
    return p


def preset_features(args: argparse.Namespace) -> FeatureSet:
    """The feature set `train.py` builds for the same preset and sizes."""
    if args.features == "mlperf":
        if args.sequence_features:
            raise ValueError("--sequence-features extend the synthetic set only")
        return mlperf_dcnv2_features(max_rows=args.mlperf_max_rows or None, dim=args.embedding_dim)
    return synthetic_default_features(dim=args.embedding_dim, num_sequence=args.sequence_features,
                                      sequence_len=args.sequence_len)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    hosts, local = args.mesh
    n = hosts * local
    if args.global_batch % n:
        parser.error(f"--global-batch {args.global_batch} is not divisible by the {n} devices of "
                     f"mesh {hosts}x{local}")
    if args.out is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        parser.error(f"--out {args.out}: its directory does not exist")
    try:
        features = preset_features(args)
    except ValueError as e:
        parser.error(str(e))
    pooling = pooling_from_fraction(features, MEAN_LEN_FRAC)
    try:
        if args.cost_model is not None:
            plan, note = _learned(args, features, pooling)
        else:
            plan, note = auto_plan(
                features, hosts, local, args.global_batch, optimizer=args.optimizer,
                memory_budget=args.memory_budget_gib * 2**30,
                cost_model=AnalyticCostModel(row_dedup=args.row_dedup), pooling=pooling,
                memory_slack=args.memory_slack,
            ), None
    except (PlanningError, ValueError, OSError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    if args.out is not None:  # before printing: a closed pipe must not lose the file
        try:
            PlanFile.from_plan(plan).write(args.out)
        except OSError as e:
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
            return 1
    print(plan.summary())
    if note:
        print(note)
    print(plan.table())
    if args.out is not None:
        print(f"wrote {args.out}")
    return 0


def _learned(args, features: FeatureSet, pooling) -> tuple[Plan, str]:
    """The learned planner's plan (`learned.learned_auto_plan`) and a line on it."""
    from jdmt.embeddings.types import SparseOptimizer
    from jdmt.planner.learned import learned_auto_plan, learned_note
    from jdmt.planner.neural import NeuralCostModel

    hosts, local = args.mesh
    plan = learned_auto_plan(
        features, hosts, local, args.global_batch, NeuralCostModel.load(args.cost_model),
        optimizer=SparseOptimizer(kind=OptimizerKind(args.optimizer)),
        memory_budget=args.memory_budget_gib * 2**30, pooling=pooling, alpha=args.alpha,
        analytic=AnalyticCostModel(row_dedup=args.row_dedup))
    return plan, learned_note(plan, args.cost_model)


if __name__ == "__main__":
    sys.exit(main())
