"""What every kernel family shares: implementation choice, targets, validation.

An operation has one public wrapper (e.g. `pooled_lookup`) and one XLA
reference with the same signature; the wrapper validates its inputs once,
brings them to a canonical form in XLA (masks folded into ids and weights),
then runs either the reference or the Pallas kernel of a *target*:

- `tpu`: Mosaic TPU kernels (`jdmt/pallas_kernels/tpu/`): ids in scalar
  memory, rows fetched from HBM by DMA, double-buffered.
- `gpu`: Mosaic GPU kernels (`jdmt/pallas_kernels/gpu/`).

One compiled artifact cannot hold both (docs/design.md: each kernel exports for
its own platform), so the target is chosen when the wrapper is traced: from
the backend, or given explicitly (exporting for TPU or CUDA from a CPU
machine). On a CPU backend a Pallas kernel runs in interpret mode (the TPU
kernel by default), which is how the tests check kernels against their
references.
"""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp


class Kernel(str, enum.Enum):
    """Which implementation of the lookups and sparse updates a run uses."""

    AUTO = "auto"  # XLA on every platform until the Pallas kernels are verified on hardware
    PALLAS = "pallas"
    XLA = "xla"


TARGETS = ("tpu", "gpu")


@dataclasses.dataclass(frozen=True)
class Impl:
    """A resolved implementation: `kernel` is "xla" or "pallas"; for Pallas,
    the `target` whose kernel runs and whether it is interpreted.

    `interpret` is False (compile for the target), True (Pallas' XLA
    interpreter), or a target's interpret-parameters object (e.g.
    `pltpu.InterpretParams()`, which simulates DMAs and semaphores)."""

    kernel: str = "xla"
    target: str | None = None
    interpret: object = False
    # XLA path on CPU: threads of each C++ kernel call (`jdmt.embeddings.
    # cpu_kernels`: the pooled lookup and the sparse update); 0: no C++ lookup.
    cpu_threads: int = 0

    @property
    def pallas(self) -> bool:
        return self.kernel == Kernel.PALLAS.value

    @property
    def cpu(self) -> bool:
        """Whether the C++ CPU kernels run (the XLA path with `cpu_threads`)."""
        return bool(self.cpu_threads) and not self.pallas


XLA = Impl()


def backend_target(platform: str | None = None) -> tuple[str | None, bool]:
    """(Pallas target, interpret?) for a JAX platform name ("cpu", "tpu",
    "gpu"/"cuda"/"rocm"): CPU runs the TPU kernels interpreted."""
    platform = platform or jax.default_backend()
    if platform == "tpu":
        return "tpu", False
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu", False
    return "tpu", True


def resolve(
    kernel: str | Kernel = Kernel.XLA,
    target: str | None = None,
    interpret: object = None,
    platform: str | None = None,
) -> Impl:
    """The implementation to run for `kernel` on `platform` (default: the
    default backend).

    Args:
      kernel: "auto" (XLA), "pallas" or "xla".
      target: force the Pallas target ("tpu" or "gpu"), e.g. to export for
        another platform or to interpret the GPU kernel on CPU.
      interpret: force interpret mode on (True or interpret parameters) or
        off (False); default: on exactly when the platform is a CPU.
      platform: the platform the program runs on (default: jax's default backend).

    Raises:
      ValueError: an unknown kernel or target.
    """
    try:
        kernel = Kernel(kernel)
    except ValueError:
        raise ValueError(f"kernel must be one of {[k.value for k in Kernel]}, got {kernel!r}") from None
    if target is not None and target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    platform = platform or jax.default_backend()
    if kernel is Kernel.AUTO:
        # The Pallas kernels are checked interpreted and exported, but have
        # not yet run compiled on GPU or TPU hardware: 'auto' takes the XLA
        # path everywhere until they have, and Pallas is chosen by name.
        kernel = Kernel.XLA if target is None else Kernel.PALLAS
    if kernel is Kernel.XLA:
        return XLA
    auto_target, auto_interpret = backend_target(platform)
    impl = Impl(
        Kernel.PALLAS.value,
        target or auto_target,
        auto_interpret if interpret is None else interpret,
    )
    if impl.target == "gpu" and impl.interpret is False and platform in ("gpu", "cuda", "rocm"):
        check_mosaic_gpu()
    return impl


