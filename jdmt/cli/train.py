"""`jdmt-train` (or `python train.py` in a checkout, or `python -m jdmt.cli.train`):
train a recommendation model on a ('host', 'local') mesh and evaluate it.

    jdmt-train --mesh=2x4                  # DLRM on synthetic data, 8 devices
    jdmt-train --mesh=2x4 --sharding=row_wise --summary-json=run.json
    jdmt-train --mesh=2x4 --sharding=auto --plan=plan.json  # writes plan.json; reruns load it

On a machine without accelerators the H*L devices are emulated on the CPU.
The last lines printed are the summary: eval AUC and logloss next to the
synthetic teacher's Bayes-optimal figures on the same evaluation set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

# Imports only: no JAX computation (and no backend) may start before prepare_devices.
from jdmt import cpu_malloc
from jdmt.embeddings import OptimizerKind, ShardingType
from jdmt.mesh import MeshError, initialize_distributed, parse_mesh_spec, prepare_devices
from jdmt.models import MODELS, SEQUENCE_POOLING
from jdmt.pallas_kernels import Kernel
from jdmt.towers.modules import TOWER_MODULES
from jdmt.towers.partition import METHODS
from jdmt.train.allreduce import DENSE_ALLREDUCE
from jdmt.train.supervisor import become_worker, is_worker, supervise
from jdmt.train import DENSE_OPTIMIZERS, TrainConfig
from jdmt.data.synthetic import TEACHERS
from jdmt.train.schedule import LR_SCHEDULES
from jdmt.train import growth_prune

SHARDINGS = (*(t.value for t in ShardingType), "auto")
EMB_OPTIMIZERS = tuple(k.value for k in OptimizerKind)
COMBINERS = ("mean", "sum")
KERNELS = tuple(k.value for k in Kernel)


def _number(cast, least: float, strict: bool, what: str):
    """An argparse type: a finite `cast` number above (or at least) `least`."""

    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(v) or (v <= least if strict else v < least):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    return parse


_positive_int = _number(int, 0, True, "a positive integer")
_nonneg_int = _number(int, 0, False, "an integer >= 0")
_positive_float = _number(float, 0, True, "a positive number")
_nonneg_float = _number(float, 0, False, "a number >= 0")


def _towers(text: str) -> int | str:
    """--towers: 'auto' or an integer >= 0."""
    return "auto" if text.strip().lower() == "auto" else _nonneg_int(text)


def _mesh(text: str) -> str:
    try:
        parse_mesh_spec(text)
    except MeshError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _data(text: str) -> str:
    if text in ("synthetic", "mlperf"):
        return text
    if text.startswith("criteo:"):
        path = text[len("criteo:"):]
        if not path:
            raise argparse.ArgumentTypeError("criteo:PATH needs a file path after 'criteo:'")
        if not os.path.isfile(path):
            raise argparse.ArgumentTypeError(f"Criteo file {path!r} does not exist")
        return text
    raise argparse.ArgumentTypeError(
        f"unknown data source {text!r}; available: synthetic, mlperf, criteo:PATH"
    )


def _plan(text: str) -> str:
    """--plan: a file to read, or one to write in an existing directory."""
    if not text:
        raise argparse.ArgumentTypeError("needs a file path")
    if not os.path.exists(text) and not os.path.isdir(os.path.dirname(os.path.abspath(text))):
        raise argparse.ArgumentTypeError(
            f"plan file {text!r} does not exist, and its directory, where it would be written, "
            "does not either")
    return text


def _partitioner(text: str) -> str:
    if text in METHODS or text.endswith(".json"):
        return text
    raise argparse.ArgumentTypeError(
        f"unknown tower partitioner {text!r}; available: {', '.join(METHODS)}, PATH.json"
    )


def _widths(text: str) -> tuple[int, ...]:
    try:
        ws = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths, got {text!r}") from None
    if any(w < 1 for w in ws):
        raise argparse.ArgumentTypeError(f"widths must be >= 1, got {text!r}")
    return ws


def _one_of(kind: str, options: tuple[str, ...]):
    def parse(text: str) -> str:
        if text not in options:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {text!r}; available: {', '.join(options)}"
            )
        return text

    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line naming the problem (no usage block), exit status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = _Parser(
        prog="train.py" if sys.argv[0].endswith("train.py") else "jdmt-train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--mesh", type=_mesh, default=d.mesh,
                   help="device mesh HOSTSxLOCAL, e.g. 2x4 (2 hosts of 4 devices); "
                   "emulated on the CPU when there is no accelerator")
    p.add_argument("--model", type=_one_of("model", MODELS), default=d.model,
                   help=f"dense model; one of: {', '.join(MODELS)}")
    p.add_argument("--data", type=_data, default=d.data,
                   help="data source; 'synthetic' is Zipf ids with a planted teacher "
                   "(26 tables, 13 dense features) whose Bayes AUC is reported; 'mlperf' is "
                   "the same teacher on the 26 MLPerf DLRM-DCNv2 tables (rows capped at "
                   "--rows-per-table, default 100000); 'criteo:PATH' reads a Criteo TSV file "
                   "(plain or gzip): its first --eval-batches x --batch-size examples are the "
                   "held-out set, training reads the rest in epochs, malformed lines are "
                   "skipped and counted (skipped_lines), categories are hashed into "
                   "--rows-per-table rows (default 100000)")
    p.add_argument("--num-tables", type=_positive_int, default=None,
                   help="synthetic data: number of tables of a uniform feature set (default 26 "
                   "when --rows-per-table or --pooling is given; else the built-in set)")
    p.add_argument("--rows-per-table", type=_positive_int, default=None,
                   help="rows of every table of the uniform set (default 10000), or the row "
                   "cap of --data=mlperf")
    p.add_argument("--pooling", type=_positive_int, default=None,
                   help="most ids per bag of every table of the uniform set (default 10)")
    p.add_argument("--sequence-features", type=_nonneg_int, default=d.sequence_features,
                   help="synthetic data: append N sequence features (item histories of "
                   "--sequence-len ids, 50000-row tables) to the default set")
    p.add_argument("--sequence-len", type=_positive_int, default=d.sequence_len,
                   help="positions of every sequence feature")
    p.add_argument("--sequence-pooling", type=_one_of("sequence pooling", SEQUENCE_POOLING),
                   default=d.sequence_pooling,
                   help="how the model pools sequence features: 'mean' (masked mean) or "
                   "'attention' (target attention queried by the bottom MLP's output)")
    p.add_argument("--steps", type=_positive_int, default=d.steps, help="training steps")
    p.add_argument("--batch-size", type=_positive_int, default=d.global_batch,
                   help="global batch (all devices together); must be divisible by H*L")
    p.add_argument("--embedding-dim", type=_positive_int, default=d.embedding_dim,
                   help="width of every embedding table (and of the bottom MLP's output)")
    p.add_argument("--sharding", type=_one_of("sharding", SHARDINGS), default=d.sharding,
                   help=f"how the tables are sharded; one of: {', '.join(SHARDINGS)} (default "
                   "%(default)s: row r of every table on device r mod N, so each device holds 1/N "
                   "of every table; auto: the planner picks a type and devices per table from its "
                   "cost model). With --towers: row_wise spreads each tower table over its host's "
                   "devices, table_wise puts it whole on one of them")
    p.add_argument("--plan", type=_plan, metavar="PATH", default=None,
                   help="a plan file (JSON): if PATH exists, shard the tables as it says "
                   "(checked against the model, the mesh and the memory budget it was planned "
                   "for; --sharding is then not used); if not, write the plan this run uses "
                   "there (whatever --sharding chose). `python -m jdmt.planner --out=PATH` "
                   "plans without training")
    p.add_argument("--cost-model", metavar="PATH", default=None,
                   help="with --sharding=auto: plan with the learned planner and this fitted cost "
                   "model (python -m jdmt.planner.neural) instead of the analytic search; "
                   "pooled features only")
    p.add_argument("--towers", type=_towers, default=d.towers,
                   help="Disaggregated Multi-Tower: group the features into N towers, each "
                   "owned by one host (tower t on host t %% H); ids and tower outputs are the "
                   "only embedding traffic across hosts. 'auto': one tower per host (or as "
                   "many as a --tower-partitioner file has). 0 (default): the flat path, "
                   "sharded as --sharding says")
    p.add_argument("--tower-module", type=_one_of("tower module", TOWER_MODULES),
                   default=d.tower_module,
                   help="each tower's dense module: identity (exactly the flat model), linear, "
                   "dot (the tower's pairwise dot products plus a projection: the DLRM "
                   "interaction inside the tower), dcn (cross layers) or mlp; all but identity "
                   "compress a tower to --tower-dim values")
    p.add_argument("--tower-dim", type=_positive_int, default=d.tower_dim,
                   help="output width C of the compressing tower modules; back at each "
                   "sample's device a per-tower projection maps it to ceil(C / embedding dim) "
                   "vectors that the model interacts like features")
    p.add_argument("--tower-partitioner", type=_partitioner, default=d.tower_partitioner,
                   help="how features are grouped into towers: balanced (default: tables by "
                   "decreasing bytes, each to the least loaded host), round_robin, random, learned "
                   "(from the flat model in --partition-checkpoint: strongly interacting "
                   "features share a tower, hosts balanced) or PATH.json (a partition written "
                   "by jdmt-partition)")
    p.add_argument("--partition-checkpoint", metavar="DIR", default=None,
                   help="a flat run's --checkpoint-dir, for --tower-partitioner=learned")
    p.add_argument("--tower-row-wise", metavar="auto|NAMES", default="",
                   help="with --sharding=table_wise and towers: tables sharded row-wise over their "
                   "host's devices anyway (the others sit table-wise on one device): 'auto' "
                   "(tables bigger than an even share of their host's tables) or comma-separated "
                   "feature names; the cross-host traffic is the same")
    p.add_argument("--kernel", type=_one_of("kernel", KERNELS), default=d.kernel,
                   help="embedding lookups and sparse updates: auto (XLA, with the C++ update "
                   "on CPU; the Pallas kernels are chosen only by name until they have been "
                   "verified on GPU and TPU hardware), pallas (Mosaic GPU needs compute "
                   "capability 9.0; on CPU interpreted: slow, for checks) or xla")
    p.add_argument("--table-dtype", type=_one_of("table dtype", ("f32", "bf16", "f16")), default=d.table_dtype,
                   help="embedding tables' storage: f32, or bf16/f16 (16-bit rows: half the table "
                   "memory and bytes per lookup; the optimizer's math and state stay f32, rows are "
                   "written back with stochastic rounding; XLA and C++ paths, not Pallas)")
    p.add_argument("--row-dedup", type=_one_of("row dedup", ("host", "device")), default=d.row_dedup,
                   help="row-wise tables: de-duplicate requests per host before they cross hosts "
                   "(host: two hops, inside the host first; applies with more than one host of "
                   "more than one device) or per device (device: ask the owners directly)")
    p.add_argument("--dense-allreduce", type=_one_of("dense all-reduce", DENSE_ALLREDUCE),
                   default=d.dense_allreduce,
                   help="how the dense gradients are summed over the devices: hierarchical (a "
                   "reduce-scatter inside each host, an all-reduce of 1/L of them across hosts, an "
                   "all-gather inside the host) or xla (the one all-reduce over all devices jit inserts)")
    p.add_argument("--malloc", type=_one_of("malloc", cpu_malloc.POLICIES), default=None,
                   help="glibc malloc settings of this process (default: JDMT_MALLOC, else auto): "
                   "auto uses one arena, no mmap and no trim when the process drives one CPU "
                   "device (XLA's per-step temporaries then stay mapped), tuned always, glibc never")
    p.add_argument("--row-tiers", type=_one_of("row tiers", ("auto", "none")), default=d.row_tiers,
                   help="flexshard tables (--sharding=flexshard): hot rows on every device, warm rows "
                   "once per host, the rest row-wise; auto sizes the tiers from the first batches' "
                   "row statistics under --memory-budget-per-device, none keeps every row cold")
    p.add_argument("--memory-budget-per-device", type=float, default=d.memory_budget,
                   help="flexshard: table memory per device the tiers may use, as a multiple of "
                   "row-wise's own footprint (default %(default)s)")
    p.add_argument("--row-tier-batches", type=int, default=d.row_tier_batches,
                   help="flexshard: global batches whose ids give the row statistics")
    p.add_argument("--embedding-optimizer", type=_one_of("embedding optimizer", EMB_OPTIMIZERS),
                   default=d.embedding_optimizer,
                   help=f"fused sparse optimizer of the tables; one of: {', '.join(EMB_OPTIMIZERS)}")
    p.add_argument("--optimizer", type=_one_of("dense optimizer", DENSE_OPTIMIZERS),
                   default=d.optimizer,
                   help=f"optax optimizer of the dense model; one of: {', '.join(DENSE_OPTIMIZERS)}")
    p.add_argument("--lr", type=_positive_float, default=d.lr,
                   help="learning rate of the dense model")
    p.add_argument("--embedding-lr", type=_positive_float, default=d.embedding_lr,
                   help="learning rate of the embedding tables")
    p.add_argument("--embedding-initial-accumulator", type=_nonneg_float,
                   default=d.embedding_initial_accumulator,
                   help="start value of the embedding Adagrad accumulators; above zero it "
                   "damps the first, noisy updates of rarely seen rows")
    p.add_argument("--teacher", type=_one_of("teacher", TEACHERS), default=d.teacher,
                   help="synthetic labels: dlrm (dot products of mean-pooled latents inside "
                   "planted groups) or deep (a random tanh network over every feature's "
                   "sum-pooled latents)")
    p.add_argument("--eval-data", metavar="PATH", default=None,
                   help="with --data=criteo:FILE: a held-out Criteo file (e.g. day_23) to "
                   "evaluate on; training then reads all of FILE (default: FILE's head is held out)")
    p.add_argument("--lr-schedule", type=_one_of("lr schedule", LR_SCHEDULES), default=d.lr_schedule,
                   help="constant, or dlrm: TorchRec's DLRM example schedule (linear warm-up, hold, "
                   "quadratic decay), scaling both --lr and --embedding-lr")
    p.add_argument("--warmup-steps", type=_nonneg_int, default=None,
                   help="dlrm schedule: warm-up steps (default: 5%% of --steps)")
    p.add_argument("--decay-start", type=_nonneg_int, default=None,
                   help="dlrm schedule: the step the decay starts (default: 60%% of --steps)")
    p.add_argument("--decay-steps", type=_nonneg_int, default=None,
                   help="dlrm schedule: steps of the decay (default: the rest of the run)")
    p.add_argument("--clip-norm", type=_positive_float, default=None,
                   help="clip the dense gradients to this global norm (default: no clipping)")
    p.add_argument("--combiner", type=_one_of("combiner", COMBINERS), default=d.combiner,
                   help="combiner of every pooled feature (default: the data preset's own: "
                   "mean for synthetic data, whose teacher averages its ids; sum for mlperf); "
                   f"one of: {', '.join(COMBINERS)}")
    p.add_argument("--weighted-features", type=int, default=d.weighted_features, metavar="N",
                   help="synthetic or mlperf data: the first N pooled features carry per-sample weights "
                   "(each bag is the sum of weight x row, combiner sum; TorchRec's weighted features; "
                   "default 0)")
    p.add_argument("--bottom-mlp", type=_widths, default=",".join(map(str, d.bottom_mlp)),
                   help="hidden widths of the bottom MLP, comma-separated "
                   "(the embedding dim is appended)")
    p.add_argument("--top-mlp", type=_widths, default=",".join(map(str, d.top_mlp)),
                   help="hidden widths of the top MLP, comma-separated (1 is appended)")
    p.add_argument("--cross-layers", type=_nonneg_int, default=d.cross_layers,
                   help="--model=dcn: low-rank cross layers")
    p.add_argument("--low-rank", type=_positive_int, default=d.low_rank,
                   help="--model=dcn: the rank of every cross layer")
    p.add_argument("--growth-prune", metavar="SCHEDULE", default=None,
                   help="alternate pruning and growth of the dense network: phases KIND:STEPS or "
                   "KIND:PERCENT%%, KIND one of dense, pruneF (remove the fraction F of the hidden "
                   "units, the DCN ranks and the Tower Modules' hidden units; smaller matrices), "
                   "grow (they return, function-preserving); e.g. "
                   "'dense:200,prune0.5:400,grow:400', or 'default' "
                   f"({growth_prune.PRESETS['default']}); a run ends full")
    p.add_argument("--eval-every", type=_nonneg_int, default=d.eval_every,
                   help="also evaluate every N steps (0: only at the end)")
    p.add_argument("--sync-every", type=_positive_int, default=d.sync_every,
                   help="fetch the loss and counters from the devices every N steps; the steps "
                   "between run without waiting for the host (1: wait for every step)")
    p.add_argument("--eval-batches", type=_positive_int, default=d.eval_batches,
                   help="held-out batches (of --batch-size examples) per evaluation")
    p.add_argument("--seed", type=_nonneg_int, default=d.seed,
                   help="seed of the initial model and of the synthetic data")
    p.add_argument("--summary-json", metavar="PATH", default=None,
                   help="also write the summary (every step's loss included) to PATH as JSON")
    p.add_argument("--metrics-dir", metavar="DIR", default=None,
                   help="write TensorBoard scalars (train loss and examples/s per step, eval "
                   "AUC/logloss) and DIR/metrics.jsonl (one JSON object per event) here")
    p.add_argument("--profile-dir", metavar="DIR", default=None,
                   help="write a jax.profiler trace of steps 2-4 (after the compiled first "
                   "one) here")
    p.add_argument("--checkpoint-dir", metavar="DIR", default=None,
                   help="write orbax checkpoints here (asynchronously): dense parameters, "
                   "tables, all optimizer state, step and data position; a new run refuses a "
                   "directory that already holds checkpoints unless --resume is given")
    p.add_argument("--checkpoint-every", type=_nonneg_int, default=d.checkpoint_every,
                   help="steps between checkpoints (0: only after the last step)")
    p.add_argument("--keep-checkpoints", type=_positive_int, default=d.keep_checkpoints,
                   help="how many of the newest checkpoints to keep")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --checkpoint-dir (any mesh or "
                   "sharding; same model and features); starts at step 0 if there is none")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    mp = p.add_argument_group(
        "multiple processes",
        "one process per host (the mesh's H): start the same command on every host with "
        "its own --process-id; on CPU each process emulates L devices and the processes "
        "talk through gloo")
    mp.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                    help="address of process 0's coordination service (all processes give "
                    "the same one)")
    mp.add_argument("--num-processes", type=_positive_int, default=1,
                    help="number of processes; must equal H of --mesh when above 1")
    mp.add_argument("--process-id", type=_nonneg_int, default=None,
                    help="this process's index in [0, --num-processes); process h owns mesh "
                    "row h")
    mp.add_argument("--peer-timeout", type=_positive_int, default=30,
                    help="seconds without a heartbeat after which a peer counts as dead and "
                    "the run stops with an error")
    return p


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB ({n:,.0f} B)"


def _check_processes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit 2 with one line if the multi-process flags do not describe a run."""
    hosts, _ = parse_mesh_spec(args.mesh)
    n = args.num_processes
    if args.coordinator is None:
        parser.error(f"--num-processes {n} needs --coordinator HOST:PORT")
    if args.process_id is None:
        parser.error("--coordinator needs --process-id")
    if args.process_id >= n:
        parser.error(f"--process-id {args.process_id} is not in [0, {n}) (--num-processes {n})")
    if n != hosts:
        parser.error(
            f"--num-processes {n} must equal the mesh's host count: --mesh {args.mesh} has "
            f"{hosts} hosts (one process per host)"
        )


