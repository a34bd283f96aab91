"""One run per run folder: `RunLock` (an exclusive flock on `RUN/.lock`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from nemo_elastic.checkpoint.collective import broadcast_str, rank
from nemo_elastic.errors import UserError, ensure_output_dir
from nemo_elastic.run.output_lock import try_flock, write_pid

LOCK_FILE = ".lock"


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

    `nested=True` (the main job's lock on its whole folder): while it is held, further
    OutputLocks on the same folder in this process are granted at once (the job's pretrain
    stage locks the folder itself).  Any other holder -- another process, or a plain lock in
    this one -- makes a second lock refuse.  The table of nestable folders is per process on
    purpose: a flock belongs to one open file, so this process would refuse itself otherwise."""

    _nestable: dict[Path, int] = {}  # resolved folder -> holders, this process

    def __init__(self, out_dir: str | Path, field_name: str, *, nested: bool = False) -> None:
        self.out_dir, self.field_name, self.nested = Path(out_dir), field_name, nested
        self._handle = None
        self._key: Optional[Path] = None

    def __enter__(self) -> "OutputLock":
        error = ""
        key = self.out_dir.resolve()
        table = OutputLock._nestable
        if rank() == 0 and key in table:
            table[key] += 1
            self._key = key
        elif rank() == 0:
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
                        table[key] = 1
                        self._key = key
            except UserError as err:
                error = str(err)
        error = broadcast_str(error)
        if error:
            raise UserError(error)
        return self

    def __exit__(self, *exc) -> None:
        table = OutputLock._nestable
        if self._key is not None:
            table[self._key] -= 1
            if not table[self._key]:
                del table[self._key]
            self._key = None
        if self._handle is not None:
            _drop_if_only_lock(self.out_dir)  # still locked: no other run can be inside
            self._handle.close()  # closing the file releases the flock
            self._handle = None
