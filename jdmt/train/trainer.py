"""The end-to-end trainer: sharded embeddings + a data-parallel dense model.

One jitted step (state donated) does the whole data flow:

    embs, ctx, stats = emb.forward(tables, ids, lengths)   # ids to owners, rows back
    loss, (g_params, g_embs) = value_and_grad(loss_fn)(params, embs)
        loss_fn: the model on the embeddings (or on the Tower Modules' outputs) -> BCE
    params    = optax update (replicated; GSPMD all-reduces the gradient)
    tables    = emb.update(tables, ctx, g_embs, ids, lengths)  # gradients to owners

A step whose exchanges overflowed a capacity changes nothing and is
repeated with more (`Trainer._grow`); one with ids outside their tables
stops the run before anything is written.

`Trainer` holds the pieces (mesh, data, embeddings, model, optimizer, the
jitted step and eval functions) so later features (other models, data
sources, checkpoints, communication reports) plug into one place;
`train_and_evaluate(config)` is the one-call entry point.
"""

from __future__ import annotations

import collections
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jdmt import cpu_malloc, metrics, precision
from jdmt.comm import comm_report_compiled
from jdmt.data import (
    Batch,
    CriteoData,
    SyntheticData,
)
from jdmt.embeddings import (
    Placement,
    ShardedEmbeddings,
    ShardingType,
    SparseOptimizer,
    TableState,
    plan_sharding,
)
from jdmt.embeddings.layout import Layout
from jdmt.mesh import DEVICES, HOST, host_numpy, make_mesh, mesh_shape
from jdmt.models import (
    DCN,
    DLRM,
    init_dcn,
    init_dlrm,
    stack_sequences,
)
from jdmt.towers.partition import TowerPartition, balanced_partition, random_partition, round_robin_partition
from jdmt.towers.sptt import SPTT
from jdmt.train.allreduce import hierarchical_psum
from jdmt.train.batches import DataSource, checked_batch
from jdmt.train.config import TrainConfig, _check_tower_sequences
from jdmt.train.growth_prune import GrowthPruneRun, flops_summary, resume_state
from jdmt.train.sharding import auto_plan, load_plan, plan_file_exists, tier_plan, write_plan
from jdmt.train.schedule import dense_optimizer, lr_scale, needs_counter, schedule_steps
from jdmt.train.state import TrainState
from jdmt.train.steps import run_steps
from jdmt.train.checkpoint import (
    CheckpointError,
    Checkpointer,
    features_json,
    layout_differences,
)
from jdmt.train.metrics_log import MetricsLog, NullMetricsLog

__all__ = ["TrainState", "Trainer"]


