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
before dispatch, and each rank's local experts read the same global neuron mask.  It does need
every rank of an expert-parallel group to run the same sub-network in a micro-batch: the
dispatcher sends every rank's tokens through each rank's experts under *that* rank's masks.
The elastic step guarantees it (budget and Gumbel noise depend on the seed, iteration and
micro-batch index, never on the data-parallel rank; `tests/test_moe_ep_step.py`).
Sliced execution (`execution="sliced"`): the router reads the kept hidden channels of its gate
(every expert's row: dropped experts still get the -inf bias, so they receive no tokens and
cost nothing but their empty loop turn), every expert and the shared expert run on the kept
[neurons, hidden] blocks of their weights (views: gradients land in the parent's tensors).
Soft (router) masks: an expert whose mask value is 0 is never routed to; every routed expert's
output [n_e, h] is multiplied by its mask value (1 for a hard sub-network; the router's
probability, or the mixture of prefixes, in training), which is how the router's expert-count
probabilities receive gradients.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer

from nemo_elastic.elastic.masks import MoEMasks, shard
from nemo_elastic.elastic.sliced import Index, local, pinned, swapped_parameters, take
from nemo_elastic.elastic.state import ElasticMixin

# mask axis -> (LayerChoice size field, TransformerConfig field of the parent's size)
NEURON_AXES = {"expert_ffn": "moe_ffn_hidden_size",
               "shared_ffn": "moe_shared_expert_intermediate_size"}


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
        for i, expert in enumerate(local):
            expert.linear_fc2.register_forward_pre_hook(self._mask_expert_neurons)
            expert.register_forward_hook(self._expert_output_hook(self.local_expert_indices[i]))
        if self.shared_experts is not None:
            self.shared_experts.linear_fc2.register_forward_pre_hook(self._mask_shared_neurons)

    def _moe_masks(self) -> Optional[MoEMasks]:
        return None if self.elastic is None else self.elastic.layer.moe

    def _neuron_hook(self, axis: str, args):
        masks = self._moe_masks()
        if masks is None or getattr(masks, axis).is_full:
            return None
        mask = shard(getattr(masks, axis).values, *self._tp())  # [F_local]
        if self._sliced() is not None:  # the activation holds the kept neurons only
            mask = take(mask, 0, self._kept_neurons(axis))
        return (args[0] * mask.to(args[0].dtype), *args[1:])

    def _kept_neurons(self, axis: str) -> Index:
        """This rank's kept neurons of `axis`: the global prefix restricted to its block."""
        field = NEURON_AXES[axis]
        kept = getattr(self.elastic.sliced.choice, field)
        rank, size = self._tp()
        block = getattr(self.config, field) // size
        return self._index((axis, kept, block),
                           lambda: (local(torch.arange(kept), block, rank), block))

    def _expert_output_hook(self, global_index: int):
        def hook(module, args, output):
            masks = self._moe_masks()
            if masks is None or masks.experts.is_full:
                return None
            out, bias = output
            return out * masks.experts.values[global_index].to(out.dtype), bias
        return hook

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
        with pinned(router, expert_bias=masked):
            yield

    def forward(self, hidden_states, *args, **kwargs):
        with contextlib.ExitStack() as stack:
            if self._sliced() is not None:
                self._swap_in_kept_weights(stack)
            stack.enter_context(self._kept_experts_only())
            out, bias = super().forward(hidden_states, *args, **kwargs)
        return self._mask_hidden(out), bias

    def _swap_in_kept_weights(self, stack: contextlib.ExitStack) -> None:
        hidden = self._hidden_index(self.router.weight.shape[1])
        stack.enter_context(swapped_parameters(
            self.router, weight=take(self.router.weight, 1, hidden)))
        mlps = [("expert_ffn", e) for e in self.experts.local_experts]
        if self.shared_experts is not None:
            mlps.append(("shared_ffn", self.shared_experts))
        for axis, mlp in mlps:
            neurons = self._kept_neurons(axis)
            fc1 = take(take(mlp.linear_fc1.weight, 0, neurons), 1, hidden)
            fc2 = take(take(mlp.linear_fc2.weight, 0, hidden), 1, neurons)
            stack.enter_context(swapped_parameters(mlp.linear_fc1, weight=fc1))
            stack.enter_context(swapped_parameters(mlp.linear_fc2, weight=fc2))
