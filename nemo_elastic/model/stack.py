"""`NemoHybridStack`: upstream `HybridStack` whose final norm does not require Transformer-Engine.

Upstream hard-wires `final_norm = TENorm(...)`; here the norm class comes from the spec
(`final_norm` param: TENorm on GPU specs, torch RMSNorm on local specs) under the same
checkpoint key `decoder.final_norm.weight`.
"""

from __future__ import annotations

from megatron.core.models.hybrid.hybrid_block import HybridStack


class NemoHybridStack(HybridStack):
    def __init__(self, *args, final_norm=None, post_layer_norm: bool = True, **kwargs):
        if final_norm is None:
            raise ValueError("NemoHybridStack needs a `final_norm` builder in its ModuleSpec params")
        # Build everything upstream except the TE-only final norm, then add ours.
        super().__init__(*args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and self.post_layer_norm:
            self.final_norm = final_norm(
                config=self.config, hidden_size=self.config.hidden_size,
                eps=self.config.layernorm_epsilon)
