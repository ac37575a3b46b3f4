"""The two-level device mesh: spec parsing, CPU emulation, processes, topology.

Every jdmt program runs on one `jax.sharding.Mesh` with axes `('host', 'local')`.
The axis names live here and nowhere else: other modules import `HOST`,
`LOCAL` and `DEVICES` (both axes, row-major, for flat collectives).

Device p of `mesh.devices.flat` is host `p // L`, local rank `p % L`; the batch
is sharded over `DEVICES`, so device p holds the p-th slice of the global batch.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jdmt import cpu_malloc

HOST = "host"
LOCAL = "local"
AXES = (HOST, LOCAL)
DEVICES = (HOST, LOCAL)  # both axes together, flattened host-major

_SPEC = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


class MeshError(ValueError):
    """A mesh spec that cannot be parsed or cannot be built on these devices."""


def parse_mesh_spec(spec: str | Sequence[int]) -> tuple[int, int]:
    """Parse `'HxL'` (e.g. `'8x8'`) into `(hosts, local_devices)`.

    Raises:
      MeshError: the spec is not two positive integers joined by `x`.
    """
    if not isinstance(spec, str):
        shape = tuple(int(s) for s in spec)
        if len(shape) != 2:
            raise MeshError(f"mesh shape must have two entries (hosts, local), got {spec!r}")
        hosts, local = shape
    else:
        m = _SPEC.match(spec)
        if not m:
            raise MeshError(
                f"malformed mesh spec {spec!r}: expected HOSTSxLOCAL with two positive "
                "integers, e.g. '2x4' (2 hosts of 4 devices) or '8x8'"
            )
        hosts, local = int(m.group(1)), int(m.group(2))
    if hosts < 1 or local < 1:
        raise MeshError(f"mesh spec {spec!r}: hosts and local devices must both be >= 1")
    return hosts, local


def _backends_initialized() -> bool:
    """Whether JAX has started its backends (after which the CPU device count is fixed)."""
    try:
        from jax._src import xla_bridge  # no public query exists

        query = getattr(xla_bridge, "backends_are_initialized", None)
        if query is not None:
            return bool(query())
        return bool(xla_bridge._backends)  # noqa: SLF001
    except Exception:  # pragma: no cover - private API moved
        return True


def emulate_cpu_devices(count: int) -> bool:
    """Ask JAX for `count` CPU devices if no backend has started yet.

    On a machine with an accelerator this only adds CPU devices, which
    `make_mesh` does not use. Returns True when the setting was applied,
    False when a backend had already started with enough devices.

    Raises:
      MeshError: JAX's CPU backend (the default one) already started with
        fewer than `count` devices: setting the count now would do nothing.
    """
    count = int(count)
    if not _backends_initialized():
        cpu_malloc.configure(count)
        jax.config.update("jax_num_cpu_devices", count)
        return True
    # Too late to set the count: fine if the backend already has enough
    # devices, or is an accelerator (whose devices make_mesh checks).
    if jax.default_backend() == "cpu":
        have = jax.local_device_count()
        if have < count:
            raise MeshError(
                f"JAX's CPU backend was initialised before the device count could be set: "
                f"it has {have} device{'s' if have != 1 else ''}, {count} are needed. "
                "Call jdmt.mesh.prepare_devices(spec) before anything uses JAX "
                "(jax.devices(), creating an array, a jitted call), or start the process "
                f"with XLA_FLAGS=--xla_force_host_platform_device_count={count}"
            )
    return False


def prepare_devices(spec: str | Sequence[int], *, stream=sys.stderr) -> tuple[int, int]:
    """Entry-point helper: parse the spec and make sure H*L devices exist.

    If the default backend turns out to be the CPU, the H*L devices are
    emulated and a one-line notice says so. Call it before any JAX
    computation.

    Raises:
      MeshError: malformed spec, or a CPU backend that already started with
        fewer than H*L devices (see `emulate_cpu_devices`).
    """
    hosts, local = parse_mesh_spec(spec)
    emulate_cpu_devices(hosts * local)
    if jax.default_backend() == "cpu" and jax.process_count() == 1:
        print(
            f"jdmt: no accelerator found; emulating {hosts * local} CPU devices "
            f"for mesh {hosts}x{local}",
            file=stream,
        )
    return hosts, local


def initialize_distributed(
    coordinator: str,
    num_processes: int,
    process_id: int,
    *,
    local_devices: int | None = None,
    heartbeat_timeout_s: int = 30,
    init_timeout_s: int = 120,
) -> None:
    """Join a multi-process run (`jax.distributed`), one process per host.

    On CPU, `local_devices` emulated devices are created per process and the
    gloo collectives are used, so two processes on localhost form a real
    two-host mesh. A peer that dies is noticed by the heartbeat within about
    `heartbeat_timeout_s` seconds.
    """
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise MeshError(f"process id {process_id} is not in [0, {num_processes})")
    if local_devices is not None:
        emulate_cpu_devices(local_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=init_timeout_s,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
    )


def make_mesh(spec: str | Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build the `('host', 'local')` mesh for `spec` on the available devices.

    In a multi-process run the `host` axis follows processes: row h holds the
    devices of process h (so the number of processes must equal H).

    Raises:
      MeshError: malformed spec, or a device count that does not match.
    """
    hosts, local = parse_mesh_spec(spec)
    want = hosts * local
    if devices is None:
        devices = jax.devices()
    devices = list(devices)
    if len(devices) != want:
        raise MeshError(
            f"mesh {hosts}x{local} needs {want} devices, but {len(devices)} "
            f"{jax.default_backend()} device(s) are available"
            + (
                f" across {jax.process_count()} processes"
                if jax.process_count() > 1
                else ""
            )
        )
    nproc = len({d.process_index for d in devices})
    if nproc > 1:
        if nproc != hosts:
            raise MeshError(
                f"mesh {hosts}x{local}: the host axis follows processes, but there "
                f"are {nproc} processes for {hosts} hosts"
            )
        devices.sort(key=lambda d: (d.process_index, d.id))
        per = [sum(d.process_index == p for d in devices) for p in sorted({d.process_index for d in devices})]
        if any(c != local for c in per):
            raise MeshError(
                f"mesh {hosts}x{local}: each process must have {local} devices, got {per}"
            )
    else:
        devices.sort(key=lambda d: d.id)
    grid = np.array(devices, dtype=object).reshape(hosts, local)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def mesh_shape(mesh: Mesh) -> tuple[int, int]:
    """`(H, L)` of a jdmt mesh."""
    return int(mesh.shape[HOST]), int(mesh.shape[LOCAL])


