"""Durable writes: every file and folder fsync'd before the rename that publishes it, so a
crash leaves the old version or the new one, never half of one."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

HASH_CHUNK = 16 << 20


def fsync_path(path: Path) -> None:
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
                fsync_path(path)
        fsync_path(Path(dirpath))


def replace_durably(src: Path, dst: Path) -> None:
    """os.replace(src, dst) of a complete file or folder: its contents fsync'd before, the
    rename itself (the parent folder) fsync'd after."""
    src, dst = Path(src), Path(dst)
    if src.is_dir():
        fsync_tree(src)
    else:
        fsync_path(src)
    os.replace(src, dst)
    fsync_path(dst.parent)
    if src.parent != dst.parent:
        fsync_path(src.parent)


def write_text_durably(path: Path, text: str) -> None:
    """Write `path` through a fsync'd temporary sibling and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def hash_file(path: Path) -> dict:
    """Size and SHA-256 of one file, fsync'd on the way (the bytes we hashed are on disk)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}
