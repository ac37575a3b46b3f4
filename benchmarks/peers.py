"""The peers our users would pick instead (FBGEMM, TorchRec on CPU), run in the
same benchmark run as jdmt, alternately, so that a ratio is measured, never
copied from elsewhere.

jdmt does not import the peers: a benchmark runs a peer's script in the
peer's own Python environment and reads the figures it prints. Where they
are:

- the scripts (`ebc_bench.py`: FBGEMM TBE and TorchRec EBC lookups;
  `dmp_dlrm.py`: a DLRM trained by TorchRec's DistributedModelParallel in
  gloo processes): `--peer DIR` or `JDMT_PEER=DIR`;
- their Python (torch, fbgemm-gpu-cpu, torchrec): `--peer-python PATH` or
  `JDMT_PEER_PYTHON=PATH`, by default the environment the peers' `setup.sh`
  builds, `${TMPDIR:-/tmp}/jdmt-peer/venv/bin/python`.

Without them a benchmark says why in its JSON (`peer.available: false`,
`peer.reason`) and prints jdmt's figures only.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# ebc_bench.py's variants that a jdmt figure is compared with
TBE_FWD = "fbgemm TBE fwd"
TBE_STEP = "fbgemm TBE fwd+bwd+RowWiseAdagrad (fused)"
TORCHREC_STEP = "torchrec FusedEBC fwd+bwd+RowWiseAdagrad (fused)"


def add_arguments(parser) -> None:
    parser.add_argument("--peer", default=os.environ.get("JDMT_PEER"), metavar="DIR",
                        help="the peers' scripts (ebc_bench.py, dmp_dlrm.py), run beside jdmt in "
                        "the same run (default: $JDMT_PEER; none: jdmt's figures only)")
    parser.add_argument("--peer-python", default=os.environ.get("JDMT_PEER_PYTHON"),
                        metavar="PATH", help="the peers' Python, with torch, fbgemm-gpu and "
                        "torchrec (default: $JDMT_PEER_PYTHON, else the venv the peers' setup.sh "
                        "builds under ${TMPDIR:-/tmp}/jdmt-peer)")


@dataclass
class Peer:
    python: str
    scripts: str
    retries: int = 0  # runs that died and were run again (`run`)

    def run(self, script: str, argv: list[str], timeout: float, attempts: int = 2) -> str:
        """The script's stdout; raises RuntimeError with its stderr's tail on failure.

        A run that dies is tried again, up to `attempts` runs in all (TorchRec's
        gloo processes now and then abort at random: "terminate called without
        an active exception", SIGABRT in one rank); each retry is said on
        stderr and counted in `self.retries`."""
        cmd = [self.python, os.path.join(self.scripts, script), *argv]
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
        for attempt in range(attempts):
            with tempfile.TemporaryFile("w+") as err:
                try:
                    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                                         timeout=timeout)
                except subprocess.TimeoutExpired:
                    raise RuntimeError(f"{script} did not finish within {timeout:.0f} s") from None
                if not out.returncode:
                    return out.stdout
                err.seek(0)
                tail = err.read()[-2000:]
            if attempt + 1 < attempts:
                self.retries += 1
                print(f"# peer {script} exited with status {out.returncode}; running it again",
                      file=sys.stderr, flush=True)
        raise RuntimeError(f"{script} exited with status {out.returncode}: {tail}")


def find(scripts: str | None, python: str | None) -> tuple[Peer | None, str]:
    """(the peer, '') or (None, why not)."""
    if not scripts:
        return None, "no peer configured (--peer DIR or JDMT_PEER: the peers' scripts)"
    if python is None:
        python = os.path.join(os.environ.get("TMPDIR", "/tmp"), "jdmt-peer", "venv", "bin", "python")
    if not os.path.isdir(scripts):
        return None, f"--peer {scripts}: not a directory"
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        return None, (f"the peers' Python {python} does not exist (build it with the peers' "
                      "setup.sh, or pass --peer-python)")
    return Peer(os.path.abspath(python), os.path.abspath(scripts)), ""


def describe(peer: Peer | None, reason: str) -> dict:
    if peer is None:
        return {"available": False, "reason": reason}
    return {"available": True, "python": peer.python, "scripts": peer.scripts, "retries": peer.retries}


def warn_missing(reason: str, scripts: str | None = None) -> None:
    """Say why there is no peer (not when `--peer ''` turned it off)."""
    if scripts != "":
        print(f"# peer: {reason}; printing jdmt's figures only", file=sys.stderr)


_EBC_ROW = re.compile(r"^(?P<name>\S.*?)\s+(?P<median>[0-9.]+)\s+(?P<min>[0-9.]+)\s+[0-9]+\s+[0-9.]+\s*$")


def parse_ebc_bench(text: str) -> dict[str, float]:
    """ebc_bench.py's summary table: {variant: median ms}."""
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("variant"))
    except StopIteration:
        raise RuntimeError(f"no summary table in ebc_bench.py's output: {text[-500:]!r}") from None
    out = {}
    for line in lines[start + 1:]:
        m = _EBC_ROW.match(line)
        if m:
            out[m["name"].strip()] = float(m["median"])
    return out


_DMP = re.compile(r"median step (?P<ms>[0-9.]+) ms .*? global (?P<eps>[0-9]+) samples/s")
_PLAN = re.compile(r"\[rank0\] plan \([0-9.]+s\): (?P<plan>.*?); DMP init")


def parse_dmp_dlrm(text: str) -> dict:
    """dmp_dlrm.py's rank-0 lines: median step (max over ranks), examples/s, plan."""
    m = _DMP.search(text)
    if not m:
        raise RuntimeError(f"no step time in dmp_dlrm.py's output: {text[-500:]!r}")
    plan = _PLAN.search(text)
    return {"step_time_ms_median": float(m["ms"]), "examples_per_sec": float(m["eps"]),
            "plan": plan["plan"] if plan else None}


def ebc_bench(peer: Peer, *, tables: int, rows: int, dim: int, batch: int, pooling: int,
              alpha: float, iters: int, variants: tuple[str, ...], timeout: float = 1200) -> dict:
    """One ebc_bench.py run: {variant: median ms} plus its wall seconds."""
    argv = ["--tables", str(tables), "--rows", str(rows), "--dim", str(dim), "--batch", str(batch),
            "--pooling", str(pooling), "--alpha", str(alpha), "--iters", str(iters),
            "--only", ",".join(variants)]
    t0 = time.perf_counter()
    ms = parse_ebc_bench(peer.run("ebc_bench.py", argv, timeout))
    missing = [v for v in variants if v not in ms]
    if missing:
        raise RuntimeError(f"ebc_bench.py printed no figure for {missing}")
    return {"ms": {v: ms[v] for v in variants}, "wall_s": round(time.perf_counter() - t0, 1)}