def check_mosaic_gpu(devices=None) -> None:
    """Raise a ValueError unless every device can run the Mosaic GPU kernels:
    an NVIDIA GPU of compute capability 9.0 or newer (Hopper's sm_90a
    instructions). ROCm GPUs and older NVIDIA GPUs are refused with the
    alternative named (kernel='xla')."""
    for d in devices if devices is not None else jax.devices():
        if d.platform == "rocm" or "rocm" in str(getattr(d.client, "platform_version", "")).lower():
            raise ValueError(f"the Pallas GPU kernels are Mosaic GPU kernels for NVIDIA GPUs; "
                             f"{d.device_kind} is a ROCm device: use kernel='xla'")
        cc = getattr(d, "compute_capability", None)
        if cc is None:
            continue
        major = int(str(cc).split(".")[0])
        if major < 9:
            raise ValueError(
                f"the Pallas GPU kernels (Mosaic GPU) need compute capability 9.0 or newer; "
                f"{d.device_kind} has {cc}: use kernel='xla'"
            )


def target_module(impl: Impl):
    """The package holding `impl.target`'s kernels."""
    if impl.target == "tpu":
        from jdmt.pallas_kernels import tpu

        return tpu
    if impl.target == "gpu":
        from jdmt.pallas_kernels import gpu

        return gpu
    raise ValueError(f"no Pallas target {impl.target!r}")


def as_arrays(*xs):
    """JAX arrays of the public entry points' array arguments (None stays None)."""
    return tuple(None if x is None else jnp.asarray(x) for x in xs)


# ---- validation: one validator per operation, shared by kernel and reference ---------------


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _float(x, name: str) -> None:
    _need(jnp.issubdtype(x.dtype, jnp.floating), f"{name} must be floating, got {x.dtype}")


def _int(x, name: str) -> None:
    _need(jnp.issubdtype(x.dtype, jnp.integer), f"{name} must be integer, got {x.dtype}")


COMBINERS = ("sum", "mean")


def check_table(table) -> None:
    _need(table.ndim == 2, f"table must be [rows, dim], got shape {table.shape}")
    _float(table, "table")


def check_bags(ids, lengths, weights, what: str = "ids") -> None:
    """ids: i32[N, L]; lengths: i32[N] or None; weights: f[N, L] or None."""
    _need(ids.ndim == 2, f"{what} must be [bags, ids per bag], got shape {ids.shape}")
    _int(ids, what)
    if lengths is not None:
        _need(lengths.shape == ids.shape[:1], f"lengths must be [{ids.shape[0]}], got {lengths.shape}")
        _int(lengths, "lengths")
    if weights is not None:
        _need(weights.shape == ids.shape, f"weights must have the ids' shape {ids.shape}, got {weights.shape}")
        _float(weights, "weights")


def check_combiner(combiner: str) -> None:
    _need(combiner in COMBINERS, f"combiner must be one of {COMBINERS}, got {combiner!r}")


def canonical_bags(ids, lengths, weights, num_rows: int, combiner: str = "sum"):
    """Fold lengths, the id range and the combiner into (ids, weights).

    Returns:
      ids: i32[N, L], -1 where a position holds no valid id (past the
        bag's length, negative, or >= num_rows).
      weights: f32[N, L] or None: the per-position weight, 0 where the id is
        not valid, divided by the bag's valid count for "mean". None means
        every valid position weighs 1 (sum without weights).
    """
    ids = ids.astype(jnp.int32)
    valid = (ids >= 0) & (ids < num_rows)
    if lengths is not None:
        pos = jax.lax.broadcasted_iota(jnp.int32, ids.shape, 1)
        valid = valid & (pos < lengths.astype(jnp.int32)[:, None])
    ids = jnp.where(valid, ids, -1)
    if weights is None and combiner == "sum":
        return ids, None
    w = jnp.ones(ids.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    w = jnp.where(valid, w, 0.0)
    if combiner == "mean":
        count = jnp.sum(valid, axis=1, dtype=jnp.int32)
        w = w / jnp.maximum(count, 1).astype(jnp.float32)[:, None]
    return ids, w


__all__ = [
    "COMBINERS",
    "Impl",
    "Kernel",
    "TARGETS",
    "XLA",
    "as_arrays",
    "backend_target",
    "canonical_bags",
    "check_bags",
    "check_combiner",
    "check_table",
    "resolve",
    "target_module",
]
