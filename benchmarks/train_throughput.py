"""Training throughput of a DLRM in two real processes (two hosts).

Launches two processes of itself on localhost (`jax.distributed` with a free
port, gloo collectives), which train the DLRM with `jdmt.train.Trainer` on a
`2xLOCAL` `('host','local')` mesh (`--local`, devices per process: 1 by
default, the fastest layout on CPU, where more are emulated devices sharing
the process's cores), and prints
one JSON object: the shape, step time (median of the steps after the
compiled first one), examples/s, the bytes per step that cross hosts and stay
inside them (from the compiled step). With a peer (`--peer DIR`,
`benchmarks/peers.py`), TorchRec's DistributedModelParallel trains the same
shape in two gloo processes (its `dmp_dlrm.py`: fused FBGEMM TBE tables with
row-wise Adagrad, its own sharding plan), alternately with jdmt for
`--rounds` rounds, and the JSON gives both medians and their ratio.

Workload: 26 tables x 100k rows x 64 dims, exactly 10 ids per bag (Zipf
1.05), 13 dense features, 4096 examples per host (global 8192), sum pooling,
row-wise Adagrad tables, Adam dense. MLPs are TorchRec's DLRM example
defaults (`dlrm_main.py`): bottom (dense arch) 512-256-64, top (over arch)
512-512-256-1.

    python benchmarks/train_throughput.py                    # table_wise, 20 steps
    python benchmarks/train_throughput.py --local 4          # 2x4: four devices per process
    python benchmarks/train_throughput.py --sharding=row_wise
    python benchmarks/train_throughput.py --malloc=glibc     # glibc's malloc defaults (docs/design.md)
    python benchmarks/train_throughput.py --quick            # tiny smoke run
    JDMT_PEER=DIR python benchmarks/train_throughput.py      # and TorchRec DMP beside it
    sudo python benchmarks/train_throughput.py --link=1000   # two namespaces, a 1 Gbit/s link

The batches are made before training (a few distinct ones, cycled) so the
timed steps measure training, not the synthetic data generator. The
generator's bags have at most 10 ids; shorter bags are filled up to exactly
10 with repeats of their own ids (the same Zipf distribution).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import peers

PROCESSES = 2

FULL = dict(tables=26, rows=100_000, dim=64, ids_per_bag=10, examples_per_host=4096,
            bottom_mlp=(512, 256), top_mlp=(512, 512, 256))
QUICK = dict(tables=4, rows=1000, dim=8, ids_per_bag=3, examples_per_host=64,
             bottom_mlp=(16,), top_mlp=(16,))
# --shape=sequence: sequence tables (a user's last S items, mean-pooled by the
# model) beside a few pooled tables (benchmarks/flexshard.py)
SEQUENCE = dict(FULL, tables=4, seq_tables=4, seq_rows=1_000_000, seq_len=64, examples_per_host=1024)
SEQUENCE_QUICK = dict(QUICK, tables=2, seq_tables=2, seq_rows=5000, seq_len=8)
CACHED_BATCHES = 4  # distinct training batches, cycled


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None,
                   help="training steps; the first (compiling) one is not timed "
                   "(default: 20, or 3 with --quick)")
    from jdmt.embeddings import ShardingType

    shardings = [t.value for t in ShardingType]
    p.add_argument("--sharding", default="table_wise", choices=shardings,
                   help="sharding type of every table")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes (4 tables x 1000 x 8, 64 examples per host): a smoke run")
    p.add_argument("--shape", default="pooled", choices=("pooled", "sequence"),
                   help="pooled: the 26 pooled tables; sequence: 4 sequence tables of 1M rows "
                   "(S=64) beside 4 pooled tables, 1024 examples per host")
    p.add_argument("--row-dedup", default="host", choices=("host", "device"),
                   help="row-wise and flexshard tables' requests: per host (two hops) or per device")
    p.add_argument("--dense-allreduce", default="hierarchical", choices=("hierarchical", "xla"),
                   help="the dense gradients' all-reduce (train.py --dense-allreduce)")
    p.add_argument("--memory-budget", type=float, default=1.25,
                   help="flexshard: per-device table memory, times row-wise's footprint")
    p.add_argument("--malloc", default="auto", choices=("auto", "tuned", "glibc"),
                   help="the processes' malloc settings (JDMT_MALLOC, jdmt/cpu_malloc.py): auto "
                   "tunes glibc when a process drives one CPU device")
    p.add_argument("--towers", type=int, default=0,
                   help="Disaggregated Multi-Tower with this many towers (0: the flat path)")
    p.add_argument("--tower-module", default="linear",
                   help="Tower Module with --towers (identity, linear, dot, dcn, mlp)")
    p.add_argument("--tower-dim", type=int, default=32, help="C of a compressing Tower Module")
    p.add_argument("--link", default="loopback", type=parse_link,
                   help="how the two processes talk: loopback (default); veth: each in its own "
                   "network namespace, joined by a veth pair (two_hosts.py; root); or a rate "
                   "in Mbit/s: that veth capped to it in each direction")
    p.add_argument("--kernel", default="auto", choices=("auto", "pallas", "xla"),
                   help="lookups and sparse updates: auto (Pallas on TPU/GPU, XLA on CPU), "
                   "pallas (interpreted on CPU: slow) or xla")
    p.add_argument("--profile", action="store_true",
                   help="trace 3 steps and add their time split to the JSON (`profile`: C++ "
                   "lookup and update, collectives, dense matmuls, other XLA ops)")
    p.add_argument("--local", type=int, default=1,
                   help="devices per process (on CPU: emulated devices; the mesh is 2xLOCAL). "
                   "1 (default) is the fastest on CPU: 478 ms/step against 582 ms with 4 on a "
                   "2-core host (2026-12-07), where emulated devices share the process's cores")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                   help="give each process its own share of this machine's cores (process i: "
                   "cores [i*C, (i+1)*C), C = cores // 2), as two hosts would have, and as "
                   "TorchRec's ranks get cores // 2 threads each; --no-pin lets both processes "
                   "run on every core")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800,
                   help="seconds to wait for the two processes")
    p.add_argument("--rounds", type=int, default=2,
                   help="with a peer: rounds of jdmt then TorchRec (medians over the rounds)")
    peers.add_arguments(p)
    # Internal: the launched processes.
    p.add_argument("--child", metavar="COORDINATOR", default=None, help=argparse.SUPPRESS)
    p.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 3 if args.quick else 20
    if args.local < 1:
        p.error("--local must be >= 1")
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step compiles and is not timed)")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    return args


def _shape(args) -> dict:
    if args.shape == "sequence":
        return SEQUENCE_QUICK if args.quick else SEQUENCE
    return QUICK if args.quick else FULL


def parse_link(text: str):
    """'loopback' -> None, 'veth' -> 0 (not capped), an integer -> that Mbit/s."""
    if text in ("loopback", "veth"):
        return None if text == "loopback" else 0
    try:
        mbit = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected loopback, veth or Mbit/s, got {text!r}") from None
    if mbit < 1:
        raise argparse.ArgumentTypeError(f"a link rate must be >= 1 Mbit/s, got {mbit}")
    return mbit


def link_name(link) -> str:
    return "loopback" if link is None else ("veth" if link == 0 else f"veth at {link} Mbit/s")


# ---------------------------------------------------------------------------- children


class FixedBags:
    """`CACHED_BATCHES` synthetic training batches (this process's rows), cycled,
    with every bag filled to exactly `max_len` ids; one eval batch."""

    def __init__(self, features, seed: int, global_batch: int, process_index: int,
                 num_processes: int):
        from jdmt.data import SyntheticData

        self.features = features
        gen = SyntheticData(features, seed=seed, mean_len_frac=1.0)
        where = dict(process_index=process_index, num_processes=num_processes)
        self._train = [self._fill(gen.batch(i, global_batch, **where))
                       for i in range(CACHED_BATCHES)]
        self._eval = self._fill(gen.eval_batch(0, global_batch, **where))

    def _fill(self, b):
        import numpy as np

        from jdmt.data import Batch

        if any(not f.pooled for f in self.features.sparse):  # sequences keep their lengths
            return b
        lens = {f.max_len for f in self.features.sparse}
        assert len(lens) == 1, "a uniform feature set"
        (p,) = lens
        n, nf = b.lengths.shape
        ids = np.asarray(b.ids).reshape(n, nf, p)
        # Position j of a bag of length k takes the bag's id j % k.
        take = np.arange(p)[None, None, :] % np.maximum(b.lengths, 1)[..., None]
        ids = np.take_along_axis(ids, take, axis=2).reshape(n, nf * p)
        return Batch(dense=b.dense, ids=np.ascontiguousarray(ids),
                     lengths=np.full_like(b.lengths, p), labels=b.labels)

    def batch(self, step, global_batch, *, process_index, num_processes):
        return self._train[step % CACHED_BATCHES]

    def eval_batch(self, index, batch_size, *, process_index, num_processes):
        return self._eval


def process_cores(i: int) -> list[int] | None:
    """The cores process i of PROCESSES runs on with `--pin` (None: too few cores)."""
    have = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    per = len(have) // PROCESSES
    return have[i * per : (i + 1) * per] if per else None


def child(args) -> int:
    cores = process_cores(args.process_id) if args.pin else None
    if cores:  # before the backend sizes its thread pools
        os.sched_setaffinity(0, cores)
    from jdmt.mesh import initialize_distributed

    initialize_distributed(args.child, PROCESSES, args.process_id, local_devices=args.local)
    import jax

    from jdmt.data import make_features
    from jdmt.mesh import make_mesh
    from jdmt.train import TrainConfig, Trainer

    shape = _shape(args)
    global_batch = shape["examples_per_host"] * PROCESSES
    features = make_features(shape["tables"], shape["rows"], shape["dim"], shape["ids_per_bag"],
                             combiner="sum")
    if "seq_tables" in shape:
        from jdmt.data.specs import FeatureSet, SparseFeature

        seq = tuple(SparseFeature(f"seq_{i}", shape["seq_rows"], shape["dim"], shape["seq_len"],
                                  kind="sequence") for i in range(shape["seq_tables"]))
        features = FeatureSet(features.sparse + seq, num_dense=features.num_dense)
    mesh = make_mesh(f"{PROCESSES}x{args.local}")
    data = FixedBags(features, args.seed, global_batch, jax.process_index(), jax.process_count())
    config = TrainConfig(
        mesh=f"{PROCESSES}x{args.local}", features=features, embedding_dim=shape["dim"],
        steps=args.steps, global_batch=global_batch, sharding=args.sharding,
        bottom_mlp=shape["bottom_mlp"], top_mlp=shape["top_mlp"], eval_batches=1,
        seed=args.seed, progress=False, towers=args.towers,
        tower_module=args.tower_module if args.towers else "identity",
        tower_dim=None if args.tower_module == "identity" or not args.towers else args.tower_dim,
        kernel=args.kernel, row_dedup=args.row_dedup, memory_budget=args.memory_budget,
        dense_allreduce=args.dense_allreduce,
        profile_dir=(os.path.join(os.path.dirname(args.result), f"trace{args.process_id}")
                     if args.profile else None),
    )
    trainer = Trainer(config, mesh, data)
    summary = trainer.run()
    summary["backend"] = jax.default_backend()
    if args.profile:
        summary["profile"] = step_profile(trainer, config.profile_dir)
    if jax.process_index() == 0:
        with open(args.result, "w") as f:
            json.dump(summary, f)
    return 0


# Device-op categories of the profile, by HLO op name (C++ kernels by their target).
# (XLA:CPU names some by their JAX primitive: psum.N, all_gather.N, ...)
_COLLECTIVES = ("all-to-all", "all-reduce", "all-gather", "reduce-scatter", "collective-permute",
                "all_to_all", "psum", "all_gather", "reduce_scatter", "ppermute")
_DENSE = ("ynn_fusion", "dot", "convolution", "onednn")


def step_profile(trainer, trace_dir: str) -> dict:
    """The profiled steps' time split (this process): device-op time per
    category in ms per step, summed over the process's devices (devices run
    concurrently, so the sum can exceed the step's wall time), and the
    step's median wall time; and the time in a step when no device op of
    the process runs (`outside_device_ops_ms_per_step`: the host's dispatch
    and input transfers, and gaps). Categories: the C++ lookup, update and bag packing kernels,
    collectives (the exchanges and gradient all-reduces), dense matmuls
    (XLA:CPU's dot thunks and YNNPACK fusions), and every other XLA op.
    A collective's time includes waiting for the other devices and process."""
    import glob
    import gzip
    import re

    import jax

    # which custom call each ffi_call.N of the step is (from the compiled HLO)
    state = trainer.init_state()
    host = trainer._host_train_batch(0)
    trainer.fit_capacities(host, "train")
    compiled, _ = trainer.compile_ahead(state, trainer.device_batch(host))
    targets = dict(re.findall(r"%(\S+) = .*?custom_call_target=\"([^\"]+)\"", compiled.as_text()))
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
    if not files:
        return {"error": f"no trace under {trace_dir}"}
    with gzip.open(files[-1]) as f:
        events = json.load(f)["traceEvents"]
    ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in (e.get("args") or {})
           and e["args"].get("hlo_module", "").startswith("jit_step")]
    # Whole steps only: the trace can start or stop inside one (dispatch is
    # asynchronous), and such a step has fewer op events than a whole one.
    per_run: dict[str, int] = {}
    for e in ops:
        per_run[e["args"].get("run_id")] = per_run.get(e["args"].get("run_id"), 0) + 1
    whole = {r for r, n in per_run.items() if n >= 0.95 * max(per_run.values(), default=0)}
    cats: dict[str, float] = {}
    other: dict[str, float] = {}  # the other XLA ops by name
    for e in ops:
        if e["args"].get("run_id") not in whole:
            continue
        a = e["args"]
        op = a["hlo_op"]
        target = targets.get(op, "")
        if "pooled_lookup" in target:
            cat = "embedding_lookup_cpp"
        elif "sparse_update" in target:
            cat = "embedding_update_cpp"
        elif "dot_interaction" in target:
            cat = "dense_interaction_cpp"
        elif "bag_pack" in target:
            cat = "embedding_pack_cpp"
        elif op.startswith(_COLLECTIVES):
            cat = "collectives"
        elif op.startswith(_DENSE):
            cat = "dense_matmuls"
        else:
            cat = "other_xla_ops"
            other[op] = other.get(op, 0.0) + e["dur"] / 1e3
        cats[cat] = cats.get(cat, 0.0) + e["dur"] / 1e3
    steps = max(1, len(whole))
    total = sum(cats.values())
    # The rest of a step: from one whole step's first op to the next one's, the
    # time no device op of this process runs (the host's dispatch and input,
    # and any gap between steps).
    spans = {}
    for e in ops:
        if e["args"].get("run_id") in whole:
            spans.setdefault(e["args"]["run_id"], []).append((e["ts"], e["ts"] + e["dur"]))
    starts = sorted(min(a for a, _ in iv) for iv in spans.values())
    periods = [b - a for a, b in zip(starts, starts[1:])]
    outside = None
    if periods:
        busy = statistics.median(_union(iv) for iv in spans.values())
        outside = round(max(0.0, statistics.median(periods) - busy) / 1e3, 1)
    return {
        "profiled_steps": steps,
        "outside_device_ops_ms_per_step": outside,
        "device_op_ms_per_step": {k: round(v / steps, 1) for k, v in sorted(cats.items())},
        "device_op_share": {k: round(v / total, 3) for k, v in sorted(cats.items())} if total else {},
        "devices_in_process": len(jax.local_devices()),
        # the largest of the other XLA ops (HLO instruction names), ms per step
        "top_other_xla_ops_ms": {k: round(v / steps, 1) for k, v in
                                 sorted(other.items(), key=lambda kv: -kv[1])[:12]},
    }


def _union(intervals) -> float:
    """The length of the union of (start, end) intervals."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total, end = total + (b - a), b
        elif b > end:
            total, end = total + (b - end), b
    return total


# ---------------------------------------------------------------------------- launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args) -> dict | int:
    """jdmt's two processes, and with a peer TorchRec's, alternately for
    --rounds rounds; prints and returns the report."""
    peer, reason = peers.find(args.peer, args.peer_python)
    if peer is not None and args.link is not None:
        peer, reason = None, "the peer runs over loopback only (--link=loopback)"
    if peer is not None and args.shape != "pooled":
        peer, reason = None, "the peer runs the pooled shape only"
    if peer is None:
        peers.warn_missing(reason, args.peer)
    runs, peer_runs = [], []
    for r in range(args.rounds if peer is not None else 1):
        got = _launch_on_link(args)
        if isinstance(got, int):
            return got
        runs.append(got)
        if peer is not None:
            peer_runs.append(run_peer(peer, args))
            print(f"# round {r + 1}: jdmt {got[0]['step_time_ms_median']:.1f} ms/step, TorchRec "
                  f"DMP {peer_runs[-1]['step_time_ms_median']:.1f} ms/step", file=sys.stderr,
                  flush=True)
    out = report(args, runs, peer_runs, peers.describe(peer, reason))
    print(json.dumps(out), flush=True)
    return out


def run_peer(peer, args) -> dict:
    """TorchRec DMP (dmp_dlrm.py) on jdmt's shape: two gloo processes, each
    with half of this machine's cores as torch threads."""
    shape = QUICK if args.quick else FULL
    layers = lambda xs: ",".join(str(x) for x in xs)  # noqa: E731
    argv = ["--nproc", str(PROCESSES), "--tables", str(shape["tables"]),
            "--rows", str(shape["rows"]), "--dim", str(shape["dim"]),
            "--pooling", str(shape["ids_per_bag"]), "--batch", str(shape["examples_per_host"]),
            "--bottom-layers", layers([*shape["bottom_mlp"], shape["dim"]]),
            "--top-layers", layers([*shape["top_mlp"], 1]),
            "--threads", str(peer_threads()), "--iters", str(args.steps - 1),
            "--port", str(_free_port())]
    t0 = time.perf_counter()
    out = peers.parse_dmp_dlrm(peer.run("dmp_dlrm.py", argv, args.timeout))
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def peer_threads() -> int:
    return max(1, (os.cpu_count() or 2) // PROCESSES)


def _launch_on_link(args):
    if args.link is None:
        return _launch(args, [[], []], "127.0.0.1")
    from two_hosts import two_hosts

    with two_hosts(args.link or None) as (prefixes, address):
        return _launch(args, prefixes, address)


def _launch(args, prefixes: list[list[str]], address: str) -> tuple[dict, float, list] | int:
    """One jdmt run: (its summary, wall seconds, load average before/after),
    or an exit status."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["JDMT_MALLOC"] = args.malloc
    coordinator = f"{address}:{_free_port()}"
    with tempfile.TemporaryDirectory(prefix="jdmt-bench-") as tmp:
        result = os.path.join(tmp, "summary.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", coordinator,
               "--result", result, "--steps", str(args.steps), "--sharding", args.sharding,
               "--seed", str(args.seed), "--towers", str(args.towers),
               "--tower-module", args.tower_module, "--tower-dim", str(args.tower_dim),
               "--kernel", args.kernel, "--local", str(args.local), "--shape", args.shape,
               "--row-dedup", args.row_dedup, "--memory-budget", str(args.memory_budget),
               "--dense-allreduce", args.dense_allreduce,
               *(["--profile"] if args.profile else []), *([] if args.pin else ["--no-pin"]),
               *(["--quick"] if args.quick else [])]
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        # The children's output (gloo's connection lines included) goes to stderr.
        procs = [subprocess.Popen([*prefixes[i], *cmd, "--process-id", str(i)], env=env,
                                  stdout=sys.stderr, stderr=sys.stderr)
                 for i in range(PROCESSES)]
        try:
            failed = _wait_all(procs, args.timeout)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if failed:
            print(f"train_throughput: {failed}", file=sys.stderr)
            return 1
        with open(result) as f:
            s = json.load(f)
        wall = time.perf_counter() - t0
    return s, wall, [round(load_before, 2), round(os.getloadavg()[0], 2)]


def _wait_all(procs, timeout: float) -> str | None:
    """Wait for every process; on the first failure (or the timeout) say which."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        for i, p in enumerate(procs):
            if p.returncode not in (None, 0):
                return f"process {i} exited with status {p.returncode}"
        if time.monotonic() > deadline:
            return f"the processes did not finish within {timeout:.0f} s"
        time.sleep(0.2)
    bad = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode]
    return f"process {bad[0][0]} exited with status {bad[0][1]}" if bad else None


def report(args, runs: list, peer_runs: list[dict], peer: dict) -> dict:
    """One JSON object: the last jdmt run's summary, step time and examples/s
    as medians over the rounds, and the peer's beside them."""
    import statistics

    shape = _shape(args)
    s = runs[-1][0]
    step_ms = statistics.median(r[0]["step_time_ms_median"] for r in runs)
    examples_per_sec = statistics.median(r[0]["examples_per_sec"] for r in runs)
    if peer_runs:
        t_ms = statistics.median(r["step_time_ms_median"] for r in peer_runs)
        t_eps = statistics.median(r["examples_per_sec"] for r in peer_runs)
        peer.update({
            "system": "TorchRec DistributedModelParallel (dmp_dlrm.py), FBGEMM TBE tables, "
                      "row-wise Adagrad, dense Adagrad",
            "processes": PROCESSES, "threads_per_process": peer_threads(),
            "plan": peer_runs[-1]["plan"],
            "step_time_ms_median": t_ms, "examples_per_sec": round(t_eps, 1),
            "rounds": [{"jdmt_step_time_ms": round(r[0]["step_time_ms_median"], 1),
                        "torchrec_step_time_ms": p["step_time_ms_median"]}
                       for r, p in zip(runs, peer_runs)],
        })
    return {
        "benchmark": "train_throughput",
        "quick": args.quick,
        "shape": {
            "model": "dlrm",
            "tables": shape["tables"],
            "rows_per_table": shape["rows"],
            "sequence_tables": shape.get("seq_tables", 0),
            "sequence_rows": shape.get("seq_rows"),
            "sequence_len": shape.get("seq_len"),
            "embedding_dim": shape["dim"],
            "ids_per_bag": shape["ids_per_bag"],
            "id_distribution": "zipf 1.05",
            "pooling": "sum",
            "dense_features": 13,
            "examples_per_host": shape["examples_per_host"],
            "global_batch": s["global_batch"],
            "bottom_mlp": [*shape["bottom_mlp"], shape["dim"]],
            "top_mlp": [*shape["top_mlp"], 1],
            "mlp_source": "tiny (--quick)" if args.quick else
                          "TorchRec examples/dlrm dlrm_main.py defaults "
                          "(dense_arch 512,256,64; over_arch 512,512,256,1)",
            "embedding_optimizer": s["embedding_optimizer"],
            "dense_optimizer": s["optimizer"],
        },
        "mesh": s["mesh"],
        "processes": PROCESSES,
        "devices_per_process": args.local,
        "link": link_name(args.link),
        "sharding": s["sharding"],
        "row_dedup": args.row_dedup,
        "dense_allreduce": args.dense_allreduce,
        "row_tiers": s.get("row_tiers"),
        "kernel": s.get("kernel"),
        "towers": s.get("towers"),
        "tower_module": s.get("tower_module"),
        "tower_dim": args.tower_dim if args.towers and args.tower_module != "identity" else None,
        "steps": s["steps"],
        "timed_steps": s["steps"] - 1,
        "step_time_ms_median": round(step_ms, 1),
        "examples_per_sec": round(examples_per_sec, 1),
        "first_step_s": round(s["first_step_s"], 2),
        "compile_s": round(s["compile_s"], 2),
        "final_train_loss": s["train_loss"][-1],
        "cross_host_bytes_per_step": s["cross_host_bytes_per_step"],
        "intra_host_bytes_per_step": s["intra_host_bytes_per_step"],
        "cross_host_payload_bytes_per_step": s["cross_host_payload_bytes_per_step"],
        "intra_host_payload_bytes_per_step": s["intra_host_payload_bytes_per_step"],
        "overflow_steps": s["overflow_steps"],
        "profile": s.get("profile"),
        "peer": peer,
        # Ours over TorchRec's, measured in this run: examples_per_sec above 1 is faster.
        "ratio_to_torchrec": None if not peer_runs else {
            "step_time": round(step_ms / peer["step_time_ms_median"], 3),
            "examples_per_sec": round(examples_per_sec / peer["examples_per_sec"], 3),
        },
        "backend": s["backend"],
        "host_cpus": os.cpu_count(),
        "cores_per_process": len(process_cores(0) or []) if args.pin else None,  # None: unpinned
        "malloc": s.get("malloc"),
        # 1-minute load average before and after: other work on a shared machine slows the steps.
        "load_average_1m": runs[-1][2],
        "wall_s": round(sum(r[1] for r in runs), 1),
    }


def run(argv=None) -> dict | int:
    """The benchmark (or a launched process); returns the report dict, or an
    exit status on failure."""
    args = parse_args(argv)
    if args.child is not None:
        return child(args)
    # SIGTERM unwinds (the children are killed, namespaces removed) instead of
    # leaving them behind
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return launch(args)


def main(argv=None) -> int:
    out = run(argv)
    return out if isinstance(out, int) else 0


if __name__ == "__main__":
    sys.exit(main())
