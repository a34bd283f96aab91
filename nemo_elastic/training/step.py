"""Forward step for Megatron's forward-backward schedules: token-level masked LM loss.

Batches are dicts of `[b, s]` tensors: tokens, labels, loss_mask, position_ids (see
`nemo_elastic.data`).  The model is called with `attention_mask=None`: every attention layer is
causal (`AttnMaskType.causal`), so no explicit mask is needed.
"""

from __future__ import annotations

from functools import partial
from typing import Iterator

import torch

LM_LOSS = "lm loss"


def masked_lm_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """per_token_loss, loss_mask [b, s] -> (sum, num_tokens, {LM_LOSS: [sum, num_tokens]}).

    The 3-tuple form tells the schedule to divide by the token count (token-mean loss).
    """
    mask = loss_mask.float()
    loss_sum = (per_token_loss.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), mask.sum().detach()])
    return loss_sum, num_tokens, {LM_LOSS: report}


def lm_forward_step(data_iterator: Iterator[dict], model, *, subnetwork=None):
    """Megatron forward_step_func: returns (per-token loss [b, s], loss_func).

    `subnetwork` (bind it with `functools.partial`) selects a nested model of an elastic parent;
    it is passed only when given, because a plain `HybridModel` has no such keyword.  It is
    keyword-only so that it can never take the place of the third positional argument that
    Megatron's schedule passes with partial activation checkpointing.
    """
    batch = next(data_iterator)
    device = next(model.parameters()).device
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    kwargs = {} if subnetwork is None else {"subnetwork": subnetwork}
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], **kwargs)
    return output, partial(masked_lm_loss, batch["loss_mask"])


def reduce_lm_loss(losses_reduced: list[dict], dp_group=None) -> tuple[float, float]:
    """Sum the [sum, count] reports of all micro-batches and data-parallel ranks -> (mean, count).

    Only meaningful on the last pipeline stage (others get an empty list).
    """
    if not losses_reduced:
        return float("nan"), 0.0
    total = torch.stack([r[LM_LOSS] for r in losses_reduced]).sum(dim=0).double()
    if dp_group is not None and torch.distributed.get_world_size(dp_group) > 1:
        torch.distributed.all_reduce(total, group=dp_group)
    return (total[0] / total[1].clamp(min=1)).item(), total[1].item()
