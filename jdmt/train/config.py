"""The run's configuration: `TrainConfig` (the CLI flags map onto its fields)."""


import dataclasses

import numpy as np

from jdmt.data import (
    Combiner,
    FeatureSet,
    criteo_features,
    make_features,
    mlperf_dcnv2_features,
    synthetic_default_features,
)
from jdmt.embeddings import (
    OptimizerKind,
    ShardingType,
)
from jdmt.data.synthetic import TEACHERS
from jdmt.mesh import parse_mesh_spec
from jdmt.train.allreduce import DENSE_ALLREDUCE
from jdmt.train.schedule import DENSE_OPTIMIZERS, LR_SCHEDULES, schedule_steps
from jdmt.pallas_kernels.common import Kernel
from jdmt.precision import TABLE_DTYPES
from jdmt.models import (
    MODELS,
    SEQUENCE_POOLING,
)

__all__ = ["DATA_SOURCES", "DENSE_OPTIMIZERS", "TOWER_SHARDINGS", "TrainConfig"]

DATA_SOURCES = ("synthetic", "mlperf", "criteo:PATH")
TOWER_SHARDINGS = ("row_wise", "table_wise")
"""Shardings of a tower's tables inside its host (the others are flat-path only)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (the CLI flags map onto these).

    Attributes:
      mesh: `'HxL'` mesh spec (ignored when `train_and_evaluate` gets a mesh).
      model: dense model (`'dlrm'` or `'dcn'`, DCNv2 with 3 rank-64 cross layers).
      data: data source: `'synthetic'` (the default feature set) or
        `'mlperf'` (the 26 MLPerf DLRM-DCNv2 tables and multi-hot sizes,
        rows capped at `rows_per_table` or 100,000), both with ids and labels
        from the synthetic teacher; or `'criteo:PATH'`, a Criteo TSV file
        (plain or gzip; `jdmt.data.CriteoData`: the first `eval_batches *
        eval_size` examples are the held-out set, training reads the rest
        in epochs; categories hashed into `rows_per_table` rows, default
        100,000).
      steps: training steps.
      global_batch: examples per step over all devices (divisible by H*L).
      embedding_dim: D of every table (and the bottom MLP's output).
      sharding: one sharding type for every table, or `'auto'`: a placement
        per table from `jdmt.planner.auto_plan` (cost model plus search).
        The default, `'row_wise'`, puts row r of every table on device
        r mod N: each device allocates 1/N of every table (what it owns,
        for any mix of table sizes) and ids go to their row's owner. On the
        tower path it says how a tower's tables sit inside its host
        (`TOWER_SHARDINGS`): `'row_wise'`, every table's rows spread over
        the host's devices; `'table_wise'`, each table whole on one of them
        (`tower_row_wise` names exceptions).
      plan: a plan file (`jdmt.planner.PlanFile`, JSON). If it exists, the
        tables are sharded as it says, as it is (`sharding` and the tier
        sizing are not used), after checking that it places exactly the
        model's tables, validly, on this mesh, within the memory budget it
        was planned for. If not, the sharding this run decides (whatever
        `sharding` chose, flexshard tiers included) is written there,
        atomically, before training. Flat path only.
      cost_model: with `sharding='auto'`, plan with the learned planner and
        this fitted cost model (`python -m jdmt.planner.neural`) instead of
        the analytic search (pooled features only).
      embedding_optimizer: fused sparse optimizer of the tables.
      embedding_lr: its learning rate.
      embedding_initial_accumulator: the Adagrad accumulators' start value;
        above zero it damps the first updates of rarely seen rows (whose
        gradients are small) instead of moving every touched row by about
        `embedding_lr` on its first touch.
      optimizer: dense optimizer (optax): adagrad, adam or sgd.
      lr: its learning rate.
      bottom_mlp, top_mlp: hidden widths (D and 1 are appended).
      cross_layers, low_rank: the DCN model's low-rank cross layers and their rank.
      growth_prune: alternate growth and pruning of the dense network
        (`jdmt.train.growth_prune`): a schedule such as
        'dense:200,prune0.5:400,grow:400' (steps, or percentages of `steps`)
        or a preset ('default'). None: the full model throughout.
      eval_every: also evaluate every this many steps (0: only at the end).
      sync_every: fetch the steps' loss and counters from the devices every
        this many steps (and before evaluations, checkpoints, phase changes
        and the end): the steps between are dispatched without waiting, so
        the host prepares the next batches while the devices work. A skipped
        step (an overflow) and the steps after it change nothing until the
        host sees it and runs them again. 1: wait for every step.
      eval_batches: evaluation batches (held-out stream, same ones every time).
      eval_batch_size: examples per eval batch (None: `global_batch`).
      seed: initialisation of tables and dense parameters.
      data_seed: the synthetic data's seed (teacher, ids; None: `seed`).
      num_tables, rows_per_table, pooling: a uniform synthetic feature set of
        `num_tables` tables (26) of `rows_per_table` rows (10,000) with up to
        `pooling` ids per bag (10), when any is given (and `data` is
        synthetic).
      features: feature set (None: from `data` and the fields above).
      sequence_features: synthetic data: append this many sequence features
        (`seq_0 ..`, `sequence_len` positions each) to the default set.
      sequence_len: S of those sequence features.
      sequence_pooling: how the model pools sequence features: `'mean'`
        (masked mean) or `'attention'` (target attention queried by the
        bottom MLP's output; `jdmt.models.SequencePooling`).
      combiner: combiner ('sum' or 'mean') given to every pooled feature of
        the feature set the data source names. None (the default): each
        preset's own: mean for the synthetic sets (the synthetic teacher
        averages its ids' latent vectors, so mean pooling matches it and
        learns much faster), sum for `mlperf` (as MLPerf's DLRM-DCNv2).
        Ignored when `features` is given.
      weighted_features: synthetic or mlperf data: the first N pooled
        features carry per-sample weights (`SparseFeature.weighted`: each bag
        is the sum of weight x row, so their combiner is sum whatever
        `combiner` says).
      progress: show a tqdm progress bar (stderr).
      metrics_dir: write TensorBoard scalars (train loss and examples/s per
        step, eval AUC/logloss at each evaluation) and `metrics.jsonl` (one
        JSON object per event) here; process 0 only. None: no metrics files.
      profile_dir: write a `jax.profiler` trace of a few steps after the
        first one (steps 2-4, 1-based, or fewer in a shorter run) here.
      towers: Disaggregated Multi-Tower: group the features into this many
        towers, each owned by one host (`jdmt.towers.SPTT`). 0 (the
        default): the flat path, sharded as `sharding` says. 'auto': one
        tower per host (at most one per feature), or the number of towers in
        a partition file given as `tower_partitioner`. Towers shard their
        tables inside their host as `sharding` says (`TOWER_SHARDINGS`).
      tower_module: the Tower Module of every tower (`TOWER_MODULES`):
        identity keeps the flat model exactly; the others compress a tower's
        embeddings to `tower_dim` values before they cross hosts.
      tower_dim: C of the compressing Tower Modules. Back on each sample's
        device a per-tower projection (data parallel) maps a tower's C values
        to ceil(C / D) D-vectors, which the model interacts like features;
        DLRM's top MLP also reads the T * C values directly.
      tower_partitioner: how features are grouped: 'balanced' (the default:
        features by decreasing table bytes, each to the tower whose host
        holds the fewest so far; `jdmt.towers.partition.balanced_partition`),
        'round_robin', 'random', 'learned' (from the flat model in `partition_checkpoint`: features
        that interact strongly share a tower, hosts balanced), or the path of
        a partition JSON (`jdmt-partition`, `python -m jdmt.cli.partition`).
      partition_checkpoint: a flat run's checkpoint directory, for 'learned'.
      tower_row_wise: with `sharding='table_wise'` on the tower path, tables
        sharded table-row-wise over their tower's host anyway (rows spread
        over its L devices; the others are table-wise on one of them):
        feature names (a tuple, or one comma-separated string), or
        'auto': tables bigger than an even share of their host's tables
        (`jdmt.towers.sptt.auto_row_wise`). Cross-host traffic is the same.
      checkpoint_dir: write orbax checkpoints (asynchronously) here: every
        `checkpoint_every` steps and after the last step. Without `resume`
        the directory must not hold checkpoints yet.
      checkpoint_every: steps between checkpoints (0: only the last step).
      resume: continue from the newest checkpoint in `checkpoint_dir` (on any
        mesh and sharding; the model and features must match). Every later
        step's loss equals the uninterrupted run's bit for bit (on CPU, same
        mesh). Without a checkpoint there, training starts from step 0.
      keep_checkpoints: how many of the newest checkpoints to keep.
      kernel: the embedding lookups' and sparse updates' implementation:
        'auto' (the XLA path, with the C++ update on CPU, until the Pallas
        kernels have run on GPU and TPU hardware), 'pallas'
        (`jdmt.pallas_kernels`; in interpret mode on CPU: slow, for checks)
        or 'xla'.
      table_dtype: the embedding tables' storage type: 'f32', 'bf16' or
        'f16' (16-bit rows, f32 optimizer math and state, stochastic
        rounding on write; `jdmt.precision`). 16-bit tables take the XLA and
        C++ paths, not the Pallas kernels.
      row_dedup: where row-wise tables' requests are de-duplicated before
        they cross hosts: 'host' (two hops: inside the host first, then one
        request per host and row; on meshes of more than one host of more
        than one device) or 'device' (each device asks the owners directly).
      dense_allreduce: how the dense parameters' gradients are summed over
        the devices: 'hierarchical' (spelled out by mesh level: a
        reduce-scatter inside each host, an all-reduce of 1/L of them across
        hosts, an all-gather inside the host; `jdmt.train.allreduce`) or
        'xla' (the one all-reduce over all devices that `jit` inserts).
      row_tiers: flexshard tables' hot and warm rows: 'auto' (sized from row
        statistics of the first `row_tier_batches` batches, under
        `memory_budget`, by the modeled communication time;
        `jdmt.planner.flexshard`; with `sharding='auto'` the planner's
        row-wise sequence tables are offered tiers too) or 'none' (every row
        cold: row-wise).
      memory_budget: per-device table memory that flexshard's tiers may fill,
        as a multiple of row-wise's footprint of all the tables (>= 1).
      row_tier_batches: global batches whose ids give the row statistics.
      eval_data: with `data='criteo:PATH'`, a separate held-out Criteo file
        (e.g. day 23): the eval batches are its first examples and training
        reads all of PATH. None: the head of PATH is held out.
      teacher: the synthetic labels' teacher (`jdmt.data.synthetic.TEACHERS`):
        'dlrm' (pairwise dot products inside planted groups) or 'deep' (a
        random tanh network over all features' sum-pooled latents).
      lr_schedule: 'constant', or 'dlrm' (TorchRec's DLRM example schedule:
        linear warm-up, hold, quadratic decay; `jdmt.train.schedule`). It
        scales both `lr` and `embedding_lr`.
      warmup_steps, decay_start, decay_steps: the 'dlrm' schedule's W, D
        and N (None: 5%, 60% and the rest of `steps`).
      clip_norm: clip the dense gradients to this global norm (None: no clipping).
    """

    mesh: str = "2x4"
    model: str = "dlrm"
    data: str = "synthetic"
    steps: int = 1500
    global_batch: int = 4096
    embedding_dim: int = 16
    sharding: str = "row_wise"
    plan: str | None = None
    cost_model: str | None = None
    embedding_optimizer: str = "rowwise_adagrad"
    embedding_lr: float = 0.1
    embedding_initial_accumulator: float = 1e-8
    optimizer: str = "adam"
    lr: float = 0.003
    bottom_mlp: tuple[int, ...] = (64, 32)
    top_mlp: tuple[int, ...] = (128, 64)
    cross_layers: int = 3
    low_rank: int = 64
    growth_prune: str | None = None
    eval_every: int = 0
    sync_every: int = 16
    eval_batches: int = 8
    eval_batch_size: int | None = None
    seed: int = 0
    data_seed: int | None = None
    num_tables: int | None = None
    rows_per_table: int | None = None
    pooling: int | None = None
    features: FeatureSet | None = None
    sequence_features: int = 0
    sequence_len: int = 20
    sequence_pooling: str = "mean"
    combiner: str | None = None
    weighted_features: int = 0
    progress: bool = True
    metrics_dir: str | None = None
    profile_dir: str | None = None
    towers: int | str = 0
    tower_module: str = "identity"
    tower_dim: int | None = None
    tower_partitioner: str = "balanced"
    partition_checkpoint: str | None = None
    tower_row_wise: str | tuple[str, ...] = ()
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    keep_checkpoints: int = 3
    kernel: str = "auto"
    table_dtype: str = "f32"
    row_dedup: str = "host"
    dense_allreduce: str = "hierarchical"
    row_tiers: str = "auto"
    memory_budget: float = 1.25
    row_tier_batches: int = 8
    eval_data: str | None = None
    teacher: str = "dlrm"
    lr_schedule: str = "constant"
    warmup_steps: int | None = None
    decay_start: int | None = None
    decay_steps: int | None = None
    clip_norm: float | None = None

    @property
    def uses_towers(self) -> bool:
        """Whether the run takes the DMT tower path on `mesh` (see `towers`)."""
        return self.towers_on(parse_mesh_spec(self.mesh)[0])

    def towers_on(self, hosts: int) -> bool:
        """Whether the run takes the DMT tower path on a mesh of `hosts` hosts:
        only when asked (`towers` >= 1, or 'auto': one tower per host)."""
        return self.towers == "auto" or self.towers > 0

    def __post_init__(self):
        parse_mesh_spec(self.mesh)  # MeshError (a ValueError) names a bad spec
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; available: {', '.join(MODELS)}")
        if self.data not in DATA_SOURCES[:2] and not (
            self.data.startswith("criteo:") and len(self.data) > len("criteo:")
        ):
            raise ValueError(
                f"unknown data source {self.data!r}; available: {', '.join(DATA_SOURCES)}"
            )
        if self.sequence_pooling not in SEQUENCE_POOLING:
            raise ValueError(
                f"unknown sequence_pooling {self.sequence_pooling!r}; available: "
                f"{', '.join(SEQUENCE_POOLING)}"
            )
        if self.sequence_features < 0 or self.sequence_len < 1:
            raise ValueError(
                f"sequence_features must be >= 0 and sequence_len >= 1, got "
                f"{self.sequence_features} and {self.sequence_len}"
            )
        if self.sequence_features and (self.data != "synthetic" or self.features is not None
                                       or self.num_tables or self.rows_per_table or self.pooling):
            raise ValueError(
                "sequence_features extend the default synthetic feature set only (not "
                "--data=mlperf/criteo, a uniform set or explicit features)"
            )
        if self.optimizer not in DENSE_OPTIMIZERS:
            raise ValueError(
                f"unknown dense optimizer {self.optimizer!r}; available: "
                f"{', '.join(DENSE_OPTIMIZERS)}"
            )
        if self.sharding != "auto":
            _choice("sharding", self.sharding, ShardingType)
        _choice("embedding_optimizer", self.embedding_optimizer, OptimizerKind)
        _choice("kernel", self.kernel, Kernel)
        if self.table_dtype not in TABLE_DTYPES:
            raise ValueError(f"table_dtype must be one of {', '.join(TABLE_DTYPES)}, got {self.table_dtype!r}")
        if self.table_dtype != "f32" and self.kernel == "pallas":
            raise ValueError(f"table_dtype={self.table_dtype!r} runs on the XLA and C++ paths; the Pallas "
                             "kernels take f32 tables (kernel='xla' or 'auto')")
        if self.row_dedup not in ("host", "device"):
            raise ValueError(f"row_dedup must be 'host' or 'device', got {self.row_dedup!r}")
        if self.dense_allreduce not in DENSE_ALLREDUCE:
            raise ValueError(f"dense_allreduce must be one of {', '.join(DENSE_ALLREDUCE)}, "
                             f"got {self.dense_allreduce!r}")
        if self.row_tiers not in ("auto", "none"):
            raise ValueError(f"row_tiers must be 'auto' or 'none', got {self.row_tiers!r}")
        if not self.memory_budget >= 1.0:
            raise ValueError(f"memory_budget is a multiple of row-wise's footprint, >= 1; got {self.memory_budget}")
        if self.row_tier_batches < 1:
            raise ValueError(f"row_tier_batches must be >= 1, got {self.row_tier_batches}")
        if self.combiner is not None:
            _choice("combiner", self.combiner, Combiner)
        if self.weighted_features < 0:
            raise ValueError(f"weighted_features must be >= 0, got {self.weighted_features}")
        if self.weighted_features and self.criteo_path is not None:
            raise ValueError("Criteo data has no per-sample weights (weighted_features applies to "
                             "synthetic and mlperf data)")
        if self.weighted_features and self.features is not None:
            raise ValueError("weighted_features marks features of the data's preset; with `features` "
                             "given, set SparseFeature.weighted there")

        for name in ("steps", "global_batch", "embedding_dim", "eval_batches", "num_tables",
                     "rows_per_table", "pooling", "sync_every"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if not self.embedding_initial_accumulator >= 0:
            raise ValueError(
                "embedding_initial_accumulator must be >= 0, got "
                f"{self.embedding_initial_accumulator}"
            )
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.towers != "auto" and not (isinstance(self.towers, int) and self.towers >= 0):
            raise ValueError(f"towers must be an integer >= 0 or 'auto', got {self.towers!r}")
        if self.towers and self.sharding not in TOWER_SHARDINGS:
            raise ValueError(
                f"towers shard their tables {' or '.join(TOWER_SHARDINGS)} inside their host; "
                f"--sharding={self.sharding} applies to the flat path (--towers=0)"
            )
        if self.cost_model is not None and self.sharding != "auto":
            raise ValueError(f"cost_model is the learned planner's: it needs sharding='auto', "
                             f"not {self.sharding!r}")
        if self.plan is not None and not self.plan:
            raise ValueError("plan needs a file path")
        if self.plan is not None and self.uses_towers:
            raise ValueError("plan is the flat path's sharding; towers place their own tables "
                             "(towers=0 to use a plan file)")
        if self.uses_towers:
            from jdmt.towers.modules import tower_output_dim

            tower_output_dim(self.tower_module, 1, self.embedding_dim, self.tower_dim)
            has_seq = self.sequence_features > 0 or (
                self.features is not None and any(not f.pooled for f in self.features.sparse))
            _check_tower_sequences(self.tower_module, self.sequence_pooling, has_seq)
        elif self.tower_module != "identity" or self.tower_partitioner != "balanced":
            raise ValueError(
                "tower_module / tower_partitioner need towers, but this run is flat (towers=0); "
                "give towers >= 1 or 'auto'"
            )
        if (self.tower_partitioner == "learned") != (self.partition_checkpoint is not None):
            raise ValueError("tower_partitioner='learned' and partition_checkpoint go together")
        if isinstance(self.tower_row_wise, str) and self.tower_row_wise != "auto":
            names = tuple(n.strip() for n in self.tower_row_wise.split(",") if n.strip())
            object.__setattr__(self, "tower_row_wise", names)
        elif not isinstance(self.tower_row_wise, str):
            object.__setattr__(self, "tower_row_wise", tuple(self.tower_row_wise))
        if self.tower_row_wise and not self.uses_towers:
            raise ValueError("tower_row_wise shards tower tables inside their host; this run is "
                             "flat (give towers >= 1 or 'auto')")
        if self.tower_row_wise and self.sharding != "table_wise":
            raise ValueError(f"tower_row_wise names the exceptions to sharding='table_wise' inside "
                             f"the towers' hosts; with sharding={self.sharding!r} every tower table "
                             "is spread over its host's devices already")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume needs a checkpoint_dir")
        if self.eval_data is not None and self.criteo_path is None:
            raise ValueError("eval_data is a held-out Criteo file: it needs data='criteo:PATH'")
        if self.teacher not in TEACHERS:
            raise ValueError(f"unknown teacher {self.teacher!r}; available: {', '.join(TEACHERS)}")
        if self.teacher != "dlrm" and self.criteo_path is not None:
            raise ValueError("teacher shapes synthetic labels; Criteo data has its own")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; available: "
                             f"{', '.join(LR_SCHEDULES)}")
        if self.lr_schedule == "dlrm":
            schedule_steps(self.steps, self.warmup_steps, self.decay_start, self.decay_steps)
        elif any(v is not None for v in (self.warmup_steps, self.decay_start, self.decay_steps)):
            raise ValueError("warmup_steps / decay_start / decay_steps shape lr_schedule='dlrm'")
        if self.clip_norm is not None and not (self.clip_norm > 0 and np.isfinite(self.clip_norm)):
            raise ValueError(f"clip_norm must be a positive number, got {self.clip_norm}")
        for name in ("lr", "embedding_lr"):
            v = float(getattr(self, name))
            if not (v > 0 and np.isfinite(v)):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)}")
        for name in ("bottom_mlp", "top_mlp"):
            widths = tuple(getattr(self, name))
            if any(int(w) < 1 for w in widths):
                raise ValueError(f"{name} widths must be >= 1, got {widths}")
            object.__setattr__(self, name, tuple(int(w) for w in widths))
        if self.cross_layers < 0 or self.low_rank < 1:
            raise ValueError(f"cross_layers must be >= 0 and low_rank >= 1, got {self.cross_layers} "
                             f"and {self.low_rank}")
        if self.growth_prune is not None:
            from jdmt.train.growth_prune import parse_schedule

            parse_schedule(self.growth_prune, self.steps)  # ScheduleError (a ValueError) says why

    @property
    def eval_size(self) -> int:
        return self.eval_batch_size or self.global_batch

    @property
    def criteo_path(self) -> str | None:
        """The file of `data='criteo:PATH'` (None for other sources)."""
        return self.data[len("criteo:"):] if self.data.startswith("criteo:") else None

    def feature_set(self) -> FeatureSet:
        if self.features is not None:
            return self.features
        uniform = (self.num_tables, self.rows_per_table, self.pooling)
        if self.criteo_path is not None:  # one id per category: the combiner is moot
            return criteo_features(self.rows_per_table or 100_000, self.embedding_dim)
        if self.data == "mlperf":
            fs = mlperf_dcnv2_features(max_rows=self.rows_per_table or 100_000, dim=self.embedding_dim)
        elif any(v is not None for v in uniform):
            fs = make_features(
                self.num_tables or 26, self.rows_per_table or 10_000, self.embedding_dim,
                self.pooling or 10, combiner=self.combiner or "mean",
            )
        else:
            fs = synthetic_default_features(
                dim=self.embedding_dim, num_sequence=self.sequence_features,
                sequence_len=self.sequence_len,
            )
        if self.combiner is not None:
            fs = dataclasses.replace(fs, sparse=tuple(
                dataclasses.replace(f, combiner=self.combiner) if f.pooled else f for f in fs.sparse))
        if self.weighted_features:
            pooled = [i for i, f in enumerate(fs.sparse) if f.pooled]
            if self.weighted_features > len(pooled):
                raise ValueError(f"weighted_features={self.weighted_features}, but the feature set has "
                                 f"{len(pooled)} pooled features")
            chosen = set(pooled[: self.weighted_features])
            fs = dataclasses.replace(fs, sparse=tuple(
                dataclasses.replace(f, combiner="sum", weighted=True) if i in chosen else f
                for i, f in enumerate(fs.sparse)))
        return fs


def _choice(name: str, value: str, enum_cls) -> None:
    try:
        enum_cls(value)
    except ValueError:
        allowed = ", ".join(e.value for e in enum_cls)
        raise ValueError(f"unknown {name} {value!r}; available: {allowed}") from None


def _check_tower_sequences(module: str, pooling: str, has_sequences: bool) -> None:
    """Compressing Tower Modules mean-pool sequence features inside the tower
    (no query there); only the identity module leaves their pooling to the model."""
    if has_sequences and module != "identity" and pooling != "mean":
        raise ValueError(
            f"tower_module={module!r} mean-pools sequence features inside its tower; "
            f"sequence_pooling={pooling!r} needs the identity Tower Module or the flat path"
        )
