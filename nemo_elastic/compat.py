"""Every change this package makes to an upstream library (Megatron-Core, torch) at run time.

Megatron-Core 0.19 assumes a GPU in a handful of places (device="cuda" literals in the
schedules, optimizer and checkpointing, `torch.cuda.current_device()` at module construction,
the CUDA RNG tracker, a CUDA causal mask), and its plain Mamba2 / Transformer-Engine modules
need kernels that a CPU machine lacks.  Two entry points, each documented with what it changes
and why (megatron-ecosystem.md §3.3):

- `install_cpu_measures()`: process-wide, once, and only when CUDA is absent (`runtime.initialize`
  calls it): torch.cuda stubs, a CPU causal mask, activation checkpoints without a CUDA RNG
  state, the MoE router's compiled helper run eagerly, `device="cuda"` rewritten to CPU;
- `megatron_cpu_kernels()`: for the duration of a block (building a plain megatron-core model
  from an exported checkpoint), megatron-core's missing kernel hooks filled with torch twins.

Not here (each lives beside the optional integration it serves, and changes nothing unless that
integration is used): the ModelOpt peer's fixes (`peers/modelopt_minitron.install`), the
Megatron-Bridge import shims (`integrations/bridge_import`), and the checkpoint writer's results
queue (`checkpoint`, in-process instead of Megatron's worker process).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Iterator, Optional

import torch

logger = logging.getLogger(__name__)

_CPU_MEASURES_INSTALLED = False


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


def install_cpu_measures() -> None:
    """The CPU measures (see the module doc); a no-op with CUDA or once installed."""
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



@contextlib.contextmanager
def megatron_cpu_kernels() -> Iterator[None]:
    """While building: megatron-core's Mamba2 / TE-norm hooks filled with torch references
    where mamba-ssm / Transformer Engine are not importable.  Only missing kernels are filled;
    the module classes stay megatron-core's.  The scan function stays filled afterwards (the
    forward pass looks it up at call time; it was None before)."""
    from megatron.core.models.hybrid import hybrid_block
    from megatron.core.post_training.modelopt.hybrid import model_specs
    from megatron.core.ssm import mamba_mixer
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from nemo_elastic.model.mamba import ShardedGatedRMSNorm
    from nemo_elastic.model.specs import have_transformer_engine
    from nemo_elastic.ops import GatedRMSNorm, have_mamba_kernels, mamba_split_conv1d_scan

    saved: list[tuple[Any, str, Any]] = []

    def patch(module, name, value):
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    if not have_transformer_engine():
        patch(hybrid_block, "TENorm", WrappedTorchNorm)
        patch(model_specs, "Norm", WrappedTorchNorm)
    if not have_mamba_kernels():
        patch(mamba_mixer, "HAVE_MAMBA_SSM", True)
        patch(mamba_mixer, "RMSNormGated", GatedRMSNorm)
        # upstream ExtendedRMSNorm = mamba-ssm's RMSNormGated + a sharded_state_dict; without
        # mamba-ssm it subclasses a MagicMock, so its torch twin (same code, same keys) stands in
        patch(mamba_mixer, "ExtendedRMSNorm", ShardedGatedRMSNorm)
        if mamba_mixer.mamba_split_conv1d_scan_combined is None:
            mamba_mixer.mamba_split_conv1d_scan_combined = mamba_split_conv1d_scan
    try:
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)
