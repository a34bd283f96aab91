"""The `elastic:` section of a recipe: budgets, axes, router, distillation, curriculum.

Pure Python (no torch): validated when the recipe is loaded.  Rules that need the model's sizes
(choice lists vs. the parent, divisibility by groups and tensor-parallel size, stage sequence
length vs. `model.max_sequence_length`, memory budgets vs. the parent's memory) are checked by
`Config.__post_init__`, which sees every section.

    elastic:
      init_checkpoint: runs/tiny/prepared     # student start (prepared = importance-reordered)
      budgets: {full: 1.0, 75pct: 0.75, half: 0.5}   # fractions of the parent's parameters
      budget_type: params                     # active: fractions of the active parameters
                                              # (MoE: what one token touches); memory: GB
      axes: [hidden, mamba_heads, attention_heads, ffn]
      width_fractions: [1.0, 0.875, 0.75, 0.625, 0.5]
      router: {hidden_dim: 256, tau_start: 1.0, tau_end: 0.05, mode: hard, lr: 1.0e-2}
      distill: {teacher: null, temperature: 1.0}   # null: the init checkpoint is the teacher
      curriculum:
        - {name: stage1, seq_length: 8192, global_batch_size: 1536, tokens: 65e9}
        - {name: stage2, seq_length: 49152, global_batch_size: 512, tokens: 45e9,
           budget_probs: {full: 0.5, 75pct: 0.3, half: 0.2}}
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Optional

from nemo_elastic.config_io import from_dict
from nemo_elastic.config_optimizer import LR_DECAY_STYLES, OptimizerConfig
from nemo_elastic.errors import fail, first_repeated, require_number, require_positive
from nemo_elastic.sizes import ELASTIC_AXES

logger = logging.getLogger(__name__)

ROUTER_MODES = {"hard": "scaled", "soft": "mixture"}  # config name -> masks.SoftAxis mode
BUDGET_TYPES = ("params", "active", "memory")
# budget types whose targets are fractions of the parent (of its total / active parameters)
FRACTION_BUDGETS = ("params", "active")
TEACHER_MODES = ("frozen", "trainable")
BANDS = ("symmetric", "ceiling")
BUDGET_COSTS = ("hard", "expected")
FAMILY_CHOICES = ("argmax", "in_band")  # RouterConfig.family_choice
HARD_SCALES = ("probability", "straight_through")  # RouterConfig.hard_scale
ROUTER_INITS = ("random", "zero_shot")  # RouterConfig.init
# How a hard-mode student runs (soft mode is always masked): on the kept slices of the weights
# (a smaller budget costs less) or masked (the reference; every budget costs the full model).
EXECUTIONS = ("sliced", "masked")
# one: one budget drawn per micro-batch (the paper); stratified: one budget per micro-batch, the
# iteration's micro-batches spread over the budgets in proportion to the probabilities
# (systematic sampling: every iteration trains each budget its share, same cost as `one`);
# full_plus_one: the full budget on every micro-batch plus one other drawn (two students per
# teacher forward); all: every budget with a non-zero probability on every micro-batch after one
# teacher forward.  Losses are weighted so that each step's expectation equals `one`'s.
BUDGET_SAMPLINGS = ("one", "stratified", "full_plus_one", "all")
# Unset warmups (model and router) are this share of the whole run, so a default fits any run
# length (the paper's 60 iterations were ~1 % of its run; in an 80-iteration run, 75 %).
WARMUP_FRACTION = 0.05
WARMUP_WARN_SHARE = 0.25  # `train` warns when a warmup is a larger share of the run
PAPER_LR = 9.0e-5  # the paper's model LR for its 12B parent: the default when elastic.lr is unset


def budget_name_problem(name: str) -> Optional[str]:
    """Why `name` cannot be a budget name (it becomes a folder name), or None."""
    if not name.strip():
        return "is empty"
    if name in (".", "..") or name.startswith("."):
        return "starts with '.'"
    if any(c in name for c in "/\\") or os.path.isabs(name):
        return "contains a path separator"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains a control character (e.g. a newline)"
    if name != name.strip():
        return "starts or ends with a space"
    if len(name.encode()) > MAX_BUDGET_NAME:
        return f"is longer than {MAX_BUDGET_NAME} bytes"
    return None


MAX_BUDGET_NAME = 100  # bytes; a folder name (with staging prefixes) stays under NAME_MAX


@dataclass(kw_only=True)
class RouterConfig:
    """Paper-digest §5: per-axis 2-layer MLPs on the budget's one-hot, Gumbel-Softmax."""

    hidden_dim: int = 256
    init_std: float = 0.1
    tau_start: float = 1.0  # Gumbel temperature, exponential decay over the whole run
    tau_end: float = 0.05
    scale_start: float = 1.0  # logit scale, linear over the whole run
    scale_end: float = 10.0
    mode: str = "hard"  # hard: argmax prefix x its probability; soft: sum_i p_i prefix_i
    lr: float = 1.0e-2  # the router's own parameter group (paper: 1e-2 vs 9e-5 for the model)
    warmup_iters: Optional[int] = None  # None: WARMUP_FRACTION of the run (paper: 60)
    weight_decay: float = 0.0
    clip_grad: float = 1.0  # clipped separately from the model's gradients (0: off)
    # Each budget's deployed sub-network.  argmax: every axis's most likely choice (the paper).
    # in_band: the most likely combination of choices (largest sum of raw logit margins) whose
    # cost lies inside the budget's band - the argmax when it is inside; only when no
    # combination of the lattice is inside, the argmax (`family_check` then says so).
    family_choice: str = "argmax"
    # mode hard: the chosen prefix's scale during training.  probability: x its probability
    # (the paper's, Megatron-LM's); straight_through: the value 1 (the student trains on the
    # sub-network it deploys) with the probability's gradient.
    hard_scale: str = "probability"
    # Where each budget's choice starts.  random: the MLP's random logits (the paper).
    # zero_shot: before the first iteration, every uniform cut of every subset of the axes on
    # the lattice (`width_fractions`) whose cost is inside a budget's band is scored by its LM
    # loss on `init_batches` training micro-batches of the initial weights, and the best one's
    # choices get `init_margin` added to their logits (a fixed offset; the MLP learns on top of
    # it).  In hard mode the router only ever hears "scale the chosen prefix up or down", never
    # "another cut would be better": from a random start its 50 % choice froze on a cut that
    # lost to every fixed cut (issue 22 item 5; nemo_elastic/elastic/router_prior.py).
    init: str = "random"
    # 8: the first iterations' Gumbel draws rarely leave the start (2 and 4 let them train other
    # cuts: 50pct 0.4422 / 0.4397 vs 0.4382 over 3 seeds; held fixed 0.4379)
    init_margin: float = 8.0
    init_batches: int = 8

    def __post_init__(self) -> None:
        p = "elastic.router."
        if self.init not in ROUTER_INITS:
            fail(f"{p}init", self.init, f"must be one of {list(ROUTER_INITS)}")
        require_positive(self, "init_batches", prefix=p)
        require_number(self, "init_margin", prefix=p, low_open=False)
        if self.hard_scale not in HARD_SCALES:
            fail(f"{p}hard_scale", self.hard_scale, f"must be one of {list(HARD_SCALES)}")
        if self.family_choice not in FAMILY_CHOICES:
            fail(f"{p}family_choice", self.family_choice, f"must be one of {list(FAMILY_CHOICES)}")
        require_positive(self, "hidden_dim", prefix=p)
        require_number(self, "init_std", "tau_start", "tau_end", "scale_start", "scale_end", "lr",
                       prefix=p)
        require_number(self, "weight_decay", "clip_grad", prefix=p, low_open=False)
        if self.tau_end > self.tau_start:
            fail(f"{p}tau_end", self.tau_end, f"must be <= elastic.router.tau_start={self.tau_start}")
        if self.mode not in ROUTER_MODES:
            fail(f"{p}mode", self.mode, f"must be one of {sorted(ROUTER_MODES)}")
        _check_warmup(self.warmup_iters, f"{p}warmup_iters")


