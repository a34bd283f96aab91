"""What a module sees during one masked forward (its masks), and how masks are bound to modules.

Masks are explicit per-call objects: `bound_layers` attaches them to the elastic modules of some
layers for the duration of a block and restores the previous binding on exit.  The model binds a
whole stage for one forward call; every activation recompute re-binds the masks of the forward
that produced it (`recompute.py`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import torch

from nemo_elastic.elastic.masks import AxisMask, ElasticMasks, LayerMasks, shard
from nemo_elastic.elastic.norm import ElasticRMSNorm

# Sub-modules of a Megatron layer that take masks: residual-stream pre-norms and the mixers.
NORMS = ("norm", "input_layernorm", "pre_mlp_layernorm")
MIXERS = ("mixer", "self_attention", "mlp")

# Megatron selective-recompute flags of a TransformerLayer whose recompute runs masked modules,
# and the attribute `recompute.adopt` sets once it made those recomputes re-bind their masks.
RECOMPUTE_FLAGS = ("recompute_mlp", "recompute_input_layernorm", "recompute_pre_mlp_layernorm")
ADOPTED = "elastic_recompute_adopted"


@dataclass
class ModuleMasks:
    hidden: AxisMask
    layer: LayerMasks


class ElasticMixin:
    """Shared by the elastic Megatron subclasses. `elastic` is bound by `ElasticHybridModel` for
    one forward call (and re-bound by each recompute of that call), cleared afterwards; None
    means the unmodified upstream computation."""

    elastic: Optional[ModuleMasks] = None

    def _tp(self) -> tuple[int, int]:
        group = self.pg_collection.tp if getattr(self, "pg_collection", None) is not None \
            else self.tp_group
        return group.rank(), group.size()

    def _local_inner(self) -> Optional[torch.Tensor]:
        """This rank's block of the layer's inner mask (None = unmasked)."""
        if self.elastic is None or self.elastic.layer.inner.is_full:
            return None
        return shard(self.elastic.layer.inner.values, *self._tp())

    def _mask_hidden(self, out: torch.Tensor) -> torch.Tensor:
        """out [s, b, h]: zero (or scale) the residual-stream channels outside the sub-network."""
        if self.elastic is None or self.elastic.hidden.is_full:
            return out
        return out * self.elastic.hidden.values

    @staticmethod
    def _mask_last_dim_blocks(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [..., n * k] viewed as n blocks of k channels; block i scaled by mask[i]."""
        n = mask.numel()
        return (x.unflatten(-1, (n, -1)) * mask[:, None]).flatten(-2)


@contextlib.contextmanager
def pinned(obj: Any, attr: str, value: Any) -> Iterator[None]:
    """`obj.attr = value` for the duration of the block; the previous value is restored."""
    previous = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, previous)


def check_recompute_adopted(layer: torch.nn.Module) -> None:
    """Refuse to mask a layer whose Megatron selective recompute would re-run masked modules in
    the backward pass without re-binding their masks (i.e. not prepared by `recompute.adopt`)."""
    on = [flag for flag in RECOMPUTE_FLAGS if getattr(layer, flag, False)]
    if on and not getattr(layer, ADOPTED, False):
        raise RuntimeError(
            f"layer {layer.layer_number}: Megatron selective recompute ({', '.join(on)}) would "
            "re-run it in the backward pass without the sub-network's masks; build elastic "
            "models with nemo_elastic.elastic.specs.build_elastic_model (ElasticHybridStack "
            "re-binds the masks in every recompute)")


@contextlib.contextmanager
def bound_layers(layers: Iterable[torch.nn.Module], masks: ElasticMasks) -> Iterator[None]:
    """Bind `masks` to the pre-norms and mixers of Megatron `layers` (global masks are looked up
    by each layer's 1-based global `layer_number`); previous bindings are restored on exit."""
    with contextlib.ExitStack() as stack:
        for layer in layers:
            check_recompute_adopted(layer)
            state = ModuleMasks(hidden=masks.hidden, layer=masks.layer(layer.layer_number - 1))
            for name in NORMS:
                norm = getattr(layer, name, None)
                if isinstance(norm, ElasticRMSNorm):
                    stack.enter_context(pinned(norm, "elastic_fraction", masks.hidden.fraction))
            for name in MIXERS:
                child = getattr(layer, name, None)
                if isinstance(child, ElasticMixin):
                    stack.enter_context(pinned(child, "elastic", state))
        yield