@dataclasses.dataclass(frozen=True)
class Topology:
    """Bandwidth per level of the mesh, for projecting communication time.

    Defaults follow TorchRec's planner: 600 GB/s between devices of a host,
    12.5 GB/s per device across hosts (100 Gb/s NIC per accelerator).
    """

    hosts: int
    local: int
    intra_host_bw: float = 600e9  # bytes/s per device, inside a host
    cross_host_bw: float = 12.5e9  # bytes/s per device, across hosts
    latency_s: float = 0.0  # fixed cost per collective, if wanted

    @classmethod
    def from_mesh(cls, mesh: Mesh, **overrides) -> "Topology":
        hosts, local = mesh_shape(mesh)
        return cls(hosts=hosts, local=local, **overrides)

    @property
    def num_devices(self) -> int:
        return self.hosts * self.local

    def host_of(self, device_index: int) -> int:
        return device_index // self.local

    def comm_time_s(
        self, cross_host_bytes_per_device: float, intra_host_bytes_per_device: float,
        num_collectives: int = 0,
    ) -> float:
        """Time of a step's communication if each level runs at its bandwidth."""
        return (
            cross_host_bytes_per_device / self.cross_host_bw
            + intra_host_bytes_per_device / self.intra_host_bw
            + num_collectives * self.latency_s
        )


def host_numpy(x: jax.Array) -> np.ndarray:
    """A global array as host numpy: the whole array on every process
    (gathered over processes when this one does not hold all of it)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
