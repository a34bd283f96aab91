"""Staged output folders: written hidden next to their place, moved in all at once, removed on
any failure, Ctrl-C or SIGTERM (`export` and `extract` write through it)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator, Mapping, Optional

from nemo_elastic.checkpoint import replace_durably
from nemo_elastic.errors import UserError
from nemo_elastic.export.common import honour_umask



class ExportInterrupted(KeyboardInterrupt):
    """SIGTERM during an export (handled like Ctrl-C: the staging folder is removed)."""

    signum = signal.SIGTERM


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise ExportInterrupted(f"signal {signum}: export interrupted, nothing written")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def staging(parent: Path, name: Optional[str] = None, *, overwrite: bool = False):
    """(staging folder, commit) — a hidden folder on the output's filesystem; `commit(sources,
    targets)` moves every staged folder into place.  New parent: one rename of the whole staging
    folder.  A target that exists at commit without `overwrite` (the caller checked it was
    absent, so another command wrote it meanwhile, e.g. `extract --out A/full` beside `export
    --out A`, whose locks differ) is refused before anything moves: the other command's output
    stays, nothing of this one is published.
    Removed on any exception, Ctrl-C and SIGTERM; a SIGKILL leaves it, named
    `.NAME.export-*` (NAME: `name`, default the parent's), and the next writer of NAME removes
    it (`output_lock.remove_stale_staging`).  Created with the umask's permissions.
    Megatron-Core (and the C extensions it pulls in, triton among them) is imported before the
    folder exists: a Ctrl-C inside such an import surfaces as an ImportError of a half-made
    extension rather than a KeyboardInterrupt, so it must not fall inside the staged write."""
    import megatron.core  # noqa: F401  (see above)

    parent = Path(parent).absolute()
    fresh = not parent.exists()
    base = parent.parent if fresh else parent
    created = [d for d in (base, *base.parents) if not d.exists()]  # removed again on failure
    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name or parent.name}.export-", dir=base))
    honour_umask(staging)  # mkdtemp makes 0700
    committed = False

    def commit(sources: Mapping[str, Path], targets: Mapping[str, Path]) -> None:
        nonlocal committed
        appeared = [str(t) for t in targets.values() if not overwrite and
                    (t.exists() or t.is_symlink())]
        if appeared:
            raise UserError(
                f"--out={appeared[0]!r} appeared while this command ran (another command wrote "
                "it at the same time); it is left as it is and nothing of this command's output "
                "was published: choose another --out, or rerun with --overwrite to replace it")
        committed = True
        if fresh and not parent.exists():
            replace_durably(staging, parent)  # the whole set appears at once
            return
        for name, target in targets.items():
            if target.exists():  # overwrite (checked): keep the old one until the new is in
                os.replace(target, staging / f".old-{target.name}")
            replace_durably(sources[name], target)

    try:
        with sigterm_raises():
            yield staging, commit
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not committed:
            for d in created:  # innermost first; only folders this export created, if empty
                with contextlib.suppress(OSError):
                    d.rmdir()
