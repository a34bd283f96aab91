"""Forward-KL knowledge distillation on logits, tensor-parallel (vocab-parallel) aware.

    loss[b, s] = KL(p_teacher || p_student) = sum_v p_t(v) * (log p_t(v) - log p_s(v))

at temperature T (both logits divided by T; Minitron / the paper use T = 1).  Under tensor
parallelism each rank holds a `[b, s, V/tp]` vocabulary shard (Megatron's column-parallel output
layer): the softmax normalizers are combined with all-reduces over the TP group (max for
stability, then sum of exponentials), the student's through an autograd-aware all-reduce, and the
per-token KL is the all-reduced sum of the shard-local terms.  The result is identical on every
TP rank and equal to the unsharded computation.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _AllReduceSum(torch.autograd.Function):
    """Sum over `group` in forward.  Backward: identity when the loss built from the sum is
    the same replicated scalar on every rank and only each shard's own term reaches it (the
    per-token KL); a sum over ranks when every rank's loss depends on the summed value through
    its own shard (the softmax normalizer), since each shard's gradient collects all ranks'."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group, reduce_backward: bool) -> torch.Tensor:
        ctx.group, ctx.reduce_backward = group, reduce_backward
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.reduce_backward:
            grad = grad.clone()
            dist.all_reduce(grad, group=ctx.group)
        return grad, None, None


def _log_softmax_vocab_parallel(logits: torch.Tensor, group) -> torch.Tensor:
    """log_softmax over a vocabulary split across `group`; logits [..., V/tp] (float32)."""
    local_max = logits.detach().amax(dim=-1, keepdim=True)
    dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - local_max
    sum_exp = shifted.exp().sum(dim=-1, keepdim=True)
    if logits.requires_grad:
        # Backward sums over ranks: log Z depends on every shard's logits.
        sum_exp = _AllReduceSum.apply(sum_exp, group, True)
    else:
        dist.all_reduce(sum_exp, group=group)
    return shifted - sum_exp.log()


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
               temperature: float = 1.0, tp_group=None) -> torch.Tensor:
    """Per-token KL(teacher || student) `[b, s]` from `[b, s, V]` (or `[b, s, V/tp]`) logits.

    `tp_group`: the tensor-parallel group when the logits are vocabulary shards (None or a
    group of size 1: ordinary softmax).  The teacher is detached (frozen).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: must be > 0")
    student = student_logits.float() / temperature
    teacher = teacher_logits.detach().float() / temperature
    sharded = tp_group is not None and dist.get_world_size(tp_group) > 1
    if sharded:
        log_p_s = _log_softmax_vocab_parallel(student, tp_group)
        log_p_t = _log_softmax_vocab_parallel(teacher, tp_group)
    else:
        log_p_s = F.log_softmax(student, dim=-1)
        log_p_t = F.log_softmax(teacher, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    if sharded:
        kl = _AllReduceSum.apply(kl, tp_group, False)
    return kl


def masked_mean(per_token: torch.Tensor, loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Token mean of a `[b, s]` loss over `loss_mask` (1 = counted)."""
    if loss_mask is None:
        return per_token.mean()
    mask = loss_mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)
