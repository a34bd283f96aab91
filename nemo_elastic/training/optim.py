"""Megatron-Core optimizer and LR/WD scheduler from an `OptimizerConfig` (`config_optimizer`)."""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from nemo_elastic import config_optimizer


def build_optimizer(model_chunks: list, opt: config_optimizer.OptimizerConfig,
                    params_dtype: torch.dtype):
    """Adam (decoupled weight decay) over DDP-wrapped chunks, Megatron's grad clipping."""
    config = OptimizerConfig(
        optimizer="adam", lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1, adam_beta2=opt.adam_beta2, clip_grad=opt.clip_grad,
        bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        params_dtype=params_dtype, use_distributed_optimizer=False)
    return get_megatron_optimizer(config, model_chunks)


def build_scheduler(optimizer, opt: config_optimizer.OptimizerConfig) -> OptimizerParamScheduler:
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=opt.lr, min_lr=opt.min_lr,
        lr_warmup_steps=opt.warmup_iters, lr_decay_steps=opt.iters,
        lr_decay_style=opt.lr_decay_style, start_wd=opt.weight_decay,
        end_wd=opt.weight_decay, wd_incr_steps=opt.iters, wd_incr_style="constant",
        # on resume the schedule is the config's (a changed lr / min_lr / iters applies
        # from the resumed iteration); the checkpoint only supplies the step count
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)


def wrap_ddp(model, finalize_grads=None):
    """Megatron DDP around `model` (fp32 grad reduction, no overlap, no distributed optimizer).

    The schedule all-reduces data-parallel grads (and syncs pipeline-shared params) through
    `config.finalize_model_grads_func`; without it every data-parallel replica would step on its
    own gradients.  `finalize_grads` replaces Megatron's `finalize_model_grads` (the elastic job
    wraps it to also sum the router's gradients across pipeline stages).
    """
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)

    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False),
        model)
    model.config.finalize_model_grads_func = finalize_grads or finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    return ddp
