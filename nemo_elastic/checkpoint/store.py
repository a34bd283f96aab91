"""The checkpoint store: saves and loads a mapping of stateful parts, as torchtitan's
checkpointer takes a dict of `Stateful` objects.  It never knows which trainer it serves.

Parts (name -> object), stored as Megatron-Core distributed checkpoints (any TP/PP size can
load one; dist_checkpointing reshards):

* `model` (required): a module with `sharded_state_dict()`, stored under Megatron-Core's own
  keys (upstream parameter names);
* `optimizer` (optional): Megatron's optimizer, sharded along the model's state;
* the RNG state (`rng.py`), always written, restored at the same parallel layout;
* every other part is replicated state (identical on every rank, written once, in the
  checkpoint's `common`): an object with `state_dict()` / `load_state_dict()` (an LR scheduler,
  a data iterator, a router) or a plain picklable value (the iteration, a stage name).

Every write goes to a temporary sibling directory that is renamed only once complete, so a
crash never leaves a checkpoint that looks valid but is not; a training run's `latest` is
replaced atomically after the rename (`series.py`).  Every file is hashed into the metadata,
which is sealed (`integrity.py`), and verified before a load.  A failed save (e.g. no space
left on device) removes its partial directory and keeps the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol, runtime_checkable

import torch
from torch.distributed.checkpoint.api import CheckpointException

from nemo_elastic.checkpoint.collective import broadcast_str, rank
from nemo_elastic.checkpoint.durable import fsync_path
from nemo_elastic.checkpoint.errors import CheckpointError, root_cause
from nemo_elastic.checkpoint.integrity import hash_checkpoint, verify_files, write_meta_file
from nemo_elastic.checkpoint.meta import TRAINING_KINDS, CheckpointMeta, read_meta
from nemo_elastic.checkpoint.optimizer_state import adopt_schedule_hyperparameters
from nemo_elastic.checkpoint.rng import RNG_KEY, parallel_layout, rng_sharded_object, \
    rng_state, set_rng_state
from nemo_elastic.checkpoint.series import write_latest
from nemo_elastic.checkpoint.writer import WriterErrors, save_failure, start_writer_processes
from nemo_elastic.config import Config, to_dict
from nemo_elastic.errors import output_path_error

logger = logging.getLogger(__name__)

MODEL, OPTIMIZER, COMMON = "model", "optimizer", "common"  # the checkpoint's top-level keys
SHARDED_PARTS = (MODEL, OPTIMIZER)


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


def replicated_state(part: Any) -> Any:
    """What a replicated part stores: its state_dict(), or the plain value itself."""
    return part.state_dict() if isinstance(part, Stateful) else part


def save_parts(ckpt_dir: str | Path, parts: Mapping[str, Any], meta: CheckpointMeta, *,
               overwrite: bool = False, field_name: str = "checkpoint") -> Path:
    """Write `parts` (see the module docstring) and `meta` as a complete checkpoint, atomically.
    Collective: call on every rank.  `field_name`: what the user called the output (`--out`,
    `output_dir`, ...), named in the one-line error when its folder cannot be made."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise CheckpointError(f"{str(ckpt_dir)!r} is an existing file, not a checkpoint "
                              "directory; choose another output path")
    if ckpt_dir.exists() and not overwrite:
        raise CheckpointError(f"{str(ckpt_dir)!r} already exists; pass --overwrite to replace it")
    start_writer_processes()
    tmp_dir = ckpt_dir.with_name(f".{ckpt_dir.name}.tmp")
    error = ""
    if rank() == 0:
        try:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            tmp_dir.mkdir(parents=True)
        except OSError as err:
            error = str(output_path_error(field_name, ckpt_dir, err))
    error = broadcast_str(error)
    if error:
        raise CheckpointError(error)
    writer_errors = WriterErrors()
    try:
        with writer_errors:
            _save_into(tmp_dir, ckpt_dir, parts, meta)
    except (Exception, CheckpointException) as err:  # torch's CheckpointException is a
        # BaseException; a full disk surfaces here wrapped in one
        if isinstance(err, CheckpointError):
            raise
        if rank() == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        raise CheckpointError(save_failure(ckpt_dir, writer_errors.os_error() or err)) from None
    logger.info("saved checkpoint %s (iteration %s)", ckpt_dir, meta.iteration)
    return ckpt_dir


def _save_into(tmp_dir: Path, ckpt_dir: Path, parts: Mapping[str, Any],
               meta: CheckpointMeta) -> None:
    from megatron.core import dist_checkpointing

    model_sd = parts[MODEL].sharded_state_dict()
    state: dict[str, Any] = {MODEL: model_sd, RNG_KEY: rng_sharded_object(rng_state())}
    if parts.get(OPTIMIZER) is not None:
        state[OPTIMIZER] = parts[OPTIMIZER].sharded_state_dict(model_sd)
    state[COMMON] = {name: replicated_state(part) for name, part in parts.items()
                     if name not in SHARDED_PARTS}
    dist_checkpointing.save(state, str(tmp_dir))
    checksums = hash_checkpoint(tmp_dir)  # every rank hashes (and fsyncs) its share
    sealed = dataclasses.replace(meta, checksums=checksums).sealed()
    error = ""
    if rank() == 0:
        try:
            write_meta_file(tmp_dir, sealed)
            fsync_path(tmp_dir)
            if ckpt_dir.exists():
                shutil.rmtree(ckpt_dir)
            os.replace(tmp_dir, ckpt_dir)
            fsync_path(ckpt_dir.parent)
            if meta.kind in TRAINING_KINDS:
                write_latest(ckpt_dir)
        except OSError as err:  # every rank must learn of it, or the others wait forever
            shutil.rmtree(tmp_dir, ignore_errors=True)
            error = save_failure(ckpt_dir, err)
    error = broadcast_str(error)
    if error:
        raise CheckpointError(error)


