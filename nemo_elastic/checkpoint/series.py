"""A run's `checkpoints/` folder: `iter_NNNNNNN/` checkpoints and `latest` (the name of the
newest complete one, replaced atomically after the checkpoint's own rename)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Optional

from nemo_elastic.checkpoint.collective import rank
from nemo_elastic.checkpoint.durable import write_text_durably
from nemo_elastic.checkpoint.meta import read_meta
from nemo_elastic.checkpoint.names import CHECKPOINTS_DIR, LATEST_FILE

logger = logging.getLogger(__name__)

def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, or a run's `checkpoints/` dir (-> its `latest`), or a run output dir."""
    path = Path(path)
    for candidate in (path, path / CHECKPOINTS_DIR):
        latest = candidate / LATEST_FILE
        if latest.is_file():
            return candidate / latest.read_text().strip()
    return path


def latest_checkpoint(checkpoints_dir: str | Path) -> Optional[Path]:
    """The checkpoint `latest` names (validated: a damaged one fails loudly instead of a run
    silently restarting from scratch), or None."""
    latest = Path(checkpoints_dir) / LATEST_FILE
    if not latest.is_file():
        return None
    path = Path(checkpoints_dir) / latest.read_text().strip()
    read_meta(path)
    return path


def latest_name(checkpoints_dir: Path) -> Optional[str]:
    """What `latest` names (unvalidated), or None."""
    latest = Path(checkpoints_dir) / LATEST_FILE
    return latest.read_text().strip() if latest.is_file() else None


def write_latest(ckpt_dir: Path) -> None:
    write_text_durably(ckpt_dir.parent / LATEST_FILE, ckpt_dir.name + "\n")


def prune_checkpoints(checkpoints_dir: str | Path, keep: Optional[int]) -> list[Path]:
    """Delete all but the newest `keep` `iter_*` checkpoints (never the one `latest` names);
    None keeps every one.  Rank 0 deletes; returns the deleted paths."""
    root = Path(checkpoints_dir)
    if keep is None or rank() != 0 or not root.is_dir():
        return []
    current = latest_name(root)
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
