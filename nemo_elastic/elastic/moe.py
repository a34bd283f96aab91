"""`ElasticMoELayer`: Megatron-Core's `MoELayer` under a sub-network's MoE masks (`MoEMasks`).

* routed experts [E]: a dropped expert is never chosen.  Its entry of the router's
  score-correction bias is -inf for the call (a bias of zeros when the router has none), so the
  top-k runs over the kept experts only; the kept experts' weights are normalised among
  themselves (Megatron-Core normalises the chosen sigmoid scores), exactly as in the physically
  smaller layer whose router has only the kept gate rows and bias entries;
* expert neurons [F_e]: every local expert's `linear_fc2` input [tokens, F_e_local] is
  multiplied by this rank's block of the mask (the same for all experts);
* shared-expert neurons [F_s]: the shared expert's `linear_fc2` input likewise;
* the residual-stream output [s, b, h] is hidden-masked like every other mixer.

Expert parallelism needs nothing more: the routing map is computed on the full [tokens, E]
before dispatch, and each rank's local experts read the same global neuron mask.
Only hard (0/1) masks and masked execution so far; sliced execution and soft (router-trained)
MoE axes are not built yet.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer

from nemo_elastic.elastic.masks import MoEMasks, shard
from nemo_elastic.elastic.state import ElasticMixin, pinned


class ElasticMoELayer(ElasticMixin, MoELayer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        local = getattr(self.experts, "local_experts", None)
        if local is None:
            raise ValueError(f"{type(self.experts).__name__}: elastic MoE masking needs the local "
                             "SequentialMLP experts (the local spec), not grouped-GEMM experts")
        if self.config.gated_linear_unit:
            raise ValueError("gated_linear_unit=True: elastic expert masking assumes Nemotron 3's "
                             "non-gated squared-ReLU experts (fc1 rows are neurons)")
        for expert in local:
            expert.linear_fc2.register_forward_pre_hook(self._mask_expert_neurons)
        if self.shared_experts is not None:
            self.shared_experts.linear_fc2.register_forward_pre_hook(self._mask_shared_neurons)

    def _moe_masks(self) -> Optional[MoEMasks]:
        return None if self.elastic is None else self.elastic.layer.moe

    def _neuron_hook(self, axis: str, args):
        masks = self._moe_masks()
        if masks is None or getattr(masks, axis).is_full:
            return None
        mask = shard(getattr(masks, axis).values, *self._tp())  # [F_local]
        return (args[0] * mask.to(args[0].dtype), *args[1:])

    def _mask_expert_neurons(self, module, args):
        return self._neuron_hook("expert_ffn", args)

    def _mask_shared_neurons(self, module, args):
        return self._neuron_hook("shared_ffn", args)

    @contextlib.contextmanager
    def _kept_experts_only(self) -> Iterator[None]:
        masks = self._moe_masks()
        if masks is None or masks.experts.is_full:
            yield
            return
        router, keep = self.router, masks.experts.values  # [E] 0/1
        bias = router.expert_bias if router.expert_bias is not None else \
            torch.zeros(keep.shape, device=keep.device)
        masked = bias.float().masked_fill(keep == 0, float("-inf"))
        with pinned(router, "expert_bias", masked):
            yield

    def forward(self, hidden_states, *args, **kwargs):
        if self._sliced() is not None:
            raise NotImplementedError("sliced execution of MoE layers is not implemented; "
                                      "use execution='masked'")
        with self._kept_experts_only():
            out, bias = super().forward(hidden_states, *args, **kwargs)
        return self._mask_hidden(out), bias
