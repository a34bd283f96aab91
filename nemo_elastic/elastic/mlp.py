"""`ElasticMLP`: FFN neurons masked after the activation (the `linear_fc2` input `[s, b, F_local]`),
then the residual-stream output is hidden-masked.

Megatron's "mlp" selective recompute checkpoints this module from its TransformerLayer with one
tensor input, so a recompute would run without (or with another call's) masks.  The elastic
stack moves that checkpoint here (`recompute.adopt` sets `checkpointed`): same checkpoint, with
the masks as extra inputs that are re-bound in the recompute.
"""

from __future__ import annotations

from megatron.core.transformer.mlp import MLP

from nemo_elastic.elastic import recompute
from nemo_elastic.elastic.state import ElasticMixin


class ElasticMLP(ElasticMixin, MLP):
    supports_masked_recompute = True
    checkpointed = False  # True: this module does Megatron's "mlp" recompute itself

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
        if self.checkpointed:
            return recompute.checkpoint_module(self, self._masked_forward, hidden_states, *args,
                                               **kwargs)
        return self._masked_forward(hidden_states, *args, **kwargs)

    def _masked_forward(self, hidden_states, *args, **kwargs):
        out, bias = super().forward(hidden_states, *args, **kwargs)
        return self._mask_hidden(out), bias
