"""Validation loss (any TP/PP) and greedy answer accuracy (synthetic corpus)."""

from __future__ import annotations

import itertools
import logging
from typing import Optional

import torch

from nemo_elastic.config import Config
from nemo_elastic.runtime import RankInfo
from nemo_elastic.training.step import lm_forward_step, reduce_lm_loss

logger = logging.getLogger(__name__)


def validation_loss(cfg: Config, model, data, num_microbatches: int, info: RankInfo) -> float:
    """Token-mean loss over the first `train.eval_iters` global batches of the validation set.

    Same batches every time (in order), so values are comparable across evaluations.
    Returns the loss on the last pipeline stage (NaN elsewhere).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_elastic.data import iterate_once

    d = cfg.data
    batches_available = -(-len(data.val_dataset) // (d.micro_batch_size * info.dp_size))
    n_micro = max(1, min(cfg.train.eval_iters * num_microbatches, batches_available))
    val_iter = itertools.islice(
        iterate_once(data.val_dataset, d.micro_batch_size, dp_rank=info.dp_rank,
                     dp_size=info.dp_size), n_micro)
    model.eval()
    with torch.no_grad():
        losses = get_forward_backward_func()(
            forward_step_func=lm_forward_step, data_iterator=val_iter, model=[model],
            num_microbatches=n_micro, seq_length=d.seq_length, micro_batch_size=d.micro_batch_size,
            forward_only=True)
    model.train()
    return reduce_lm_loss(losses, ps.get_data_parallel_group())[0]


def greedy_logits_fn(model, subnetwork=None):
    """tokens [b, s] -> logits [b, s, v] for a model on one process (TP=PP=1); with an
    elastic model, `subnetwork` selects the nested model that generates."""
    kwargs = {} if subnetwork is None else {"subnetwork": subnetwork}

    def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return model(tokens, positions, None, **kwargs)

    return logits_fn


def answer_accuracy_of(cfg: Config, model, data, info: RankInfo) -> Optional[dict]:
    """Exact-match accuracy of greedy answers on validation problems (rank 0, TP=PP=1 only)."""
    from nemo_elastic.data import answer_accuracy

    n = cfg.train.eval_accuracy_samples
    if not data.val_problems or n <= 0:
        return None
    if info.tp_size > 1 or info.pp_size > 1:
        logger.info("answer accuracy is computed with TP=PP=1 only; skipped "
                    "(run `nemo-elastic eval` on the checkpoint)")
        return None
    if not info.is_main:
        return None
    model.eval()
    try:
        result = answer_accuracy(greedy_logits_fn(model), data.tokenizer, data.val_problems[:n],
                                 batch_size=64, device=next(model.parameters()).device)
    finally:
        model.train()
    logger.info("answer accuracy (greedy, %d validation problems): %.1f%%", result["n"],
                100 * result["accuracy"])
    return result
