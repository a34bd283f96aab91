"""Megatron-Core distributed checkpoints: model (+ optimizer, scheduler, RNG, data position).

Layout of one checkpoint directory (any TP/PP size can load it; dist_checkpointing reshards):

    CKPT/
      .metadata, __*_*.distcp, metadata.json   Megatron dist_checkpointing (torch_dist)
      nemo_elastic.json                         resolved config + iteration + kind (human readable)

A training run keeps `OUTPUT/checkpoints/iter_0000100/...` and `OUTPUT/checkpoints/latest`
(text: the directory name of the newest complete checkpoint).  Every write goes to a temporary
sibling directory that is renamed only once complete, so a crash never leaves a checkpoint that
looks valid but is not; `latest` is replaced atomically after the rename.

Checkpoints prove they are whole: `nemo_elastic.json` lists every file with its size and SHA-256
(hashed once written, split over the ranks); `load_checkpoint` verifies them before reading, so a
damaged or missing file is named instead of loading garbage.  Every file and directory is
fsync'd before the rename that publishes it.  A failed save (e.g. no space left on device)
removes its partial directory and keeps the last good checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from nemo_elastic.config import Config, ConfigError, load_config, to_dict
from nemo_elastic.errors import UserError, output_path_error

logger = logging.getLogger(__name__)

META_FILE = "nemo_elastic.json"
LATEST_FILE = "latest"
FORMAT_VERSION = 1
TRAINING_KINDS = ("pretrain", "elastic")  # runs whose checkpoints/latest is kept up to date


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete or unreadable; the message names the path."""


CHECKSUMS_KEY = "checksums"  # nemo_elastic.json: {file name: {"bytes": n, "sha256": hex}}
# nemo_elastic.json's own SHA-256 (of its JSON without this key, keys sorted): an edited or
# damaged metadata file (e.g. a budget's hidden_size changed) is refused like a damaged shard.
# Checked where `checksums` is present (a file without both is of the older format).
META_SHA_KEY = "meta_sha256"
_HASH_CHUNK = 16 << 20


def root_cause(err: BaseException) -> str:
    """One line for what went wrong deep inside `err` (torch's CheckpointException pastes whole
    tracebacks into its message): the first OSError of the chain (strerror and file), else the
    innermost exception's first line."""
    seen, chain, cur = set(), [], err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append(cur)
        nxt = None
        failures = getattr(cur, "failures", None)  # CheckpointException: rank -> (exc, tb)
        if isinstance(failures, dict) and failures:
            first = next(iter(failures.values()))
            nxt = first[0] if isinstance(first, tuple) else first
        cur = nxt if isinstance(nxt, BaseException) else (cur.__cause__ or cur.__context__)
    for exc in chain:
        if isinstance(exc, OSError) and exc.strerror:
            where = f" ({exc.filename})" if exc.filename else ""
            return f"{exc.strerror.lower()}{where}"
    inner = chain[-1]
    text = (str(inner).strip().splitlines() or [""])[0]
    return f"{type(inner).__name__}: {text}" if text else type(inner).__name__


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (and `root`): call before the rename that
    publishes a folder, so a crash cannot leave it published with unwritten contents."""
    root = Path(root)
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if not path.is_symlink():
                _fsync_path(path)
        _fsync_path(Path(dirpath))


def replace_durably(src: Path, dst: Path) -> None:
    """os.replace(src, dst) of a complete file or folder: its contents fsync'd before, the
    rename itself (the parent folder) fsync'd after."""
    src, dst = Path(src), Path(dst)
    if src.is_dir():
        fsync_tree(src)
    else:
        _fsync_path(src)
    os.replace(src, dst)
    _fsync_path(dst.parent)
    if src.parent != dst.parent:
        _fsync_path(src.parent)


def _hash_file(path: Path) -> dict:
    """Size and SHA-256 of one file, fsync'd on the way (the bytes we hashed are on disk)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _checkpoint_files(ckpt_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(ckpt_dir)) for p in ckpt_dir.rglob("*")
                  if p.is_file() and p.name != META_FILE)


def _split_over_ranks(names: list[str], fn) -> dict:
    """{name: fn(name)} with the names shared out over the ranks (rank r: names[r::world])."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    local = {name: fn(name) for name in names[_rank()::world]}
    if world == 1:
        return local
    gathered: list = [None] * world
    dist.all_gather_object(gathered, local)
    return {k: v for part in gathered for k, v in part.items()}


