"""The training loop of a `Trainer`: steps dispatched ahead of the host,
their stats fetched in windows, overflowed steps run again, evaluations,
checkpoints, the profile window and the progress bar.

`run_steps(trainer, state, start, checkpointer, history)` is what
`Trainer.run` calls.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import jax
import numpy as np

from jdmt.embeddings import OutOfRangeIdError
from jdmt.train.batches import Batch, _Prefetch
from jdmt.train.growth_prune import step_flops


def run_steps(trainer, state, start: int, ckpt, history: dict):
    """Steps `[start, steps)`, evaluations and checkpoints; updates `history`.

    Steps are dispatched without waiting for them: their stats stay on
    the devices and are fetched together every `sync_every` steps (and
    before an evaluation, a checkpoint, a phase change, the profile's end
    and the run's end), so the host makes and transfers the next batches
    while the devices work. A step that cannot be applied (an overflow,
    bad ids, a non-finite loss) changes nothing and tells the next step
    (`halt`), which then changes nothing either; when the host sees it,
    it raises the capacities and runs the skipped batches again, or
    stops with the cause named. Step times are the wall time between two
    fetches over the steps between them (compiles and phase changes
    excluded)."""
    cfg = trainer.config
    show = cfg.progress and jax.process_index() == 0
    losses = history["train_loss"]
    step_times: list[float] = []
    compile_s = 0.0
    comm = None
    local_batch = cfg.global_batch // trainer.emb.num_devices
    # Profile steps [p0, p1) (0-based): a few after the first one run here.
    p0 = min(start + 1, cfg.steps - 1)
    p1 = min(p0 + 3, cfg.steps)
    tracing = False
    payload = {"cross": [], "intra": [], "requested": 0, "unique": 0, "unique_host": 0}
    steps: dict[tuple[str, int], Any] = {}  # compiled steps by (widths, capacity version)
    no_halt = trainer.no_halt()
    halt = no_halt
    window: list[tuple[int, Batch, dict]] = []  # dispatched, not yet fetched
    redo: list[tuple[int, Batch]] = []  # skipped steps to run again (after an overflow)
    t_mark = time.perf_counter()  # when the window's first step began
    excluded = 0.0  # compiles and phase changes inside the window (off the step times)
    fitted = False
    ev = None

    def evaluate(at: int) -> dict:
        out = trainer.evaluate(state)
        history["eval_history"].append({"step": at, "auc": out["auc"], "logloss": out["logloss"]})
        log.log(at, "eval", auc=out["auc"], logloss=out["logloss"])
        return out

    def fetch() -> bool:
        """Fetch the window's stats (one transfer) and account its steps;
        False when a step was skipped for an overflow (the capacities are
        raised and its batches queued in `redo`)."""
        nonlocal halt, t_mark, excluded
        if not window:
            return True
        got = jax.device_get([st for _, _, st in window])
        now = time.perf_counter()
        per_step = (now - t_mark - excluded) / len(window)
        if window[0][0] == start:  # the first step keeps its compile (first_step_s)
            per_step = now - t_mark
        applied = True
        for k, ((s, _, _), st) in enumerate(zip(window, got)):
            if bool(st["halted"]):
                _halted(trainer, s, st, local_batch)  # raises unless it was an overflow
                redo[:0] = [(q, b) for q, b, _ in window[k:]]
                halt, applied = no_halt, False
                break
            loss = float(st["loss"])
            losses.append(loss)
            step_times.append(per_step)
            payload["cross"].append(float(st["payload_cross_host_bytes"]))
            payload["intra"].append(float(st["payload_intra_host_bytes"]))
            payload["requested"] += int(st["ids_requested"])
            payload["unique"] += int(st["ids_unique"])
            payload["unique_host"] += int(st["ids_unique_host"])
            history["steps_by_width"][width] = history["steps_by_width"].get(width, 0) + 1
            if trainer.gp is not None:
                trainer.gp.record(s, per_step)
            log.log(s + 1, "train", loss=loss, step_time_s=per_step,
                    examples_per_sec=cfg.global_batch / max(per_step, 1e-9))
            bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{cfg.global_batch / max(per_step, 1e-9):,.0f}",
                            refresh=False)
            bar.update(1)
        window.clear()
        t_mark, excluded = time.perf_counter(), 0.0
        return applied

    bar = _progress(cfg.steps, show, initial=start)
    log = trainer._metrics_log()
    prefetch = iter(_Prefetch(trainer._host_train_batch, range(start, cfg.steps)))
    width = "full" if trainer.gp is None else trainer.gp.signature
    try:
        while True:
            if redo:
                s, host_batch = redo.pop(0)
            else:
                item = next(prefetch, None)
                if item is None:
                    break
                s, host_batch = item
            if trainer.gp is not None and trainer.gp.changes_at(s) and window:
                # a phase change prunes or grows the state: every earlier step must have held
                redo.append((s, host_batch))
                fetch()
                continue
            if cfg.profile_dir is not None and s == p0 and not tracing:
                jax.profiler.start_trace(cfg.profile_dir)
                tracing = True
            t0 = time.perf_counter()
            if not fitted:  # the first batch sizes the exchanges (its compile is first_step_s)
                fitted, t_mark = True, t0
                caps = trainer.fit_capacities(host_batch, "train")
                if jax.process_index() == 0:
                    print(f"jdmt: exchange capacities (rows per block, from batch {s}): {caps}",
                          file=sys.stderr)
            if trainer.gp is not None:  # a new phase's first step prunes or grows the state
                state = trainer.gp.enter(state, s)
                width = trainer.gp.signature
                excluded += time.perf_counter() - t0
            batch = trainer.device_batch(host_batch)
            if (width, trainer.emb.version) not in steps:  # the first step, a new phase, more capacity
                tc = time.perf_counter()
                step, comm_w = trainer.compile_ahead(state, batch, halt)
                steps[(width, trainer.emb.version)] = step
                history["step_flops"][width] = step_flops(step)
                if comm is None or width == "full":  # the summary's bytes: the full step's
                    comm = comm_w
                compile_s += time.perf_counter() - tc
                excluded += time.perf_counter() - tc
            state, stats = steps[(width, trainer.emb.version)](state, batch, halt)
            halt = stats["halted"]
            window.append((s, host_batch, stats))
            done = s + 1
            evaluating = done < cfg.steps and cfg.eval_every and done % cfg.eval_every == 0
            saving = ckpt is not None and (
                done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0))
            if (s == start or len(window) >= cfg.sync_every or evaluating or saving
                    or done == cfg.steps or (tracing and done == p1)):
                if not fetch():
                    continue  # the skipped steps run again first
            if tracing and done == p1:
                jax.profiler.stop_trace()
                tracing = False
            if evaluating:
                out = evaluate(done)
                bar.write(f"step {done}: eval AUC {out['auc']:.4f}, logloss {out['logloss']:.4f}")
            if done == cfg.steps:
                ev = evaluate(done)
            if saving:
                saved = state if trainer.gp is None else trainer.gp.full_state(state)
                ckpt.save(done, saved, trainer._checkpoint_meta(done, history))
            if evaluating or saving:
                t_mark, excluded = time.perf_counter(), 0.0  # off the step times
        if start == cfg.steps:  # resumed at the last step: evaluate the restored model
            if history["eval_history"] and history["eval_history"][-1]["step"] == start:
                history["eval_history"].pop()  # replaced by this evaluation
            ev = evaluate(start)
        if ckpt is not None:
            ckpt.wait()
    finally:
        if tracing:
            jax.profiler.stop_trace()
        prefetch.close()
        bar.close()
        log.close()
    return state, {
        "step_times": step_times,
        "compile_s": compile_s,
        "comm": comm,
        "payload": payload,
        "eval_examples": ev["examples"],
        # throughput over the steps after the compiled first one (or that one alone)
        "train_wall_s": sum(step_times[1:]) if len(step_times) > 1 else sum(step_times) - compile_s,
    }


def _halted(trainer, s: int, st: dict, local_batch: int) -> None:
    """Step `s` changed nothing (`stats["halted"]`): raise the capacities
    if an exchange overflowed (the caller runs it again), else stop with
    the cause named."""
    if int(st["out_of_range"]):
        raise OutOfRangeIdError(
            f"out_of_range_ids: {int(st['out_of_range'])} ids of training batch {s} lie outside their "
            "tables' rows on the device path (check_batch passed them; hashed "
            "features are reduced modulo rows); the step was not applied"
        )
    if int(st["overflow"]):
        trainer.overflow_steps += 1
        trainer._grow(local_batch, st, f"training step {s}")
        return
    loss = float(st["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss} at step {s}; the step was not applied")
    raise RuntimeError(f"training step {s} was skipped with no cause: a bug")


class _NoBar:
    def update(self, n=1): ...
    def set_postfix(self, *a, **k): ...
    def write(self, s): print(s, file=sys.stderr)
    def close(self): ...


def _progress(total: int, show: bool, initial: int = 0):
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr
    )
