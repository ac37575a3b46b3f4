"""Checkpoints: bit-identical resume after SIGKILL, restores onto other meshes and
plans, kills during a save, and runs that fail without touching the directory."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jdmt.data import BadBatchError, SyntheticData
from jdmt.train import TrainConfig, Trainer, train_and_evaluate
from jdmt.train.checkpoint import CheckpointError, Checkpointer

ROOT = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).parent / "helpers"

# A small uniform synthetic set; the same flags drive train.py and TrainConfig.
FLAGS = dict(num_tables=6, rows_per_table=1000, pooling=4, embedding_dim=8, global_batch=256,
             eval_batches=2, bottom_mlp=(16,), top_mlp=(16,))
CLI = ["--num-tables", "6", "--rows-per-table", "1000", "--pooling", "4", "--embedding-dim", "8",
       "--batch-size", "256", "--eval-batches", "2", "--bottom-mlp", "16", "--top-mlp", "16",
       "--no-progress"]


def config(**kw) -> TrainConfig:
    return TrainConfig(**{**FLAGS, "progress": False, **kw})


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _train_py(*args, timeout=300, check=True):
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *CLI, *args],
                       capture_output=True, text=True, env=_env(), timeout=timeout)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def _tree_digest(directory: Path) -> dict[str, str]:
    return {
        str(f.relative_to(directory)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(directory.rglob("*")) if f.is_file()
    }


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    steps = 16
    full = train_and_evaluate(config(steps=steps))
    ckdir, out = tmp_path / "ck", tmp_path / "resumed.json"
    args = ["--mesh=2x4", "--steps", str(steps), "--checkpoint-dir", str(ckdir),
            "--checkpoint-every", "3"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *CLI, *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            done = [int(d.name) for d in ckdir.glob("*") if d.name.isdigit()]
            if any(s >= 6 for s in done):
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = Checkpointer(ckdir).latest_step()
    assert killed_at is not None and 6 <= killed_at < steps
    _train_py(*args, "--resume", "--summary-json", str(out))
    resumed = json.loads(out.read_text())
    assert resumed["start_step"] == killed_at
    assert resumed["train_loss"] == full["train_loss"]  # every step, bit for bit
    assert resumed["eval_auc"] == full["eval_auc"]
    assert resumed["eval_logloss"] == full["eval_logloss"]
    assert resumed["checkpoint_steps"][-1] == steps


def test_restore_across_meshes_8x8_4x16_2x4(tmp_path, mesh24):
    ckdir = tmp_path / "ck"
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    _train_py("--mesh=8x8", "--steps", "4", "--checkpoint-dir", str(ckdir),
              "--summary-json", str(a))
    _train_py("--mesh=4x16", "--steps", "6", "--checkpoint-dir", str(ckdir), "--resume",
              "--checkpoint-every", "2", "--sharding", "row_wise", "--summary-json", str(b))
    sa, sb = json.loads(a.read_text()), json.loads(b.read_text())
    assert sb["start_step"] == 4 and sb["mesh"] == [4, 16]
    # The resumed 4x16 steps continue the 8x8 model: same losses as 2x4 uninterrupted.
    ref = train_and_evaluate(config(steps=6), mesh24)
    np.testing.assert_allclose(sb["train_loss"], ref["train_loss"], rtol=2e-5)

    ckpt = Checkpointer(ckdir)
    try:
        assert ckpt.all_steps() == [4, 6]
        for step, want, sharding in ((4, sa, "column_wise"), (6, sb, "table_wise")):
            trainer = Trainer(config(steps=step, sharding=sharding), mesh24)
            state, meta = trainer.restore(ckpt, step)
            assert meta["layout"]["mesh"] == ([8, 8] if step == 4 else [4, 16])
            ev = trainer.evaluate(state)
            assert ev["auc"] == pytest.approx(want["eval_auc"], abs=1e-6)
            assert ev["logloss"] == pytest.approx(want["eval_logloss"], rel=1e-5)
    finally:
        ckpt.close()


def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path):
    ckdir = tmp_path / "ck"
    p = subprocess.run([sys.executable, str(HELPERS / "kill_during_save.py"), str(ckdir)],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert p.stdout.split() == ["saved", "1", "killing"]
    assert any(".orbax-checkpoint-tmp" in d.name for d in ckdir.iterdir())  # killed mid-write
    ckpt = Checkpointer(ckdir)
    try:
        assert ckpt.latest_step() == 1
        like = {"w": jnp.zeros(1000, jnp.float32), "step": jnp.int32(0)}
        got = ckpt.restore_host(1, like)
        np.testing.assert_array_equal(got["w"], np.arange(1000, dtype=np.float32))
        assert ckpt.meta(1)["note"] == "complete"
        ckpt.save(2, like, {"note": "again"})  # the step can be written again
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2]
    finally:
        ckpt.close()


class _PoisonedData(SyntheticData):
    """Synthetic data whose training batch `bad_step` has a NaN dense value."""

    def __init__(self, features, bad_step, **kw):
        super().__init__(features, **kw)
        self.bad_step = bad_step

    def batch(self, step, global_batch, **kw):
        b = super().batch(step, global_batch, **kw)
        if step == self.bad_step:
            b.dense[3, 1] = np.nan
        return b


def test_failed_runs_leave_the_checkpoint_dir_untouched(tmp_path, mesh24):
    ckdir = tmp_path / "ck"
    train_and_evaluate(config(steps=3, checkpoint_dir=str(ckdir)), mesh24)
    before = _tree_digest(ckdir)
    assert before

    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train_and_evaluate(config(steps=5, checkpoint_dir=str(ckdir)), mesh24)
    with pytest.raises(CheckpointError, match="embedding_dim"):
        train_and_evaluate(
            config(steps=5, checkpoint_dir=str(ckdir), resume=True, embedding_dim=4), mesh24
        )
    with pytest.raises(CheckpointError, match="embedding_optimizer"):
        train_and_evaluate(
            config(steps=5, checkpoint_dir=str(ckdir), resume=True, embedding_optimizer="sgd"),
            mesh24,
        )
    cfg = config(steps=5, checkpoint_dir=str(ckdir), resume=True, checkpoint_every=1)
    data = _PoisonedData(cfg.feature_set(), bad_step=3, seed=0)
    with pytest.raises(BadBatchError, match=r"training batch 3.*dense.*NaN|training batch 3"):
        train_and_evaluate(cfg, mesh24, data)
    assert _tree_digest(ckdir) == before

    p = _train_py("--mesh=2x4", "--steps", "5", "--checkpoint-dir", str(ckdir), check=False)
    assert p.returncode == 1 and "already holds checkpoints" in p.stderr
    assert _tree_digest(ckdir) == before
