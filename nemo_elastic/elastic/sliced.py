"""Sliced execution of a hard sub-network: the elastic layers run on the kept parts of the
parent's weights instead of masking the full tensors, so a smaller budget costs less.

`ElasticHybridModel.forward(..., subnetwork=s, execution="sliced")` runs the same function as the
masked forward (`execution="masked"`) whenever every mask of `s` is zero outside a prefix set: a
hard `SubNetwork` (0/1 masks) or the router's hard mode (`SoftAxis.mode="scaled"`: the argmax
prefix x its probability).  Per call:

* the weights used are views / index-selects of the parent's parameters (`take`), put in place of
  the parameters for that call only (`swapped_parameters`): the gradients land in the parent's
  tensors, exactly where the masked forward puts them (it leaves zeros elsewhere);
* the mask's value on the kept channels (1, or the router's probability) multiplies the same
  activation as in the masked forward, so the router gets the same gradient;
* the kept index sets are those of `export.slicing` (the physical-slicing oracle), taken in the
  parent's global order and restricted to this tensor-parallel rank's block (Megatron's
  column-parallel layout): each rank computes its own share, the row-parallel all-reduce sums
  them, as in the masked forward;
* norms normalize the kept channels only (no masked-channel correction needed);
* dropped layers (gate 0.0) are not run; a soft depth gate (a tensor) still runs its layer.
  In the router's hard mode the depth axis is hard too: the argmax depth choice's layers carry
  its probability as their gate, the others are dropped (`router._soft_subnetwork`), so a
  smaller depth costs less;
* between pipeline stages the residual stream travels at the parent's width with zeros in the
  pruned channels (what the masked forward sends), and is cut back on arrival.

Activation recompute re-runs modules in the backward pass, after the call: like the masks, the
sizes are re-bound there (full recompute: with the chunk's masks; "mlp": with the module's
binding; "layernorm": the norm's width; "core_attn": the core attention reads its head count from
its query), and the recompute slices the weights again.

Not supported (refused): the router's soft (mixture) mode, whose masks are non-zero everywhere;
inference contexts; context parallelism.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from nemo_elastic.elastic.subnet import LayerChoice


@dataclass(frozen=True)
class SlicedLayer:
    """What a module needs besides its masks to run sliced: the kept hidden size and its
    layer's kept sizes."""

    hidden_size: int
    choice: LayerChoice


class Index:
    """Kept positions along one axis of a local tensor: a CPU index tensor (sorted, unique), its
    copy on the compute device, and whether it is one contiguous run (then `take` narrows)."""

    def __init__(self, cpu: torch.Tensor, total: int, device) -> None:
        cpu = cpu.to(torch.long)
        self.cpu, self.total = cpu, total
        self.size = int(cpu.numel())
        start = int(cpu[0]) if self.size else 0
        self.run = (start, self.size) if self.size == 0 or \
            int(cpu[-1]) - start + 1 == self.size else None
        self.on_device = None if self.run is not None else cpu.to(device)

    @property
    def is_all(self) -> bool:
        return self.run == (0, self.total)


def take(t: torch.Tensor, dim: int, index: Index) -> torch.Tensor:
    """`t`'s kept entries along `dim`: `t` itself, a narrow view or an index-select."""
    if index.is_all:
        return t
    if index.run is not None:
        return t.narrow(dim, index.run[0], index.run[1])
    return t.index_select(dim, index.on_device)


def local(global_index: torch.Tensor, block: int, rank: int) -> torch.Tensor:
    """The entries of a global index set that fall in tensor-parallel rank `rank`'s contiguous
    block of `block` items, as positions inside that block."""
    lo = rank * block
    keep = (global_index >= lo) & (global_index < lo + block)
    return global_index[keep] - lo


@contextlib.contextmanager
def swapped_parameters(module: torch.nn.Module, **tensors: torch.Tensor) -> Iterator[None]:
    """`module.<name>` returns `tensors[name]` (e.g. a slice of that very parameter) instead of
    the registered parameter for the duration of the block; the parameters are restored after.
    Autograd sees the slices, so gradients flow back into the parameters."""
    params = module._parameters
    saved = {name: params[name] for name in tensors}
    try:
        params.update(tensors)
        yield
    finally:
        params.update(saved)


@contextlib.contextmanager
def pinned(obj, **values) -> Iterator[None]:
    """Plain attributes of `obj` set for the duration of the block, the previous values
    restored after it (sizes an upstream forward reads, e.g. the number of attention heads of
    this rank; the sub-network state bound to a module for one call)."""
    saved = {name: getattr(obj, name) for name in values}
    try:
        for name, value in values.items():
            setattr(obj, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(obj, name, value)


def check_sliceable(config) -> None:
    """Refuse settings under which a sliced forward would not compute its masked twin."""
    if getattr(config, "context_parallel_size", 1) > 1:
        raise ValueError(f"execution='sliced' with context_parallel_size="
                         f"{config.context_parallel_size}: not supported; use execution='masked'")
