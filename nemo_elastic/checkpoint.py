"""Megatron-Core distributed checkpoints: model (+ optimizer, scheduler, RNG, data position).

Layout of one checkpoint directory (any TP/PP size can load it; dist_checkpointing reshards):

    CKPT/
      .metadata, __*_*.distcp, metadata.json   Megatron dist_checkpointing (torch_dist)
      nemo_elastic.json                         resolved config + iteration + kind (human readable)

A training run keeps `OUTPUT/checkpoints/iter_0000100/...` and `OUTPUT/checkpoints/latest`
(text: the directory name of the newest complete checkpoint).  Every write goes to a temporary
sibling directory that is renamed only once complete, so a crash never leaves a checkpoint that
looks valid but is not; `latest` is replaced atomically after the rename.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from nemo_elastic.config import Config, ConfigError, load_config, to_dict

logger = logging.getLogger(__name__)

META_FILE = "nemo_elastic.json"
LATEST_FILE = "latest"
FORMAT_VERSION = 1
TRAINING_KINDS = ("pretrain", "elastic")  # runs whose checkpoints/latest is kept up to date


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable; the message names the path."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast_str(value: str) -> str:
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------
# inspection
# ---------------------------------------------------------------------------------------------

def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    """Read `nemo_elastic.json`; raises CheckpointError naming the path if missing/corrupt."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.exists():
        raise CheckpointError(f"checkpoint {str(ckpt_dir)!r} does not exist")
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint {str(ckpt_dir)!r} is not a directory")
    meta_path = ckpt_dir / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(
            f"checkpoint {str(ckpt_dir)!r} has no {META_FILE}: not a nemo_elastic checkpoint, or an "
            "interrupted write")
    for required in ("metadata.json", ".metadata"):
        if not (ckpt_dir / required).is_file():
            raise CheckpointError(
                f"checkpoint {str(ckpt_dir)!r} is incomplete: {required} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {str(ckpt_dir)!r}: {META_FILE} is corrupt ({err})") from err
    if not isinstance(meta, dict) or "config" not in meta:
        raise CheckpointError(f"checkpoint {str(ckpt_dir)!r}: {META_FILE} has no 'config' entry")
    return meta


def config_from_checkpoint(ckpt_dir: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    meta = read_meta(ckpt_dir)
    try:
        return load_config(base=meta["config"], overrides=overrides)
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {str(ckpt_dir)!r}: stored config is invalid: {err}") from err


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, or a run's `checkpoints/` dir (-> its `latest`), or a run output dir."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        latest = candidate / LATEST_FILE
        if latest.is_file():
            return candidate / latest.read_text().strip()
    return path


def latest_checkpoint(checkpoints_dir: str | Path) -> Optional[Path]:
    latest = Path(checkpoints_dir) / LATEST_FILE
    if not latest.is_file():
        return None
    path = Path(checkpoints_dir) / latest.read_text().strip()
    read_meta(path)  # validate: fail loudly instead of silently restarting from scratch
    return path


# ---------------------------------------------------------------------------------------------
# RNG state (per model-parallel rank; data-parallel replicas hold the same state)
# ---------------------------------------------------------------------------------------------

def _rng_state() -> dict[str, Any]:
    return {"random": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _parallel_layout() -> list[int]:
    from megatron.core import parallel_state as ps

    return [ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()]


def _rng_sharded_object(state: Optional[dict[str, Any]]):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        "rng_state", state,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True))


# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------

