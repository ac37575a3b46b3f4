"""Training checkpoints with orbax-checkpoint, restorable onto another mesh.

A checkpoint (one directory per step, written by orbax's asynchronous
`CheckpointManager`) holds two items:

- `state`: the `TrainState` pytree as it lives on the devices: dense
  parameters, their optax state, and every storage buffer of the tables
  (one per embedding width: the rows each device owns, and their optimizer
  accumulators; `jdmt.embeddings.layout`), each shard written by the
  process that owns it;
- `meta`: JSON: the step, the data position, every step's loss so far, the
  evaluations so far, and the *layout*: features, model, optimizers, mesh
  shape and the sharding plan (`{table: placement}`).

Restoring onto the same layout reads the shards straight onto their devices.
Restoring onto another mesh or plan (8x8 -> 4x16 -> 2x4, or table_wise ->
row_wise, or flat <-> identity towers) rebuilds the saved layout from the
meta (`Layout` needs only features, plan and mesh shape), cuts the full
tables out of it on the host (`Layout.to_dense`) and lays them out for the
new plan (`ShardedEmbeddings.from_dense`). This costs host memory of the whole model
on every process, once, at start-up.

Orbax writes a step into a temporary directory and renames it when complete,
so a process killed during a save leaves the previous checkpoints intact and
the half-written one invisible (`latest_step` never returns it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from jdmt.data.specs import FeatureSet, Kind, SparseFeature

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "features_from_json",
    "features_json",
    "layout_differences",
]

FORMAT_VERSION = 2  # 2: storage per width, rows of row-wise tables spread id mod S


class CheckpointError(ValueError):
    """A checkpoint directory or checkpoint that cannot be used as asked."""


def features_json(features: FeatureSet) -> dict:
    """The feature set as plain JSON (what must match for a restore)."""
    return {
        "num_dense": features.num_dense,
        "sparse": [
            {k: (v.value if hasattr(v, "value") else v) for k, v in dataclasses.asdict(f).items()}
            for f in features.sparse
        ],
    }


# Layout keys that must be equal to restore (the rest, mesh and plan, may differ).
_MUST_MATCH = ("features", "model", "embedding_optimizer", "dense_optimizer", "dense_optimizer_chain")



def features_from_json(obj: Mapping[str, Any]) -> FeatureSet:
    """The inverse of `features_json`."""
    return FeatureSet(
        tuple(SparseFeature(**{**f, "kind": Kind(f["kind"])}) for f in obj["sparse"]),
        num_dense=int(obj["num_dense"]),
    )


def layout_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable reasons why a saved layout cannot restore into `current`."""
    out = []
    for key in _MUST_MATCH:
        a, b = saved.get(key), current.get(key)
        if a == b:
            continue
        if key == "features" and a and b:
            out += _feature_differences(a, b)
        else:
            out.append(f"{key} differs: checkpoint {json.dumps(a)}, this run {json.dumps(b)}")
    return out


def _feature_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """What differs between two `features_json` (checkpoint `a`, this run `b`)."""
    sa = {f["name"]: f for f in a["sparse"]}
    sb = {f["name"]: f for f in b["sparse"]}
    out = []
    if set(sa) != set(sb):
        out.append(
            f"features differ: only in the checkpoint {sorted(set(sa) - set(sb))[:5]}, "
            f"only in this run {sorted(set(sb) - set(sa))[:5]}"
        )
    else:
        out += [f"feature {n!r} differs: checkpoint {sa[n]}, this run {sb[n]}"
                for n in sa if sa[n] != sb[n]][:1]
    if a.get("num_dense") != b.get("num_dense"):
        out.append(f"dense features: checkpoint {a.get('num_dense')}, this run {b.get('num_dense')}")
    if not out and list(sa) != list(sb):
        out.append("the features are in another order")
    return out


class Checkpointer:
    """Asynchronous orbax checkpoints of a training run in `directory`.

    Args:
      directory: where the step directories go (created if missing).
      keep: how many of the newest checkpoints to keep.
      asynchronous: write in the background (the step loop goes on while
        the shards, already copied off the donated buffers, are written).

    Every process of a multi-process run makes one and calls `save` and
    `restore` together; each writes and reads its own shards.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, asynchronous: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(f"checkpoint directory {self.directory} is a file")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=asynchronous,
            create=True,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    # ---- queries ----------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (None when there is none)."""
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def meta(self, step: int) -> dict:
        """The JSON meta of checkpoint `step`."""
        out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = dict(out["meta"])
        if meta.get("format") != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} has format {meta.get('format')}, "
                f"this version reads {FORMAT_VERSION}"
            )
        return meta

    # ---- save / restore -----------------------------------------------------------------------

    def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
        """Start saving `state` and `meta` as checkpoint `step`.

        Returns once the arrays have been copied off the devices (so `state`
        may be donated to the next step right away); the files are written in
        the background and become visible only when complete.
        """
        meta = {**meta, "format": FORMAT_VERSION, "step": int(step)}
        self._mngr.save(
            step,
            args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def restore(self, step: int, target: Any) -> Any:
        """Checkpoint `step`'s state onto the shardings of `target`, a pytree of
        `jax.ShapeDtypeStruct`s with shardings (same layout as when saved)."""
        args = ocp.checkpoint_utils.construct_restore_args(target)
        out = self._mngr.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.PyTreeRestore(item=target, restore_args=args)),
        )
        return out["state"]

    def restore_host(self, step: int, like: Any) -> Any:
        """Checkpoint `step`'s state as host numpy arrays; `like` is a pytree
        with the saved structure (leaves are ignored, None stays None)."""
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), like)
        out = self._mngr.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.PyTreeRestore(item=like, restore_args=args)),
        )
        return out["state"]

    def wait(self) -> None:
        """Block until every started save is complete on disk."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Finish the pending saves and release the manager."""
        self._mngr.wait_until_finished()
        self._mngr.close()