def _hash_checkpoint(ckpt_dir: Path) -> dict:
    return _split_over_ranks(_checkpoint_files(ckpt_dir), lambda n: _hash_file(ckpt_dir / n))


def verify_checkpoint(ckpt_dir: str | Path, meta: Optional[dict] = None) -> None:
    """Compare every file with the size and SHA-256 recorded at save time (collective when
    distributed: the files are shared out over the ranks).  Raises CheckpointError naming the
    first damaged or missing file.  Checkpoints written before checksums existed pass."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir) if meta is None else meta
    expected = meta.get(CHECKSUMS_KEY)
    if expected is not None:
        _check_checksums_entry(ckpt_dir, expected)
    if not expected:
        logger.debug("checkpoint %s has no checksums (older format): not verified", ckpt_dir)
        return

    def check(name: str) -> Optional[str]:
        path, want = ckpt_dir / name, expected[name]
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size:,} bytes, {want['bytes']:,} when saved (truncated or replaced)"
        if _hash_file(path)["sha256"] != want["sha256"]:
            return f"{name} is damaged: its SHA-256 differs from the one recorded at save time"
        return None

    problems = _split_over_ranks(sorted(expected), check)
    bad = [problems[name] for name in sorted(problems) if problems[name]]
    if bad:
        raise CheckpointError(
            f"checkpoint {str(ckpt_dir)!r} is corrupt: {bad[0]}"
            f"{f' (and {len(bad) - 1} more file(s))' if len(bad) > 1 else ''}; restore the file "
            "from a copy or use an earlier checkpoint")


def _check_checksums_entry(ckpt_dir: Path, expected) -> None:
    """`checksums` must map file names to {"bytes": int, "sha256": hex string}; anything else
    means nemo_elastic.json was edited or damaged: one line naming the file."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {str(ckpt_dir)!r}: {META_FILE} is corrupt ('{CHECKSUMS_KEY}' {what}); "
            "restore the file from a copy or use an earlier checkpoint")

    if not isinstance(expected, dict):
        raise bad(f"is a {type(expected).__name__}, not a mapping of file names")
    for name, want in expected.items():
        if not isinstance(want, dict) or not isinstance(want.get("bytes"), int) \
                or isinstance(want.get("bytes"), bool) or not isinstance(want.get("sha256"), str):
            raise bad(f"entry {name!r} is {want!r}, not {{'bytes': N, 'sha256': HEX}}")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise bad(f"entry {name!r} is not a file name inside the checkpoint")


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
    meta = read_json_file(meta_path, f"checkpoint {str(ckpt_dir)!r}: {META_FILE}")
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"checkpoint {str(ckpt_dir)!r}: {META_FILE} has no 'config' entry"
                              "; restore the file from a copy or use an earlier checkpoint")
    _check_meta_fields(ckpt_dir, meta)
    _check_meta_digest(ckpt_dir, meta)
    # Megatron's own metadata.json (its sharded backend): garbage there fails deep inside the
    # load with no file name (StopIteration: 0)
    megatron_meta = read_json_file(ckpt_dir / "metadata.json",
                                   f"checkpoint {str(ckpt_dir)!r}: metadata.json")
    if not isinstance(megatron_meta, dict) or "sharded_backend" not in megatron_meta:
        raise CheckpointError(f"checkpoint {str(ckpt_dir)!r}: metadata.json is corrupt (no "
                              "'sharded_backend' entry); restore the file from a copy or use an "
                              "earlier checkpoint")
    return meta


def meta_digest(meta: dict) -> str:
    """SHA-256 of `meta` as JSON (keys sorted, without META_SHA_KEY), computed on its JSON
    round trip so that the value written and the value read back hash alike."""
    body = json.loads(json.dumps({k: v for k, v in meta.items() if k != META_SHA_KEY}))
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _check_meta_digest(ckpt_dir: Path, meta: dict) -> None:
    want = meta.get(META_SHA_KEY)
    if want is None or CHECKSUMS_KEY not in meta:
        return  # written before the metadata was checksummed
    if want != meta_digest(meta):
        raise CheckpointError(
            f"checkpoint {str(ckpt_dir)!r}: {META_FILE} is corrupt (its contents differ from "
            "the SHA-256 recorded at save time: edited or damaged); restore the file from a "
            "copy or use an earlier checkpoint")


