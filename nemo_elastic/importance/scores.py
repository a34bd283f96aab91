"""Width importance scores from calibration forwards (paper-digest §4.1, Eqs. 1-4).

    scores = compute_scores(model, batches, cfg.model, Aggregation(sequence="mean", batch="l2"))

* ``hidden [h]``: sum over every pre-norm and the final norm of the aggregated |LN(X)|;
* ``ffn [F]`` per MLP layer: aggregated |fc1 output after the activation|;
* Mamba, nested (Eqs. 3-4): ``A [H, P]`` = aggregated |x| per (head, channel);
  head-channel score ``s_d = ||A[:, d]||_2`` (L2 over heads: the paper's one ranking shared by
  all heads; the default order sorts each head's channels by its own row ``A[h, :]`` instead,
  `order.py`);
  head score ``f_h = ||A[h, D_top]||_2`` over the top ``mamba_top_channels`` fraction of
  channels by s_d; heads are then ranked within their group (`permute.py`);
* ``attention [Hq]`` per attention layer: aggregated per-head L2 of the attention output.

Forward-only (`torch.no_grad`, eval mode, restored afterwards).  Works on the plain
`build_hybrid_model` model and on `ElasticHybridModel` (run as the full parent), at any tensor-
and data-parallel size with pipeline size 1: raw sums are all-reduced over the data-parallel
group, then the TP-local blocks of heads / neurons are all-gathered into the global index order,
so every rank ends with the same global scores.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from nemo_elastic.config import ATTENTION, MAMBA, MLP, MOE, ModelConfig
from nemo_elastic.importance.aggregate import Aggregation
from nemo_elastic.importance.hooks import DEFAULT_MAMBA_SIGNAL, ActivationRecorder

logger = logging.getLogger(__name__)


@dataclass
class LayerScores:
    """Scores of one layer in the parent's global index order (float64, larger = more
    important); only the fields of the layer's type are set."""

    kind: str  # 'M' | '*' | '-'
    ffn: Optional[torch.Tensor] = None  # [F]
    mamba_head_channel: Optional[torch.Tensor] = None  # [H, P] aggregated |x|
    mamba_channels: Optional[torch.Tensor] = None  # [P]
    mamba_heads: Optional[torch.Tensor] = None  # [H]
    attention_heads: Optional[torch.Tensor] = None  # [Hq]
    experts: Optional[torch.Tensor] = None  # [E] the ranking criterion's scores (REAP default)
    expert_reap: Optional[torch.Tensor] = None  # [E] mean over routed tokens of g * ||f(x)||
    expert_frequency: Optional[torch.Tensor] = None  # [E] share of the routed token slots
    expert_ffn: Optional[torch.Tensor] = None  # [F_e]
    shared_ffn: Optional[torch.Tensor] = None  # [F_s] (empty without a shared expert)

    def axes(self) -> dict[str, torch.Tensor]:
        """The rankable axes of this layer: name -> 1-D scores."""
        names = {MAMBA: ("mamba_heads", "mamba_channels"), ATTENTION: ("attention_heads",),
                 MLP: ("ffn",), MOE: ("experts", "expert_ffn", "shared_ffn")}[self.kind]
        return {n: getattr(self, n) for n in names}


@dataclass
class ImportanceScores:
    hidden: torch.Tensor  # [h]
    layers: dict[int, LayerScores]  # global 0-based layer index -> scores
    aggregation: Aggregation
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"aggregation": self.aggregation.to_dict(), "samples": self.samples,
                "tokens": self.tokens, "seconds": round(self.seconds, 3), **self.extra}


# ------------------------------------------------------------------------------ distributed

def parallel_groups():
    """(data-parallel group, tensor-parallel group), or (None, None) without Megatron state."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized() or not ps.model_parallel_is_initialized():
        return None, None
    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise NotImplementedError(
            "importance scores run with pipeline_model_parallel_size=1 (any tensor- and "
            "data-parallel size); prepare a checkpoint at PP=1 - it loads at any PP afterwards")
    return ps.get_data_parallel_group(), ps.get_tensor_model_parallel_group()


def all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def _gather_tp(t: torch.Tensor, group) -> torch.Tensor:
    """Concatenate the TP ranks' contiguous blocks along dim 0 (heads / neurons), rank order."""
    if group is None or dist.get_world_size(group) == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=0)


