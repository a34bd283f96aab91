"""`ElasticMLP`: FFN neurons masked after the activation (the `linear_fc2` input `[s, b, F_local]`),
then the residual-stream output is hidden-masked."""

from __future__ import annotations

from megatron.core.transformer.mlp import MLP

from nemo_elastic.elastic.state import ElasticMixin


class ElasticMLP(ElasticMixin, MLP):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.gated_linear_unit:
            raise ValueError("gated_linear_unit=True: elastic FFN masking assumes the non-gated "
                             "squared-ReLU MLP of Nemotron-H (fc1 rows are neurons)")
        self.linear_fc2.register_forward_pre_hook(self._mask_neurons)

    def _mask_neurons(self, module, args):
        mask = self._local_inner()  # [F_local]
        if mask is None:
            return None
        return (args[0] * mask, *args[1:])

    def forward(self, hidden_states, *args, **kwargs):
        out, bias = super().forward(hidden_states, *args, **kwargs)
        return self._mask_hidden(out), bias