def _start_processes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Join the multi-process run the flags describe (`jax.distributed`)."""
    _check_processes(parser, args)
    _, local = parse_mesh_spec(args.mesh)
    initialize_distributed(
        args.coordinator, args.num_processes, args.process_id, local_devices=local,
        heartbeat_timeout_s=args.peer_timeout,
    )


def _train(config: TrainConfig, mesh) -> dict | None:
    """Run training; on a known failure print one line naming it and return None.

    With several processes a failed collective usually means a peer died: the
    process then exits at once (`os._exit`) instead of waiting in
    `jax.distributed`'s shutdown barrier for the dead peer.
    """
    import jax

    from jdmt.data import BadBatchError
    from jdmt.embeddings import OutOfRangeIdError
    from jdmt.train import train_and_evaluate

    where = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
    try:
        return train_and_evaluate(config, mesh)
    except (BadBatchError, OutOfRangeIdError, FloatingPointError, OSError, ValueError) as e:
        print(f"train.py: error: {where}{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if jax.process_count() > 1:
            os._exit(1)
        return None
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        first = str(e).strip().splitlines()[0][:300]
        print(
            f"train.py: error: {where}a collective failed, probably because a peer process "
            f"died or was killed: {first}",
            file=sys.stderr, flush=True,
        )
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.growth_prune is not None:  # before the devices: one line, no start-up notice
        try:
            growth_prune.parse_schedule(args.growth_prune, args.steps)
        except growth_prune.ScheduleError as e:
            parser.error(f"--growth-prune: {e}")
    multi = args.num_processes > 1 or args.coordinator is not None
    if is_worker():
        become_worker()
    elif multi:
        # The training runs in a child whose death by a signal (gloo's abort
        # when a peer dies) is reported in one line (jdmt/train/supervisor.py).
        try:
            _check_processes(parser, args)
        except MeshError as e:
            parser.error(f"--mesh: {e}")
        return supervise(["-m", "jdmt.cli.train", *(sys.argv[1:] if argv is None else argv)],
                         args.process_id)
    # Before any JAX computation: on a CPU machine this creates the H*L devices
    # (or, with several processes, each process's L devices).
    if args.malloc is not None:
        cpu_malloc.set_policy(args.malloc)
    try:
        cpu_malloc.policy()
    except ValueError as e:  # a bad JDMT_MALLOC
        parser.error(str(e))
    try:
        if multi:
            _start_processes(parser, args)
        else:
            prepare_devices(args.mesh)
    except MeshError as e:
        parser.error(f"--mesh: {e}")

    from jdmt.mesh import make_mesh

    try:
        config = TrainConfig(
            mesh=args.mesh,
            model=args.model,
            data=args.data,
            num_tables=args.num_tables,
            rows_per_table=args.rows_per_table,
            pooling=args.pooling,
            sequence_features=args.sequence_features,
            sequence_len=args.sequence_len,
            sequence_pooling=args.sequence_pooling,
            steps=args.steps,
            global_batch=args.batch_size,
            embedding_dim=args.embedding_dim,
            sharding=args.sharding,
            plan=args.plan,
            cost_model=args.cost_model,
            embedding_optimizer=args.embedding_optimizer,
            embedding_lr=args.embedding_lr,
            embedding_initial_accumulator=args.embedding_initial_accumulator,
            combiner=args.combiner,
            weighted_features=args.weighted_features,
            optimizer=args.optimizer,
            lr=args.lr,
            bottom_mlp=args.bottom_mlp,
            top_mlp=args.top_mlp,
            cross_layers=args.cross_layers,
            low_rank=args.low_rank,
            growth_prune=args.growth_prune,
            eval_every=args.eval_every,
            sync_every=args.sync_every,
            eval_batches=args.eval_batches,
            seed=args.seed,
            progress=not args.no_progress,
            metrics_dir=args.metrics_dir,
            profile_dir=args.profile_dir,
            towers=args.towers,
            tower_module=args.tower_module,
            tower_dim=args.tower_dim,
            tower_partitioner=args.tower_partitioner,
            partition_checkpoint=args.partition_checkpoint,
            tower_row_wise=args.tower_row_wise,
            checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every,
            keep_checkpoints=args.keep_checkpoints,
            resume=args.resume,
            kernel=args.kernel,
            table_dtype=args.table_dtype,
            row_dedup=args.row_dedup,
            dense_allreduce=args.dense_allreduce,
            row_tiers=args.row_tiers,
            memory_budget=args.memory_budget_per_device,
            row_tier_batches=args.row_tier_batches,
            eval_data=args.eval_data,
            teacher=args.teacher,
            lr_schedule=args.lr_schedule,
            warmup_steps=args.warmup_steps,
            decay_start=args.decay_start,
            decay_steps=args.decay_steps,
            clip_norm=args.clip_norm,
        )
        mesh = make_mesh(args.mesh)
        n = mesh.devices.size
        if config.global_batch % n:
            raise ValueError(
                f"--batch-size {config.global_batch} is not divisible by the {n} devices "
                f"of mesh {args.mesh}"
            )
    except (MeshError, ValueError) as e:
        parser.error(str(e))

    summary = _train(config, mesh)
    if summary is None:
        return 1
    import jax

    if jax.process_index() != 0:  # process 0 reports for the run
        return 0
    s = summary
    layout = (f"{len(s['towers'])} towers ({s['tower_module']})" if s.get("towers") else
              f"flat plan from {s['plan_file']}" if s["plan_loaded"] else f"flat {s['sharding']}")
    print(
        f"mesh {s['mesh'][0]}x{s['mesh'][1]}, {layout}, {s['kernel']} kernels, {s['steps']} steps of "
        f"{s['global_batch']}: final train loss {s['train_loss'][-1]:.4f}"
    )
    print(
        f"throughput {s['examples_per_sec']:,.0f} examples/s, median step "
        f"{s['step_time_ms_median']:.1f} ms, first step (compile) {s['first_step_s']:.1f} s, "
        f"wall {s['wall_time_s']:.1f} s"
    )
    if math.isnan(s["bayes_auc"]):
        print(
            f"eval AUC {s['eval_auc']:.4f}, logloss {s['eval_logloss']:.4f} on "
            f"{s['eval_examples']:,} held-out examples"
        )
    else:
        print(
            f"eval AUC {s['eval_auc']:.4f} (Bayes {s['bayes_auc']:.4f}), logloss "
            f"{s['eval_logloss']:.4f} (Bayes {s['bayes_logloss']:.4f}) on "
            f"{s['eval_examples']:,} held-out examples"
        )
    if s["skipped_lines"] is not None:
        print(f"data: {s['skipped_lines']:,} malformed lines skipped, epoch {s['data_epoch']}")
    print(
        f"communication per step (all devices): payload cross-host "
        f"{_mib(s['cross_host_payload_bytes_per_step'])}, intra-host "
        f"{_mib(s['intra_host_payload_bytes_per_step'])}; compiled program (wire) cross-host "
        f"{_mib(s['cross_host_bytes_per_step'])}, intra-host {_mib(s['intra_host_bytes_per_step'])}"
        + (f"; {s['overflow_steps']} steps repeated after an overflow" if s["overflow_steps"] else "")
    )
    if s.get("growth_prune"):
        g = s["growth_prune"]
        print(f"growth-prune {g['schedule']}: {_flops(s['dense_train_flops'])} training FLOPs, "
              f"{_flops(s['dense_train_flops_unpruned'])} dense ({100 * g['flops_saving']:.1f}% saved); "
              f"time saved {g['time_saved_s']:.1f} s (measured step times per phase)")
        for ph in g["phases"]:
            ms = ph["step_time_ms_median"]
            print(f"  {ph['label']:>10} steps {ph['start']}-{ph['start'] + ph['steps']}: "
                  f"{_flops(ph['step_flops'])}/step, "
                  + ("not run here" if ms is None else f"median {ms:.1f} ms/step") + f"; {ph['widths']}")
    print(
        f"tables and optimizer state: {_mib(s['table_bytes'])} owned, "
        f"{_mib(s['table_bytes_allocated'])} allocated over all devices "
        f"({s['table_bytes_allocated'] / max(s['table_bytes'], 1):.2f}x)"
    )
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary, f, indent=1)
            f.write("\n")
    return 0


def _flops(x) -> str:
    return "n/a" if x is None else f"{x / 1e9:,.2f} GFLOP"


if __name__ == "__main__":
    sys.exit(main())