def add_checksummed_files(ckpt_dir: str | Path, names: list[str]) -> None:
    """Files written into a finished (not yet published) checkpoint after `save_checkpoint`
    (an export's `megatron_config.json` and `export.json`, `prepare`'s ranking): hash them into
    `checksums` (and re-seal the metadata), so every file a command reads is verified."""
    ckpt_dir = Path(ckpt_dir)
    meta = json.loads((ckpt_dir / META_FILE).read_text())
    checksums = meta.setdefault(CHECKSUMS_KEY, {})
    for name in names:
        checksums[name] = _hash_file(ckpt_dir / name)
    meta[META_SHA_KEY] = meta_digest(meta)
    write_text_durably(ckpt_dir / META_FILE, json.dumps(meta, indent=2, sort_keys=True))


_FAMILY_ROW = {"name": str, "subnetwork": dict, "target": (int, float), "budget_type": str,
               "summary": str, "parameters": int, "parameter_fraction": (int, float),
               "memory_bytes": (int, float)}


def _check_meta_fields(ckpt_dir: Path, meta: dict) -> None:
    """The fields of nemo_elastic.json that commands read (iteration, kind, the trained budget
    family) have the types save_checkpoint wrote; an edited or damaged file is one line naming
    the file and the field, not a TypeError later."""
    def bad(field: str, value) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {str(ckpt_dir)!r}: {META_FILE} is corrupt ({field!r} is {value!r}); "
            "restore the file from a copy or use an earlier checkpoint")

    iteration = meta.get("iteration")
    if iteration is not None and (not isinstance(iteration, int) or isinstance(iteration, bool)
                                  or iteration < 0):
        raise bad("iteration", iteration)
    if not isinstance(meta.get("kind", ""), str):
        raise bad("kind", meta["kind"])
    family = meta.get("family")
    if family is None:
        return
    if not isinstance(family, list):
        raise bad("family", family)
    for row in family:
        if not isinstance(row, dict):
            raise bad("family", row)
        for key, kind in _FAMILY_ROW.items():
            value = row.get(key)
            if key in ("name", "subnetwork") or key in row:
                if not isinstance(value, kind) or isinstance(value, bool):
                    raise bad(f"family[{row.get('name')!r}].{key}", value)


def read_json_file(path: Path, what: str, *, error=None,
                   fix: str = "restore the file from a copy or use an earlier checkpoint") -> Any:
    """json.loads of a file this project wrote; an unreadable, cut or garbage file raises one
    line (`error`, default CheckpointError) naming it as `what`, with `fix`."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        cause = root_cause(err) if isinstance(err, OSError) else \
            f"not valid JSON: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        raise (error or CheckpointError)(
            f"{what} is corrupt ({cause}); {fix}") from None


def config_from_checkpoint(ckpt_dir: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """The checkpoint's stored config with `overrides` applied.  The model's shape is the
    checkpoint's: an override that changes it (beyond where the pipeline stages split) is an
    error naming the field, the checkpoint's value and the fix."""
    meta = read_meta(ckpt_dir)
    try:
        stored = load_config(base=meta["config"])
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {str(ckpt_dir)!r}: stored config is invalid: {err}") from err
    if not overrides:
        return stored
    cfg = load_config(base=meta["config"], overrides=overrides)
    check_model_matches(ckpt_dir, stored, cfg)
    return cfg


