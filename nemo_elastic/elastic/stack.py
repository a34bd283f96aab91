"""`ElasticHybridStack`: depth elasticity by global layer number.

A dropped layer (gate 0.0) is skipped: the residual stream passes through unchanged.  A soft
gate g scales the layer's residual update: h <- h + g * (layer(h) - h).  Gates are looked up by
the layer's *global* number, so every pipeline stage applies the same sub-network.
"""

from __future__ import annotations

from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor

from nemo_elastic.elastic.masks import ElasticMasks
from nemo_elastic.model.stack import NemoHybridStack


class ElasticHybridStack(NemoHybridStack):
    elastic: ElasticMasks | None = None

    def _has_gates(self) -> bool:
        return self.elastic is not None and any(
            self.elastic.layer(layer.layer_number - 1).gate is not None for layer in self.layers)

    def forward(self, hidden_states, attention_mask, inference_context=None, rotary_pos_emb=None,
                *, inference_params=None, packed_seq_params=None, padding_mask=None):
        if not self._has_gates():
            return super().forward(hidden_states, attention_mask, inference_context, rotary_pos_emb,
                                   inference_params=inference_params,
                                   packed_seq_params=packed_seq_params, padding_mask=padding_mask)
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError("depth-elastic forward does not support inference contexts")
        if self.config.recompute_granularity == "full" and self.training:
            raise NotImplementedError("depth-elastic forward does not support full recompute")
        if not self.pre_process:
            hidden_states = self.input_tensor
        for layer in self.layers:
            gate = self.elastic.layer(layer.layer_number - 1).gate
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
        if self.post_process and self.post_layer_norm:
            hidden_states = self.final_norm(hidden_states)
        return make_viewless_tensor(inp=hidden_states, requires_grad=hidden_states.requires_grad,
                                    keep_graph=True)
