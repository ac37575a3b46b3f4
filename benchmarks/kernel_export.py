#!/usr/bin/env python
"""Export every Pallas kernel for TPU and CUDA at realistic shapes, from any machine.

    python benchmarks/kernel_export.py             # every kernel, both platforms
    python benchmarks/kernel_export.py --platforms cuda

For each platform, operation and shape it lowers the public wrapper with the
platform's kernels compiled (`kernel="pallas"`, `interpret=False`) through
`jax.export`, and prints one JSON object: whether it lowered, the Mosaic
custom calls in the module, whether the update aliases its state in place,
the serialized size and the time taken. Shapes: dims 64, 100 and 128 over
100,003 rows, 4096 bags of 1, 10 and 100 ids, 512 sequences of 256, and the
backward and update of 40,960 ids. Lowering is the Python side only:
Mosaic's own checks (VMEM limits, layouts, registers) run when a real chip
compiles the module.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROWS = 100_003


def cases(platform: str):
    """(operation, shape label, fn, args, donate) of every export."""
    import jax
    import jax.numpy as jnp

    from jdmt.pallas_kernels import pooled_lookup, row_gradients, sequence_lookup, sparse_update

    target = "tpu" if platform == "tpu" else "gpu"
    kw = dict(kernel="pallas", target=target, interpret=False)
    S = jax.ShapeDtypeStruct
    f32, i32 = jnp.float32, jnp.int32
    for d in (64, 100, 128):
        table = S((ROWS, d), f32)
        for ln in (1, 10, 100):
            yield ("pooled_lookup", f"D={d} N=4096 L={ln} mean",
                   lambda t, i: pooled_lookup(t, i, combiner="mean", **kw),
                   (table, S((4096, ln), i32)), ())
        yield ("pooled_lookup_grad", f"D={d} N=4096 L=10 weighted",
               jax.grad(lambda t, i, w: jnp.sum(pooled_lookup(t, i, None, w, **kw) ** 2), (0, 2)),
               (table, S((4096, 10), i32), S((4096, 10), f32)), ())
        yield ("sequence_lookup", f"D={d} N=512 S=256",
               lambda t, i: sequence_lookup(t, i, **kw), (table, S((512, 256), i32)), ())
        yield ("row_gradients", f"D={d} N=4096 L=10",
               lambda i, g: row_gradients(i, g, num_rows=ROWS, **kw),
               (S((4096, 10), i32), S((4096, d), f32)), ())
        for kind, acc in (("rowwise_adagrad", (ROWS,)), ("adagrad", (ROWS, d)), ("sgd", None)):
            yield ("sparse_update", f"D={d} U=40960 {kind}",
                   lambda t, a, r, g, k=kind: sparse_update(t, a, r, g, 0.01, kind=k, **kw),
                   (table, None if acc is None else S(acc, f32), S((40960,), i32),
                    S((40960, d), f32)), (0, 1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--platforms", default="tpu,cuda")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from jdmt.pallas_kernels.export import CUSTOM_CALLS, export_for

    failed = 0
    for platform in args.platforms.split(","):
        for op, shape, fn, fargs, donate in cases(platform):
            row = {"benchmark": "kernel_export", "platform": platform, "operation": op,
                   "shape": shape}
            t0 = time.perf_counter()
            try:
                exp = export_for(platform, fn, *fargs, donate_argnums=donate)
            except Exception as e:  # a kernel that does not lower is the result here
                failed += 1
                row.update(lowered=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            else:
                text = exp.mlir_module()
                row.update(
                    lowered=True,
                    custom_calls=text.count(f"stablehlo.custom_call @{CUSTOM_CALLS[platform]}"),
                    in_place=("tf.aliasing_output" in text) if donate else None,
                    serialized_bytes=len(exp.serialize()),
                )
            row["seconds"] = round(time.perf_counter() - t0, 2)
            print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