def _check_warmup(value, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        fail(name, value, "must be an integer >= 0, or null for "
             f"{WARMUP_FRACTION:.0%} of the run")


# Memory budgets may carry a unit; stored as GB (decimal, as nemo_elastic.cost_model.GB).
MEMORY_UNITS = {"B": 1e-9, "kB": 1e-6, "KB": 1e-6, "MB": 1e-3, "GB": 1.0, "TB": 1e3,
                "KiB": 2**10 / 1e9, "MiB": 2**20 / 1e9, "GiB": 2**30 / 1e9}


def parse_budget(value, budget_type: str, name: str):
    """A budget target: a number (a fraction of the parameters, or GB), '75%' (params) or a
    memory size with its unit ('512 MB', '1.5GB', '300 kB'; memory) -> the number."""
    if not isinstance(value, str):
        return value
    import re

    text = value.strip()
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z%]*)", text)
    unit = match.group(2) if match else None
    if match and budget_type == "memory" and unit in MEMORY_UNITS:
        return float(f"{float(match.group(1)) * MEMORY_UNITS[unit]:.12g}")
    if match and budget_type in FRACTION_BUDGETS and unit == "%":
        return float(match.group(1)) / 100
    what = (f"a size with a unit ({', '.join(MEMORY_UNITS)}), e.g. '512 MB', or a number of GB"
            if budget_type == "memory" else "a fraction of the parameters (0.75) or a percentage "
            "('75%'); for memory sizes set elastic.budget_type=memory")
    fail(name, value, f"must be {what}")


