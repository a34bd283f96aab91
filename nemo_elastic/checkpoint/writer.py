"""Megatron's torch_dist writer, kept in this process, and the one line for a failed save."""

from __future__ import annotations

import errno
import logging
import re
from pathlib import Path
from typing import Optional

from nemo_elastic.checkpoint.errors import exc_chain, root_cause
from nemo_elastic.checkpoint.series import latest_name


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


class WriterErrors(logging.Handler):
    """Megatron's writer threads log their exception (e.g. `[Errno 28] No space left on device:
    'FILE'`) and raise a RuntimeError that keeps only its class; collect those records during
    a save (instead of printing them) to recover the root cause."""

    LOGGER = "megatron.core.dist_checkpointing.strategies.filesystem_async"
    ERRNO = re.compile(r"\[Errno (\d+)\] ([^:]+)(?:: '(.*)')?")

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> "WriterErrors":
        self._logger = logging.getLogger(self.LOGGER)
        self._logger.addHandler(self)
        self._propagate, self._logger.propagate = self._logger.propagate, False
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self)
        self._logger.propagate = self._propagate

    def os_error(self) -> Optional[OSError]:
        for message in self.messages:
            match = self.ERRNO.search(message)
            if match:
                return OSError(int(match.group(1)), match.group(2), match.group(3))
        return None


def save_failure(ckpt_dir: Path, err: BaseException) -> str:
    """The one line for a failed save: root cause, what is kept, the fix."""
    cause = root_cause(err)
    current = latest_name(ckpt_dir.parent)
    kept = (f"the last good checkpoint {str(ckpt_dir.parent / current)!r} is "
            "kept" if current is not None else "no earlier checkpoint was touched")
    nospace = any(getattr(e, "errno", None) == errno.ENOSPC for e in exc_chain(err)) \
        or "no space left" in cause
    fix = ("free disk space (or point the output elsewhere) and rerun the same command"
           if nospace else "check that the output path is writable and rerun")
    return f"saving checkpoint {str(ckpt_dir)!r} failed: {cause}; {kept}; {fix}"