def check_model_matches(ckpt_dir, stored: Config, cfg: Config,
                        fix: str = "the model's shape comes from the checkpoint: drop the "
                        "override (to slice a smaller model use `nemo-elastic extract`)") -> None:
    """`cfg.model` must be the checkpoint's (`stored.model`) up to where the pipeline stages
    split: else one line naming the field, both values and `fix`."""
    old, new = to_dict(stored.model), to_dict(cfg.model)
    for key in old:
        same = old[key] == new.get(key)
        if key == "hybrid_layer_pattern" and isinstance(new.get(key), str):
            same = old[key].replace("|", "") == new[key].replace("|", "")
        if not same:
            raise ConfigError(
                f"model.{key}={new.get(key)!r} does not match checkpoint {str(ckpt_dir)!r}, which "
                f"holds model.{key}={old[key]!r}; {fix}")


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
    """Keep dist_checkpointing's writer in this process: no helper process at all.

    Megatron's torch_dist writer lazily spawns a `multiprocessing.Manager` (a server process of
    ~0.5 GB, plus multiprocessing's resource tracker) only to carry its writer threads' results
    back.  Our saves are synchronous: the threads run in this process, so a plain in-process
    queue does the same job.  Nothing is then left behind by a SIGKILL of the trainer, and a
    SIGTERM to the whole process group (Slurm, torchrun) cannot kill a helper that the
    preemption checkpoint needs.  Idempotent; `save_checkpoint` calls it too.
    """
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def save_checkpoint(ckpt_dir: str | Path, *, cfg: Config, model: torch.nn.Module,
                    optimizer=None, scheduler=None, iteration: int = 0,
                    data_state: Optional[dict] = None, kind: str = "pretrain",
                    extra_meta: Optional[dict] = None, extra_common: Optional[dict] = None,
                    overwrite: bool = False, field_name: str = "checkpoint") -> Path:
    """Write a complete checkpoint atomically. Call on every rank (collective).

    `field_name`: what the user called the output (`--out`, `output_dir`, ...), named in the
    one-line error when its folder cannot be made.

    `extra_common`: picklable, replicated state (identical on every rank, written once), e.g. the
    router's weights and optimizer (`{"extra": {"router": ..., "router_optimizer": ...}}`);
    `extra_meta`: JSON-serializable facts for `nemo_elastic.json` (e.g. the budget family).
    """

    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise CheckpointError(f"{str(ckpt_dir)!r} is an existing file, not a checkpoint "
                              "directory; choose another output path")
    if ckpt_dir.exists() and not overwrite:
        raise CheckpointError(f"{str(ckpt_dir)!r} already exists; pass --overwrite to replace it")
    start_writer_processes()
    tmp_dir = ckpt_dir.with_name(f".{ckpt_dir.name}.tmp")
    error = ""
    if _rank() == 0:
        try:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            tmp_dir.mkdir(parents=True)
        except OSError as err:
            error = str(output_path_error(field_name, ckpt_dir, err))
    error = _broadcast_str(error)
    if error:
        raise CheckpointError(error)
    writer_errors = _WriterErrors()
    try:
        with writer_errors:
            _save_into(tmp_dir, ckpt_dir, cfg=cfg, model=model, optimizer=optimizer,
                       scheduler=scheduler, iteration=iteration, data_state=data_state,
                       kind=kind, extra_meta=extra_meta, extra_common=extra_common)
    except (Exception, CheckpointException) as err:  # torch's CheckpointException is a
        # BaseException; a full disk surfaces here wrapped in one
        if isinstance(err, CheckpointError):
            raise
        if _rank() == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        raise CheckpointError(_save_failure(ckpt_dir, writer_errors.os_error() or err)) from None
    logger.info("saved checkpoint %s (iteration %d)", ckpt_dir, iteration)
    return ckpt_dir


class _WriterErrors(logging.Handler):
    """Megatron's writer threads log their exception (e.g. `[Errno 28] No space left on device:
    'FILE'`) and raise a RuntimeError that keeps only its class; collect those records during
    a save (instead of printing them) to recover the root cause."""

    LOGGER = "megatron.core.dist_checkpointing.strategies.filesystem_async"
    _ERRNO = re.compile(r"\[Errno (\d+)\] ([^:]+)(?:: '(.*)')?")

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> "_WriterErrors":
        self._logger = logging.getLogger(self.LOGGER)
        self._logger.addHandler(self)
        self._propagate, self._logger.propagate = self._logger.propagate, False
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self)
        self._logger.propagate = self._propagate

    def os_error(self) -> Optional[OSError]:
        for message in self.messages:
            match = self._ERRNO.search(message)
            if match:
                return OSError(int(match.group(1)), match.group(2), match.group(3))
        return None


def _save_failure(ckpt_dir: Path, err: BaseException) -> str:
    """The one line for a failed save: root cause, what is kept, the fix."""
    cause = root_cause(err)
    latest = ckpt_dir.parent / LATEST_FILE
    kept = (f"the last good checkpoint {str(ckpt_dir.parent / latest.read_text().strip())!r} is "
            "kept" if latest.is_file() else "no earlier checkpoint was touched")
    nospace = any(getattr(e, "errno", None) == errno.ENOSPC for e in _exc_chain(err)) \
        or "no space left" in cause
    fix = ("free disk space (or point the output elsewhere) and rerun the same command"
           if nospace else "check that the output path is writable and rerun")
    return f"saving checkpoint {str(ckpt_dir)!r} failed: {cause}; {kept}; {fix}"


def _exc_chain(err: BaseException) -> list[BaseException]:
    out, cur = [], err
    while cur is not None and cur not in out:
        out.append(cur)
        failures = getattr(cur, "failures", None)
        if isinstance(failures, dict) and failures:
            first = next(iter(failures.values()))
            out.append(first[0] if isinstance(first, tuple) else first)
        cur = cur.__cause__ or cur.__context__
    return out