def default_warmup(total_iters: int) -> int:
    """The warmup of an unset `warmup_iters`: WARMUP_FRACTION of the run, rounded down."""
    return int(WARMUP_FRACTION * total_iters)


@dataclass(kw_only=True)
class BudgetLossConfig:
    """L = KD + weight * |cost / target - 1| (0 inside +-tolerance); the full budget adds
    full_budget_weight * MSE(probs, one-hot(largest)) (Megatron-LM Flextron form)."""

    weight: float = 1.0  # lambda
    tolerance: float = 0.05
    full_budget_weight: float = 10.0
    # symmetric: zero within target x (1 +- tolerance) (Megatron-LM); ceiling: zero within
    # target x [1 - tolerance, 1] - the budget is an upper bound (memory that must fit).
    band: str = "symmetric"
    # What the band judges.  expected: E[cost] under the router's probabilities (Megatron-LM);
    # hard: the cost of the argmax sub-network (the one mode hard's student runs and either mode
    # deploys), with the expectation's gradient (straight-through).  In mode hard measured no
    # better in router-only runs (bench/bench_router_band.py); in mode soft E[cost] can sit in
    # the band with the argmax 10 % above it (bench/bench_family_seeds.py, issue 22 item 5).
    cost: str = "expected"
    # Where the cost's gradient comes from.  None: the router's probabilities as the student
    # uses them (Gumbel noise, logit scale, annealed tau; Megatron-LM).  Late in a run those are
    # one-hot to float precision (tau 0.05, scale 10), the gradient is exactly 0 while the loss
    # is not, and the router's choice drifts with whatever else moves it (the main job's 75pct
    # left its band at iteration ~110 that way).  A number T: the gradient of the expected cost
    # under softmax(raw router logits / T) - no noise, no scale, no annealing, never saturated;
    # the loss value is unchanged (straight-through).
    grad_temperature: Optional[float] = None

    def __post_init__(self) -> None:
        p = "elastic.loss."
        if self.grad_temperature is not None:
            require_number(self, "grad_temperature", prefix=p)
        if self.band not in BANDS:
            fail(f"{p}band", self.band, f"must be one of {list(BANDS)}")
        if self.cost not in BUDGET_COSTS:
            fail(f"{p}cost", self.cost, f"must be one of {list(BUDGET_COSTS)}")
        require_number(self, "weight", "full_budget_weight", prefix=p, low_open=False)
        require_number(self, "tolerance", prefix=p, low_open=False, high=1.0)


@dataclass(kw_only=True)
class DistillConfig:
    teacher: Optional[str] = None  # checkpoint; None: elastic.init_checkpoint (the parent)
    temperature: float = 1.0
    ce_weight: float = 0.0  # + ce_weight x LM cross-entropy of the student (paper: 0, KD only)
    teacher_mode: str = "frozen"  # frozen: separate copy; trainable: the full-budget student

    def __post_init__(self) -> None:
        p = "elastic.distill."
        require_number(self, "temperature", prefix=p)
        require_number(self, "ce_weight", prefix=p, low_open=False)
        if self.teacher_mode not in TEACHER_MODES:
            fail(f"{p}teacher_mode", self.teacher_mode, f"must be one of {list(TEACHER_MODES)}")
        if self.teacher_mode == "trainable" and self.ce_weight == 0:
            fail(f"{p}ce_weight", self.ce_weight, "must be > 0 with teacher_mode=trainable (the "
                 "paper's self-distillation: L = KD + alpha * CE; without CE the teacher collapses)")