def load_parts(ckpt_dir: str | Path, parts: Mapping[str, Any], *, restore_rng: bool = True,
               strict: bool = True) -> dict[str, Any]:
    """Load into `parts` (the model, the optimizer if given, and every replicated part with
    `load_state_dict` whose saved state is not None); returns the checkpoint's whole replicated
    state ({name: state}, for what the caller restores conditionally) plus 'meta'.  Collective."""
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    verify_files(ckpt_dir, meta)
    model, optimizer = parts[MODEL], parts.get(OPTIMIZER)
    if optimizer is not None and not meta.get("has_optimizer", False):
        raise CheckpointError(
            f"checkpoint {str(ckpt_dir)!r} holds no optimizer state (kind={meta.get('kind')!r}); "
            "start a new run from it instead of resuming")
    model_sd = model.sharded_state_dict()
    template: dict[str, Any] = {MODEL: model_sd}
    # RNG states are stored per (pipeline, tensor) rank: only restorable at the same layout.
    restore_rng = restore_rng and meta.get("parallel_layout") == parallel_layout()
    if restore_rng:
        template[RNG_KEY] = rng_sharded_object(None)
    if optimizer is not None:
        template[OPTIMIZER] = optimizer.sharded_state_dict(model_sd, is_loading=True)
    try:
        loaded = dist_checkpointing.load(template, str(ckpt_dir))
    except (Exception, CheckpointException) as err:  # many types for damaged files; torch's
        # CheckpointException derives from BaseException
        raise CheckpointError(
            f"checkpoint {str(ckpt_dir)!r} could not be read: {root_cause(err)}; it is damaged or "
            "was written for a different model shape") from None
    incompatible = model.load_state_dict(loaded[MODEL], strict=False)
    missing = [k for k in incompatible.missing_keys if not k.endswith("_extra_state")]
    if strict and (missing or incompatible.unexpected_keys):
        raise CheckpointError(
            f"checkpoint {str(ckpt_dir)!r} does not match the model: missing {missing[:5]}, "
            f"unexpected {incompatible.unexpected_keys[:5]}")
    if optimizer is not None:
        adopt_schedule_hyperparameters(loaded[OPTIMIZER], optimizer, ckpt_dir)
        optimizer.load_state_dict(loaded[OPTIMIZER])
    common = loaded.get(COMMON) or {}
    for name, part in parts.items():
        if name not in SHARDED_PARTS and isinstance(part, Stateful) \
                and common.get(name) is not None:
            part.load_state_dict(common[name])
    if restore_rng and loaded.get(RNG_KEY) is not None:
        set_rng_state(loaded[RNG_KEY])
    logger.info("loaded checkpoint %s (iteration %s)", ckpt_dir, common.get("iteration"))
    return {**common, "meta": meta}


# ---------------------------------------------------------------- the keyword form used widely

def save_checkpoint(ckpt_dir: str | Path, *, cfg: Config, model: torch.nn.Module,
                    optimizer=None, scheduler=None, iteration: int = 0,
                    data_state: Optional[dict] = None, kind: str = "pretrain",
                    extra_meta: Optional[dict] = None, extra_common: Optional[dict] = None,
                    overwrite: bool = False, field_name: str = "checkpoint") -> Path:
    """`save_parts` of a model (+ optimizer, scheduler, data position) with its config.

    `extra_common`: more replicated parts ({name: state or Stateful}), e.g. a trainer's
    `{"extra": {"router": ..., "router_optimizer": ...}}`; `extra_meta`: JSON-serializable facts
    for `nemo_elastic.json` (e.g. the budget family)."""
    parts = {MODEL: model, OPTIMIZER: optimizer, "iteration": iteration,
             "data_state": data_state, "scheduler": scheduler, **(extra_common or {})}
    return save_parts(ckpt_dir, parts, checkpoint_meta(
        cfg, kind=kind, iteration=iteration, has_optimizer=optimizer is not None,
        extra=extra_meta), overwrite=overwrite, field_name=field_name)


def checkpoint_meta(cfg: Config, *, kind: str, iteration: int, has_optimizer: bool,
                    extra: Optional[dict] = None) -> CheckpointMeta:
    """The metadata of a checkpoint written now by this process (its parallel layout)."""
    extra = dict(extra or {})
    family = extra.pop("family", None)
    return CheckpointMeta(kind=kind, iteration=iteration, config=to_dict(cfg),
                          has_optimizer=has_optimizer, parallel_layout=parallel_layout(),
                          family=family, extra=extra)


def load_checkpoint(ckpt_dir: str | Path, *, model: torch.nn.Module, optimizer=None,
                    scheduler=None, restore_rng: bool = True, strict: bool = True) -> dict[str, Any]:
    """Load into existing objects; returns the replicated state with 'iteration', 'data_state'
    and 'meta' always present.  Collective."""
    parts = {MODEL: model, OPTIMIZER: optimizer}
    if scheduler is not None:
        parts["scheduler"] = scheduler
    state = load_parts(ckpt_dir, parts, restore_rng=restore_rng, strict=strict)
    return {**state, "iteration": state.get("iteration", 0),
            "data_state": state.get("data_state")}