def _save_into(tmp_dir: Path, ckpt_dir: Path, *, cfg, model, optimizer, scheduler, iteration,
               data_state, kind, extra_meta, extra_common) -> None:
    from megatron.core import dist_checkpointing

    model_sd = model.sharded_state_dict()
    state: dict[str, Any] = {"model": model_sd, "rng_state": _rng_sharded_object(_rng_state())}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd)
    common = {"iteration": iteration, "data_state": data_state,
              "scheduler": scheduler.state_dict() if scheduler is not None else None,
              **(extra_common or {})}
    state["common"] = common
    dist_checkpointing.save(state, str(tmp_dir))
    checksums = _hash_checkpoint(tmp_dir)  # every rank hashes (and fsyncs) its share

    meta = {"format_version": FORMAT_VERSION, "kind": kind, "iteration": iteration,
            "config": to_dict(cfg), "has_optimizer": optimizer is not None,
            "parallel_layout": _parallel_layout(), CHECKSUMS_KEY: checksums}
    meta.update(extra_meta or {})
    meta[META_SHA_KEY] = meta_digest(meta)
    error = ""
    if _rank() == 0:
        try:
            write_text_durably(tmp_dir / META_FILE, json.dumps(meta, indent=2, sort_keys=True))
            _fsync_path(tmp_dir)
            if ckpt_dir.exists():
                shutil.rmtree(ckpt_dir)
            os.replace(tmp_dir, ckpt_dir)
            _fsync_path(ckpt_dir.parent)
            if kind in TRAINING_KINDS:
                _write_latest(ckpt_dir)
        except OSError as err:  # every rank must learn of it, or the others wait forever
            shutil.rmtree(tmp_dir, ignore_errors=True)
            error = _save_failure(ckpt_dir, err)
    error = _broadcast_str(error)
    if error:
        raise CheckpointError(error)


