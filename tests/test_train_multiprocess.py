"""train.py across two real processes on localhost (gloo): the same run as one
process, checkpoints one process can resume, a dead peer ends the run, and the
multi-process flags are checked.

Each process emulates 4 CPU devices; the pytest process's XLA_FLAGS (8
devices, from conftest.py) are kept out of the children's environment.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

TRAIN_PY = Path(__file__).resolve().parent.parent / "train.py"

# A small run: 6 tables of 1,000 rows, 6 steps of 256 examples, one eval batch.
SMALL = [
    "--mesh=2x4", "--batch-size", "256", "--eval-batches", "1", "--num-tables", "6",
    "--rows-per-table", "1000", "--no-progress",
]

# gloo's all-reduce of the dense gradient sums the 8 devices' parts in another
# order than XLA:CPU's in-process all-reduce, so float32 results differ by a
# few ulps (measured: 1.2e-7 on losses near 0.55, where one ulp is 6e-8) and
# Adam carries that through the steps. 1e-5 leaves room for that and is far
# below what a wrong routing or a lost gradient does (1e-3 and more).
LOSS_ATOL = 1e-5
# AUC is a rank statistic: a few ulps can swap two nearly tied predictions;
# one swapped pair of 256 examples (about 64 x 192 pairs) moves it by 8e-5.
AUC_ATOL = 5e-4

# What a survivor prints when its peer dies: train.py's own line, either
# from the training process (a collective raised) or from its supervising
# parent (the training process was aborted: by gloo, on a broken connection,
# or by JAX's coordination service, when the coordinator sees the peer's
# heartbeats stop or a non-coordinator loses the coordinator).
PEER_FAILURE = re.compile(
    r"train\.py: error: process \d: (the training process died of SIG[A-Z]+: )?"
    r"a collective failed"
)
PEER_TIMEOUT_S = 10  # --peer-timeout of the peer-death runs (the default is 30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _start(args, out_dir: Path, name: str) -> subprocess.Popen:
    """train.py with `args`; stdout/stderr go to files (no pipe can fill up)."""
    with open(out_dir / f"{name}.out", "w") as out, open(out_dir / f"{name}.err", "w") as err:
        return subprocess.Popen(
            [sys.executable, str(TRAIN_PY), *args], stdout=out, stderr=err, env=_env(),
            cwd=out_dir,
        )


def _start_pair(args, out_dir: Path, per_process=lambda i: []) -> list[subprocess.Popen]:
    coord = ["--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2"]
    return [
        _start([*args, *coord, "--process-id", str(i), *per_process(i)], out_dir, f"p{i}")
        for i in range(2)
    ]


def _output(out_dir: Path, name: str) -> tuple[str, str]:
    return (out_dir / f"{name}.out").read_text(), (out_dir / f"{name}.err").read_text()


def _kill_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def _wait_ok(p: subprocess.Popen, out_dir: Path, name: str, timeout: float) -> str:
    p.wait(timeout=timeout)
    out, err = _output(out_dir, name)
    assert p.returncode == 0, f"{name} exited {p.returncode}:\n{err[-3000:]}"
    return out


def test_two_processes_match_one_process(tmp_path):
    """Losses, eval metrics and bytes per step equal the single-process 2x4 run,
    with growth and pruning (the step-3 checkpoint falls in the pruned phase)."""
    args = [*SMALL, "--steps", "6", "--seed", "3", "--growth-prune", "dense:2,prune0.5:2,grow:2"]
    procs = []
    try:
        # All three at once: the pair spends much of its time waiting on gloo.
        procs.append(_start([*args, "--summary-json", "single.json"], tmp_path, "single"))
        procs += _start_pair(args, tmp_path, lambda i: [
            "--summary-json", f"p{i}.json", "--checkpoint-dir", "ck", "--checkpoint-every", "3"])
        outs = [_wait_ok(p, tmp_path, n, 300) for p, n in zip(procs, ("single", "p0", "p1"))]
    finally:
        _kill_all(procs)

    one = json.loads((tmp_path / "single.json").read_text())
    two = json.loads((tmp_path / "p0.json").read_text())
    # Process 0 reports for the run; process 1 prints no summary and writes no file.
    assert not (tmp_path / "p1.json").exists()
    assert "eval AUC" in outs[1] and "eval AUC" not in outs[2]

    assert two["mesh"] == [2, 4] == one["mesh"]
    assert two["steps"] == 6 and len(two["train_loss"]) == 6
    np.testing.assert_allclose(two["train_loss"], one["train_loss"], rtol=0, atol=LOSS_ATOL)
    assert two["eval_examples"] == one["eval_examples"] == 256
    assert abs(two["eval_auc"] - one["eval_auc"]) <= AUC_ATOL
    assert abs(two["eval_logloss"] - one["eval_logloss"]) <= LOSS_ATOL
    assert two["bayes_auc"] == one["bayes_auc"]  # the same held-out examples
    # The same compiled program: the same collectives, hence the same bytes.
    assert two["cross_host_bytes_per_step"] == one["cross_host_bytes_per_step"] > 0
    assert two["intra_host_bytes_per_step"] == one["intra_host_bytes_per_step"]

    # Both processes wrote their shards of each checkpoint; one process reads them.
    assert two["checkpoint_steps"] == [3, 6]
    assert two["dense_train_flops"] == one["dense_train_flops"] < two["dense_train_flops_unpruned"]
    p = _start([*args, "--checkpoint-dir", "ck", "--resume", "--summary-json", "resumed.json"],
               tmp_path, "resumed")
    try:
        _wait_ok(p, tmp_path, "resumed", 300)
    finally:
        _kill_all([p])
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["start_step"] == 6 and resumed["train_loss"] == two["train_loss"]
    assert resumed["eval_auc"] == pytest.approx(two["eval_auc"], abs=1e-6)
    assert resumed["eval_logloss"] == pytest.approx(two["eval_logloss"], rel=1e-6)


@pytest.mark.parametrize("victim", [1, 0], ids=["kill_process_1", "kill_process_0"])
def test_dead_peer_ends_the_run(tmp_path, victim):
    """SIGKILL one process mid-training: the other exits non-zero within 60 s, naming it."""
    args = [*SMALL, "--steps", "100000", "--peer-timeout", str(PEER_TIMEOUT_S)]
    jsonl = tmp_path / "metrics" / "metrics.jsonl"
    procs = _start_pair(args, tmp_path, lambda i: ["--metrics-dir", "metrics"] if i == 0 else [])
    survivor = 1 - victim
    try:
        # Process 0 logs step s only after step s's collectives finished on both
        # processes, so a train event means both are training.
        deadline = time.monotonic() + 180
        while not (jsonl.exists() and '"kind": "train"' in jsonl.read_text()):
            for i, p in enumerate(procs):
                if p.poll() is not None:
                    pytest.fail(f"p{i} exited {p.returncode} before training:\n"
                                f"{_output(tmp_path, f'p{i}')[1][-3000:]}")
            assert time.monotonic() < deadline, "the two processes did not start training"
            time.sleep(0.2)

        procs[victim].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        try:
            rc = procs[survivor].wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"p{survivor} still runs 60 s after p{victim} was killed")
        took = time.monotonic() - t0
        err = _output(tmp_path, f"p{survivor}")[1]
        assert rc == 1, f"p{survivor} exited {rc}:\n{err[-3000:]}"
        assert PEER_FAILURE.search(err), f"p{survivor} exited {rc} after {took:.1f} s:\n{err[-3000:]}"
    finally:
        _kill_all(procs)


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--num-processes", "3", "--coordinator", "127.0.0.1:1", "--process-id", "0"],
         "--num-processes 3"),
        (["--num-processes", "2", "--process-id", "0"], "--coordinator"),
        (["--num-processes", "2", "--coordinator", "127.0.0.1:1", "--process-id", "2"],
         "--process-id 2"),
    ],
    ids=["processes_not_hosts", "no_coordinator", "process_id_out_of_range"],
)
def test_bad_multiprocess_flags(tmp_path, args, flag):
    """Exit 2 before joining any run, with one line naming the flag."""
    r = subprocess.run(
        [sys.executable, str(TRAIN_PY), "--mesh=2x4", *args],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120,
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.startswith("train.py: error:") and flag in r.stderr, r.stderr
