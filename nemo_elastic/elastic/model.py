"""`ElasticHybridModel`: a HybridModel whose forward can run any nested sub-network.

    logits = model(tokens, position_ids, None, subnetwork=SubNetwork(...))      # hard
    logits = model(tokens, position_ids, None, subnetwork=SoftSubNetwork(...))  # router-driven
    logits = model(tokens, position_ids, None)                                  # the parent

The sub-network is an explicit argument of each forward call.  It is resolved to masks in the
global index space (`masks.py`), bound to the elastic modules of this pipeline stage for the
duration of the call, and cleared afterwards (also on error).  Activation recompute runs after
the call (in the backward pass) and re-binds the masks of the call it recomputes (`recompute.py`).
The embedding output is hidden-masked, so pruned residual channels are zero from the first layer on.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Union

from megatron.core.models.hybrid.hybrid_model import HybridModel

from nemo_elastic.elastic.masks import ElasticMasks, SoftSubNetwork, hard_masks, soft_masks
from nemo_elastic.elastic.norm import ElasticRMSNorm
from nemo_elastic.elastic.stack import ElasticHybridStack
from nemo_elastic.elastic.state import bound_layers, pinned
from nemo_elastic.elastic.subnet import SubNetwork

SubNetworkLike = Union[SubNetwork, SoftSubNetwork, ElasticMasks]


class ElasticHybridModel(HybridModel):
    def __init__(self, *args, model_config=None, **kwargs):
        """`model_config`: our `ModelConfig` (sizes, groups) used to resolve sub-networks."""
        if model_config is None:
            raise ValueError("ElasticHybridModel needs model_config (nemo_elastic ModelConfig); "
                             "build it with nemo_elastic.elastic.build_elastic_model")
        super().__init__(*args, **kwargs)
        if not isinstance(self.decoder, ElasticHybridStack):
            raise ValueError("ElasticHybridModel needs an ElasticHybridStack decoder (depth "
                             f"gates, masked recompute), got {type(self.decoder).__name__}; "
                             "build it with nemo_elastic.elastic.specs.build_elastic_model")
        self.model_config = model_config

    # ------------------------------------------------------------------ masks
    def resolve(self, subnetwork: SubNetworkLike) -> ElasticMasks:
        if isinstance(subnetwork, ElasticMasks):
            return subnetwork
        param = next(self.parameters())
        kw = {"dtype": param.dtype, "device": param.device}
        if isinstance(subnetwork, SoftSubNetwork):
            return soft_masks(subnetwork, self.model_config, **kw)
        if isinstance(subnetwork, SubNetwork):
            return hard_masks(subnetwork, self.model_config, tp_size=self.pg_collection.tp.size(), **kw)
        raise TypeError(f"subnetwork={type(subnetwork).__name__}: expected SubNetwork, "
                        "SoftSubNetwork or ElasticMasks")

    @contextlib.contextmanager
    def bound(self, masks: ElasticMasks):
        """Bind `masks` to every elastic module of this stage; always unbind on exit."""
        decoder = self.decoder
        with contextlib.ExitStack() as stack:
            stack.enter_context(pinned(decoder, "elastic", masks))
            stack.enter_context(bound_layers(decoder.layers, masks))
            final_norm = getattr(decoder, "final_norm", None)
            if isinstance(final_norm, ElasticRMSNorm):
                stack.enter_context(pinned(final_norm, "elastic_fraction", masks.hidden.fraction))
            yield masks

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None,
                inference_context=None, runtime_gather_output: Optional[bool] = None, *,
                subnetwork: Optional[SubNetworkLike] = None, **kwargs):
        call = dict(labels=labels, inference_context=inference_context,
                    runtime_gather_output=runtime_gather_output, **kwargs)
        if subnetwork is None:
            return super().forward(input_ids, position_ids, attention_mask, decoder_input, **call)
        masks = self.resolve(subnetwork)
        with self.bound(masks):
            if self.pre_process and decoder_input is None and not masks.hidden.is_full:
                decoder_input = self.embedding(input_ids=input_ids, position_ids=position_ids)
                decoder_input = decoder_input * masks.hidden.values  # [s, b, h] * [h]
            return super().forward(input_ids, position_ids, attention_mask, decoder_input, **call)
