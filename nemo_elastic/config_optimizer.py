"""The model's optimizer and learning-rate schedule: one type for both training commands.

`train:` (pretraining) and `elastic:` (elastic distillation) each set the same optimizer fields
(`lr`, `min_lr`, `warmup_iters`, `lr_decay_style`, `weight_decay`, `clip_grad`; the Adam betas
live in `train:` and serve both) and hand them to `training.optim` as one `OptimizerConfig`
(`TrainConfig.optimizer`, `ElasticConfig.optimizer(train)`), which builds Megatron-Core's
`OptimizerConfig` and `OptimizerParamScheduler` from it.  The sections validate their fields
(with their own defaults: the elastic ones follow the run's length), this type only carries
the result.  Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass

LR_DECAY_STYLES = ("constant", "linear", "cosine")


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """Adam with decoupled weight decay and gradient clipping; linear warmup over
    `warmup_iters`, then `lr_decay_style` decay from `lr` to `min_lr` at `iters`."""

    iters: int  # the schedule's length (decay ends here)
    lr: float
    min_lr: float
    warmup_iters: int
    lr_decay_style: str
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    clip_grad: float  # 0: off
