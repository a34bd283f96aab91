"""The few collectives the checkpoint store needs; each is a no-op in one process."""

from __future__ import annotations

from typing import Callable

import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def broadcast_str(value: str) -> str:
    """Rank 0's `value` on every rank (an error line every rank must raise alike)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def split_over_ranks(names: list[str], fn: Callable[[str], object]) -> dict:
    """{name: fn(name)} with the names shared out over the ranks (rank r: names[r::world])."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    local = {name: fn(name) for name in names[rank()::world]}
    if world == 1:
        return local
    gathered: list = [None] * world
    dist.all_gather_object(gathered, local)
    return {k: v for part in gathered for k, v in part.items()}
