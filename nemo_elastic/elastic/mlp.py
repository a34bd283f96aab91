"""`ElasticMLP`: FFN neurons masked after the activation (the `linear_fc2` input `[s, b, F_local]`),
then the residual-stream output is hidden-masked.

Megatron's "mlp" selective recompute checkpoints this module from its TransformerLayer with one
tensor input, so a recompute would run without (or with another call's) masks.  The elastic
stack moves that checkpoint here (`recompute.adopt` sets `checkpointed`): same checkpoint, with
the masks as extra inputs that are re-bound in the recompute.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.mlp import MLP

from nemo_elastic.elastic import recompute
from nemo_elastic.elastic.sliced import Index, local, swapped_parameters, take
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
        sliced = self._sliced()
        mask = self._inner_multiplier(self._kept_neurons() if sliced else None)  # [F_local(kept)]
        if mask is None:
            return None
        return (args[0] * mask, *args[1:])

    def _kept_neurons(self) -> Index:
        """This rank's kept FFN neurons: the global prefix [0, ffn_hidden_size) restricted to
        the rank's block of fc1 rows (a rank may keep fewer than another, or none)."""
        f = self.elastic.sliced.choice.ffn_hidden_size
        rank, size = self._tp()
        block = self.config.ffn_hidden_size // size  # (fc1.weight is swapped during the call)
        return self._index(("ffn", f, block), lambda: (local(torch.arange(f), block, rank), block))

    def forward(self, hidden_states, *args, **kwargs):
        if self.checkpointed:
            return recompute.checkpoint_module(self, self._masked_forward, hidden_states, *args,
                                               **kwargs)
        return self._masked_forward(hidden_states, *args, **kwargs)

    def _masked_forward(self, hidden_states, *args, **kwargs):
        if self._sliced() is not None:
            return self._sliced_forward(hidden_states, *args, **kwargs)
        out, bias = super().forward(hidden_states, *args, **kwargs)
        return self._mask_hidden(out), bias

    def _sliced_forward(self, hidden_states, *args, **kwargs):
        """Upstream forward on fc1 [kept neurons, kept hidden] and fc2 [kept hidden, kept
        neurons]; the neuron mask's kept entries scale the fc2 input (hook)."""
        neurons = self._kept_neurons()
        hidden = self._hidden_index(self.linear_fc2.weight.shape[0])
        fc1 = take(take(self.linear_fc1.weight, 0, neurons), 1, hidden)
        fc2 = take(take(self.linear_fc2.weight, 0, hidden), 1, neurons)
        with swapped_parameters(self.linear_fc1, weight=fc1), \
                swapped_parameters(self.linear_fc2, weight=fc2):
            out, bias = super().forward(hidden_states, *args, **kwargs)
        return self._mask_hidden(out), bias