@dataclass(kw_only=True)
class StageConfig:
    """One curriculum stage; unset sizes fall back to the `data:` section."""

    name: str
    iters: Optional[int] = None
    tokens: Optional[float] = None  # alternative to iters: ceil(tokens / (gbs * seq_length))
    seq_length: Optional[int] = None
    global_batch_size: Optional[int] = None
    micro_batch_size: Optional[int] = None
    budget_probs: Optional[dict] = None  # budget name -> weight (normalized); None: uniform

    def validate(self, p: str) -> "StageConfig":
        """Check every field; `p` is the field-path prefix, e.g. 'elastic.curriculum[1].'."""
        if not isinstance(self.name, str) or not self.name:
            fail(f"{p}name", self.name, "must be a non-empty string")
        if (self.iters is None) == (self.tokens is None):
            fail(f"{p}iters", self.iters, "give exactly one of iters or tokens for each stage")
        if self.iters is not None:
            require_positive(self, "iters", prefix=p)
        else:
            require_number(self, "tokens", prefix=p)
        for name in ("seq_length", "global_batch_size", "micro_batch_size"):
            if getattr(self, name) is not None:
                require_positive(self, name, prefix=p)
        if self.budget_probs is not None:
            if not isinstance(self.budget_probs, dict) or not self.budget_probs:
                fail(f"{p}budget_probs", self.budget_probs,
                     "must map budget names to weights, e.g. {full: 0.5, 9b: 0.3, 6b: 0.2}")
            for key, value in self.budget_probs.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) \
                        or not value >= 0 or math.isinf(value):
                    fail(f"{p}budget_probs.{key}", value, "must be a finite number >= 0")
            if sum(self.budget_probs.values()) <= 0:
                fail(f"{p}budget_probs", self.budget_probs, "needs at least one weight > 0")
        return self


