"""Where a command may write: never into, over or under what it reads, nor into a checkpoint or a
run folder another run owns.  One check (`check_output_location`) used by every command that
reads and writes (extract, export, import-hf, prepare, eval --out, preprocess, train).

Paths are compared after resolving symlinks (`Path.resolve`, also for parts that do not exist
yet), so a link to a checkpoint is the checkpoint.  Refused, each in one line naming the flag,
the path and the fix:

* the output equal to an input, inside an input, or a parent of an input (`--overwrite` would
  delete the input with it);
* the output inside a checkpoint (a folder holding `nemo_elastic.json`) or inside a run's
  `checkpoints/` folder (named so, holding `latest`): `train.keep_checkpoints` deletes
  checkpoints with whatever was written into them, and checksums do not cover strangers' files;
* the output holding a run (`checkpoints/latest` or `latest` inside it): `--overwrite` would
  delete the run;
* the output inside a run folder whose `.lock` another live process holds (a running train /
  pretrain / run owns that folder).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

from nemo_elastic.checkpoint.names import CHECKPOINTS_DIR, LATEST_FILE, META_FILE
from nemo_elastic.errors import UserError, output_kind
from nemo_elastic.run.lock import LOCK_FILE

PathLike = Union[str, os.PathLike]


def _resolved(path: PathLike) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def _inside(child: Path, parent: Path) -> bool:
    return child != parent and parent in child.parents


def check_output_location(out: PathLike, field_name: str, inputs: Mapping[str, PathLike] = {},
                          *, error=UserError, run_folder: bool = False) -> None:
    """Refuse output `out` (of flag `field_name`) where it would overlap the command's `inputs`
    ({what: path}, e.g. {"--ckpt": ckpt}), a checkpoint, or a folder another run owns.
    `run_folder`: `out` is a training run's own folder (it may hold its run; its `.lock` is
    checked by `run.lock.OutputLock`)."""
    target = _resolved(out)
    where = f"{field_name}={str(out)!r}"
    fix = f"choose another {field_name} outside it"
    for what, path in inputs.items():
        if path is None:
            continue
        source = _resolved(path)
        if target == source:
            raise error(f"{where} is the input {what}={str(path)!r} itself: the command would "
                        f"replace what it reads; choose another {field_name}")
        if _inside(target, source):
            raise error(f"{where} is inside the input {what}={str(path)!r}: the command would "
                        f"write into what it reads; {fix}")
        if _inside(source, target):
            harm = "a run deletes its old checkpoints" if run_folder else \
                "the command would replace (with --overwrite, delete) what it reads"
            raise error(f"{where} contains the input {what}={str(path)!r}: {harm}; {fix}")
    for folder in target.parents:
        if (folder / META_FILE).is_file():
            raise error(f"{where} is inside the checkpoint {str(folder)!r}: a checkpoint holds "
                        "only its own files (they are checksummed and deleted together); "
                        f"{fix}")
        if folder.name == CHECKPOINTS_DIR and (folder / LATEST_FILE).is_file():
            raise error(f"{where} is inside the checkpoints folder {str(folder)!r} of a run: "
                        f"it belongs to that run (old checkpoints are deleted there); {fix}")
        owner = _live_owner(folder)
        if owner is not None:
            raise error(f"{where} is inside the run folder {str(folder)!r}, which a running "
                        f"job (pid {owner}) owns; wait for it to finish or {fix}")
    if run_folder:
        kind = output_kind(target)
        if kind is not None:  # its config.json, metrics and checkpoints would go in among its files
            raise error(f"{where} is {kind}, not a run folder: the run would write its "
                        "config.json, metrics and checkpoints into it (a Hugging Face folder's "
                        f"config.json would be replaced); choose another {field_name}")
        return
    for marker in (Path(CHECKPOINTS_DIR) / LATEST_FILE, Path(LATEST_FILE)):
        if (target / marker).is_file():
            raise error(f"{where} holds a training run ({marker} is inside it): the command "
                        f"would replace it; choose another {field_name}")
    owner = _live_owner(target)
    if owner is not None:
        raise error(f"{where} is the run folder of a running job (pid {owner}); wait for it to "
                    f"finish or choose another {field_name}")


def _live_owner(folder: Path) -> Optional[str]:
    """The pid holding `folder/.lock` (run.lock.OutputLock) if another process holds it now.
    Only rank 0 asks: under torchrun rank 0 holds the job's own lock, and the other ranks'
    pids differ from the holder's (they follow rank 0's decisions, writing nothing alone)."""
    import fcntl

    if int(os.environ.get("RANK", "0") or 0) != 0:
        return None

    lock = folder / LOCK_FILE
    if not lock.is_file():
        return None
    try:
        with open(lock) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = handle.read().strip() or "unknown"
                return None if pid == str(os.getpid()) else pid
            fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError:
        return None
    return None


def checkpoint_inputs(ckpt: PathLike, flag: str = "--ckpt") -> dict[str, PathLike]:
    """{flag: ckpt} and what the run that wrote checkpoint `ckpt` reads: its init and teacher
    checkpoints (recorded in an elastic checkpoint's fingerprint).  An output over the run's
    parent would silently destroy its teacher (the run could no longer resume, and a later
    refusal would blame the recipe), so every reader of a checkpoint protects them too."""
    from nemo_elastic.checkpoint.fingerprint import recorded_checkpoints
    from nemo_elastic.checkpoint.meta import read_meta

    inputs: dict[str, PathLike] = {flag: ckpt}
    try:
        meta = read_meta(ckpt)
    except (OSError, UserError, ValueError):
        return inputs  # an unreadable checkpoint is refused by the command's own reading
    for field_name, path in recorded_checkpoints(meta).items():
        inputs[f"{flag}'s {field_name}"] = path
    return inputs


def check_outputs(outs: Iterable[PathLike], field_name: str, inputs: Mapping[str, PathLike],
                  *, error=UserError) -> None:
    """`check_output_location` for each of several outputs (e.g. PREFIX.bin and PREFIX.idx)."""
    for out in outs:
        check_output_location(out, field_name, inputs, error=error)
