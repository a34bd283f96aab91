"""Evaluation of a model or of one of its nested sub-networks: validation loss through the
Megatron forward-only schedule (any TP/PP/DP) and greedy answer accuracy (synthetic corpus).

This is the one evaluation path: pretraining, `nemo-elastic eval`, the zero-shot budgets of
`nemo-elastic run` and the importance benchmark all go through it, so their numbers agree.
"""

from __future__ import annotations

import itertools
import logging
from functools import partial
from typing import Iterator, Optional

import torch

from nemo_elastic.config import Config
from nemo_elastic.runtime import RankInfo
from nemo_elastic.training.step import lm_forward_step, reduce_lm_loss

logger = logging.getLogger(__name__)


def _validation_batches(cfg: Config, data, num_microbatches: int,
                        info: RankInfo) -> tuple[Iterator[dict], int]:
    """(iterator, count) over the first `train.eval_iters * num_microbatches` micro-batches of
    this data-parallel rank's share of the validation set (fewer if the set is smaller).

    Always from the start and in order, so successive evaluations see the same tokens.
    """
    from nemo_elastic.data import iterate_once

    d = cfg.data
    batches_available = -(-len(data.val_dataset) // (d.micro_batch_size * info.dp_size))
    asked = cfg.train.eval_iters * num_microbatches
    count = max(1, min(asked, batches_available))
    if count < asked:
        _warn_once("train.eval_iters", f"train.eval_iters={cfg.train.eval_iters} asks for "
                   f"{asked} validation micro-batches, the validation split has only "
                   f"{batches_available}: using {count}")
    batches = iterate_once(data.val_dataset, d.micro_batch_size, dp_rank=info.dp_rank,
                           dp_size=info.dp_size)
    return itertools.islice(batches, count), count


_WARNED: set = set()


def _warn_once(key: str, message: str) -> None:
    """A capped setting is logged once per process (evaluations repeat every interval)."""
    if (key, message) not in _WARNED:
        _WARNED.add((key, message))
        logger.warning("%s", message)


def to_every_stage(value: float) -> float:
    """The last pipeline stage's value on every stage (the others contribute zero)."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return value
    is_last = ps.is_pipeline_last_stage(ignore_virtual=True)
    t = torch.tensor([value if is_last else 0.0], dtype=torch.float64)
    torch.distributed.all_reduce(t, group=ps.get_pipeline_model_parallel_group())
    return t.item()


def eval_microbatches(cfg: Config, info: Optional[RankInfo] = None) -> int:
    """Validation micro-batches per evaluation iteration: one global batch, as in training
    (`data.global_batch_size / (data.micro_batch_size x data-parallel size)`).  Every command
    that reports a validation loss - training's log, `eval`, `eval --all-budgets`, the main
    job's tables - measures `train.eval_iters` of these iterations, so they agree whatever the
    micro-batch size."""
    dp = info.dp_size if info is not None else 1
    return max(1, cfg.data.global_batch_size // (cfg.data.micro_batch_size * dp))


def validation_loss(cfg: Config, model, data, num_microbatches: int, info: RankInfo, *,
                    subnetwork=None, all_stages: bool = False) -> float:
    """Token-mean loss over the first `train.eval_iters * num_microbatches` validation
    micro-batches (per data-parallel rank), through Megatron's forward-only schedule.

    `subnetwork` (an `ElasticHybridModel`, bare or DDP-wrapped) evaluates that nested model
    instead of the whole one.  The loss is computed on the last pipeline stage; other stages get
    NaN unless `all_stages`, which all-reduces it over the pipeline group so every rank returns
    it.  (`all_stages` is opt-in because pretraining still broadcasts the value itself.)
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    val_iter, n_micro = _validation_batches(cfg, data, num_microbatches, info)
    step = lm_forward_step if subnetwork is None else partial(lm_forward_step,
                                                              subnetwork=subnetwork)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            losses = get_forward_backward_func()(
                forward_step_func=step, data_iterator=val_iter, model=[model],
                num_microbatches=n_micro, seq_length=cfg.data.seq_length,
                micro_batch_size=cfg.data.micro_batch_size, forward_only=True)
    finally:
        model.train(was_training)
    loss = reduce_lm_loss(losses, ps.get_data_parallel_group())[0]
    return to_every_stage(loss) if all_stages else loss


def greedy_logits_fn(model, subnetwork=None):
    """tokens [b, s] -> logits [b, s, v] (the whole vocabulary, gathered over tensor-parallel
    ranks) for a one-stage model; with an elastic model, `subnetwork` selects the nested model
    that generates."""
    kwargs = {} if subnetwork is None else {"subnetwork": subnetwork}

    def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return model(tokens, positions, None, runtime_gather_output=True, **kwargs)

    return logits_fn


def answer_accuracy_of(cfg: Config, model, data, info: RankInfo, *,
                       subnetwork=None, progress: bool = False) -> Optional[dict]:
    """Exact-match accuracy of greedy answers on the first `train.eval_accuracy_samples`
    validation problems (rank 0, TP=PP=1 only; None elsewhere or without problems).

    `subnetwork` (an elastic model) makes that nested model generate: on its physically sliced
    weights (`export.slicing.slice_model`, what `extract` writes), so it decodes with its own
    KV cache and Mamba states at its own cost.  Decoding is stateful (`nemo_elastic.inference`);
    it is announced in the log and `progress` shows a bar.
    """
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
    if n > len(data.val_problems):
        _warn_once("train.eval_accuracy_samples", f"train.eval_accuracy_samples={n} is more "
                   f"than the {len(data.val_problems)} validation problems: using "
                   f"{len(data.val_problems)}")
    from nemo_elastic.report.common import fmt_pct

    was_training = model.training
    model.eval()
    what = "" if subnetwork is None else " of a sub-network"
    logger.info("greedy answer accuracy%s on %d validation problems ...", what,
                min(n, len(data.val_problems)))
    try:
        decoder = model if subnetwork is None else _sliced(cfg, model, subnetwork)
        result = answer_accuracy(decoder, data.tokenizer, data.val_problems[:n], batch_size=64,
                                 progress=progress)
    finally:
        model.train(was_training)
    logger.info("answer accuracy%s (greedy, %d validation problems): %s", what, result["n"],
                fmt_pct(result["accuracy"]))
    return result


def _sliced(cfg: Config, model, subnetwork):
    """The plain model of a hard `subnetwork` of an elastic `model` (the parent itself when the
    sub-network is the whole model)."""
    from megatron.core.utils import unwrap_model

    from nemo_elastic.export.slicing import slice_model

    if not hasattr(subnetwork, "is_full"):  # a soft (router) sub-network: masked, no state
        raise TypeError(f"answer accuracy needs a hard SubNetwork, got {type(subnetwork).__name__}")
    if subnetwork.is_full(cfg.model):
        return unwrap_model(model)
    _, child = slice_model(model, cfg, subnetwork)
    return child.eval()


def evaluate_subnetwork(cfg: Config, model, data, info: RankInfo, subnetwork,
                        num_microbatches: int, *, progress: bool = False) -> dict:
    """{"val_loss": on every rank, "answer_accuracy": float or None where it is not computed}
    of `subnetwork` (None: the whole model)."""
    loss = validation_loss(cfg, model, data, num_microbatches, info, subnetwork=subnetwork,
                           all_stages=True)
    accuracy = answer_accuracy_of(cfg, model, data, info, subnetwork=subnetwork,
                                  progress=progress)
    return {"val_loss": loss, "answer_accuracy": None if accuracy is None else accuracy["accuracy"]}
