"""`ElasticHybridModel`: a HybridModel whose forward can run any nested sub-network.

    logits = model(tokens, position_ids, None, subnetwork=SubNetwork(...))      # hard
    logits = model(tokens, position_ids, None, subnetwork=SoftSubNetwork(...))  # router-driven
    logits = model(tokens, position_ids, None)                                  # the parent

The sub-network is an explicit argument of each forward call.  It is resolved to masks in the
global index space (`masks.py`), bound to the elastic modules of this pipeline stage for the
duration of the call, and cleared afterwards (also on error).  Activation recompute runs after
the call (in the backward pass) and re-binds the masks of the call it recomputes (`recompute.py`).
The embedding output is hidden-masked, so pruned residual channels are zero from the first layer on.

    logits = model(tokens, position_ids, None, subnetwork=s, execution="sliced")

runs the same function on the kept parts of the weights (`sliced.py`): a hard `SubNetwork`, or
the router's hard mode (argmax prefix x its probability); gradients land in the parent's tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional, Union

from megatron.core.models.hybrid.hybrid_model import HybridModel

from nemo_elastic.elastic.masks import (ElasticMasks, SoftAxis, SoftSubNetwork, hard_masks,
                                        soft_masks)
from nemo_elastic.elastic.norm import ElasticRMSNorm
from nemo_elastic.elastic.stack import ElasticHybridStack
from nemo_elastic.elastic.sliced import pinned, swapped_parameters
from nemo_elastic.elastic.state import bound_layers, pinned_norm
from nemo_elastic.elastic.subnet import SubNetwork
from nemo_elastic.sizes import SIZE_FIELDS

SubNetworkLike = Union[SubNetwork, SoftSubNetwork, ElasticMasks]
EXECUTIONS = ("masked", "sliced")


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

    def resolve_sliced(self, subnetwork: SubNetworkLike) -> tuple[ElasticMasks, SubNetwork]:
        """(masks, hard sizes) of a sub-network that sliced execution can run: its masks are zero
        outside the kept prefixes.  A dropped layer is one whose gate is 0.0; a soft depth gate
        keeps its layer running (gated); the router's hard mode gives gates only to the argmax depth
        choice's layers and drops the others."""
        if isinstance(subnetwork, SubNetwork):
            return self.resolve(subnetwork), subnetwork
        if not isinstance(subnetwork, SoftSubNetwork):
            raise TypeError(f"subnetwork={type(subnetwork).__name__}: sliced execution needs a "
                            "SubNetwork or a SoftSubNetwork (it needs the kept sizes)")
        axes = [subnetwork.hidden_size, *(getattr(layer, f) for layer in subnetwork.layers
                                          for f in SIZE_FIELDS)]
        soft = sorted({a.mode for a in axes if isinstance(a, SoftAxis) and a.mode != "scaled"})
        if soft:
            raise ValueError(f"sliced execution needs the router's hard mode (SoftAxis mode "
                             f"'scaled'), got mode {soft}: a mixture mask is non-zero beyond the "
                             "kept prefix; use execution='masked' (elastic.execution=masked)")
        masks = self.resolve(subnetwork)
        hard = subnetwork.hard()
        layers = tuple(dataclasses.replace(choice, keep=not masks.layer(i).dropped)
                       for i, choice in enumerate(hard.layers))
        return masks, dataclasses.replace(hard, layers=layers)

    @contextlib.contextmanager
    def bound(self, masks: ElasticMasks, sliced: Optional[SubNetwork] = None):
        """Bind `masks` (and for sliced execution the hard sizes `sliced`) to every elastic
        module of this stage; always unbind on exit."""
        decoder = self.decoder
        with contextlib.ExitStack() as stack:
            stack.enter_context(pinned(decoder, elastic=masks))
            stack.enter_context(pinned(decoder, sliced=sliced))
            stack.enter_context(bound_layers(decoder.layers, masks, sliced))
            final_norm = getattr(decoder, "final_norm", None)
            if isinstance(final_norm, ElasticRMSNorm):
                pinned_norm(stack, final_norm, masks, sliced)
            yield masks

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None,
                inference_context=None, runtime_gather_output: Optional[bool] = None, *,
                subnetwork: Optional[SubNetworkLike] = None, execution: str = "masked", **kwargs):
        call = dict(labels=labels, inference_context=inference_context,
                    runtime_gather_output=runtime_gather_output, **kwargs)
        if execution not in EXECUTIONS:
            raise ValueError(f"execution={execution!r}: must be one of {list(EXECUTIONS)}")
        if subnetwork is None:
            return super().forward(input_ids, position_ids, attention_mask, decoder_input, **call)
        if execution == "sliced":
            return self._sliced_forward(input_ids, position_ids, attention_mask, decoder_input,
                                        subnetwork, call)
        masks = self.resolve(subnetwork)
        with self.bound(masks):
            if self.pre_process and decoder_input is None and not masks.hidden.is_full:
                decoder_input = self.embedding(input_ids=input_ids, position_ids=position_ids)
                decoder_input = decoder_input * masks.hidden.values  # [s, b, h] * [h]
            return super().forward(input_ids, position_ids, attention_mask, decoder_input, **call)

    def _sliced_forward(self, input_ids, position_ids, attention_mask, decoder_input,
                        subnetwork: SubNetworkLike, call: dict):
        masks, sizes = self.resolve_sliced(subnetwork)
        width = sizes.hidden_size
        narrower = width < self.config.hidden_size
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.bound(masks, sliced=sizes))
            if self.pre_process and decoder_input is None:
                decoder_input = self.embedding(input_ids=input_ids, position_ids=position_ids)
                decoder_input = decoder_input[..., :width] if narrower else decoder_input
                if not masks.hidden.is_full:
                    decoder_input = decoder_input * masks.hidden.values[:width]
            if self.post_process and narrower:
                stack.enter_context(swapped_parameters(
                    self.output_layer, weight=self.output_layer.weight[:, :width]))
            return super().forward(input_ids, position_ids, attention_mask, decoder_input, **call)
