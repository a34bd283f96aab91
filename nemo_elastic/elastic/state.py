"""What a module sees during one masked forward (its masks), and how masks are bound to modules.

Masks are explicit per-call objects: `bound_layers` attaches them to the elastic modules of some
layers for the duration of a block and restores the previous binding on exit.  The model binds a
whole stage for one forward call; every activation recompute re-binds the masks of the forward
that produced it (`recompute.py`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch

from nemo_elastic.elastic.masks import AxisMask, ElasticMasks, LayerMasks, shard
from nemo_elastic.elastic.norm import ElasticRMSNorm
from nemo_elastic.elastic.sliced import Index, SlicedLayer, pinned, take
from nemo_elastic.elastic.subnet import SubNetwork

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
    sliced: Optional[SlicedLayer] = None  # set: run on the kept weights (`sliced.py`)


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
        """out [s, b, h]: zero (or scale) the residual-stream channels outside the sub-network
        (sliced: out [s, b, h_kept] scaled by the mask's kept entries)."""
        if self.elastic is None or self.elastic.hidden.is_full:
            return out
        values = self.elastic.hidden.values
        if self.elastic.sliced is not None:
            values = values[:self.elastic.sliced.hidden_size]
        return out * values

    # ------------------------------------------------------------------ sliced execution
    def _sliced(self) -> Optional[SlicedLayer]:
        return None if self.elastic is None else self.elastic.sliced

    def _inner_multiplier(self, kept: Optional[Index] = None) -> Optional[torch.Tensor]:
        """What the inner activation is multiplied by: this rank's mask (masked), or its entries
        at the kept local positions `kept` (sliced); None when the axis is unmasked."""
        mask = self._local_inner()
        if mask is None or kept is None:
            return mask
        return take(mask, 0, kept)

    def _index(self, key: tuple, build) -> Index:
        """Cached `Index` for `key` (sizes, rank, device): `build()` -> (cpu index, total)."""
        cache = self.__dict__.setdefault("_slice_indices", {})
        device = next(self.parameters()).device
        full_key = (*key, self._tp(), device)
        if full_key not in cache:
            cpu, total = build()
            cache[full_key] = Index(cpu, total, device)
        return cache[full_key]

    def _hidden_index(self, total: int) -> Index:
        h = self.elastic.sliced.hidden_size
        return self._index(("hidden", h, total), lambda: (torch.arange(h), total))

    @staticmethod
    def _mask_last_dim_blocks(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [..., n * k] viewed as n blocks of k channels; block i scaled by mask[i]."""
        n = mask.numel()
        return (x.unflatten(-1, (n, -1)) * mask[:, None]).flatten(-2)


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


def pinned_norm(stack: contextlib.ExitStack, norm: ElasticRMSNorm, masks: ElasticMasks,
                sliced: Optional[SubNetwork]) -> None:
    """Masked: the norm corrects for the active hidden fraction; sliced: it normalizes the first
    `hidden_size` channels it is given."""
    if sliced is None:
        stack.enter_context(pinned(norm, elastic_fraction=masks.hidden.fraction))
        return
    width = sliced.hidden_size if sliced.hidden_size < norm.weight.shape[0] else None
    stack.enter_context(pinned(norm, elastic_fraction=None))
    stack.enter_context(pinned(norm, elastic_width=width))


@contextlib.contextmanager
def bound_layers(layers: Iterable[torch.nn.Module], masks: ElasticMasks,
                 sliced: Optional[SubNetwork] = None) -> Iterator[None]:
    """Bind `masks` to the pre-norms and mixers of Megatron `layers` (global masks are looked up
    by each layer's 1-based global `layer_number`); previous bindings are restored on exit.
    `sliced`: the hard sizes of a sliced execution (`sliced.py`), None for masked."""
    with contextlib.ExitStack() as stack:
        for layer in layers:
            check_recompute_adopted(layer)
            index = layer.layer_number - 1
            state = ModuleMasks(hidden=masks.hidden, layer=masks.layer(index), sliced=None if
                                sliced is None else SlicedLayer(sliced.hidden_size,
                                                                sliced.layers[index]))
            for name in NORMS:
                norm = getattr(layer, name, None)
                if isinstance(norm, ElasticRMSNorm):
                    pinned_norm(stack, norm, masks, sliced)
            for name in MIXERS:
                child = getattr(layer, name, None)
                if isinstance(child, ElasticMixin):
                    stack.enter_context(pinned(child, elastic=state))
        yield
