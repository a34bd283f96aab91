"""`NemoHybridStack`: upstream `HybridStack` with a spec-chosen final norm and per-layer sizes.

* Upstream hard-wires `final_norm = TENorm(...)`; here the norm class comes from the spec
  (`final_norm` param: TENorm on GPU specs, torch RMSNorm on local specs) under the same
  checkpoint key `decoder.final_norm.weight`.
* Heterogeneous layers (`ModelConfig.per_layer`, e.g. an extracted sub-network): the spec param
  `layer_overrides` maps a GLOBAL 0-based layer index to TransformerConfig field overrides
  (`mamba_num_heads`, `mamba_head_dim`, `num_attention_heads`, `ffn_hidden_size`).  After the
  upstream construction, only those layers are rebuilt from the same submodule spec with
  `dataclasses.replace(config, **overrides)`, the same layer_number / pp_layer_offset /
  pg_collection / name as upstream.  The layers stay upstream classes with upstream parameter
  names; each one reads its sizes from its own `layer.config`.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import nullcontext
from typing import Mapping, Optional

from megatron.core.fp4_utils import get_fp4_context
from megatron.core.fp8_utils import get_fp8_context
from megatron.core.models.hybrid.hybrid_block import HybridStack
from megatron.core.models.hybrid.hybrid_layer_allocation import Symbols
from megatron.core.transformer.cuda_graphs import annotate_first_last_layer
from megatron.core.transformer.spec_utils import build_module

from nemo_elastic.sizes import LAYER_FIELDS

logger = logging.getLogger(__name__)



class NemoHybridStack(HybridStack):
    def __init__(self, config, submodules, *args, final_norm=None,
                 post_layer_norm: bool = True, pp_layer_offset: int = 0, pg_collection=None,
                 is_mtp_layer: bool = False, name: Optional[str] = None,
                 layer_overrides: Optional[Mapping[int, Mapping[str, int]]] = None, **kwargs):
        if final_norm is None:
            raise ValueError("NemoHybridStack needs a `final_norm` builder in its ModuleSpec params")
        # Build everything upstream except the TE-only final norm, then add ours.
        super().__init__(config, submodules, *args, post_layer_norm=False,
                         pp_layer_offset=pp_layer_offset, pg_collection=pg_collection,
                         is_mtp_layer=is_mtp_layer, name=name, **kwargs)
        if layer_overrides:
            self._rebuild_overridden_layers(submodules, layer_overrides, pp_layer_offset,
                                            pg_collection, is_mtp_layer, name)
        self.post_layer_norm = post_layer_norm
        if self.post_process and self.post_layer_norm:
            self.final_norm = final_norm(
                config=self.config, hidden_size=self.config.hidden_size,
                eps=self.config.layernorm_epsilon)

    def _rebuild_overridden_layers(self, submodules, layer_overrides, offset, pg_collection,
                                   is_mtp_layer, name) -> None:
        """Replace `self.layers[i]` (global index i + offset) for every override in this segment."""
        for i, symbol in enumerate(self.layer_type_list):
            overrides = dict(layer_overrides.get(i + offset) or {})
            if not overrides:
                continue
            # the TransformerConfig fields a per-layer override may set (Megatron's Symbols are
            # the same one-character strings as ours)
            allowed = LAYER_FIELDS.get(symbol, ())
            bad = sorted(set(overrides) - set(allowed))
            if bad:
                raise ValueError(
                    f"layer_overrides[{i + offset}] sets {bad}, but layer {i + offset} is "
                    f"{symbol!r} which only takes {list(allowed)}")
            # replace() re-runs TransformerConfig.__post_init__; kv_channels / ffn_hidden_size /
            # num_query_groups are explicit in the parent config, so nothing else is re-derived.
            layer_config = dataclasses.replace(self.config, **overrides)
            common = dict(config=layer_config, layer_number=i + 1 + offset,
                          pg_collection=pg_collection,
                          name=(name + f".layers.{i}") if name is not None else None)
            # Same keyword arguments as HybridStack.__init__ gives each layer type.
            if symbol == Symbols.MAMBA:
                spec, extra = submodules.mamba_layer, dict(pp_layer_offset=offset)
            elif symbol == Symbols.ATTENTION:
                spec, extra = submodules.attention_layer, dict(
                    is_mtp_layer=is_mtp_layer, add_layer_offset=False, pp_layer_offset=offset)
            elif symbol == Symbols.MOE:
                spec, extra = submodules.moe_layer, dict(add_layer_offset=False)
            else:
                spec, extra = submodules.mlp_layer, dict(add_layer_offset=False)
            with self._quant_init_context(i + offset):
                self.layers[i] = build_module(spec, **common, **extra)
            logger.debug("layer %d (%s) rebuilt with %s", i + offset, symbol, overrides)
        if self.config.cuda_graph_impl == "local":
            annotate_first_last_layer(self.layers)

    def _quant_init_context(self, layer_index: int):
        if self.config.fp8:
            return get_fp8_context(self.config, layer_index, is_init=True)
        if self.config.fp4:
            return get_fp4_context(self.config, layer_index, is_init=True)
        return nullcontext()
