"""One process of a multi-process run, watched by a small parent.

Some failures of a multi-process run kill the process outright instead of
raising: when a peer dies mid-collective, gloo may abort (`std::terminate`,
SIGABRT) with a message about a "collective mismatch", and JAX's
coordination service aborts the process when it loses its peers. No Python
handler runs then, so `train.py` runs the training in a child process and
its parent, which imports nothing heavy and holds no devices, turns a death
by signal into one clear line and exit status 1.

The child dies with the parent (Linux `PR_SET_PDEATHSIG`, which the child
sets first thing: `become_worker`): killing the parent, as a cluster
scheduler does, never leaves a training process behind. SIGINT, SIGTERM
and SIGHUP sent to the parent are passed on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Sequence

WORKER_ENV = "JDMT_SUPERVISED_WORKER"
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def is_worker() -> bool:
    """True inside the child that `supervise` started."""
    return bool(os.environ.get(WORKER_ENV))


def become_worker() -> None:
    """In the child, first thing: get SIGKILL when the parent dies (Linux),
    and exit at once if it died already."""
    parent = int(os.environ[WORKER_ENV])
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def supervise(argv: Sequence[str], process_id: int) -> int:
    """Run `python argv...` as this process's worker and return its exit status.

    A worker killed by a signal is reported as
    `train.py: error: process N: ... died of SIGNAME ...` and gives status 1.
    """
    env = dict(os.environ, **{WORKER_ENV: str(os.getpid())})
    child = subprocess.Popen([sys.executable, *argv], env=env)

    def forward(signum, _frame):
        if child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in _FORWARDED}
    try:
        rc = child.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if rc >= 0:
        return rc
    name = signal.Signals(-rc).name
    if -rc in (signal.SIGKILL, *_FORWARDED):
        why = "it was killed"
    else:
        why = ("a collective failed, probably because a peer process died or was killed "
               "(gloo and JAX's coordination service abort the process then)")
    print(f"train.py: error: process {process_id}: the training process died of {name}: {why}",
          file=sys.stderr, flush=True)
    return 1


__all__ = ["WORKER_ENV", "become_worker", "is_worker", "supervise"]