def write_text_durably(path: Path, text: str) -> None:
    """Write `path` through a fsync'd temporary sibling and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _write_latest(ckpt_dir: Path) -> None:
    write_text_durably(ckpt_dir.parent / LATEST_FILE, ckpt_dir.name + "\n")


def prune_checkpoints(checkpoints_dir: str | Path, keep: Optional[int]) -> list[Path]:
    """Delete all but the newest `keep` `iter_*` checkpoints (never the one `latest` names);
    None keeps every one.  Rank 0 deletes; returns the deleted paths."""
    root = Path(checkpoints_dir)
    if keep is None or _rank() != 0 or not root.is_dir():
        return []
    latest = root / LATEST_FILE
    current = latest.read_text().strip() if latest.is_file() else None
    found = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("iter_"))
    doomed = [p for p in found[:max(0, len(found) - keep)] if p.name != current]
    for path in doomed:
        # rename first: a crash mid-delete leaves a hidden leftover, never a half checkpoint
        trash = path.with_name(f".{path.name}.deleting")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    if doomed:
        logger.info("kept the last %d checkpoint(s): deleted %s", keep,
                    ", ".join(p.name for p in doomed))
    return doomed


def load_checkpoint(ckpt_dir: str | Path, *, model: torch.nn.Module, optimizer=None,
                    scheduler=None, restore_rng: bool = True, strict: bool = True) -> dict[str, Any]:
    """Load into existing objects; returns {'iteration', 'data_state', 'meta'}. Collective."""
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    verify_checkpoint(ckpt_dir, meta)
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
            f"checkpoint {str(ckpt_dir)!r} could not be read: {root_cause(err)}; it is damaged or "
            "was written for a different model shape") from None
    incompatible = model.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in incompatible.missing_keys if not k.endswith("_extra_state")]
    if strict and (missing or incompatible.unexpected_keys):
        raise CheckpointError(
            f"checkpoint {str(ckpt_dir)!r} does not match the model: missing {missing[:5]}, "
            f"unexpected {incompatible.unexpected_keys[:5]}")
    if optimizer is not None:
        _adopt_schedule_hyperparameters(loaded["optimizer"], optimizer, ckpt_dir)
        optimizer.load_state_dict(loaded["optimizer"])
    common = loaded.get("common") or {}
    if scheduler is not None and common.get("scheduler") is not None:
        scheduler.load_state_dict(common["scheduler"])
    if restore_rng and loaded.get("rng_state") is not None:
        _set_rng_state(loaded["rng_state"])
    logger.info("loaded checkpoint %s (iteration %s)", ckpt_dir, common.get("iteration"))
    return {**common, "iteration": common.get("iteration", 0),
            "data_state": common.get("data_state"), "meta": meta}


_SCHEDULE_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")  # the LR/WD schedule's per-group
# values, which Megatron also uses to match saved optimizer param groups to the current ones


def _adopt_schedule_hyperparameters(saved: Any, optimizer, ckpt_dir: Path) -> None:
    """A resume with a changed learning rate (train.lr / min_lr, elastic.lr / min_lr) or weight
    decay: the saved param groups get the current config's values, so Megatron finds them
    (it keys them by these values) and the new schedule applies from the resumed iteration
    (as Megatron-LM's --override-opt_param-scheduler).  Adam's moments are kept."""
    current = {tuple((k, g.get(k)) for k in _SCHEDULE_KEYS) for g in optimizer.param_groups}
    if len(current) != 1:  # per-group schedules: leave Megatron's matching as it is
        return
    values = dict(next(iter(current)))
    changed = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            groups = node.get("param_groups")
            if isinstance(groups, list):
                for g in groups:
                    if isinstance(g, dict):
                        for k, v in values.items():
                            if k in g and g[k] != v:
                                changed.add(f"{k} {g[k]} -> {v}")
                                g[k] = v
            for v in node.values():
                if v is not groups:
                    walk(v)

    walk(saved)
    if changed:
        logger.warning("resuming %s with a changed learning-rate/weight-decay schedule (%s): "
                       "the new values apply from the resumed iteration", ckpt_dir,
                       ", ".join(sorted(changed)))


# ---------------------------------------------------------------------------------------------
# one run per output folder
# ---------------------------------------------------------------------------------------------

LOCK_FILE = ".lock"
# Folders this process holds with `nested=True` (resolved path -> how many holders): the
# pipeline's lock on its run folder, inside which its stages (pretrain on the same folder)
# take their own locks without refusing themselves.
_NESTABLE: dict[Path, int] = {}


def _drop_if_only_lock(out_dir: Path) -> None:
    """A run that wrote nothing (it failed at start-up) leaves no folder holding only `.lock`."""
    try:
        if [p.name for p in out_dir.iterdir()] == [LOCK_FILE]:
            (out_dir / LOCK_FILE).unlink()
            out_dir.rmdir()
    except OSError:
        pass  # not ours to clean, or already gone


class OutputLock:
    """An exclusive lock on a run's output folder, so that a second run on it refuses clearly
    instead of racing for its checkpoints.  Rank 0 creates the folder and holds `fcntl.flock`
    on `OUT/.lock` (the kernel drops it when the process ends, even by SIGKILL: no stale lock);
    every rank raises the same one-line UserError when another run holds it.  Collective.

    `nested=True` (the whole pipeline's lock): while it is held, further OutputLocks on the
    same folder in this process are granted at once.  Any other holder -- another process, or
    a plain lock in this one -- makes a second lock refuse."""

    def __init__(self, out_dir: str | Path, field_name: str, *, nested: bool = False) -> None:
        self.out_dir, self.field_name, self.nested = Path(out_dir), field_name, nested
        self._handle = None
        self._key: Optional[Path] = None

    def __enter__(self) -> "OutputLock":
        from nemo_elastic.errors import ensure_output_dir
        from nemo_elastic.output_lock import try_flock, write_pid

        error = ""
        key = self.out_dir.resolve()
        if _rank() == 0 and key in _NESTABLE:
            _NESTABLE[key] += 1
            self._key = key
        elif _rank() == 0:
            try:
                ensure_output_dir(self.out_dir, self.field_name)
                handle = open(self.out_dir / LOCK_FILE, "a+")
                holder = try_flock(handle)
                if holder is not None:
                    error = (f"{self.field_name}={str(self.out_dir)!r} is in use by another run "
                             f"(pid {holder}); wait for it to finish or choose another "
                             f"{self.field_name}")
                else:
                    write_pid(handle)
                    self._handle = handle
                    if self.nested:
                        _NESTABLE[key] = 1
                        self._key = key
            except UserError as err:
                error = str(err)
        error = _broadcast_str(error)
        if error:
            raise UserError(error)
        return self

    def __exit__(self, *exc) -> None:
        if self._key is not None:
            _NESTABLE[self._key] -= 1
            if not _NESTABLE[self._key]:
                del _NESTABLE[self._key]
            self._key = None
        if self._handle is not None:
            _drop_if_only_lock(self.out_dir)  # still locked: no other run can be inside
            self._handle.close()  # closing the file releases the flock
            self._handle = None