class Trainer:
    """A training run's pieces; `run()` trains, evaluates and returns the summary.

    Args:
      config: the run's configuration.
      mesh: the `('host','local')` mesh (default: `make_mesh(config.mesh)`).
      data: a data source (default: `SyntheticData(features, seed=...)`).
      partition: the towers of a `tower_partitioner='learned'` run (from
        `jdmt.train.interactions.learned_towers`, which `train_and_evaluate`
        calls); for other partitioners it overrides the configured one.
    """

    def __init__(self, config: TrainConfig, mesh: Mesh | None = None, data: DataSource | None = None,
                 *, partition: TowerPartition | None = None):
        self.config = config
        self._partition = partition
        self.mesh = mesh if mesh is not None else make_mesh(config.mesh)
        self.hosts, self.local = mesh_shape(self.mesh)
        n = self.hosts * self.local
        for what, size in (("global_batch", config.global_batch), ("eval batch size", config.eval_size)):
            if size % n:
                raise ValueError(
                    f"{what} {size} is not divisible by the {n} devices of mesh "
                    f"{self.hosts}x{self.local}"
                )
        self.features = data.features if data is not None else config.feature_set()
        self._check_features()
        if data is not None:
            self.data = data
        elif config.criteo_path is not None:
            self.data = CriteoData(
                config.criteo_path, self.features, global_batch=config.global_batch,
                eval_batches=config.eval_batches, eval_batch_size=config.eval_size,
                eval_path=config.eval_data,
            )
        else:
            self.data = SyntheticData(
                self.features, seed=config.seed if config.data_seed is None else config.data_seed,
                teacher=config.teacher,
            )
        fs = self.features
        self.seq_index = np.array([i for i, f in enumerate(fs.sparse) if not f.pooled], np.int32)
        self.seq_names = tuple(fs.sparse[i].name for i in self.seq_index)
        self.seq_len = max((fs.sparse[i].max_len for i in self.seq_index), default=1)
        sparse_opt = SparseOptimizer(
            config.embedding_optimizer,
            lr=config.embedding_lr,
            initial_accumulator=config.embedding_initial_accumulator,
        )
        self.plan = None
        self.plan_loaded = config.plan is not None and plan_file_exists(config.plan)
        sharding = config.sharding
        if self.plan_loaded:
            sharding = load_plan(self, sparse_opt)
        elif sharding == "auto":
            self.plan = auto_plan(self, sparse_opt)
            sharding = dict(self.plan.placements)
            if jax.process_index() == 0:
                print(f"jdmt: {self.plan.summary()}", file=sys.stderr)
                print(self.plan.table(), file=sys.stderr)
            # Sequence tables the planner made row-wise may take FlexShard tiers: the
            # tier chooser keeps every row cold (a row-wise table) unless tiers pay.
            if config.row_tiers == "auto" and not config.uses_towers:
                for name in self.seq_names:
                    if sharding[name].type is ShardingType.ROW_WISE:
                        sharding[name] = Placement(ShardingType.FLEXSHARD, sharding[name].devices)
        self.tier_report = None
        if sharding == ShardingType.FLEXSHARD.value:
            sharding = plan_sharding(self.features, n, sharding, local=self.local)
        if (not self.plan_loaded and isinstance(sharding, dict)
                and any(p.type is ShardingType.FLEXSHARD for p in sharding.values())):
            sharding = tier_plan(self, sharding, sparse_opt)
        self.sptt = None
        self.num_towers = config.towers
        if config.towers == "auto":  # one tower per host
            self.num_towers = min(self.hosts, len(self.features.sparse))
        if self.num_towers:
            self.sptt = self._build_towers(sparse_opt)
            self.emb = self.sptt.emb
        else:
            self.emb = ShardedEmbeddings(self.features, self.mesh, sharding, sparse_opt,
                                         kernel=config.kernel, row_dedup=config.row_dedup,
                                         table_dtype=config.table_dtype)
            if config.plan is not None and not self.plan_loaded and jax.process_index() == 0:
                write_plan(self, config.plan)
        if config.model == "dcn":
            self.model = DCN(config.embedding_dim, bottom=config.bottom_mlp, top=config.top_mlp,
                             cross_layers=config.cross_layers, low_rank=config.low_rank,
                             sequence_pooling=config.sequence_pooling)
            self._init_params = init_dcn
        else:
            # the interaction in C++ where the embeddings' C++ kernels run (CPU)
            cpu = self.emb.impl.cpu_threads  # 0 unless the C++ kernels run (never with Pallas)
            self.model = DLRM(config.embedding_dim, bottom=config.bottom_mlp, top=config.top_mlp,
                              sequence_pooling=config.sequence_pooling, interaction_threads=cpu,
                              interaction_mesh=self.mesh if cpu else None)
            self._init_params = init_dlrm
        self.full_model = self.model  # `model` is a pruned one during a pruned phase
        self.tower_module = None if self.sptt is None or self.sptt.identity else self.sptt.module
        self.emb_path = self.sptt if self.sptt is not None else self.emb
        sched = (schedule_steps(config.steps, config.warmup_steps, config.decay_start,
                                config.decay_steps) if config.lr_schedule == "dlrm" else (0, 0, 0))
        self.lr_scale = lr_scale(config.lr_schedule, sched, config.lr)
        scale = None if config.lr_schedule == "constant" else self.lr_scale
        # 16-bit tables round with a new seed every step: the dense state must count steps
        self.step_counter = config.table_dtype != "f32" and needs_counter(config.optimizer, scale)
        self.tx = dense_optimizer(config.optimizer, config.lr, scale, config.clip_norm,
                                  count=self.step_counter)
        self.gp = None if config.growth_prune is None else GrowthPruneRun(self, config.growth_prune)
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(DEVICES))
        self._train_step = None
        self._train_version = -1
        self._jitted: dict[str, tuple[int, Callable]] = {}  # by name: (capacity version, jitted fn)
        self.overflow_steps = 0  # steps repeated because an exchange overflowed
        self.capacity_raises = 0
        self.capacities: dict[str, dict[str, int]] = {}

    def _build_towers(self, optimizer: SparseOptimizer):
        """`--towers=N`: the SPTT path with the configured partition and modules."""
        cfg, n = self.config, self.num_towers
        if self._partition is not None:
            part = self._partition
            part.validate(self.features, self.hosts)
        elif cfg.tower_partitioner == "balanced":
            part = balanced_partition(self.features, n, self.hosts, optimizer=optimizer)
        elif cfg.tower_partitioner == "round_robin":
            part = round_robin_partition(self.features, n, self.hosts)
        elif cfg.tower_partitioner == "random":
            part = random_partition(self.features, n, self.hosts, seed=cfg.seed)
        elif cfg.tower_partitioner == "learned":
            raise ValueError(
                "tower_partitioner='learned' needs the partition measured from the flat run: "
                "train_and_evaluate(config) measures it, or pass "
                "partition=jdmt.train.interactions.learned_towers(config, mesh, data)"
            )
        else:
            part = TowerPartition.load(cfg.tower_partitioner, self.features, self.hosts,
                                       optimizer=optimizer)
        if cfg.towers != "auto" and part.num_towers != cfg.towers:
            raise ValueError(
                f"tower partition {cfg.tower_partitioner} has {part.num_towers} towers, "
                f"but towers={cfg.towers}"
            )
        self.num_towers = part.num_towers
        _check_tower_sequences(cfg.tower_module, cfg.sequence_pooling, len(self.seq_index) > 0)
        # sharding row_wise: every tower table spread over its host's devices
        # (with one device per host that is the table-wise placement)
        row_wise = (self.features.names if cfg.sharding == "row_wise" and self.local > 1
                    else cfg.tower_row_wise)
        return SPTT(self.features, self.mesh, part.towers, part.hosts, optimizer,
                    module=cfg.tower_module, tower_dim=cfg.tower_dim, row_wise=row_wise,
                    kernel=cfg.kernel, table_dtype=cfg.table_dtype)

    def path_line(self) -> str:
        """What runs, in one line: the embedding path, the kernels and the exchange."""
        cfg = self.config
        if self.sptt is not None:
            spread = len(self.sptt.row_wise)
            inside = ("row_wise" if spread == len(self.features.sparse) else
                      f"table_wise, {spread} row_wise" if spread else "table_wise")
            path = (f"DMT: {len(self.sptt.towers)} towers ({cfg.tower_partitioner}, "
                    f"{self.sptt.module_kind} Tower Module, tables {inside} in their host) "
                    f"on {self.hosts} hosts")
        else:
            path = f"flat {cfg.sharding}"
            if self.plan_loaded:
                counts = collections.Counter(p.type.value for p in self.emb.plan.values())
                path = (f"flat plan from {cfg.plan} "
                        f"({', '.join(f'{v} {k}' for k, v in counts.items())})")
            elif cfg.sharding == "auto":
                path += " (planner; plan above)"
        exchange = (self.emb.exchange_mode if self.emb.exchange_mode != "auto" else
                    "padded all-to-all" if jax.default_backend() == "cpu" else "ragged all-to-all")
        if self.emb.hops:
            exchange += ", row-wise requests de-duplicated per host (two hops)"
        gp = "" if self.gp is None else f", growth-prune {cfg.growth_prune} ({len(self.gp.phases)} phases)"
        tables = "f32" if cfg.table_dtype == "f32" else f"{cfg.table_dtype} (f32 math, stochastic rounding)"
        weighted = [f.name for f in self.features.sparse if f.weighted]
        if weighted:
            tables += f", {len(weighted)} weighted features (per-sample weights)"
        isa = self._cpu_isa()
        kernels = self._kernel_name() + (f" ({isa} build)" if isa else "")
        malloc = f", malloc: {cpu_malloc.state()}" if jax.default_backend() == "cpu" else ""
        return (f"mesh {self.hosts}x{self.local}, {cfg.model}, {path}, kernels {kernels}, "
                f"tables {tables}, exchange {exchange}, dense all-reduce {cfg.dense_allreduce}{gp}{malloc}")

    def _cpu_isa(self) -> str | None:
        """'native' or 'portable': how the C++ CPU kernels were built (None: not used)."""
        if not self.emb.cpu_kernels or self.emb.impl.pallas:
            return None
        from jdmt.embeddings import cpu_kernels

        return cpu_kernels.isa()

    def _kernel_name(self) -> str:
        """What runs the lookups and updates: 'xla' (with the C++ kernels on
        CPU: 'xla+cpu_lookup+cpu_update', and '+cpu_interaction' for DLRM's dot
        interaction) or 'pallas:<target>' (', interpreted' on CPU)."""
        impl = self.emb.impl
        if not impl.pallas:
            if not self.emb.cpu_kernels:
                return "xla"
            inter = "+cpu_interaction" if getattr(self.model, "interaction_threads", 0) else ""
            return "xla+cpu_lookup+cpu_update" + inter
        return f"pallas:{impl.target}" + (", interpreted" if impl.interpret else "")

    def _model_features(self) -> int:
        """Pooled interaction vectors the model reads (tower outputs with DMT)."""
        if self.sptt is None or self.sptt.module_kind == "identity":
            return len(self.features.sparse) - len(self.seq_index)
        return len(self.sptt.towers) * self._tower_vectors()

    def _model_sequences(self) -> int:
        """Sequence features the model pools itself: none with compressing
        towers (they pool them inside the tower)."""
        if self.sptt is None or self.sptt.module_kind == "identity":
            return len(self.seq_index)
        return 0

    def _top_extra(self) -> int:
        """Width of the DLRM top MLP's `extra` input: with compressing towers
        their T * C outputs, which join it directly (as the bottom MLP's output
        does) besides interacting as vectors. Without that direct path a
        tower's own interactions (`dot`) reach the logit only through a dot
        product with the bottom output; with it, 600 steps of the default run
        (6 towers, one per planted group, `dot`, C=32) end at AUC 0.7288
        instead of 0.7220 (flat: 0.7327)."""
        if self.sptt is None or self.sptt.module_kind == "identity" or self.config.model != "dlrm":
            return 0
        return len(self.sptt.towers) * self.sptt.out_dim

    def _tower_vectors(self) -> int:
        """D-vectors per tower the model interacts: ceil(C / D)."""
        return -(-self.sptt.out_dim // self.config.embedding_dim)

    def _check_features(self) -> None:
        fs, d = self.features, self.config.embedding_dim
        bad = [f.name for f in fs.sparse if f.dim != d]
        if bad:
            raise ValueError(
                f"{self.config.model.upper()} needs features of dim {d} (the embedding dim); "
                f"these are not: {bad[:5]}{'...' if len(bad) > 5 else ''}"
            )
        if not any(f.pooled for f in fs.sparse):
            raise ValueError(f"{self.config.model.upper()} needs at least one pooled feature")

    # ---- state ---------------------------------------------------------------------------

    def init_state(self) -> TrainState:
        """Tables and dense parameters from `config.seed`, independent of the plan."""
        tables = self.emb.init(self.config.seed)
        shapes = jax.eval_shape(self._dense_init)
        params, opt_state = jax.jit(self._dense_init, out_shardings=self._dense_shardings(shapes))()
        return TrainState(params, opt_state, tables)

    def _dense_init(self):
        """Dense parameters and their optax state. With compressing towers:
        `{"model", "towers", "adapter"}`; identity towers have no parameters,
        so their run's parameters are the flat model's (and its checkpoints
        restore into flat runs, and back, on any mesh)."""
        nd, ns, extra = self.features.num_dense, self._model_sequences(), self._top_extra()
        params = self._init_params(
            self.full_model, self.config.seed, nd, self._model_features(), ns, self.seq_len,
            *((extra,) if extra else ()),  # DLRM only (`_top_extra`)
        )
        if self.sptt is not None and self.sptt.module_kind != "identity":
            params = {"model": params, "towers": self.sptt.stacked_params(self.config.seed),
                      "adapter": self._init_adapter()}
        return params, self.tx.init(params)

    def _init_adapter(self):
        """Per-tower projections C -> ceil(C / D) * D of the tower outputs (data parallel)."""
        t, c = len(self.sptt.towers), self.sptt.out_dim
        d = self._tower_vectors() * self.config.embedding_dim
        key = jax.random.fold_in(jax.random.key(self.config.seed), 0xADA)
        scale = np.sqrt(2.0 / (c + d))  # Glorot, like the models' dense layers
        return {
            "kernel": scale * jax.random.truncated_normal(key, -2.0, 2.0, (t, c, d), jnp.float32),
            "bias": jnp.zeros((t, d), jnp.float32),
        }

    def _dense_shardings(self, tree):
        """Replicated, except Tower Module parameters and their optimizer
        moments (under a "towers" key), which are sharded over `host`."""
        towers = NamedSharding(self.mesh, P(HOST))

        def pick(path, leaf):
            return towers if _in_towers(path) and len(leaf.shape) >= 1 else self.replicated

        return jax.tree_util.tree_map_with_path(pick, tree)

    def state_shardings(self, state: TrainState) -> TrainState:
        params, opt_state = self._dense_shardings((state.params, state.opt_state))
        return TrainState(params, opt_state, self.emb.state_shardings())

    # ---- checkpoints ---------------------------------------------------------------------

    def layout(self) -> dict[str, Any]:
        """What a checkpoint's state depends on (saved in its meta).

        `features`, `model` and the optimizer kinds must match to restore;
        `mesh`, `plan` and `table_dtype` may differ (the tables are then
        re-laid out, and rounded to the nearest value of a 16-bit type).
        """
        cfg = self.config
        return {
            "features": features_json(self.features),
            "model": {
                "name": cfg.model,
                "embedding_dim": cfg.embedding_dim,
                "bottom_mlp": list(cfg.bottom_mlp),
                "top_mlp": list(cfg.top_mlp),
                "sequence_pooling": cfg.sequence_pooling,
                **({"cross_layers": cfg.cross_layers, "low_rank": cfg.low_rank} if cfg.model == "dcn" else {}),
                # identity towers are a layout of the flat model, not another model
                "towers": None if self.sptt is None or self.sptt.module_kind == "identity" else {
                    "towers": [list(t) for t in self.sptt.towers],
                    "hosts": list(self.sptt.tower_hosts),
                    "module": self.sptt.module_kind,
                    "tower_dim": self.sptt.out_dim,
                },
            },
            "towers": None if self.sptt is None else [list(t) for t in self.sptt.towers],
            "embedding_optimizer": self.emb.optimizer.kind.value,
            "dense_optimizer": cfg.optimizer,
            # the optax state's structure: a schedule and clipping add state
            "dense_optimizer_chain": None if (cfg.lr_schedule == "constant" and cfg.clip_norm is None
                                              and not self.step_counter)
            else {"lr_schedule": cfg.lr_schedule, "clip": cfg.clip_norm is not None,
                  **({"step_counter": True} if self.step_counter else {})},
            "mesh": [self.hosts, self.local],
            "plan": {name: p.to_json() for name, p in self.emb.plan.items()},
            "table_dtype": cfg.table_dtype,
        }

    def restore(self, ckpt: Checkpointer, step: int) -> tuple[TrainState, dict]:
        """The state of checkpoint `step` on this trainer's mesh and plan, and its meta.

        Raises:
          CheckpointError: the checkpoint's model, features or optimizers
            differ from this run's (the message names what differs).
        """
        meta = ckpt.meta(step)
        saved, here = meta["layout"], self.layout()
        problems = layout_differences(saved, here)
        if problems:
            raise CheckpointError(
                f"checkpoint {step} in {ckpt.directory} does not fit this run: " + "; ".join(problems)
            )
        like = self.abstract_state()
        if (saved["mesh"] == here["mesh"] and saved["plan"] == here["plan"]
                and saved.get("table_dtype", "f32") == here["table_dtype"]):
            return ckpt.restore(step, like), meta
        # Another mesh, plan or table type: rebuild the saved layout, cut the tables out on the host.
        old_plan = {n: Placement.from_json(p) for n, p in saved["plan"].items()}
        old = Layout(self.features, old_plan, *saved["mesh"])
        has_acc = any(t.accum is not None for t in like.tables.values())
        old_tables = {name: TableState(0, 0 if has_acc else None) for name in old.storages()}
        host = ckpt.restore_host(step, TrainState(like.params, like.opt_state, old_tables))
        names = [f.name for f in self.features.sparse]
        tables = dict(zip(names, old.to_dense({k: precision.decode_host(t.weights) for k, t in host.tables.items()})))
        accums = None
        if has_acc:
            acc = {k: t.accum for k, t in host.tables.items()}
            per_row = next(iter(acc.values())).ndim == 1
            accums = dict(zip(names, old.to_dense(acc, per_row=per_row)))
        put = lambda x, a: jax.device_put(np.asarray(x, a.dtype), a.sharding)  # noqa: E731
        params = jax.tree.map(put, host.params, like.params)
        opt_state = jax.tree.map(put, host.opt_state, like.opt_state)
        return TrainState(params, opt_state, self.emb.from_dense(tables, accums)), meta

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state (no computation)."""
        shapes = jax.eval_shape(self._dense_init)
        with_sharding = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)  # noqa: E731
        params, opt_state = jax.tree.map(with_sharding, shapes, self._dense_shardings(shapes))
        return TrainState(params, opt_state, self.emb.state_shapes())

    # ---- the step ------------------------------------------------------------------------

    def loss_and_grads(self, params, tables, batch: Batch):
        """Loss, dense gradients, the embeddings' gradients and what the update needs."""
        acts, ctx, stats = self.emb_path.forward(tables, batch.ids, batch.lengths, batch.weights)
        if self.config.dense_allreduce == "hierarchical":
            loss, g_params, g_acts = self._grads_by_level(params, acts, batch)
            return loss, g_params, g_acts, ctx, stats

        def loss_fn(params, acts):
            logits = self._logits(params, acts, batch)
            return optax.sigmoid_binary_cross_entropy(logits, batch.labels).mean()

        loss, (g_params, g_acts) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, acts)
        return loss, g_params, g_acts, ctx, stats

    def _grads_by_level(self, params, acts, batch: Batch):
        """`loss_and_grads`'s dense part inside a `shard_map`: each device
        differentiates its samples' share of the mean loss, and the dense
        gradients are summed by mesh level (`hierarchical_psum`; the Tower
        Modules', each host's own, over `local` only)."""
        n = batch.labels.shape[0]
        specs = jax.tree.map(lambda sh: sh.spec, self._dense_shardings(params))
        own = jax.tree.leaves(jax.tree_util.tree_map_with_path(
            lambda path, leaf: _in_towers(path) and leaf.ndim >= 1, params))

        def body(params, acts, batch):
            def loss_fn(params, acts):
                logits = self._logits(params, acts, batch, inside=True)
                return optax.sigmoid_binary_cross_entropy(logits, batch.labels).sum() / n

            loss, (gp, ga) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, acts)
            leaves, tree = jax.tree.flatten(gp)
            shared = hierarchical_psum([x for x, o in zip(leaves, own) if not o], self.hosts, self.local)
            mine = hierarchical_psum([x for x, o in zip(leaves, own) if o], self.hosts, self.local,
                                     over_hosts=False)
            shared, mine = iter(shared), iter(mine)
            gp = jax.tree.unflatten(tree, [next(mine) if o else next(shared) for o in own])
            return lax.psum(loss, DEVICES), gp, ga

        return jax.shard_map(body, mesh=self.mesh, in_specs=(specs, P(DEVICES), P(DEVICES)),
                             out_specs=(P(), specs, P(DEVICES)), check_vma=False)(params, acts, batch)

    def step_fn(self, state: TrainState, batch: Batch, halt=False):
        """One training step (un-jitted): (state, batch[, halt]) -> (state, stats).

        A step whose ids overflowed an exchange's capacity, or hold ids
        outside their tables, or whose loss is not finite changes nothing
        (`stats["halted"]`; the cause in `stats["overflow"]`,
        `stats["out_of_range"]`, `stats["loss"]`): the run raises the
        capacities and repeats it, or stops with the cause named. So does a
        step given `halt` true: the run passes each step the previous one's
        `halted`, so steps dispatched before the host has seen a skipped one
        change nothing either.
        """
        loss, g_params, g_acts, ctx, stats = self.loss_and_grads(state.params, state.tables, batch)
        skip = self.emb.must_skip(stats) | ~jnp.isfinite(loss) | halt
        updates, opt_state = self.tx.update(g_params, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(skip, b, a), new, old)  # noqa: E731
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        lr = None
        if self.config.lr_schedule != "constant":  # the schedule scales the sparse optimizer too
            lr = self.emb.optimizer.lr * self.lr_scale(_step_count(state.opt_state))
        seed = None
        if self.config.table_dtype != "f32":
            # 16-bit tables round stochastically: new bits every applied step (a
            # repeated step rounds alike), and per run seed
            seed = (_step_count(state.opt_state).astype(jnp.uint32)
                    + jnp.uint32(self.config.seed) * jnp.uint32(0x9E3779B9))
        tables, ustats = self.emb_path.update(state.tables, ctx, g_acts, batch.ids, batch.lengths,
                                              batch.weights, lr=lr, skip=skip, seed=seed)
        return TrainState(params, opt_state, tables), {
            "loss": loss,
            "halted": skip,
            "out_of_range": stats["out_of_range"],
            "overflow": stats["overflow"],
            "need": stats["need"],
            "payload_cross_host_bytes": stats["payload_cross_host_bytes"] + ustats["payload_cross_host_bytes"],
            "payload_intra_host_bytes": stats["payload_intra_host_bytes"] + ustats["payload_intra_host_bytes"],
            "ids_requested": stats["ids_requested"],
            "ids_unique": stats["ids_unique"],
            "ids_unique_host": stats["ids_unique_host"],
        }

    def no_halt(self) -> jax.Array:
        """A replicated false `halt` for the compiled step's third argument."""
        return jax.device_put(np.zeros((), np.bool_), self.replicated)

    def compiled_step(self, state: TrainState):
        """The jitted step: `(state, batch, halt) -> (state, stats)` (`step_fn`;
        state donated; `halt`: `no_halt()`, or the previous step's `halted`)."""
        if self._train_step is None or self._train_version != self.emb.version:
            shardings = self.state_shardings(state)
            self._train_step = jax.jit(
                self.step_fn,
                in_shardings=(shardings, self.batch_sharding, self.replicated),
                out_shardings=(shardings, self.replicated),
                donate_argnums=0,
            )
            self._train_version = self.emb.version
        return self._train_step

    def logits_fn(self, state: TrainState, batch: Batch):
        """The model's logits f32[B] of a device batch (sharded like the batch),
        and the lookup's overflow (when > 0 the logits are not exact)."""
        acts, _, stats = self.emb_path.forward(state.tables, batch.ids, batch.lengths, batch.weights)
        return self._logits(state.params, acts, batch), {"overflow": stats["overflow"], "need": stats["need"]}

    def predict_fn(self, state: TrainState, batch: Batch):
        """Click probabilities f32[B] of a device batch, and the lookup's overflow."""
        logits, stats = self.logits_fn(state, batch)
        return jax.nn.sigmoid(logits), stats

    def logits(self, state: TrainState, batch: Batch) -> np.ndarray:
        """The model's logits of a host batch, as host numpy f32[B] (every
        process gets the whole batch's). The batch is checked first
        (`check_batch`: ids in range, finite dense values); a lookup that
        overflows an exchange's capacity is repeated with more, so the
        logits are exact. The batch size must divide over the devices."""
        host = checked_batch(self.features, batch, "logits batch")
        if host.labels.shape[0] % self.emb.num_devices:
            raise ValueError(f"a batch of {host.labels.shape[0]} does not divide over the "
                             f"{self.emb.num_devices} devices")
        if "eval" not in self.capacities:
            self.fit_capacities(host, "eval")
        return host_numpy(self._exact(self.logits_fn, state, self.device_batch(host),
                                      "logits batch"))

    def _exact(self, fn, state: TrainState, batch: Batch, where: str):
        """`fn(state, batch)`'s first output, jitted once per capacity version
        and repeated with larger capacities until no exchange overflows."""
        while True:
            jitted = self._jitted.get(fn.__name__)
            if jitted is None or jitted[0] != self.emb.version:
                jitted = (self.emb.version,
                          jax.jit(fn, out_shardings=(self.batch_sharding, self.replicated)))
                self._jitted[fn.__name__] = jitted
            out, st = jitted[1](state, batch)
            if int(st["overflow"]) == 0:
                return out
            self._grow(batch.labels.shape[0] // self.emb.num_devices, st, where)

    def _logits(self, params, acts, batch: Batch, *, inside: bool = False) -> jax.Array:
        """The model on the looked-up embeddings (flat, or identity towers), or
        on the Tower Modules' outputs (compressing towers). `inside`: on one
        device's samples, inside a `shard_map` over the mesh."""
        model = self.model
        if inside and getattr(model, "interaction_mesh", None) is not None:
            model = model.clone(interaction_mesh=None)  # already on one device's samples
        if self.sptt is None or self.sptt.identity:
            return model.apply({"params": params}, *self.model_inputs(acts, batch))
        # Compressing towers: their outputs hold the sequence features, pooled in the tower.
        out = self.sptt.tower_outputs(params["towers"], acts, module=self.tower_module,
                                      inside=inside)  # [B, T, C]
        a = params["adapter"]
        pooled = jnp.einsum("btc,tcd->btd", out, a["kernel"]) + a["bias"]
        pooled = pooled.reshape(out.shape[0], -1, self.config.embedding_dim)
        extra = {"extra": out.reshape(out.shape[0], -1)} if self._top_extra() else {}
        return model.apply({"params": params["model"]}, batch.dense, pooled, **extra)

    def model_inputs(self, embs, batch: Batch) -> tuple:
        """The model's arguments: dense, pooled f32[B, F, D] and, with sequence
        features, their embeddings f32[B, Fs, S, D] and lengths i32[B, Fs]."""
        args = (batch.dense, embs.stacked())
        if len(self.seq_index):
            seq = stack_sequences([embs.sequence[n] for n in self.seq_names])
            args += (seq, batch.lengths[:, self.seq_index])
        return args

    # ---- data ----------------------------------------------------------------------------

    def device_batch(self, batch: Batch) -> Batch:
        """This process's rows of a global batch -> a global batch sharded over devices."""
        put = lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x)  # noqa: E731
        return jax.tree.map(put, batch)

    def _host_train_batch(self, step: int) -> Batch:
        b = self.data.batch(
            step, self.config.global_batch,
            process_index=jax.process_index(), num_processes=jax.process_count(),
        )
        return checked_batch(self.features, b, f"training batch {step}")

    def _host_eval_batch(self, i: int) -> Batch:
        b = self.data.eval_batch(
            i, self.config.eval_size,
            process_index=jax.process_index(), num_processes=jax.process_count(),
        )
        return checked_batch(self.features, b, f"eval batch {i}")

    # ---- evaluation ----------------------------------------------------------------------

    def evaluate(self, state: TrainState) -> dict[str, float]:
        """Exact AUC and logloss over `eval_batches` held-out batches (a batch
        whose lookup overflowed a capacity is looked up again with more)."""
        probs, labels = [], []
        for i in range(self.config.eval_batches):
            host = self._host_eval_batch(i)
            if "eval" not in self.capacities:
                self.fit_capacities(host, "eval")
            batch = self.device_batch(host)
            p = self._exact(self.predict_fn, state, batch, f"eval batch {i}")
            probs.append(host_numpy(p))
            labels.append(host_numpy(batch.labels))
        p, y = np.concatenate(probs), np.concatenate(labels)
        return {"auc": metrics.auc(p, y), "logloss": metrics.logloss(p, y), "examples": int(y.size)}

    def _grow(self, local_batch: int, stats, where: str) -> None:
        """Raise the exchange capacities an overflow needed, and say so."""
        need = jax.device_get(stats["need"])
        before = self.emb.describe_caps(local_batch)
        self.emb.grow(local_batch, {"need": need})
        if self.emb.describe_caps(local_batch) == before:
            # every capacity that overflowed is at its no-overflow bound: a bug, not a batch
            raise RuntimeError(f"{where}: an exchange overflowed at capacities that cannot overflow "
                               f"({before}; needed {({k: int(v) for k, v in need.items()})})")
        self.capacity_raises += 1
        if jax.process_index() == 0:
            print(f"jdmt: {where}: an exchange needed more room than its capacity; raised the "
                  f"capacities to {self.emb.describe_caps(local_batch)} and repeated it", file=sys.stderr)

    def fit_capacities(self, host_batch: Batch, what: str) -> dict[str, int]:
        """Size the exchanges' capacities from a batch of this run (the first
        training batch, the first eval batch): what its lookup needs, plus a
        quarter (`ShardedEmbeddings.measure` / `fit_caps`, host numpy, no
        device work). A later batch that needs more overflows visibly and the
        step is repeated with more (`_grow`)."""
        ids, lengths = np.asarray(host_batch.ids), np.asarray(host_batch.lengths)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            ids = np.asarray(multihost_utils.process_allgather(ids, tiled=True))
            lengths = np.asarray(multihost_utils.process_allgather(lengths, tiled=True))
        b = ids.shape[0] // self.emb.num_devices
        self.emb.fit_caps(b, self.emb.measure(ids, lengths))
        caps = self.emb.describe_caps(b)
        self.capacities[what] = caps
        return caps

    # ---- the run -------------------------------------------------------------------------

    def compile_ahead(self, state: TrainState, batch: Batch, halt: jax.Array | None = None):
        """Lower and compile the step for `(state, batch, halt)`; (compiled, CommReport).

        The compiled step takes the previous step's `halted` (a replicated
        bool; `halt` None: a false one is made for the lowering). The report
        accounts the compiled step's collectives on the mesh (`jdmt.comm`);
        the compiled executable is what `run` calls, so the step is compiled
        once.
        """
        if halt is None:
            halt = self.no_halt()
        lowered = self.compiled_step(state).lower(state, batch, halt)
        compiled = lowered.compile()
        return compiled, comm_report_compiled(compiled, self.mesh, lowered=lowered)

    def _metrics_log(self):
        d = self.config.metrics_dir
        if d is None or jax.process_index() != 0:
            return NullMetricsLog()
        return MetricsLog(d)

    def _open_checkpoints(self) -> tuple[Checkpointer | None, int | None]:
        """The run's Checkpointer and the step to resume from (None: a fresh start).

        Raises:
          CheckpointError: the directory already holds checkpoints and
            `resume` is off (they are never overwritten by a new run).
        """
        cfg = self.config
        if cfg.checkpoint_dir is None:
            return None, None
        ckpt = Checkpointer(cfg.checkpoint_dir, keep=cfg.keep_checkpoints)
        latest = ckpt.latest_step()
        if latest is not None and not cfg.resume:
            ckpt.close()
            raise CheckpointError(
                f"{ckpt.directory} already holds checkpoints (latest: step {latest}); pass "
                "--resume to continue from it, or choose another --checkpoint-dir"
            )
        if latest is not None and latest > cfg.steps:
            ckpt.close()
            raise CheckpointError(
                f"the newest checkpoint in {ckpt.directory} is at step {latest}, after the "
                f"{cfg.steps} steps of this run"
            )
        if cfg.resume and latest is None and jax.process_index() == 0:
            print(f"jdmt: no checkpoint in {ckpt.directory}; starting at step 0", file=sys.stderr)
        return ckpt, latest

    def _checkpoint_meta(self, step: int, history: dict) -> dict:
        return {
            "layout": self.layout(),
            "data": self._data_position(step),
            "train_loss": list(history["train_loss"]),
            "eval_history": list(history["eval_history"]),
            "out_of_range_ids": history["out_of_range_ids"],
            "step_flops": dict(history["step_flops"]),
            "steps_by_width": dict(history["steps_by_width"]),
            "growth_prune": None if self.gp is None else self.gp.meta(),
        }

    def _data_position(self, step: int) -> Any:
        """Where a stateful source (a file) continues after `step` steps (JSON;
        None for sources that are a function of the step, like the synthetic)."""
        position = getattr(self.data, "position_after", None)
        return None if position is None else position(step - 1)

    def _data_resume(self, position: Any) -> None:
        if position is None:
            return
        resume = getattr(self.data, "resume", None)
        if resume is None:
            raise CheckpointError("the checkpoint has a data position this data source cannot use")
        resume(position)

    def memory_report(self) -> str | None:
        """One line on the tables' memory, and a warning when the devices
        allocate more than 10% beyond what they own (an SPMD program gives
        every device the largest device's share)."""
        m = self.emb.memory()
        line = (f"jdmt: tables and optimizer state {m.owned / 2**20:,.1f} MiB owned, "
                f"{m.allocated / 2**20:,.1f} MiB allocated over {self.emb.num_devices} devices "
                f"({m.ratio:.2f}x)")
        replicas = m.per_device_owned.sum() - m.owned  # replicated rows' extra copies
        if replicas > 0:
            line += f", of which {replicas / 2**20:,.1f} MiB are replicas (data-parallel, flexshard tiers)"
        if m.per_device_allocated <= 1.1 * m.per_device_owned.mean():
            return line
        if self.sptt is not None:  # a tower's tables stay on its host
            per_host = m.per_device_owned.reshape(self.hosts, self.local).sum(axis=1)
            hint = (f"; the towers' heaviest host owns {per_host.max() / 2**20:,.1f} MiB against a mean "
                    f"of {per_host.mean() / 2**20:,.1f} MiB (a tower's tables stay on its host: "
                    "--tower-partitioner=balanced evens the hosts as far as the tables allow, "
                    "--sharding=row_wise spreads a host's tables over its devices)")
        else:
            big = sorted(((f.rows * f.dim, f.name) for f in self.features.sparse), reverse=True)
            even = m.owned / self.emb.num_devices
            over = [n for b_, n in big if 4.0 * b_ > 1.1 * even][:5]
            hint = (f"; tables bigger than an even share of a device ({', '.join(over)}) cannot be "
                    "balanced table-wise: row_wise or table_row_wise spreads them" if over else "")
        over_pct = 100 * (m.per_device_allocated / m.per_device_owned.mean() - 1)
        return (line + f"\njdmt: warning: allocated exceeds owned by {over_pct:.0f}%: every "
                f"device holds the largest device's share ({m.per_device_owned.max() / 2**20:,.1f} MiB; "
                f"the mean is {m.per_device_owned.mean() / 2**20:,.1f} MiB){hint}")

    def run(self) -> dict[str, Any]:
        cfg = self.config
        t_start = time.perf_counter()
        if jax.process_index() == 0:
            print(f"jdmt: {self.path_line()}", file=sys.stderr)
            print(self.memory_report(), file=sys.stderr)
        ckpt, start = self._open_checkpoints()
        # step_flops: the compiled step's FLOPs per width signature ('full', or a pruned
        # phase's); steps_by_width: the steps run with each (both carried by checkpoints).
        history = {"train_loss": [], "eval_history": [], "out_of_range_ids": 0,
                   "step_flops": {}, "steps_by_width": {}}
        try:
            if start is None:
                start = 0
                state = self.init_state()
            else:
                state, meta = self.restore(ckpt, start)
                for k in history:
                    history[k] = meta.get(k, history[k])
                state = resume_state(self, state, meta.get("growth_prune"))
                self._data_resume(meta["data"])
                if jax.process_index() == 0:
                    print(f"jdmt: resumed from {ckpt.directory} at step {start}", file=sys.stderr)
            state, stats = run_steps(self, state, start, ckpt, history)
        finally:
            if ckpt is not None:
                ckpt.close()
        bayes = (
            self.data.bayes_metrics(cfg.eval_batches, cfg.eval_size)
            if hasattr(self.data, "bayes_metrics")
            else {"auc": float("nan"), "logloss": float("nan")}
        )
        ev = history["eval_history"][-1]
        step_times = stats["step_times"]
        timed = step_times[1:] or step_times or [float("nan")]
        train_wall = stats["train_wall_s"]
        comm = stats["comm"]
        return {
            "model": cfg.model,
            "data": cfg.data,
            "steps": cfg.steps,
            "start_step": start,
            "global_batch": cfg.global_batch,
            "mesh": [self.hosts, self.local],
            "sharding": cfg.sharding,
            "plan_file": cfg.plan,
            "plan_loaded": self.plan_loaded,
            "kernel": self._kernel_name(),
            "cpu_kernels_isa": self._cpu_isa(),
            "table_dtype": self.config.table_dtype,
            "weighted_features": [f.name for f in self.features.sparse if f.weighted],
            "path": self.path_line(),
            "row_tiers": None if self.tier_report is None else [r.to_json() for r in self.tier_report],
            "dense_allreduce": self.config.dense_allreduce,
            "malloc": cpu_malloc.state() if jax.default_backend() == "cpu" else None,
            "embedding_dim": cfg.embedding_dim,
            "embedding_optimizer": cfg.embedding_optimizer,
            "embedding_lr": cfg.embedding_lr,
            "optimizer": cfg.optimizer,
            "lr": cfg.lr,
            "lr_schedule": cfg.lr_schedule,
            "clip_norm": cfg.clip_norm,
            "seed": cfg.seed,
            "teacher": cfg.teacher if cfg.criteo_path is None else None,
            "train_loss": history["train_loss"],
            "eval_auc": ev["auc"],
            "eval_logloss": ev["logloss"],
            "eval_examples": stats["eval_examples"],
            "eval_history": history["eval_history"],
            "bayes_auc": bayes["auc"],
            "bayes_logloss": bayes["logloss"],
            "examples_per_sec": len(timed) * cfg.global_batch / max(train_wall, 1e-9),
            "step_time_ms_median": 1e3 * statistics.median(timed),
            "first_step_s": step_times[0] if step_times else 0.0,
            "compile_s": stats["compile_s"],
            "wall_time_s": time.perf_counter() - t_start,
            "out_of_range_ids": history["out_of_range_ids"],
            "cross_host_bytes_per_step": float(comm.cross_host_bytes) if comm else 0.0,
            "intra_host_bytes_per_step": float(comm.intra_host_bytes) if comm else 0.0,
            "cross_host_payload_bytes_per_step": _mean(stats["payload"]["cross"]),
            "intra_host_payload_bytes_per_step": _mean(stats["payload"]["intra"]),
            "dedup_ratio": (stats["payload"]["unique"] / stats["payload"]["requested"]
                            if stats["payload"]["requested"] else None),
            "row_dedup": "host" if self.emb.hops else "device",
            "host_dedup_ratio": (stats["payload"]["unique_host"] / stats["payload"]["requested"]
                                 if stats["payload"]["unique_host"] else None),
            "overflow_steps": self.overflow_steps,
            "exchange_capacities": self.capacities,
            **self.emb.memory().to_json(),
            "metrics_dir": cfg.metrics_dir,
            "profile_dir": cfg.profile_dir,
            "checkpoint_dir": None if ckpt is None else ckpt.directory,
            "checkpoint_steps": [] if ckpt is None else ckpt.all_steps(),
            "skipped_lines": getattr(self.data, "skipped_lines", None),
            "data_epoch": getattr(self.data, "epoch", None),
            "sequence_features": list(self.seq_names),
            "sequence_pooling": cfg.sequence_pooling,
            "plan": None if self.plan is None else self.plan.report(),
            "towers": None if self.sptt is None else [list(t) for t in self.sptt.towers],
            "tower_hosts": None if self.sptt is None else list(self.sptt.tower_hosts),
            "tower_module": None if self.sptt is None else self.sptt.module_kind,
            "tower_row_wise": None if self.sptt is None else list(self.sptt.row_wise),
            **flops_summary(self, history),
        }


def _in_towers(path) -> bool:
    """A dense parameter (or its moment) of the Tower Modules: under a "towers" key."""
    return any(getattr(k, "key", None) == "towers" for k in path)


def _step_count(opt_state) -> jax.Array:
    """The number of applied dense updates (optax's `count`; skipped steps keep it)."""
    counts = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    if not counts:
        raise ValueError("the dense optimizer state has no step count")
    return counts[0][1]


def _mean(xs) -> float:
    return float(np.mean(xs)) if xs else 0.0
