"""`ElasticHybridStack`: depth elasticity by global layer number, and masked activation recompute.

A dropped layer (gate 0.0) is skipped: the residual stream passes through unchanged.  A soft
gate g scales the layer's residual update: h <- h + g * (layer(h) - h).  Gates are looked up by
the layer's *global* number, so every pipeline stage applies the same sub-network.

Sliced execution (`sliced.py`, `sliced` set with the masks): the residual stream is
`[s, b, hidden_size]` of the sub-network; it arrives from the previous pipeline stage at the
parent's width (zeros in the pruned channels) and is cut, and leaves for the next one padded back.

Recompute (`recompute.py`): full recompute of a masked forward is done here, in Megatron's chunks,
with the masks as checkpoint inputs that are re-bound to the chunk's layers in the recompute; the
selective recomputes of every layer are adopted at construction.
"""

from __future__ import annotations

import functools

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import WrappedTensor, make_viewless_tensor

from nemo_elastic.elastic import recompute
from nemo_elastic.elastic.masks import ElasticMasks
from nemo_elastic.elastic.sliced import check_sliceable
from nemo_elastic.elastic.state import bound_layers
from nemo_elastic.elastic.subnet import SubNetwork
from nemo_elastic.model.stack import NemoHybridStack


class ElasticHybridStack(NemoHybridStack):
    elastic: ElasticMasks | None = None
    sliced: SubNetwork | None = None  # the hard sizes of a sliced execution (with `elastic`)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        recompute.check_config(self.config)
        for layer in self.layers:
            recompute.adopt(layer)

    def _has_gates(self) -> bool:
        return self.elastic is not None and any(
            self.elastic.layer(layer.layer_number - 1).gate is not None for layer in self.layers)

    def forward(self, hidden_states, attention_mask, inference_context=None, rotary_pos_emb=None,
                *, inference_params=None, packed_seq_params=None, padding_mask=None):
        if self.elastic is not None and self.sliced is not None:
            return self._sliced_forward(hidden_states, attention_mask, inference_context,
                                        rotary_pos_emb, inference_params=inference_params,
                                        packed_seq_params=packed_seq_params,
                                        padding_mask=padding_mask)
        full_recompute = self.config.recompute_granularity == "full" and self.training
        if self.elastic is None or not (full_recompute or self._has_gates()):
            # Upstream loop: no depth gates, and no full recompute of masked layers.
            return super().forward(hidden_states, attention_mask, inference_context, rotary_pos_emb,
                                   inference_params=inference_params,
                                   packed_seq_params=packed_seq_params, padding_mask=padding_mask)
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError("depth-elastic forward does not support inference contexts")
        if not self.pre_process:
            hidden_states = self.input_tensor
        if isinstance(hidden_states, WrappedTensor):
            hidden_states = hidden_states.unwrap()
        run = functools.partial(self._run_layers, packed_seq_params=packed_seq_params)
        # Tensors (or None) that a recompute chunk takes as checkpoint inputs, as upstream's does.
        inputs = (attention_mask, rotary_pos_emb, padding_mask)
        if full_recompute:
            hidden_states = self._checkpointed_forward(hidden_states, inputs, run)
        else:
            hidden_states = run(0, len(self.layers), hidden_states, *inputs, self.elastic)
        if self.post_process and self.post_layer_norm:
            hidden_states = self.final_norm(hidden_states)
        return make_viewless_tensor(inp=hidden_states, requires_grad=hidden_states.requires_grad,
                                    keep_graph=True)

    def _sliced_forward(self, hidden_states, attention_mask, inference_context, rotary_pos_emb,
                        *, inference_params, packed_seq_params, padding_mask):
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError("sliced execution does not support inference contexts")
        check_sliceable(self.config)
        width = self.sliced.hidden_size
        if not self.pre_process:
            hidden_states = self.input_tensor
        if isinstance(hidden_states, WrappedTensor):
            hidden_states = hidden_states.unwrap()
        if hidden_states.shape[-1] != width:  # from the previous stage, at the parent's width
            hidden_states = hidden_states[..., :width]
        run = functools.partial(self._run_layers, packed_seq_params=packed_seq_params)
        inputs = (attention_mask, rotary_pos_emb, padding_mask)
        if self.config.recompute_granularity == "full" and self.training:
            hidden_states = self._checkpointed_forward(hidden_states, inputs, run,
                                                       sliced=self.sliced)
        else:
            hidden_states = run(0, len(self.layers), hidden_states, *inputs, self.elastic)
        if self.post_process and self.post_layer_norm:
            hidden_states = self.final_norm(hidden_states)
        if not self.post_process and width < self.config.hidden_size:
            # to the next stage at the parent's width: pruned channels are zero, as masked
            hidden_states = torch.nn.functional.pad(hidden_states,
                                                    (0, self.config.hidden_size - width))
        return make_viewless_tensor(inp=hidden_states, requires_grad=hidden_states.requires_grad,
                                    keep_graph=True)

    def _checkpointed_forward(self, hidden_states, inputs, run, sliced=None):
        """Megatron's full recompute (same chunks), each chunk a checkpoint of its masks too
        (and, sliced, re-bound with the same sizes: the recompute slices the weights again)."""
        masks = self.elastic
        plan = recompute.full_recompute_plan(self.config, len(self.layers))
        for start, end, checkpointed in plan:
            if all(masks.layer(layer.layer_number - 1).dropped for layer in self.layers[start:end]):
                continue  # nothing runs: identity on the residual stream
            if not checkpointed:
                hidden_states = run(start, end, hidden_states, *inputs, masks)
                continue
            hidden_states = recompute.checkpoint_with_masks(
                functools.partial(run, start, end), masks,
                functools.partial(_bind, self.layers[start:end], sliced), hidden_states, *inputs,
                distribute_saved_activations=self.config.distribute_saved_activations)
        return hidden_states

    def _run_layers(self, start, end, hidden_states, attention_mask, rotary_pos_emb, padding_mask,
                    masks: ElasticMasks, *, packed_seq_params=None):
        """Layers [start, end) of this stage with `masks`' depth gates; hidden_states [s, b, h]."""
        for layer in self.layers[start:end]:
            gate = masks.layer(layer.layer_number - 1).gate
            if isinstance(gate, float) and gate == 0.0:
                continue  # dropped: identity on the residual stream
            if isinstance(layer, TransformerLayer):
                out, _ = layer(hidden_states=hidden_states, attention_mask=attention_mask,
                               rotary_pos_emb=rotary_pos_emb, packed_seq_params=packed_seq_params,
                               padding_mask=padding_mask)
            else:
                out = layer(hidden_states=hidden_states, attention_mask=attention_mask,
                            packed_seq_params=packed_seq_params)
            if isinstance(out, tuple):
                out = out[0]
            hidden_states = out if gate is None else hidden_states + gate * (out - hidden_states)
        return hidden_states


def _bind(layers, sliced, masks):
    return bound_layers(layers, masks, sliced)