def start_writer_processes() -> None:
    """Start dist_checkpointing's writer helper process now, with SIGTERM/SIGINT ignored.

    Megatron's torch_dist writer lazily spawns a `multiprocessing.Manager` at the first save.
    Slurm and torchrun deliver SIGTERM to the whole process group; a Manager started normally
    would die with the trainer and make the preemption checkpoint fail.  Started here, with the
    signals ignored, it inherits the ignore and survives until the final save is done.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals cannot be changed here
        pass
    try:
        filesystem_async.get_write_results_queue()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def save_checkpoint(ckpt_dir: str | Path, *, cfg: Config, model: torch.nn.Module,
                    optimizer=None, scheduler=None, iteration: int = 0,
                    data_state: Optional[dict] = None, kind: str = "pretrain",
                    extra_meta: Optional[dict] = None, extra_common: Optional[dict] = None,
                    overwrite: bool = False) -> Path:
    """Write a complete checkpoint atomically. Call on every rank (collective).

    `extra_common`: picklable, replicated state (identical on every rank, written once), e.g. the
    router's weights and optimizer (`{"extra": {"router": ..., "router_optimizer": ...}}`);
    `extra_meta`: JSON-serializable facts for `nemo_elastic.json` (e.g. the budget family).
    """
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.exists() and not overwrite:
        raise CheckpointError(f"{str(ckpt_dir)!r} already exists; pass --overwrite to replace it")
    tmp_dir = ckpt_dir.with_name(f".{ckpt_dir.name}.tmp")
    if _rank() == 0:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir(parents=True)
    _barrier()

    model_sd = model.sharded_state_dict()
    state: dict[str, Any] = {"model": model_sd, "rng_state": _rng_sharded_object(_rng_state())}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd)
    common = {"iteration": iteration, "data_state": data_state,
              "scheduler": scheduler.state_dict() if scheduler is not None else None,
              **(extra_common or {})}
    state["common"] = common
    dist_checkpointing.save(state, str(tmp_dir))

    if _rank() == 0:
        meta = {"format_version": FORMAT_VERSION, "kind": kind, "iteration": iteration,
                "config": to_dict(cfg), "has_optimizer": optimizer is not None,
                "parallel_layout": _parallel_layout()}
        meta.update(extra_meta or {})
        (tmp_dir / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        os.replace(tmp_dir, ckpt_dir)
        if kind in TRAINING_KINDS:
            _write_latest(ckpt_dir)
    _barrier()
    logger.info("saved checkpoint %s (iteration %d)", ckpt_dir, iteration)
    return ckpt_dir


def _write_latest(ckpt_dir: Path) -> None:
    latest = ckpt_dir.parent / LATEST_FILE
    tmp = latest.with_name(LATEST_FILE + ".tmp")
    tmp.write_text(ckpt_dir.name + "\n")
    os.replace(tmp, latest)


def load_checkpoint(ckpt_dir: str | Path, *, model: torch.nn.Module, optimizer=None,
                    scheduler=None, restore_rng: bool = True, strict: bool = True) -> dict[str, Any]:
    """Load into existing objects; returns {'iteration', 'data_state', 'meta'}. Collective."""
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    if optimizer is not None and not meta.get("has_optimizer", False):
        raise CheckpointError(
            f"checkpoint {str(ckpt_dir)!r} holds no optimizer state (kind={meta.get('kind')!r}); "
            "start a new run from it instead of resuming")
    model_sd = model.sharded_state_dict()
    template: dict[str, Any] = {"model": model_sd}
    # RNG states are stored per (pipeline, tensor) rank: only restorable at the same layout.
    restore_rng = restore_rng and meta.get("parallel_layout") == _parallel_layout()
    if restore_rng:
        template["rng_state"] = _rng_sharded_object(None)
    if optimizer is not None:
        template["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True)
    try:
        loaded = dist_checkpointing.load(template, str(ckpt_dir))
    except (Exception, CheckpointException) as err:  # many types for damaged files; torch's
        # CheckpointException derives from BaseException
        raise CheckpointError(
            f"checkpoint {str(ckpt_dir)!r} could not be read ({type(err).__name__}: {err}); "
            "it is corrupt or was written for a different model shape") from err
    incompatible = model.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in incompatible.missing_keys if not k.endswith("_extra_state")]
    if strict and (missing or incompatible.unexpected_keys):
        raise CheckpointError(
            f"checkpoint {str(ckpt_dir)!r} does not match the model: missing {missing[:5]}, "
            f"unexpected {incompatible.unexpected_keys[:5]}")
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    common = loaded.get("common") or {}
    if scheduler is not None and common.get("scheduler") is not None:
        scheduler.load_state_dict(common["scheduler"])
    if restore_rng and loaded.get("rng_state") is not None:
        _set_rng_state(loaded["rng_state"])
    logger.info("loaded checkpoint %s (iteration %s)", ckpt_dir, common.get("iteration"))
    return {**common, "iteration": common.get("iteration", 0),
            "data_state": common.get("data_state"), "meta": meta}
