"""Test set-up: 8 emulated CPU devices, set before JAX starts a backend."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One pytest-xdist worker per core: numpy's BLAS gets one thread per worker
# (OpenBLAS threads spinning against the other worker made a 856 x 856 eigh 10x slower).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
_flag = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

# Many tests compile the same programs (a reference run beside each sharding,
# a resumed run beside a full one, train.py subprocesses): a compilation
# cache shared by the test workers and their subprocesses compiles each once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"jdmt-tests-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(scope="session")
def mesh24():
    from jdmt.mesh import make_mesh

    return make_mesh("2x4")
