"""The elastic run's schedule: curriculum stages and the router's learning-rate factor.

One object, `Curriculum`, answers every question about the stages: where each begins and ends
(iterations `(begin, end]`, 1-based), its sequence length and batch sizes (unset ones fall back
to the `data:` section), its budget probabilities, how many training tokens the student has seen
at an iteration, and where the stages change.  The trainer (segments), the main job (tokens per
evaluated checkpoint), its report (stage text, stage marks), recipe validation (stages given in
tokens become iterations) and the Megatron-Bridge callback all ask it; none recomputes it.

Pure Python (no torch, no megatron): recipe validation imports it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

from nemo_elastic.config_elastic import StageConfig

IMPLICIT_STAGE = "elastic"  # the name of the one stage of a recipe without `curriculum`


@dataclass(frozen=True)
class Stage:
    """One resolved stage: iterations `(begin, end]` of the run with one data shape."""

    index: int
    name: str
    begin: int
    end: int
    seq_length: int
    global_batch_size: int
    micro_batch_size: int
    weights: Optional[dict]  # the recipe's budget_probs (unnormalized); None: uniform
    budget_probs: tuple  # one probability per budget, in `elastic.budgets` order

    @property
    def iters(self) -> int:
        return self.end - self.begin

    @property
    def tokens_per_iteration(self) -> int:
        return self.global_batch_size * self.seq_length

    def data_config(self, data):
        """The `data:` section this stage trains on (its sizes; a seed of its own)."""
        return dataclasses.replace(
            data, seq_length=self.seq_length, seed=data.seed + self.index,
            micro_batch_size=self.micro_batch_size, global_batch_size=self.global_batch_size)


def stage_iterations(stage: StageConfig, seq_length: int, global_batch_size: int) -> int:
    """A stage's iterations: given, or its tokens at its batch and length (at least 1)."""
    if stage.iters is not None:
        return stage.iters
    return max(1, math.ceil(stage.tokens / (global_batch_size * seq_length)))


class Curriculum:
    """The stages of `elastic` (or its one implicit stage of `elastic.iters`) over `data`."""

    def __init__(self, elastic, data) -> None:
        self.explicit = bool(elastic.curriculum)  # whether the recipe lists stages
        given = elastic.curriculum or [StageConfig(name=IMPLICIT_STAGE, iters=elastic.iters)]
        self._given = list(given)
        self.budget_names = list(elastic.budget_names)
        self.stages: list[Stage] = []
        begin = 0
        for k, stage in enumerate(given):
            seq = stage.seq_length or data.seq_length
            gbs = stage.global_batch_size or data.global_batch_size
            mbs = stage.micro_batch_size or data.micro_batch_size
            iters = stage_iterations(stage, seq, gbs)
            weights = [float((stage.budget_probs or {}).get(n, 0.0)) if stage.budget_probs
                       else 1.0 for n in self.budget_names]
            probs = tuple(w / sum(weights) for w in weights)
            self.stages.append(Stage(index=k, name=stage.name, begin=begin, end=begin + iters,
                                     seq_length=seq, global_batch_size=gbs, micro_batch_size=mbs,
                                     weights=stage.budget_probs, budget_probs=probs))
            begin += iters

    @property
    def total_iters(self) -> int:
        return self.stages[-1].end

    def stage_at(self, iteration: int) -> Stage:
        """The stage running `iteration` (1-based); the last one once past the end."""
        for stage in self.stages:
            if iteration <= stage.end:
                return stage
        return self.stages[-1]

    def tokens_at(self, iteration: int) -> int:
        """Training tokens the student has seen after `iteration` iterations (past the end:
        at the last stage's rate)."""
        total, left = 0, iteration
        for stage in self.stages:
            step = min(left, stage.iters)
            total, left = total + step * stage.tokens_per_iteration, left - step
        return total + left * self.stages[-1].tokens_per_iteration

    def stage_change_tokens(self) -> list[int]:
        """Training tokens at each change of stage (none for one stage)."""
        return [self.tokens_at(stage.end) for stage in self.stages[:-1]]

    def stage_configs(self) -> list[StageConfig]:
        """The recipe's stages with their iterations resolved (stages given in tokens carry
        their iterations, `tokens` cleared): what a validated recipe stores."""
        return [dataclasses.replace(given, iters=stage.iters, tokens=None)
                for given, stage in zip(self._given, self.stages)] if self.explicit \
            else []

    def describe(self, names: Sequence[str]) -> str:
        """One line per stage for reports: iterations, batch x length, how budgets are drawn."""
        if not self.explicit:
            return f"{self.total_iters} iterations"
        return "; ".join(
            f"{s.name}: {s.iters} iterations x {s.global_batch_size} x {s.seq_length} tokens, "
            "budgets drawn " + ("uniformly" if not s.weights else
                                "/".join(f"{s.weights.get(n, 0):g}" for n in names))
            for s in self.stages)

    @classmethod
    def of(cls, cfg) -> "Curriculum":
        """The curriculum of a whole recipe (`Config` with an `elastic:` section)."""
        return cls(cfg.elastic, cfg.data)


def lr_factor(iteration: int, warmup: int, total: int, style: str, min_ratio: float) -> float:
    """The router's LR multiplier after `iteration` steps (torch `LambdaLR`'s `last_epoch`):
    linear warmup, then constant / linear / cosine decay to `min_ratio` at `total`.

    Not Megatron's `OptimizerParamScheduler` (which schedules the model): that one sets the LR
    of step k from k itself (its first step runs at `init_lr`) where this one, as torch's
    schedulers, uses k - 1 after the warmup, so switching would move every router LR after the
    warmup by one step and change every trained number and checkpoint of an elastic run; and a
    resumed checkpoint holds `LambdaLR`'s state (`last_epoch`, `base_lrs`), not its.
    """
    if warmup and iteration < warmup:
        return (iteration + 1) / warmup
    if style == "constant" or total <= warmup:
        return 1.0
    t = min(1.0, (iteration - warmup) / max(1, total - warmup))
    decay = 1 - t if style == "linear" else 0.5 * (1 + math.cos(math.pi * t))
    return min_ratio + (1 - min_ratio) * decay
