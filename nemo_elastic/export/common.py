"""Shared plumbing of the converters: a one-process TP=1 runtime and the TP=1 model build.

Conversions always materialize the full (unsharded) model in one process: at TP=1 / PP=1 the
Megatron parameter names and layouts are the global ones that `hf_adapter` maps.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
from typing import Iterator

from nemo_elastic.config import Config, ParallelConfig

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def tp1_runtime(seed: int = 1234) -> Iterator[None]:
    """Reuse an initialized single-process TP=1/PP=1 Megatron state, or set one up and tear it down."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from nemo_elastic import runtime

    if ps.model_parallel_is_initialized():
        tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
        world = dist.get_world_size() if dist.is_initialized() else 1
        if (tp, pp, world) != (1, 1, 1):
            raise RuntimeError(
                f"Hugging Face conversion runs in one process at TP=1/PP=1, but Megatron is "
                f"initialized with tensor_model_parallel_size={tp}, pipeline_model_parallel_size="
                f"{pp}, world size {world}; run import/export as a single plain process")
        yield
        return
    with runtime.distributed(ParallelConfig(), seed=seed):
        yield


def build_tp1_model(cfg: Config):
    """The whole model with torch (local-spec) modules; weights left uninitialized (overwritten)."""
    from nemo_elastic.model import build_hybrid_model

    model = build_hybrid_model(cfg.single_process(), spec_backend="local",
                               perform_initialization=False)
    model.eval()
    return model


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def same_filesystem_tmp(path: os.PathLike) -> str:
    """Name of a hidden sibling used for atomic writes (rename within one directory)."""
    path = os.fspath(path)
    head, tail = os.path.split(path.rstrip(os.sep))
    return os.path.join(head, f".{tail}.tmp")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def honour_umask(root: os.PathLike) -> None:
    """Give `root` and everything under it the permissions the umask allows (folders 0777,
    files 0666, minus the umask): `tempfile.mkdtemp` makes 0700 folders and safetensors'
    `save_file` 0600 files whatever the umask, so on a shared cluster nobody else could read an
    export."""
    mask = current_umask()
    for dirpath, dirs, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)
