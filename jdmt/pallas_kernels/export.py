"""Lower kernels for TPU or CUDA from any machine (`jax.export`).

Exporting runs the kernels' Python lowering for the target platform without
its hardware: a CPU-only machine can check that every kernel lowers (Mosaic's
own checks, e.g. VMEM limits, run only when a chip compiles the module).
"""

from __future__ import annotations

import contextlib

import jax

CUSTOM_CALLS = {"tpu": "tpu_custom_call", "cuda": "mosaic_gpu_v2"}


def _abstract_tpu():
    """Pallas asks for the TPU generation when it lowers some operands (a 1-D
    array in HBM, e.g. row-wise Adagrad's accumulator); on a machine without
    a TPU an abstract TPU device answers."""
    mesh = jax.sharding.AbstractMesh(
        (1,), ("x",), abstract_device=jax.sharding.AbstractDevice("TPU v5 lite", 1, "tpu"))
    return jax.sharding.use_abstract_mesh(mesh)


def export_for(platform: str, fn, *args, donate_argnums=()) -> jax.export.Exported:
    """`jax.export` of `jit(fn)` for `platform` ("tpu" or "cuda") at `args`
    (`jax.ShapeDtypeStruct`s).

    Raises:
      ValueError: an unknown platform, or a module without the platform's
        Mosaic custom call (the kernels did not lower as kernels).
    """
    if platform not in CUSTOM_CALLS:
        raise ValueError(f"platform must be one of {tuple(CUSTOM_CALLS)}, got {platform!r}")
    ctx = _abstract_tpu() if platform == "tpu" else contextlib.nullcontext()
    with ctx:
        exported = jax.export.export(jax.jit(fn, donate_argnums=donate_argnums),
                                     platforms=[platform])(*args)
    if CUSTOM_CALLS[platform] not in exported.mlir_module():
        raise ValueError(f"no {CUSTOM_CALLS[platform]} in the module exported for {platform}")
    return exported


__all__ = ["CUSTOM_CALLS", "export_for"]
