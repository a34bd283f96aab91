"""What a module sees during one masked forward: the hidden mask and its layer's masks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from nemo_elastic.elastic.masks import AxisMask, LayerMasks, shard


@dataclass
class ModuleMasks:
    hidden: AxisMask
    layer: LayerMasks


class ElasticMixin:
    """Shared by the elastic Megatron subclasses. `elastic` is bound by `ElasticHybridModel` for
    one forward call and cleared afterwards; None means the unmodified upstream computation."""

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
