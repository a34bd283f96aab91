"""Typed, validated configuration for every `nemo-elastic` command.

YAML (OmegaConf) only serializes these dataclasses: a recipe is loaded, merged with command-line
`key=value` overrides, then converted field by field into keyword-only dataclasses whose
`__post_init__` checks every structural rule (divisibility by heads / groups / tensor-parallel
size, valid layer pattern).  Errors name the field, the value and the fix.

This module imports neither torch nor megatron: a recipe can be validated on a laptop.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from nemo_elastic.errors import ConfigError, fail as _fail, require_positive  # noqa: F401

# Pure Python (no torch): the synthetic corpus knobs are a config section as they are.
from nemo_elastic.data.synthetic import SyntheticReasoningConfig
from nemo_elastic.config_elastic import ElasticConfig
from nemo_elastic.config_io import from_dict, load_yaml, yaml_problem
from nemo_elastic.config_optimizer import LR_DECAY_STYLES, OptimizerConfig

# The layer symbols and their size tables live in `sizes` (re-exported here: config.MAMBA, ...).
# GDN ('G'), MLA ('+'), DSA ('D') and MTP ('/') are real Megatron symbols that the elastic
# machinery does not handle yet.  MoE ('E') needs a `model.moe` section (`config_moe`).
from nemo_elastic.sizes import (  # noqa: F401
    ATTENTION, ELASTIC_AXES, GROUPED, GROUPED_WHY, LAYER_FIELDS, MAMBA, MLP, MOE, MOE_FIELDS, PIPE,
    SIZE_FIELDS)
from nemo_elastic.config_moe import MoEConfig

SUPPORTED_SYMBOLS = (MAMBA, ATTENTION, MLP, MOE)
UNSUPPORTED_SYMBOLS = {"G": "GatedDeltaNet", "+": "MLA", "D": "DSA attention", "/": "MTP"}


def _require_divides(prefix: str, name: str, value: int, divisor_name: str, divisor: int) -> None:
    if value % divisor != 0:
        _fail(f"{prefix}{name}", value,
              f"must be divisible by {divisor_name}={divisor} (e.g. use "
              f"{max(divisor, value - value % divisor)} or {value - value % divisor + divisor})")


def parse_layer_pattern(pattern: str, field_name: str = "model.hybrid_layer_pattern") -> list[str]:
    """Split a hybrid pattern like ``"M-M*|M-M-"`` into pipeline segments (no separators inside).

    Raises ConfigError for unknown or unsupported symbols and for empty segments.
    """
    if not isinstance(pattern, str) or not pattern:
        _fail(field_name, pattern, "must be a non-empty string of layer symbols "
              "('M' Mamba2, '*' attention, '-' MLP, '|' pipeline-stage boundary), e.g. 'M-M*-M-'")
    for pos, char in enumerate(pattern):
        if char in UNSUPPORTED_SYMBOLS:
            _fail(field_name, pattern,
                  f"symbol {char!r} at position {pos} ({UNSUPPORTED_SYMBOLS[char]}) is not supported; "
                  "use only 'M', '*', '-', 'E' and '|'")
        if char not in SUPPORTED_SYMBOLS and char != PIPE:
            _fail(field_name, pattern,
                  f"unknown symbol {char!r} at position {pos}; valid symbols are 'M' (Mamba2), "
                  "'*' (attention), '-' (MLP), 'E' (MoE, with model.moe) and '|' "
                  "(pipeline-stage boundary)")
    segments = pattern.split(PIPE)
    if any(not seg for seg in segments):
        _fail(field_name, pattern, "has an empty pipeline segment (two '|' in a row or at an end)")
    return segments


@dataclass(kw_only=True)
class ModelConfig:
    """Shape of the hybrid parent model (Nemotron-H conventions). Names follow Megatron-Core."""

    hybrid_layer_pattern: str
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: Optional[int] = None  # default hidden_size // num_attention_heads
    mamba_num_heads: int
    mamba_head_dim: int
    mamba_num_groups: int
    mamba_state_dim: int
    mamba_conv_kernel: int = 4
    mamba_chunk_size: int = 128
    vocab_size: int
    max_sequence_length: int = 4096
    layernorm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    params_dtype: str = "float32"  # float32 | bfloat16 | float16
    # Heterogeneous layers (e.g. an extracted budget): one dict per global layer overriding
    # mamba_num_heads / mamba_head_dim (Mamba), num_attention_heads (attention) or
    # ffn_hidden_size (MLP) for that layer; None = every layer uses the global sizes.
    per_layer: Optional[list] = None
    # Mixture-of-experts layers ('E' in the pattern): router and expert sizes (`config_moe`).
    moe: Optional[MoEConfig] = None

    def __post_init__(self) -> None:
        p = "model."
        parse_layer_pattern(self.hybrid_layer_pattern)
        self._validate_moe()
        require_positive(self, "hidden_size", "ffn_hidden_size", "num_attention_heads",
                          "num_query_groups", "mamba_num_heads", "mamba_head_dim",
                          "mamba_num_groups", "mamba_state_dim", "mamba_conv_kernel",
                          "mamba_chunk_size", "vocab_size", "max_sequence_length", prefix=p)
        _require_divides(p, "num_attention_heads", self.num_attention_heads,
                         "model.num_query_groups", self.num_query_groups)
        if self.kv_channels is None:
            if self.has_attention:
                _require_divides(p, "hidden_size", self.hidden_size,
                                 "model.num_attention_heads", self.num_attention_heads)
        else:
            require_positive(self, "kv_channels", prefix=p)
        _require_divides(p, "mamba_num_heads", self.mamba_num_heads,
                         "model.mamba_num_groups", self.mamba_num_groups)
        if self.params_dtype not in ("float32", "bfloat16", "float16"):
            _fail(f"{p}params_dtype", self.params_dtype, "must be one of float32, bfloat16, float16")
        if not self.layernorm_epsilon > 0:
            _fail(f"{p}layernorm_epsilon", self.layernorm_epsilon, "must be > 0")
        if self.per_layer is not None:
            self._validate_per_layer()

    def _validate_moe(self) -> None:
        if isinstance(self.moe, Mapping):
            self.moe = from_dict(MoEConfig, self.moe, "model.moe.")
        elif self.moe is not None and not isinstance(self.moe, MoEConfig):
            _fail("model.moe", self.moe, "must be a mapping of MoE fields (or null)")
        if self.has_moe and self.moe is None:
            _fail("model.hybrid_layer_pattern", self.hybrid_layer_pattern,
                  "has MoE layers ('E') but model.moe is not set; add a model.moe section "
                  "(num_moe_experts, moe_router_topk, moe_ffn_hidden_size, ...)")

    def _validate_moe_layer(self, i: int, entry: dict) -> None:
        experts = entry.get("num_moe_experts")
        if experts is None or experts == self.moe.num_moe_experts:
            return
        if experts < self.moe.moe_router_topk:
            _fail(f"model.per_layer[{i}].num_moe_experts", experts,
                  f"must be >= model.moe.moe_router_topk={self.moe.moe_router_topk}")
        if self.moe.moe_router_num_groups > 1:
            _fail(f"model.per_layer[{i}].num_moe_experts", experts,
                  "fewer experts per layer need model.moe.moe_router_num_groups=1 (a prefix "
                  "of the experts does not keep the expert groups)")

    @property
    def has_moe(self) -> bool:
        return MOE in self.layer_symbols

    def _validate_per_layer(self) -> None:
        symbols = self.layer_symbols
        if not isinstance(self.per_layer, (list, tuple)) or len(self.per_layer) != len(symbols):
            _fail("model.per_layer", self.per_layer,
                  f"must be a list with one entry (a dict, possibly empty) per layer: {len(symbols)}")
        self.per_layer = [dict(entry or {}) for entry in self.per_layer]
        for i, (sym, entry) in enumerate(zip(symbols, self.per_layer)):
            for key, value in entry.items():
                name = f"model.per_layer[{i}].{key}"
                if key not in LAYER_FIELDS[sym]:
                    _fail(name, value, f"layer {i} ({sym!r}) only takes {list(LAYER_FIELDS[sym])}")
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    _fail(name, value, "must be a positive integer")
            if sym == MOE and self.moe is not None:
                self._validate_moe_layer(i, entry)
            for key, groups in GROUPED.items():
                if key in entry:
                    _require_divides("", f"model.per_layer[{i}].{key}", entry[key],
                                     f"model.{groups}", getattr(self, groups))

    def layer_size(self, field_name: str, layer: int) -> int:
        """`field_name` (e.g. 'ffn_hidden_size') of global layer `layer`, per-layer aware."""
        if self.per_layer and field_name in self.per_layer[layer]:
            return self.per_layer[layer][field_name]
        if field_name in MOE_FIELDS:
            return getattr(self.moe, field_name) if self.moe is not None else None
        return getattr(self, field_name)

    @property
    def layer_symbols(self) -> str:
        """The pattern without pipeline separators: one symbol per global layer."""
        return self.hybrid_layer_pattern.replace(PIPE, "")

    @property
    def num_layers(self) -> int:
        return len(self.layer_symbols)

    @property
    def has_attention(self) -> bool:
        return ATTENTION in self.layer_symbols

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim


@dataclass(kw_only=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # MoE expert parallelism: the routed experts are split over this many data-parallel ranks
    expert_model_parallel_size: int = 1
    backend: Optional[str] = None  # None: nccl with CUDA, gloo without

    def __post_init__(self) -> None:
        require_positive(self, "tensor_model_parallel_size", "pipeline_model_parallel_size",
                          "expert_model_parallel_size", prefix="parallel.")
        if self.backend not in (None, "gloo", "nccl"):
            _fail("parallel.backend", self.backend, "must be null (auto), 'gloo' or 'nccl'")


@dataclass(kw_only=True)
class IndexedDataConfig:
    """Megatron-Core indexed dataset (`.bin/.idx`) built by `nemo-elastic preprocess`."""

    prefix: Optional[str] = None
    tokenizer: Optional[str] = None  # path to a Hugging Face tokenizer.json
    eod_token: Optional[str] = None
    split: str = "98,2,0"
    cache_dir: Optional[str] = None

    def __post_init__(self) -> None:
        name = "data.indexed.split"
        try:
            weights = [float(w) for w in self.split.replace("/", ",").split(",")]
        except ValueError:
            weights = []
        if len(weights) != 3 or any(not math.isfinite(w) or w < 0 for w in weights):
            _fail(name, self.split, "must be three non-negative weights 'train,valid,test' "
                  "(e.g. '98,2,0')")
        if weights[0] <= 0 or weights[1] <= 0:
            _fail(name, self.split, "gives the {} split no weight; training needs both a train "
                  "and a validation split (e.g. '98,2,0')".format(
                      "train" if weights[0] <= 0 else "validation"))


@dataclass(kw_only=True)
class DataConfig:
    source: str = "synthetic"  # synthetic | indexed
    seq_length: int = 128
    micro_batch_size: int = 8
    global_batch_size: int = 8
    seed: int = 1234
    synthetic: SyntheticReasoningConfig = field(default_factory=SyntheticReasoningConfig)
    indexed: IndexedDataConfig = field(default_factory=IndexedDataConfig)

    def __post_init__(self) -> None:
        require_positive(self, "seq_length", "micro_batch_size", "global_batch_size",
                          prefix="data.")
        if self.source not in ("synthetic", "indexed"):
            _fail("data.source", self.source, "must be 'synthetic' or 'indexed'")
        if self.source == "synthetic":
            for name in ("num_train", "num_val"):
                if getattr(self.synthetic, name) < 1:
                    _fail(f"data.synthetic.{name}", getattr(self.synthetic, name),
                          "training needs at least 1 problem in the train and the validation "
                          "split")
        if self.source == "indexed" and (not self.indexed.prefix or not self.indexed.tokenizer):
            _fail("data.indexed.prefix", self.indexed.prefix,
                  "data.source=indexed needs data.indexed.prefix (from `nemo-elastic preprocess`) "
                  "and data.indexed.tokenizer (the tokenizer.json used to build it)")


@dataclass(kw_only=True)
class TrainConfig:
    iters: int = 300
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_iters: int = 20
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 100
    eval_iters: int = 10
    save_interval: int = 100
    eval_accuracy_samples: int = 64  # greedy-decoding answer accuracy at the end (synthetic data)
    keep_checkpoints: Optional[int] = None  # keep the newest N checkpoints (pretrain and the
    # elastic train); None keeps every one
    # Megatron activation recompute (TransformerConfig fields of the same names); masks of
    # elastic sub-networks survive it (nemo_elastic/elastic/recompute.py).
    recompute_granularity: Optional[str] = None  # None | full | selective
    recompute_method: Optional[str] = None  # full: uniform | block
    recompute_num_layers: Optional[int] = None  # full: layers per chunk / recomputed layers
    recompute_modules: Optional[list] = None  # selective: core_attn, mlp, layernorm

    def __post_init__(self) -> None:
        require_positive(self, "iters", "log_interval", "eval_interval", "eval_iters",
                          "save_interval", prefix="train.")
        if self.keep_checkpoints is not None:
            require_positive(self, "keep_checkpoints", prefix="train.")
        n = self.eval_accuracy_samples
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            _fail("train.eval_accuracy_samples", n, "must be an integer >= 0 (0 skips the "
                  "answer accuracy)")
        if self.warmup_iters < 0 or self.warmup_iters >= self.iters:
            _fail("train.warmup_iters", self.warmup_iters, f"must be in [0, train.iters={self.iters})")
        if not 0 < self.lr:
            _fail("train.lr", self.lr, "must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            _fail("train.min_lr", self.min_lr, f"must be in [0, train.lr={self.lr}]")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            _fail("train.lr_decay_style", self.lr_decay_style, "must be constant, linear or cosine")
        if self.clip_grad < 0:
            _fail("train.clip_grad", self.clip_grad, "must be >= 0 (0 disables clipping)")
        if self.recompute_granularity not in (None, "full", "selective"):
            _fail("train.recompute_granularity", self.recompute_granularity,
                  "must be null, 'full' or 'selective'")
        if self.recompute_granularity == "full":
            if self.recompute_method not in ("uniform", "block"):
                _fail("train.recompute_method", self.recompute_method,
                      "full recompute needs 'uniform' or 'block'")
            require_positive(self, "recompute_num_layers", prefix="train.")

    @property
    def optimizer(self) -> OptimizerConfig:
        """The pretraining's optimizer and LR schedule (over `iters`)."""
        return OptimizerConfig(
            iters=self.iters, lr=self.lr, min_lr=self.min_lr, warmup_iters=self.warmup_iters,
            lr_decay_style=self.lr_decay_style, weight_decay=self.weight_decay,
            adam_beta1=self.adam_beta1, adam_beta2=self.adam_beta2, clip_grad=self.clip_grad)

    def recompute_overrides(self) -> dict:
        """TransformerConfig overrides for activation recompute (empty when off)."""
        if self.recompute_granularity is None:
            return {}
        out = {"recompute_granularity": self.recompute_granularity}
        if self.recompute_granularity == "full":
            out.update(recompute_method=self.recompute_method,
                       recompute_num_layers=self.recompute_num_layers)
        elif self.recompute_modules is not None:
            out["recompute_modules"] = list(self.recompute_modules)
        return out


