"""Depth importance: which layers to drop first (paper-digest §4.2 and §9.2).

Three rankings, each a full order of the global layer indices from least to most important:

* ``iterative`` (the paper's, default): normalized MSE of the logits,
  ``s_j(R) = sum (M_full - M_{R+j})^2 / sum M_full^2`` over all calibration tokens and vocab,
  where ``M_{R+j}`` are the logits with the already-removed layers R *and* candidate j dropped
  (depth masking of `ElasticHybridModel`, residual passthrough).  Each round scores every
  remaining layer, then removes the lowest for good: round r measures the damage of removing
  one more layer from the already reduced model, always against the FULL model's logits.  The
  removal order is the ranking; the last survivor is the most important.  A layer's reported
  score is its score in the last round it took part in (its removal round).  ``max_rounds``
  stops early (remaining layers are then ordered by their last-round scores).
* ``one_shot``: the same score with each layer removed alone (= round 0 of ``iterative``).
* ``cosine``: Minitron's block importance, mean over tokens of ``1 - cos(layer input, layer
  output)`` on the residual stream.

Forward-only; data-parallel sums are all-reduced; logits are gathered over tensor parallelism.
Pipeline size 1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from nemo_elastic.config import ModelConfig
from nemo_elastic.elastic.subnet import SubNetwork
from nemo_elastic.importance.hooks import unwrap
from nemo_elastic.importance.scores import all_reduce_sum, parallel_groups, run_batch

logger = logging.getLogger(__name__)

METHODS = ("iterative", "one_shot", "cosine")
# The iterative ranking compares every round against the same full-model logits; keep them in
# memory below this size (tiny models), recompute them each round above it (real vocabularies).
FULL_LOGITS_CACHE_BYTES = 512 * 2**20


@dataclass
class DepthRanking:
    method: str
    order: list[int]  # global layer indices, least important (dropped first) -> most important
    scores: dict[int, float]  # layer -> score (higher = more important)
    rounds: list[dict] = field(default_factory=list)  # iterative: per-round candidate scores

    def to_dict(self) -> dict:
        return {"method": self.method, "order": self.order,
                "scores": {str(k): v for k, v in sorted(self.scores.items())},
                "rounds": [{"removed_before": r["removed_before"],
                            "scores": {str(k): v for k, v in sorted(r["scores"].items())}}
                           for r in self.rounds]}


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"depth_method={method!r}: must be one of {METHODS}")


@torch.no_grad()  # forward-only whoever calls (the public rankings are called directly too)
def _logits(model, batch: dict, subnetwork: Optional[SubNetwork]) -> torch.Tensor:
    """[b, s, V] float32 logits (gathered over tensor parallelism)."""
    device = next(model.parameters()).device
    tokens = batch["tokens"].to(device)
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
    out = model(tokens, positions.to(device), None, runtime_gather_output=True,
                subnetwork=subnetwork)
    return out.float()


class _Progress:
    """One tqdm bar over all forwards of a ranking (rank 0 only)."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        show = enabled and (not dist.is_initialized() or dist.get_rank() == 0)
        self.bar = tqdm(total=total, desc=desc, unit="fwd", disable=not show, dynamic_ncols=True)

    def step(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def full_logits_cache(model, batches: Sequence[dict], bar: Optional[_Progress] = None
                      ) -> Optional[list[torch.Tensor]]:
    """The full model's logits of every batch when they fit in FULL_LOGITS_CACHE_BYTES (reused by
    every round of the iterative ranking), else None (recomputed per round)."""
    first = _logits(model, batches[0], None)
    if first.numel() * first.element_size() * len(batches) > FULL_LOGITS_CACHE_BYTES:
        return None
    cache = [first] + [_logits(model, b, None) for b in batches[1:]]
    if bar is not None:
        bar.step(len(batches))
    return cache


def nmse_scores(model, batches: Sequence[dict], model_cfg: ModelConfig, removed: Sequence[int],
                candidates: Sequence[int], bar: Optional[_Progress] = None,
                full_logits: Optional[Sequence[torch.Tensor]] = None) -> dict[int, float]:
    """{j: sum (M_full - M_{removed + j})^2 / sum M_full^2} for every candidate j."""
    model = unwrap(model)
    if not hasattr(model, "resolve"):
        raise TypeError(f"normalized-MSE depth scores need an ElasticHybridModel (depth masking), "
                        f"got {type(model).__name__}; build it with build_elastic_model(cfg)")
    dp_group, _ = parallel_groups()
    num = torch.zeros(len(candidates), dtype=torch.float64)
    den = torch.zeros(1, dtype=torch.float64)
    subnets = [SubNetwork.uniform(model_cfg, drop_layers=[*removed, j]) for j in candidates]
    for b, batch in enumerate(batches):
        full = full_logits[b] if full_logits is not None else _logits(model, batch, None)
        den += full.double().square().sum()
        for k, subnet in enumerate(subnets):
            num[k] += (full - _logits(model, batch, subnet)).double().square().sum()
        if bar is not None:
            bar.step(len(subnets) + (full_logits is None))
    totals = all_reduce_sum(torch.cat([num, den]), dp_group)
    return {j: float(totals[k] / totals[-1]) for k, j in enumerate(candidates)}


def iterative_ranking(model, batches: Sequence[dict], model_cfg: ModelConfig, *,
                      max_rounds: Optional[int] = None, progress: bool = True) -> DepthRanking:
    L = model_cfg.num_layers
    rounds_to_run = L - 1 if max_rounds is None else min(max_rounds, L - 1)
    full = full_logits_cache(model, batches) if rounds_to_run else None
    # Exact count of forwards: every candidate of every round, plus the full model's logits
    # once (cached, done above and shown as done) or once per round (not cached).
    n = len(batches)
    full_forwards = n if full is not None else n * rounds_to_run
    bar = _Progress(n * sum(L - r for r in range(rounds_to_run)) + full_forwards,
                    "depth (iterative nMSE)", progress)
    if full is not None:
        bar.step(n)
    removed: list[int] = []
    remaining = list(range(L))
    rounds: list[dict] = []
    last_score: dict[int, float] = {}
    try:
        for _ in range(rounds_to_run):
            scores = nmse_scores(model, batches, model_cfg, removed, remaining, bar, full)
            rounds.append({"removed_before": list(removed), "scores": scores})
            last_score.update(scores)
            drop = min(remaining, key=lambda j: (scores[j], j))
            removed.append(drop)
            remaining.remove(drop)
            logger.debug("depth round %d: removed layer %d (nMSE %.3g)", len(rounds), drop,
                         scores[drop])
    finally:
        bar.close()
    # Survivors (one unless stopped early), least important first by their last score.
    order = removed + sorted(remaining, key=lambda j: (last_score.get(j, float("inf")), j))
    return DepthRanking(method="iterative", order=order, scores=last_score, rounds=rounds)


def one_shot_ranking(model, batches: Sequence[dict], model_cfg: ModelConfig, *,
                     progress: bool = True) -> DepthRanking:
    L = model_cfg.num_layers
    if L == 1:  # removing the only layer is not a sub-network
        return DepthRanking(method="one_shot", order=[0], scores={})
    bar = _Progress(len(batches) * (L + 1), "depth (one-shot nMSE)", progress)
    try:
        scores = nmse_scores(model, batches, model_cfg, [], list(range(L)), bar)
    finally:
        bar.close()
    return DepthRanking(method="one_shot", order=sorted(scores, key=lambda j: (scores[j], j)),
                        scores=scores)


def cosine_ranking(model, batches: Sequence[dict], model_cfg: ModelConfig, *,
                   progress: bool = True) -> DepthRanking:
    """Minitron block importance: mean over tokens of 1 - cos(h_in, h_out) per layer."""
    dp_group, _ = parallel_groups()
    sums: dict[int, torch.Tensor] = {}
    inputs: dict[int, torch.Tensor] = {}
    count = torch.zeros(1, dtype=torch.float64)
    handles = []

    def pre_hook(index):
        def hook(module, args, kwargs):
            inputs[index] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return hook

    def post_hook(index):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output  # [s, b, h]
            cos = torch.nn.functional.cosine_similarity(inputs.pop(index).double(),
                                                        out.double(), dim=-1)
            sums[index] = sums.get(index, 0) + (1 - cos).sum()
        return hook

    for layer in unwrap(model).decoder.layers:
        index = layer.layer_number - 1
        handles.append(layer.register_forward_pre_hook(pre_hook(index), with_kwargs=True))
        handles.append(layer.register_forward_hook(post_hook(index), with_kwargs=True))
    bar = _Progress(len(batches), "depth (cosine)", progress)
    try:
        for batch in batches:
            run_batch(model, batch)
            count += batch["tokens"].numel()
            bar.step()
    finally:
        bar.close()
        for h in handles:
            h.remove()
    layers = sorted(sums)
    totals = all_reduce_sum(torch.stack([torch.as_tensor(sums[i], dtype=torch.float64)
                                      for i in layers] + [count[0]]), dp_group)
    scores = {i: float(totals[k] / totals[-1]) for k, i in enumerate(layers)}
    return DepthRanking(method="cosine", order=sorted(scores, key=lambda j: (scores[j], j)),
                        scores=scores)


def depth_rankings(model, batches: Sequence[dict], model_cfg: ModelConfig, *,
                   methods: Sequence[str] = METHODS, max_rounds: Optional[int] = None,
                   progress: bool = True) -> dict[str, DepthRanking]:
    """The requested rankings; `one_shot` is taken from round 0 of `iterative` when both run.
    Forward-only, eval mode (restored afterwards)."""
    for method in methods:
        _check_method(method)
    batches = list(batches)
    was_training = model.training
    model.eval()
    out: dict[str, DepthRanking] = {}
    try:
        with torch.no_grad():
            if "iterative" in methods:
                out["iterative"] = iterative_ranking(model, batches, model_cfg,
                                                     max_rounds=max_rounds, progress=progress)
            if "one_shot" in methods:
                rounds = out["iterative"].rounds if "iterative" in out else []
                if rounds:
                    s = rounds[0]["scores"]
                    out["one_shot"] = DepthRanking(
                        method="one_shot", order=sorted(s, key=lambda j: (s[j], j)), scores=dict(s))
                else:
                    out["one_shot"] = one_shot_ranking(model, batches, model_cfg,
                                                       progress=progress)
            if "cosine" in methods:
                out["cosine"] = cosine_ranking(model, batches, model_cfg, progress=progress)
    finally:
        model.train(was_training)
    for name, ranking in out.items():
        logger.info("depth ranking (%s), least important first: %s", name, ranking.order)
    return out