# ------------------------------------------------------------------------------ scoring

def run_batch(model, batch: dict):
    """model(tokens, position_ids, None) for a batch dict of [b, s] tensors (positions default
    to 0..s-1); returns the model's output."""
    param = next(model.parameters())
    tokens = batch["tokens"].to(param.device)
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return model(tokens, positions.to(param.device), None)


def compute_scores(model: torch.nn.Module, batches: Iterable[dict], model_cfg: ModelConfig,
                   aggregation: Optional[Aggregation] = None, *, mamba_top_channels: float = 1.0,
                   mamba_signal: str = DEFAULT_MAMBA_SIGNAL, expert_criterion: str = "reap",
                   num_batches: Optional[int] = None, progress: bool = True) -> ImportanceScores:
    """Run `batches` (dicts with `tokens [b, s]`, optional `position_ids`) through `model` and
    return the global width scores.  Collective over the model's data- and tensor-parallel
    groups: call on every rank, each with its own data-parallel share of the batches.

    `mamba_signal`: 'x' (paper: the x block of in_proj) or 'output' (the out_proj input) - see
    `hooks.py`.
    `mamba_top_channels`: fraction of head channels (by channel score) the head scores use
    (Eq. 4's D_top); 1.0 = all channels.
    """
    if not 0.0 < mamba_top_channels <= 1.0:
        raise ValueError(f"mamba_top_channels={mamba_top_channels!r}: must be in (0, 1] "
                         "(the fraction of head channels used to score Mamba heads)")
    agg = aggregation or Aggregation()
    dp_group, tp_group = parallel_groups()
    show = progress and (not dist.is_initialized() or dist.get_rank() == 0)
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    try:
        with torch.no_grad(), ActivationRecorder(model, model_cfg, agg,
                                                           mamba_signal=mamba_signal) as rec:
            for batch in tqdm(batches, total=num_batches, desc="importance scores", unit="batch",
                              disable=not show, dynamic_ncols=True):
                run_batch(model, batch)
                rec.count_batch(batch["tokens"])
    finally:
        model.train(was_training)
    if rec.samples == 0:
        raise ValueError("compute_scores: no calibration batches were given (every data-parallel "
                         "rank needs at least one)")
    if expert_criterion not in EXPERT_CRITERIA:
        raise ValueError(f"expert_criterion={expert_criterion!r}: must be one of {EXPERT_CRITERIA}")
    scores = _finalize(rec, model_cfg, agg, dp_group, tp_group, mamba_top_channels,
                       expert_criterion)
    scores.seconds = time.perf_counter() - started
    logger.info("importance scores from %d samples (%d tokens) in %.1f s, aggregation %s",
                scores.samples, scores.tokens, scores.seconds, agg.to_dict())
    return scores


EXPERT_CRITERIA = ("reap", "frequency")


def _moe_scores(rec: ActivationRecorder, index: int, m: ModelConfig, final, dp_group,
                tp_group, criterion: str) -> LayerScores:
    """REAP (mean over its routed tokens of gate weight x ||expert output||) and frequency
    (share of the routed token slots) of every expert; expert and shared neuron scores."""
    raw = rec.moe_experts[index]
    dp = lambda t: all_reduce_sum(t, dp_group)  # noqa: E731  (sums over data-parallel ranks)
    reap_sum, count = dp(raw["reap"].clone()), dp(raw["count"].clone())
    reap = reap_sum / count.clamp(min=1)
    frequency = count / count.sum().clamp(min=1)
    F = m.layer_size("moe_ffn_hidden_size", index)
    expert_ffn = raw["expert_ffn"] if raw["expert_ffn"] is not None else \
        torch.zeros(F, dtype=torch.float64)
    expert_ffn = _gather_tp(dp(expert_ffn.clone()), tp_group)
    shared = rec.moe_shared_ffn.get(index)
    shared = _gather_tp(final(shared), tp_group) if shared is not None else \
        torch.zeros(m.layer_size("moe_shared_expert_intermediate_size", index) or 0,
                    dtype=torch.float64)
    return LayerScores(kind=MOE, experts=reap if criterion == "reap" else frequency,
                       expert_reap=reap, expert_frequency=frequency, expert_ffn=expert_ffn,
                       shared_ffn=shared)


