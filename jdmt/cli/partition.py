"""`python -m jdmt.cli.partition` (or `jdmt-partition`): a flat checkpoint
in, a tower partition file out.

    python -m jdmt.cli.partition --checkpoint-dir ck --towers 4 --mesh 2x4 \
        --out partition.json [--method learned|random|round_robin]

The partition file is what `train.py --tower-partitioner=PATH.json` reads.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from jdmt.towers.partition import COSTS, METHODS, feature_costs
from jdmt.train.interactions import (
    MEASURES,
    mean_lengths_from_trainer,
    partition_from_trainer,
    restore_trainer,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jdmt-partition",
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
    p.add_argument("--cost", choices=COSTS, default="mixed",
                   help="what the hosts balance (learned and balanced): work (lookups x dim), "
                   "bytes (tables and optimizer state) or mixed (a feature's share of both)")
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