@dataclass(kw_only=True)
class Config:
    """A whole recipe. `output_dir` holds checkpoints, logs, plots and the resolved config."""

    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    elastic: Optional[ElasticConfig] = None  # `nemo-elastic train` (elastic distillation)
    output_dir: str = "runs/default"

    def __post_init__(self) -> None:
        m, par, d = self.model, self.parallel, self.data
        tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
        tp_rule = "parallel.tensor_model_parallel_size"
        for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size",
                     "mamba_num_heads", "mamba_num_groups", "vocab_size"):
            _require_divides("model.", name, getattr(m, name), tp_rule, tp)
        for i, entry in enumerate(m.per_layer or []):
            for name, value in entry.items():
                # head channels are not split by TP; experts are split by expert parallelism
                if name not in ("mamba_head_dim", "num_moe_experts"):
                    _require_divides("", f"model.per_layer[{i}].{name}", value, tp_rule, tp)
        self._check_moe_parallel()
        segments = parse_layer_pattern(m.hybrid_layer_pattern)
        if pp > 1 and len(segments) % pp != 0:
            _fail("model.hybrid_layer_pattern", m.hybrid_layer_pattern,
                  f"has {len(segments)} pipeline segment(s) but parallel.pipeline_model_parallel_size"
                  f"={pp}; separate the stages with '|' (e.g. '{_split_hint(m.layer_symbols, pp)}')")
        if pp == 1 and len(segments) > 1:
            _fail("model.hybrid_layer_pattern", m.hybrid_layer_pattern,
                  "contains '|' stage boundaries but parallel.pipeline_model_parallel_size=1; "
                  "remove the '|' or set the pipeline size to the number of segments")
        if d.seq_length > m.max_sequence_length:
            _fail("data.seq_length", d.seq_length,
                  f"exceeds model.max_sequence_length={m.max_sequence_length}")
        if d.global_batch_size % d.micro_batch_size != 0:
            _fail("data.global_batch_size", d.global_batch_size,
                  f"must be a multiple of data.micro_batch_size={d.micro_batch_size}")
        if self.elastic is not None:
            self.elastic = from_dict(ElasticConfig, self.elastic, "elastic.")
            self._check_elastic()

    def _check_moe_parallel(self) -> None:
        m, par = self.model, self.parallel
        ep, tp = par.expert_model_parallel_size, par.tensor_model_parallel_size
        if m.moe is None:
            if ep > 1:
                _fail("parallel.expert_model_parallel_size", ep,
                      "must be 1 for a model without MoE layers ('E' and model.moe)")
            return
        _require_divides("model.moe.", "num_moe_experts", m.moe.num_moe_experts,
                         "parallel.expert_model_parallel_size", ep)
        for i, entry in enumerate(m.per_layer or []):
            if "num_moe_experts" in entry:
                _require_divides("", f"model.per_layer[{i}].num_moe_experts",
                                 entry["num_moe_experts"], "parallel.expert_model_parallel_size", ep)
        for name in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
            if getattr(m.moe, name) is not None:
                _require_divides("model.moe.", name, getattr(m.moe, name),
                                 "parallel.tensor_model_parallel_size", tp)

    def _check_elastic(self) -> None:
        """Rules of the elastic section that depend on the model and data sections."""
        e, m, d = self.elastic, self.model, self.data
        for axis, sizes in e.choices.items():
            _, field_name = ELASTIC_AXES[axis]
            group_name = GROUPED.get(field_name)
            full = getattr(m.moe, field_name, None) if field_name in MOE_FIELDS else \
                getattr(m, field_name)
            if full is None:
                _fail(f"elastic.choices.{axis}", sizes, f"model.{field_name} is not set (no "
                      "MoE section or no shared expert)")
            step = getattr(m, group_name) if group_name else 1
            for size in sizes:
                if size > full:
                    _fail(f"elastic.choices.{axis}", sizes, f"{size} exceeds model.{field_name}={full}")
                if size % step:
                    _fail(f"elastic.choices.{axis}", sizes, f"{size} is not a multiple of "
                          f"model.{group_name}={step} (every group keeps the same number of heads)")
        for c in e.depth_choices:
            if c > m.num_layers:
                _fail("elastic.depth_choices", e.depth_choices,
                      f"{c} exceeds the parent's {m.num_layers} layers")
        from nemo_elastic.training.elastic.schedule import Curriculum  # pure Python

        curriculum = Curriculum(e, d)
        for stage in curriculum.stages if curriculum.explicit else []:
            p = f"elastic.curriculum[{stage.index}]."
            seq, gbs, mbs = stage.seq_length, stage.global_batch_size, stage.micro_batch_size
            if seq > m.max_sequence_length:
                _fail(f"{p}seq_length", seq, f"exceeds model.max_sequence_length={m.max_sequence_length}")
            if gbs % mbs:
                _fail(f"{p}global_batch_size", gbs, f"must be a multiple of the micro batch {mbs}")
        # the stored recipe carries every stage's iterations (stages given in tokens resolved)
        e.curriculum = curriculum.stage_configs()
        e.resolve_warmups()
        if e.warmup_iters >= e.total_iters:
            _fail("elastic.warmup_iters", e.warmup_iters,
                  f"must be below the run's {e.total_iters} iterations")
        if e.budget_type == "active" and not m.has_moe:
            _fail("elastic.budget_type", e.budget_type, "counts what one token touches, which "
                  "differs from the parameters only with MoE ('E') layers in "
                  f"model.hybrid_layer_pattern={m.hybrid_layer_pattern!r}; use params")
        if e.budget_type in ("params", "active"):
            from nemo_elastic.cost_model import smallest_fraction

            what = "active parameters" if e.budget_type == "active" else "parameters"
            smallest = smallest_fraction(m, e, active=e.budget_type == "active")
            largest = smallest_fraction(m, e, active=e.budget_type == "active", largest=True)
            for name, value in e.budgets.items():
                if value > largest * (1 + e.loss.tolerance):
                    _fail(f"elastic.budgets.{name}", value, f"exceeds the largest fraction of "
                          f"the parent's {what} the elastic axes can reach, {largest:.3f} "
                          "(every axis at its largest choice, elastic.width_fractions / "
                          "choices); lower the budget, or add larger width_fractions / choices "
                          "(1.0 keeps an axis whole)")
                if value < smallest * (1 - e.loss.tolerance):
                    _fail(f"elastic.budgets.{name}", value, f"is below the smallest fraction of "
                          f"the parent's {what} the elastic axes can reach, {smallest:.3f} "
                          f"(every axis at its smallest choice, elastic.width_fractions / "
                          "choices); raise the budget, or add smaller width_fractions / choices")
        if e.budget_type == "memory":
            from nemo_elastic.cost_model import GB, MemorySpec, count_memory, smallest_memory
            from nemo_elastic.units import readable_bytes

            try:
                spec = MemorySpec(**e.memory)
            except TypeError as err:
                raise ConfigError(f"elastic.memory: {err}") from err
            parent_gb = count_memory(m, spec) / GB
            smallest_gb = smallest_memory(m, e, spec) / GB
            largest_gb = smallest_memory(m, e, spec, largest=True) / GB
            for name, value in e.budgets.items():
                if parent_gb * (1 + e.loss.tolerance) >= value > largest_gb * (1 + e.loss.tolerance):
                    _fail(f"elastic.budgets.{name}", value, f"({readable_bytes(value * GB)}) "
                          f"exceeds the largest memory the elastic axes can reach, "
                          f"{readable_bytes(largest_gb * GB)} (every axis at its largest "
                          f"choice, elastic.memory={dataclasses.asdict(spec)}); lower the "
                          "budget, or add larger elastic.width_fractions / choices (1.0 keeps "
                          "an axis whole)")
                if value > parent_gb * (1 + e.loss.tolerance):
                    _fail(f"elastic.budgets.{name}", value, f"({readable_bytes(value * GB)}) "
                          f"exceeds the parent's memory {readable_bytes(parent_gb * GB)} at "
                          f"elastic.memory={dataclasses.asdict(spec)}; give a memory budget "
                          "as a size up to the parent's (e.g. "
                          f"elastic.budgets.{name}='{readable_bytes(parent_gb * GB)}'), or "
                          "count a larger batch / seq_length in elastic.memory")
                if value < smallest_gb * (1 - e.loss.tolerance):
                    _fail(f"elastic.budgets.{name}", value, f"({readable_bytes(value * GB)}) is "
                          f"below the smallest memory the elastic axes can reach, "
                          f"{readable_bytes(smallest_gb * GB)} (every axis at its smallest "
                          f"choice, elastic.memory={dataclasses.asdict(spec)}); raise the "
                          "budget, or add smaller "
                          "elastic.width_fractions / choices")

    def with_model(self, model: ModelConfig) -> "Config":
        """This config around another model (a sliced sub-network, a checkpoint's own model).
        The elastic section describes the parent's family (its depth choices, choice sizes and
        memory budgets are checked against the parent), so it is dropped: the child is a plain
        model, validated by its own rules only."""
        return dataclasses.replace(self, model=model, elastic=None)

    def single_process(self) -> "Config":
        """This config at TP=1, PP=1 (pipeline separators removed; global layer indices and so
        checkpoint keys unchanged): how conversion, slicing and importance scoring run."""
        model = dataclasses.replace(self.model, hybrid_layer_pattern=self.model.layer_symbols)
        return dataclasses.replace(self, model=model,
                                   parallel=ParallelConfig(backend=self.parallel.backend))


