"""The one place that sets up processes: torch.distributed, Megatron-Core parallel state, seeds.

When - and only when - CUDA is absent, `initialize` first installs `compat`'s CPU measures, so
the unmodified Megatron-Core training stack (schedules, DDP, optimizer, dist_checkpointing) runs
on CPU with gloo.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import sys
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from nemo_elastic import compat
from nemo_elastic.config import ConfigError, ParallelConfig

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# process / parallel state
# ---------------------------------------------------------------------------------------------

def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch identically on every rank.

    Identical seeds on all tensor-parallel ranks matter: with `use_cpu_initialization` every
    rank draws the full master weight and keeps its shard, so shards are consistent.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    from megatron.core.tensor_parallel import random as mrandom

    if torch.cuda.is_available():
        mrandom.model_parallel_cuda_manual_seed(seed)
    else:
        # The inference tracker's fork() is a no-op context: Megatron modules that draw from
        # "model-parallel-rng" (Mamba dt/A init) use the default CPU generator instead.
        mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def initialize(parallel: ParallelConfig, seed: int = 1234) -> RankInfo:
    """Initialize torch.distributed (if needed), Megatron parallel state and seeds.

    Works under torchrun / srun (env RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), under
    torch.multiprocessing (the caller sets those env vars per rank) and in one plain process.
    """
    compat.install_cpu_measures()
    backend = parallel.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if not dist.is_initialized():
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            # One plain process: an in-memory store, no TCP port (nothing to collide with, and
            # nothing leaks into the environment of processes this one starts).
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    world_size = dist.get_world_size()
    _share_cpu_threads(world_size)
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if world_size % (tp * pp) != 0:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size={tp} x parallel.pipeline_model_parallel_size={pp} "
            f"does not divide the world size {world_size}; launch a multiple of {tp * pp} processes")

    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=parallel.expert_model_parallel_size)
    set_seed(seed)
    return rank_info()


def _share_cpu_threads(world_size: int) -> None:
    """Without CUDA, ranks on one machine compute on its cores: give each rank its share of
    intra-op threads (torchrun sets OMP_NUM_THREADS=1 itself; torch.multiprocessing and srun do
    not), because oversubscribed OpenMP threads spin and slow every rank down several-fold."""
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if local > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def rank_info() -> RankInfo:
    from megatron.core import parallel_state as ps

    return RankInfo(
        rank=dist.get_rank(), world_size=dist.get_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
    )


def destroy() -> None:
    """Tear down Megatron's parallel state and the process group.

    On a normal exit (no exception in flight) the ranks first meet at a barrier: a rank that
    tears down its group and exits while a peer is still communicating or tearing down breaks
    that peer's transport (seen in CI: a gloo rank aborted with SIGABRT, "terminate called
    without an active exception", after its peer had exited).  While an exception propagates
    there is no barrier, since the failed peers may never reach it.
    """
    from megatron.core import parallel_state

    if dist.is_initialized() and dist.get_world_size() > 1 and sys.exc_info()[0] is None:
        try:
            dist.barrier()
        except Exception as err:  # a peer already gone: tear down anyway, and say so
            logger.warning("barrier before process-group teardown failed (%s); a peer rank "
                           "has probably exited already", err)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(parallel: Optional[ParallelConfig] = None, seed: int = 1234) -> Iterator[RankInfo]:
    """`with distributed(ParallelConfig()) as info: ...` — initialize, then always tear down."""
    info = initialize(parallel or ParallelConfig(), seed)
    try:
        yield info
    finally:
        destroy()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