def _finalize(rec: ActivationRecorder, model_cfg: ModelConfig, agg: Aggregation, dp_group,
              tp_group, top_fraction: float, expert_criterion: str = "reap") -> ImportanceScores:
    counts = all_reduce_sum(torch.tensor([rec.samples, rec.tokens], dtype=torch.float64), dp_group)
    samples, tokens = int(counts[0]), int(counts[1])
    final = lambda raw: agg.finalize(all_reduce_sum(raw, dp_group), samples)  # noqa: E731
    # Hidden: replicated over TP (identical on every TP rank); summed over norms once finalized.
    hidden = sum(final(rec.hidden[name]) for name in sorted(rec.hidden))
    layers: dict[int, LayerScores] = {}
    for index in sorted(rec.ffn):
        layers[index] = LayerScores(kind=MLP, ffn=_gather_tp(final(rec.ffn[index]), tp_group))
    for index in sorted(rec.attention):
        layers[index] = LayerScores(
            kind=ATTENTION, attention_heads=_gather_tp(final(rec.attention[index]), tp_group))
    for index in sorted(rec.mamba):
        per_head_channel = _gather_tp(final(rec.mamba[index]), tp_group)  # [H, P]
        channels = per_head_channel.norm(dim=0)  # [P]: L2 over heads (Eq. 3)
        P = channels.numel()
        top = torch.sort(channels, descending=True, stable=True).indices[
            :max(1, math.ceil(top_fraction * P))]
        heads = per_head_channel[:, top].norm(dim=1)  # [H]: L2 over the top channels (Eq. 4)
        layers[index] = LayerScores(kind=MAMBA, mamba_head_channel=per_head_channel,
                                    mamba_channels=channels, mamba_heads=heads)
    for index in sorted(rec.moe_experts):
        layers[index] = _moe_scores(rec, index, model_cfg, final, dp_group, tp_group,
                                    expert_criterion)
    _check_shapes(hidden, layers, model_cfg)
    return ImportanceScores(hidden=hidden, layers=dict(sorted(layers.items())), aggregation=agg,
                            samples=samples, tokens=tokens,
                            extra={"mamba_top_channels": top_fraction})


def _check_shapes(hidden: torch.Tensor, layers: dict[int, LayerScores], m: ModelConfig) -> None:
    """The recorded sizes must be the config's (catches a model built from another config)."""
    expect = {"hidden": (tuple(hidden.shape), (m.hidden_size,))}
    for i, s in layers.items():
        if s.kind == MAMBA:
            expect[f"layer {i} mamba"] = (tuple(s.mamba_head_channel.shape),
                                          (m.layer_size("mamba_num_heads", i),
                                           m.layer_size("mamba_head_dim", i)))
        elif s.kind == ATTENTION:
            expect[f"layer {i} attention"] = (tuple(s.attention_heads.shape),
                                              (m.layer_size("num_attention_heads", i),))
        elif s.kind == MOE:
            expect[f"layer {i} experts"] = (tuple(s.experts.shape),
                                            (m.layer_size("num_moe_experts", i),))
        else:
            expect[f"layer {i} ffn"] = (tuple(s.ffn.shape), (m.layer_size("ffn_hidden_size", i),))
    for what, (got, want) in expect.items():
        if got != want:
            raise ValueError(f"{what}: recorded activation shape {got} does not match the "
                             f"config's {want}; pass the ModelConfig the model was built from")
