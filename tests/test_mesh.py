"""Mesh spec parsing, device-count errors, topology."""

import subprocess
import sys

import jax
import pytest

from jdmt.mesh import (HOST, LOCAL, MeshError, Topology, emulate_cpu_devices, make_mesh, mesh_shape,
                       parse_mesh_spec, prepare_devices)


@pytest.mark.parametrize("spec,want", [("8x8", (8, 8)), ("2x4", (2, 4)), ("1x1", (1, 1)),
                                       (" 4X2 ", (4, 2)), ((2, 4), (2, 4))])
def test_parse(spec, want):
    assert parse_mesh_spec(spec) == want


@pytest.mark.parametrize("spec", ["", "8", "8x", "x8", "2x4x2", "ax4", "2*4", "-2x4", "2.5x4"])
def test_malformed_specs_are_named(spec):
    with pytest.raises(MeshError, match="malformed mesh spec"):
        parse_mesh_spec(spec)


def test_zero_is_rejected():
    with pytest.raises(MeshError, match=">= 1"):
        parse_mesh_spec("0x4")


def test_mesh_axes_and_device_order():
    mesh = make_mesh("2x4")
    assert mesh.axis_names == (HOST, LOCAL)
    assert mesh_shape(mesh) == (2, 4)
    assert [d.id for d in mesh.devices.flat] == sorted(d.id for d in jax.devices())


@pytest.mark.parametrize("spec", ["4x4", "1x4", "3x3"])
def test_device_count_mismatch_is_an_error(spec):
    with pytest.raises(MeshError, match=r"needs \d+ devices, but 8"):
        make_mesh(spec)


def test_topology_defaults_and_time():
    topo = Topology.from_mesh(make_mesh("2x4"))
    assert (topo.hosts, topo.local, topo.num_devices) == (2, 4, 8)
    assert topo.intra_host_bw == 600e9 and topo.cross_host_bw == 12.5e9
    assert topo.host_of(5) == 1
    assert topo.comm_time_s(12.5e9, 600e9) == pytest.approx(2.0)
    fast = Topology.from_mesh(make_mesh("2x4"), cross_host_bw=50e9)
    assert fast.comm_time_s(12.5e9, 0) == pytest.approx(0.25)


def test_prepare_devices_emulates_in_a_fresh_process():
    """An entry point asking for 8x8 on a CPU-only machine gets 64 devices."""
    code = (
        "import sys, jax; from jdmt.mesh import prepare_devices, make_mesh;"
        "prepare_devices('8x8'); m = make_mesh('8x8'); print(m.devices.size)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"JAX_PLATFORMS": "cpu", "PATH": ""}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "64"
    assert "emulating 64 CPU devices" in out.stderr


def _fresh_python(code):
    """Run `code` in a new interpreter: CPU only, no XLA_FLAGS (so 1 device by default)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"JAX_PLATFORMS": "cpu", "PATH": ""}, timeout=120)


def test_prepare_devices_after_jax_started_is_a_clear_error():
    """Set-up called after JAX's CPU backend started cannot add devices: it says so."""
    late = _fresh_python(
        "import jax\n"
        "from jdmt.mesh import MeshError, prepare_devices\n"
        "print(len(jax.devices()))\n"  # starts the backend with 1 CPU device
        "try:\n"
        "    prepare_devices('2x4')\n"
        "except MeshError as e:\n"
        "    print(e)\n"
    )
    assert late.returncode == 0, late.stderr
    first, msg = late.stdout.strip().split("\n", 1)
    assert first == "1"
    assert "initialised before the device count could be set" in msg
    assert "it has 1 device, 8 are needed" in msg
    assert "prepare_devices" in msg and "--xla_force_host_platform_device_count=8" in msg
    # called first, the same request works
    early = _fresh_python(
        "from jdmt.mesh import prepare_devices, make_mesh; import jax;"
        "prepare_devices('2x4'); print(make_mesh('2x4').devices.size, len(jax.devices()))"
    )
    assert early.returncode == 0, early.stderr
    assert early.stdout.strip() == "8 8"


def test_late_set_up_with_enough_devices_is_fine():
    jax.devices()  # the test process's backend: 8 CPU devices (conftest)
    assert emulate_cpu_devices(8) is False  # already there: nothing to do
    assert prepare_devices("2x4") == (2, 4)
    assert prepare_devices("1x1") == (1, 1)  # fewer is make_mesh's business
    with pytest.raises(MeshError, match="it has 8 devices, 16 are needed"):
        prepare_devices("4x4")
