"""Save checkpoint 1, start saving checkpoint 2, and SIGKILL this process while
the second save is still being written.

Usage: python kill_during_save.py DIR
Prints "saved 1" once checkpoint 1 is complete, then "killing" right before
the kill.
"""

import os
import signal
import sys

import jax.numpy as jnp
import numpy as np

from jdmt.train.checkpoint import Checkpointer

ckpt = Checkpointer(sys.argv[1])
small = {"w": jnp.arange(1000, dtype=jnp.float32), "step": jnp.int32(1)}
ckpt.save(1, small, {"note": "complete"})
ckpt.wait()
print("saved 1", flush=True)
# Large enough that writing takes far longer than the kill below.
big = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((64, 1 << 20), np.float32)),
       "step": jnp.int32(2)}
ckpt.save(2, big, {"note": "never finished"})
print("killing", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
