"""The RNG state as one stateful part of a checkpoint: Python, NumPy, torch (and CUDA) states,
stored per (pipeline, tensor) rank (data-parallel replicas hold the same state), so it is only
restorable at the parallel layout it was written at."""

from __future__ import annotations

import random
from typing import Any, Optional

import numpy as np
import torch

RNG_KEY = "rng_state"  # the sharded object's key in the checkpoint (unchanged since v1)


def rng_state() -> dict[str, Any]:
    return {"random": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def parallel_layout() -> list[int]:
    """[PP, TP] of this process's model-parallel layout."""
    from megatron.core import parallel_state as ps

    return [ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()]


def rng_sharded_object(state: Optional[dict[str, Any]]):
    """The RNG state as Megatron's ShardedObject (one per model-parallel rank); None: a load
    template."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        RNG_KEY, state,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True))