def _split_hint(symbols: str, parts: int) -> str:
    size = -(-len(symbols) // parts)
    return PIPE.join(symbols[i:i + size] for i in range(0, len(symbols), size))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _override_problem(old, item: str, key: str, value, err: Exception) -> str:
    """One line for an override OmegaConf cannot apply; a mapping (`old`, the key's value
    before) given a list, or the other way round, says which kind the key takes and how to
    write it."""
    from omegaconf import DictConfig, ListConfig

    kinds = {DictConfig: ("a mapping", f"{key}={{name: value, ...}}"),
             ListConfig: ("a list", f"{key}=[a,b]")}
    for kind, (what, example) in kinds.items():
        if isinstance(old, kind) and not isinstance(value, dict if kind is DictConfig else list):
            given = type(value).__name__ if value is not None else "null"
            empty = " (it cannot be empty)" if value in ([], {}) else ""
            return (f"override {item!r}: {key} takes {what}, not a {given}{empty}; write it as "
                    f"{example}")
    return f"override {item!r}: {err}".splitlines()[0] if err is not None else \
        f"override {item!r}: {key} cannot take {value!r}"


def _glued_key(value) -> Optional[str]:
    """A mapping key such as 'full:0.5' (YAML's flow mapping `{full:0.5}`, no space after the
    colon, is one key with a null value), anywhere in `value`."""
    if isinstance(value, dict):
        for k, v in value.items():
            if v is None and isinstance(k, str) and ":" in k:
                return k
            inner = _glued_key(v)
            if inner is not None:
                return inner
    if isinstance(value, list):
        for v in value:
            inner = _glued_key(v)
            if inner is not None:
                return inner
    return None


def _spaced(text: str) -> str:
    import re

    return re.sub(r":(?=\S)", ": ", text)


def load_config(path: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = (),
                base: Optional[Mapping[str, Any]] = None) -> Config:
    """Load a YAML recipe, apply `key=value` overrides (OmegaConf dotlist), validate.

    `base` (a dict) may replace the file, e.g. the resolved config stored in a checkpoint.
    """
    from omegaconf import DictConfig, ListConfig, OmegaConf  # local: keep the import light

    if path is None and base is None:
        raise ConfigError("no config given: pass --config conf/tiny.yaml (or a checkpoint)")
    if base is None:
        base = load_yaml(path, "--config")
        if not isinstance(base, Mapping):
            raise ConfigError(f"--config={str(path)!r}: holds {type(base).__name__}, not a mapping "
                              "of sections (model:, data:, train:, ...); see conf/tiny.yaml")
    conf = OmegaConf.create(dict(base))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.iters=100)")
    for item in overrides:
        # One key at a time with update(): a path may index a list (elastic.curriculum.0.iters),
        # which a merge of from_dotlist() cannot do.  The value is typed by OmegaConf's grammar.
        key, text = item.split("=", 1)
        try:
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]
        except Exception as err:  # yaml / OmegaConf grammar errors of the value
            raise ConfigError(f"override {item!r}: the value is {yaml_problem(err)}; quote it or "
                              "fix the brackets") from None
        glued = _glued_key(value)
        if glued is not None:
            raise ConfigError(f"override {item!r}: {glued!r} reads as one key (YAML needs a space "
                              f"after the colon); write {key}={_spaced(text)}")
        try:
            before = OmegaConf.select(conf, key.lstrip("+"), default=None)
        except Exception:
            before = None
        if isinstance(before, (DictConfig, ListConfig)) and value is not None and \
                not isinstance(value, dict if isinstance(before, DictConfig) else list):
            # replacing (merge=False) would accept any value: say which kind the key takes
            raise ConfigError(_override_problem(before, item, key.lstrip("+"), value, None))
        if isinstance(value, dict) and isinstance(before, DictConfig):
            dropped = [k for k in before if k not in value]
            if dropped:  # say what happens: a mapping replaces, it does not merge
                logging.getLogger(__name__).info(
                    "override %s: the mapping replaces the recipe's %s (dropped: %s); set one "
                    "entry with %s.NAME=VALUE", item, key.lstrip("+"),
                    ", ".join(map(str, dropped)), key.lstrip("+"))
        try:
            # merge=False: a mapping value replaces the key's mapping (elastic.budgets={a: 1.0}
            # keeps only `a`); a scalar or list replaces it either way.
            OmegaConf.update(conf, key.lstrip("+"), value, merge=False, force_add=True)
        except Exception as err:  # omegaconf raises several types for bad paths
            raise ConfigError(_override_problem(before, item, key.lstrip("+"), value, err)) \
                from None
    try:
        data = OmegaConf.to_container(conf, resolve=True)
    except Exception as err:  # an ${interpolation} that does not resolve
        raise ConfigError(f"config: {str(err).splitlines()[0]}; fix or remove the ${{...}} "
                          "reference") from None
    return from_dict(Config, data)
