"""jdmt.cpu_malloc: the in-process glibc malloc settings of one-device processes."""

import os
import subprocess
import sys
import textwrap

import pytest

from jdmt import cpu_malloc

glibc = pytest.mark.skipif(cpu_malloc._glibc() is None, reason="needs Linux with glibc (mallopt)")

# In a fresh process: apply the policy for DEVICES CPU devices, then in a new
# thread (under glibc's defaults a thread arena, which serves 96 MB with mmap)
# allocate, touch and free 96 MB four times; print the state and the page
# faults of the last three rounds.
_PROBE = textwrap.dedent("""
    import ctypes, resource, sys, threading
    from jdmt import cpu_malloc
    state = cpu_malloc.configure(int(sys.argv[1]))
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 96 << 20
    faults = []
    def rounds():
        for i in range(4):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            p = libc.malloc(size)
            ctypes.memset(p, 1, size)
            libc.free(p)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    t = threading.Thread(target=rounds)
    t.start(); t.join()
    print(state)
    print(sum(faults[1:]))
""")


def _probe(devices: int, policy: str) -> tuple[str, int]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JDMT_MALLOC=policy)
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", _PROBE, str(devices)], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split("\n")
    return out[0], int(out[1])


@glibc
def test_one_device_keeps_large_blocks_mapped_between_steps():
    state, faults = _probe(1, "auto")
    assert state == "one arena, no mmap, no trim (one CPU device per process)"
    base_state, base_faults = _probe(1, "glibc")
    assert base_state.startswith("glibc defaults")
    pages = 3 * (96 << 20) // 4096
    # glibc's defaults map the block afresh each round: every page faults again
    assert base_faults > 0.9 * pages
    assert faults < 0.05 * pages


@glibc
def test_several_devices_or_glibc_policy_keep_glibc_defaults():
    state, faults = _probe(8, "auto")
    assert state == "glibc defaults (several CPU devices in the process)"
    assert faults > 0.9 * 3 * (96 << 20) // 4096
    state, _ = _probe(8, "tuned")
    assert state == "one arena, no mmap, no trim (JDMT_MALLOC=tuned)"


def test_bad_policy_is_refused(monkeypatch):
    monkeypatch.setenv("JDMT_MALLOC", "fast")
    monkeypatch.setattr(cpu_malloc, "_policy", None)
    with pytest.raises(ValueError, match="JDMT_MALLOC='fast': expected one of auto, tuned, glibc"):
        cpu_malloc.policy()
    with pytest.raises(ValueError, match="malloc policy 'x'"):
        cpu_malloc.set_policy("x")


def test_accelerator_platform_keeps_glibc_defaults(monkeypatch):
    monkeypatch.setattr(cpu_malloc, "_policy", "auto")
    monkeypatch.setattr(cpu_malloc, "_state", cpu_malloc._state)
    monkeypatch.setattr(cpu_malloc, "_accelerator_expected", lambda: True)
    assert cpu_malloc.configure(1) == "glibc defaults (an accelerator backend)"