@dataclass(kw_only=True)
class ElasticConfig:
    """Everything `nemo-elastic train` needs beyond the parent's model/data sections."""

    init_checkpoint: Optional[str] = None  # model-only or prepared checkpoint to start from
    output_dir: Optional[str] = None  # default: <output_dir>/elastic
    budgets: dict = field(default_factory=lambda: {"100%": 1.0, "75%": 0.75, "50%": 0.5})
    # params: fractions of the parent's parameters; active: of its active parameters (what one
    # token touches: MoE layers count top-k experts); memory: GB (see `memory`)
    budget_type: str = "params"
    memory: dict = field(default_factory=dict)  # nemo_elastic.cost_model.MemorySpec fields
    axes: list = field(default_factory=lambda: ["hidden", "mamba_heads", "attention_heads", "ffn"])
    # 1/16 steps: with 1/8 steps one step of an axis moves the size by more than a +-5 % band,
    # and the router oscillates across the band (bench/bench_router_band.py: 12/12 budgets
    # inside with 1/16 steps, about 70 % with 1/8 steps)
    width_fractions: list = field(default_factory=lambda: [1 - i / 16 for i in range(9)])
    choices: dict = field(default_factory=dict)  # axis -> explicit sizes (overrides fractions)
    heterogeneous: list = field(default_factory=list)  # axes with one choice per layer
    depth_choices: list = field(default_factory=list)  # numbers of kept layers; [] = no depth
    router: RouterConfig = field(default_factory=RouterConfig)
    loss: BudgetLossConfig = field(default_factory=BudgetLossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    curriculum: list = field(default_factory=list)  # StageConfig dicts; [] = one stage
    iters: Optional[int] = None  # length of the implicit single stage (no curriculum)
    execution: str = "sliced"  # hard-mode students: sliced | masked (see EXECUTIONS)
    budget_sampling: str = "one"  # one | stratified | full_plus_one | all (BUDGET_SAMPLINGS)
    lr: Optional[float] = None  # None: PAPER_LR (tuned for a 12B parent), with a warning
    min_lr: Optional[float] = None  # None: lr / 10
    warmup_iters: Optional[int] = None  # None: WARMUP_FRACTION of the run (paper: 60)
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 100
    save_interval: int = 100
    # `nemo-elastic run`: evaluate every saved elastic checkpoint's budgets (training_curve.json,
    # the report's curve); false skips that stage
    training_curve: bool = True

    def __post_init__(self) -> None:
        p = "elastic."
        if not isinstance(self.training_curve, bool):
            fail(f"{p}training_curve", self.training_curve, "must be true or false")
        self._check_budgets(p)
        if self.budget_type not in BUDGET_TYPES:
            fail(f"{p}budget_type", self.budget_type, f"must be one of {list(BUDGET_TYPES)}")
        if not isinstance(self.memory, dict):
            fail(f"{p}memory", self.memory, "must be a mapping of MemorySpec fields "
                 "(batch_size, seq_length, bytes_per_param, bytes_per_cache)")
        self._check_axes(p)
        if not isinstance(self.depth_choices, (list, tuple)) or any(
                isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in self.depth_choices):
            fail(f"{p}depth_choices", self.depth_choices, "must be a list of positive layer counts")
        if len(set(self.depth_choices)) != len(self.depth_choices):
            fail(f"{p}depth_choices", self.depth_choices, "has duplicates")
        self.router = from_dict(RouterConfig, self.router, f"{p}router.")
        self.loss = from_dict(BudgetLossConfig, self.loss, f"{p}loss.")
        self.distill = from_dict(DistillConfig, self.distill, f"{p}distill.")
        self._check_curriculum(p)
        if self.execution not in EXECUTIONS:
            fail(f"{p}execution", self.execution, f"must be one of {list(EXECUTIONS)}")
        if self.budget_sampling not in BUDGET_SAMPLINGS:
            fail(f"{p}budget_sampling", self.budget_sampling,
                 f"must be one of {list(BUDGET_SAMPLINGS)}")
        if self.lr is None:
            import logging

            logging.getLogger(__name__).warning(
                "elastic.lr is not set: using the paper's %g (tuned for a 12B parent); set "
                "elastic.lr (and elastic.min_lr) for your model", PAPER_LR)
            self.lr = PAPER_LR
        require_number(self, "lr", prefix=p)
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        require_number(self, "min_lr", prefix=p, low_open=False, high=self.lr)
        require_number(self, "weight_decay", "clip_grad", prefix=p, low_open=False)
        require_positive(self, "log_interval", "eval_interval", "save_interval", prefix=p)
        _check_warmup(self.warmup_iters, f"{p}warmup_iters")
        if all(s.iters is not None for s in self.curriculum):  # else Config resolves tokens first
            self.resolve_warmups()
        if self.lr_decay_style not in LR_DECAY_STYLES:
            fail(f"{p}lr_decay_style", self.lr_decay_style, "must be constant, linear or cosine")

    # ------------------------------------------------------------------ validation pieces
    def _check_budgets(self, p: str) -> None:
        if not isinstance(self.budgets, dict) or not self.budgets:
            fail(f"{p}budgets", self.budgets, "must map names to targets, e.g. "
                 "{full: 1.0, 9b: 0.72, 6b: 0.5} (fractions of the parent's parameters)")
        for name in self.budgets:
            problem = budget_name_problem(str(name))
            if problem:
                fail(f"{p}budgets", name, f"a budget name {problem} (names become export "
                     "folder names); use letters, digits, '_', '-' or '.', e.g. 50pct")
        self.budgets = {str(k): parse_budget(v, self.budget_type, f"{p}budgets.{k}")
                        for k, v in self.budgets.items()}
        for name, value in self.budgets.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                    or math.isinf(value):
                fail(f"{p}budgets.{name}", value, "must be a positive number")
            if self.budget_type in FRACTION_BUDGETS and value > 1:
                fail(f"{p}budgets.{name}", value, "must be a fraction of the parent's parameters "
                     "in (0, 1]; for sizes in GB set elastic.budget_type=memory")
        values = sorted(self.budgets.values())
        if len(set(values)) != len(values):
            fail(f"{p}budgets", self.budgets, "two budgets have the same target")

    def _check_axes(self, p: str) -> None:
        for name in ("axes", "heterogeneous", "width_fractions"):
            if not isinstance(getattr(self, name), (list, tuple)):
                fail(f"{p}{name}", getattr(self, name), "must be a list")
            repeated = first_repeated(getattr(self, name))
            if repeated is not None:
                fail(f"{p}{name}", list(getattr(self, name)),
                     f"{repeated!r} is given twice; list each once")
        bad = [a for a in self.axes if a not in ELASTIC_AXES]
        if bad or not self.axes and not self.depth_choices:
            fail(f"{p}axes", self.axes, f"unknown {bad}; valid: {list(ELASTIC_AXES)}" if bad else
                 "no elastic axis and no depth_choices: nothing to train")
        if not set(self.heterogeneous) <= set(self.axes) - {"hidden"}:
            fail(f"{p}heterogeneous", self.heterogeneous, "must be a subset of elastic.axes "
                 "without 'hidden' (the hidden size is global)")
        if not self.width_fractions or any(
                isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1
                for f in self.width_fractions):
            fail(f"{p}width_fractions", self.width_fractions, "must be fractions in (0, 1]")
        if not isinstance(self.choices, dict):
            fail(f"{p}choices", self.choices, "must map axis names to lists of sizes")
        for axis, sizes in self.choices.items():
            if axis not in self.axes:
                fail(f"{p}choices.{axis}", sizes, f"{axis!r} is not in elastic.axes={self.axes}")
            if not isinstance(sizes, (list, tuple)) or not sizes or any(
                    isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
                fail(f"{p}choices.{axis}", sizes, "must be a non-empty list of positive sizes")

    def _check_curriculum(self, p: str) -> None:
        if not isinstance(self.curriculum, (list, tuple)):
            fail(f"{p}curriculum", self.curriculum, "must be a list of stages")
        stages = []
        for i, stage in enumerate(self.curriculum):
            prefix = f"{p}curriculum[{i}]."
            if not isinstance(stage, (dict, StageConfig)):
                fail(f"{p}curriculum[{i}]", stage, "must be a mapping (name, iters or tokens, ...)")
            stages.append(from_dict(StageConfig, stage, prefix).validate(prefix))
            for name in stages[-1].budget_probs or {}:
                if name not in self.budgets:
                    fail(f"{prefix}budget_probs.{name}", stages[-1].budget_probs[name],
                         f"unknown budget {name!r}; budgets are {list(self.budgets)}")
            left_out = [n for n in self.budgets if stages[-1].budget_probs is not None
                        and n not in stages[-1].budget_probs]
            if left_out:
                logger.warning("%sbudget_probs leaves out %s: probability 0 in stage %r (give "
                               "them a weight to train them there)", prefix, left_out,
                               stages[-1].name)
        never = [n for n in self.budgets if stages and all(
            s.budget_probs is not None and not s.budget_probs.get(n) for s in stages)]
        if never:
            fail(f"{p}budgets.{never[0]}", self.budgets[never[0]], "is never trained: every "
                 "stage's budget_probs gives it probability 0; give it a weight in "
                 "elastic.curriculum[*].budget_probs, or remove the budget")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            fail(f"{p}curriculum", names, "stage names must be unique")
        self.curriculum = stages
        if not stages:
            if self.iters is None:
                fail(f"{p}iters", None, "set elastic.iters (one stage) or elastic.curriculum")
            require_positive(self, "iters", prefix=p)
        elif self.iters is not None:
            fail(f"{p}iters", self.iters, "give the length per stage in elastic.curriculum "
                 "(iters or tokens), not elastic.iters")

    def resolve_warmups(self) -> None:
        """Unset warmups (model, router) -> WARMUP_FRACTION of the run (needs every stage's
        iterations)."""
        if self.warmup_iters is None:
            self.warmup_iters = default_warmup(self.total_iters)
        if self.router.warmup_iters is None:
            self.router.warmup_iters = default_warmup(self.total_iters)

    def warmup_warnings(self) -> list[str]:
        """Warmups that take more than WARMUP_WARN_SHARE of the run (a hand-written recipe
        that kept a long run's value)."""
        total, out = self.total_iters, []
        for name, value in (("elastic.warmup_iters", self.warmup_iters),
                            ("elastic.router.warmup_iters", self.router.warmup_iters)):
            if value is not None and value > WARMUP_WARN_SHARE * total:
                out.append(f"{name}={value} is {value / total:.0%} of the run's {total} "
                           f"iterations; unset it for {WARMUP_FRACTION:.0%} of the run, or "
                           "lower it")
        return out

    # ------------------------------------------------------------------ queries
    def optimizer(self, train) -> OptimizerConfig:
        """The student's optimizer and LR schedule over the whole run (all stages); the Adam
        betas are the `train:` section's (`train`)."""
        return OptimizerConfig(
            iters=self.total_iters, lr=self.lr, min_lr=self.min_lr, warmup_iters=self.warmup_iters,
            lr_decay_style=self.lr_decay_style, weight_decay=self.weight_decay,
            adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2, clip_grad=self.clip_grad)

    @property
    def budget_names(self) -> list[str]:
        return list(self.budgets)

    @property
    def total_iters(self) -> int:
        """Iterations of the whole run (stages given in tokens are resolved to iterations by
        `Config`, which knows the data section's sequence length and batch)."""
        if not self.curriculum:
            return int(self.iters)
        return sum(s.iters for s in self.curriculum)
