"""The one place that sets up processes: torch.distributed, Megatron-Core parallel state, seeds.

Megatron-Core 0.19 assumes a GPU in a handful of places (device="cuda" literals in the
schedules, optimizer and checkpointing, `torch.cuda.current_device()` at module construction,
the CUDA RNG tracker, a CUDA causal mask).  When - and only when - CUDA is absent, `initialize`
applies the measures listed in `_install_cpu_measures`, so the unmodified Megatron-Core training
stack (schedules, DDP, optimizer, dist_checkpointing) runs on CPU with gloo.  Nothing else in the
package patches Megatron.
"""

from __future__ import annotations

import contextlib
import functools
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

from nemo_elastic.config import ConfigError, ParallelConfig

logger = logging.getLogger(__name__)

_CPU_MEASURES_INSTALLED = False


# ---------------------------------------------------------------------------------------------
# CPU measures (megatron-ecosystem.md §3.3); installed once per process, never on a GPU machine
# ---------------------------------------------------------------------------------------------

def _to_cpu_device(dev):
    if isinstance(dev, torch.device) and dev.type == "cuda":
        return torch.device("cpu")
    if isinstance(dev, str) and dev.startswith("cuda"):
        return "cpu"
    if isinstance(dev, int) and not isinstance(dev, bool):  # device=torch.cuda.current_device()
        return "cpu"
    return dev


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Rewrites `device="cuda"` factory arguments, `.cuda()` and `.to("cuda")` to CPU.

    Megatron-Core's schedules, optimizer and checkpoint code allocate small bookkeeping tensors
    with literal `device="cuda"`.  Also reports CPU float tensors as `torch.cuda.*Tensor` from
    `Tensor.type()`, which Megatron's grad clipping and mixed-precision optimizer assert on.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs = dict(kwargs, device=_to_cpu_device(kwargs["device"]))
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], (str, torch.device, int)):
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        result = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and isinstance(result, str):
            return result.replace("torch.", "torch.cuda.", 1)
        return result


class _NoopStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NoopEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _NoopEvent(_NoopStream):
    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def elapsed_time(self, other):
        return 0.0


@functools.lru_cache(maxsize=64)
def _cpu_causal_mask(sq: int, sk: Optional[int] = None) -> torch.Tensor:
    """[sq, sk] bool, True = masked (future) position; same contract as Megatron's helper."""
    sk = sq if sk is None else sk
    return torch.triu(torch.ones(sq, sk, dtype=torch.bool), diagonal=1 + sk - sq)


def _install_cpu_measures() -> None:
    global _CPU_MEASURES_INSTALLED
    if _CPU_MEASURES_INSTALLED or torch.cuda.is_available():
        return
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda *a, **k: None
    cuda.current_stream = lambda *a, **k: _NoopStream()
    cuda.default_stream = lambda *a, **k: _NoopStream()
    cuda.Stream = _NoopStream
    cuda.Event = _NoopEvent
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.set_device = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0

    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.transformer.utils as transformer_utils

    transformer_utils.get_default_causal_mask = _cpu_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_causal_mask
    _activation_checkpoints_without_gpu()
    _eager_moe_router()
    _CudaToCpuMode().__enter__()  # process-global; a CPU process never has real CUDA tensors
    _CPU_MEASURES_INSTALLED = True
    logger.info("CUDA is not available: Megatron-Core runs on CPU (gloo, torch Mamba2 path)")


def _eager_moe_router() -> None:
    """Megatron-Core's `TopKRouter._apply_expert_bias` (the MoE load count behind the expert-bias
    update) is wrapped in torch.compile (`jit_fuser`): on CPU that is seconds of C++ code
    generation for one add.  Run the function itself."""
    from megatron.core.transformer.moe.router import TopKRouter

    fn = TopKRouter.__dict__["_apply_expert_bias"]
    TopKRouter._apply_expert_bias = getattr(fn, "_torchdynamo_orig_callable", fn)


class _NoFp8:
    """Transformer-Engine's FP8GlobalStateManager with fp8 off."""

    is_fp8_enabled = staticmethod(lambda: False)
    get_fp8_recipe = staticmethod(lambda: None)


def _activation_checkpoints_without_gpu() -> None:
    """Megatron's activation checkpoints (`tensor_parallel.checkpoint`,
    `CheckpointWithoutOutput`, i.e. full and selective recompute) save and restore the CUDA RNG
    state, which a CPU process has not: an empty state.  `CheckpointWithoutOutput()` also treats
    fp8=False as fp8 on and calls Transformer-Engine's fp8 state manager: without TE, fp8 is off."""
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *a, **k: None
    if not getattr(mrandom, "HAVE_TE", False):
        off = lambda *a, **k: contextlib.nullcontext()  # noqa: E731
        mrandom.FP8GlobalStateManager = _NoFp8
        mrandom.activation_recompute_forward = off
        mrandom.fp8_autocast = off


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
    _install_cpu_measures()
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
