"""glibc malloc settings for a process that drives one CPU device.

XLA:CPU allocates each execution's temporaries as one block (127 MB for the
training step of `benchmarks/train_throughput.py`) from the executing
thread's malloc arena. glibc serves a request that large from a thread arena
with `mmap` whatever `M_MMAP_MAX` says (a thread arena's heap holds at most
64 MB), and `munmap`s it when the step ends: every step faults in and zeroes
the block again, page by page (31k page faults per step and process there;
a sixth of the machine's CPU time went to the kernel).

With one arena (`M_ARENA_MAX=1`), no `mmap` (`M_MMAP_MAX=0`) and no trimming
(`M_TRIM_THRESHOLD`), the block comes from the main heap and stays mapped
between steps. That is a win only when one CPU device runs in the process:
with several emulated devices their threads allocate at once and one arena
serialises them (`train.py --mesh=2x4`: 111 ms steps became 160 ms). So the
default (`auto`) applies the settings when the process drives exactly one
CPU device and has no accelerator, and the start-up line says which ran.

The settings must be in place before the XLA backend starts its threads:
`jdmt.mesh.emulate_cpu_devices` (called by `prepare_devices` and
`initialize_distributed`) applies them. `JDMT_MALLOC=auto|tuned|glibc` (or
`set_policy`) chooses: `tuned` always, `glibc` never.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import sys

POLICIES = ("auto", "tuned", "glibc")

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))

_policy: str | None = None
_state = "glibc defaults"  # what runs, for the start-up line


def policy() -> str:
    """The chosen policy: `set_policy`'s, else `JDMT_MALLOC`, else 'auto'."""
    p = _policy or os.environ.get("JDMT_MALLOC", "auto")
    if p not in POLICIES:
        raise ValueError(f"JDMT_MALLOC={p!r}: expected one of {', '.join(POLICIES)}")
    return p


def set_policy(p: str) -> None:
    """Choose the policy for this process (before its backend starts)."""
    global _policy
    if p not in POLICIES:
        raise ValueError(f"malloc policy {p!r}: expected one of {', '.join(POLICIES)}")
    _policy = p


def state() -> str:
    """What this process's malloc runs with, in words (the start-up line's)."""
    return _state


def _glibc():
    """The C library if it is glibc with `mallopt`, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only  # noqa: B018
        return libc if hasattr(libc, "mallopt") else None
    except (OSError, AttributeError):
        return None


def _accelerator_expected() -> bool:
    """Whether JAX will start an accelerator backend: `jax_platforms` names
    one, or (unset) an accelerator plugin or libtpu is installed."""
    import jax

    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() not in ("cpu", "")
    try:
        if any(True for _ in importlib.metadata.entry_points(group="jax_plugins")):
            return True
    except Exception:  # pragma: no cover - broken metadata
        pass
    return importlib.util.find_spec("libtpu") is not None


def configure(cpu_devices: int) -> str:
    """Apply the policy for a process about to start a backend with
    `cpu_devices` CPU devices; returns `state()`. Idempotent."""
    global _state
    p = policy()
    if p == "glibc":
        _state = "glibc defaults (JDMT_MALLOC=glibc)"
        return _state
    if p == "auto" and (cpu_devices != 1 or _accelerator_expected()):
        why = "several CPU devices in the process" if cpu_devices != 1 else "an accelerator backend"
        _state = f"glibc defaults ({why})"
        return _state
    libc = _glibc()
    if libc is None:
        _state = "platform default (not glibc)"
        return _state
    ok = all(libc.mallopt(ctypes.c_int(k), ctypes.c_int(v)) == 1 for k, v in _SETTINGS)
    if not ok:
        _state = "glibc defaults (mallopt refused the settings)"
        return _state
    _state = "one arena, no mmap, no trim" + (" (one CPU device per process)" if p == "auto" else
                                              " (JDMT_MALLOC=tuned)")
    return _state
