"""A checkpoint proves it is whole: `nemo_elastic.json` lists every file with its size and
SHA-256 (hashed once written, split over the ranks) and carries its own SHA-256 (the seal,
`meta_sha256`), so a damaged, missing or edited file is named instead of loading garbage.

Checkpoints written before checksums existed (no `checksums` entry) pass unverified; the seal
is checked only where `checksums` is present (a file without both is of the older format).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Optional

from nemo_elastic.checkpoint.collective import split_over_ranks
from nemo_elastic.checkpoint.durable import hash_file, write_text_durably
from nemo_elastic.checkpoint.errors import CheckpointError
from nemo_elastic.checkpoint.names import META_FILE

logger = logging.getLogger(__name__)

CHECKSUMS_KEY = "checksums"  # nemo_elastic.json: {file name: {"bytes": n, "sha256": hex}}
# nemo_elastic.json's own SHA-256 (of its JSON without this key, keys sorted): an edited or
# damaged metadata file (e.g. a budget's hidden_size changed) is refused like a damaged shard.
META_SHA_KEY = "meta_sha256"
RESTORE_FIX = "restore the file from a copy or use an earlier checkpoint"


def checkpoint_files(ckpt_dir: Path) -> list[str]:
    """Every file of a checkpoint folder (relative names) but its metadata file."""
    return sorted(str(p.relative_to(ckpt_dir)) for p in ckpt_dir.rglob("*")
                  if p.is_file() and p.name != META_FILE)


def hash_checkpoint(ckpt_dir: Path) -> dict:
    """{file: {"bytes", "sha256"}} of a written checkpoint folder; collective (every rank
    hashes, and fsyncs, its share)."""
    return split_over_ranks(checkpoint_files(ckpt_dir), lambda n: hash_file(ckpt_dir / n))


def meta_digest(meta: dict) -> str:
    """SHA-256 of `meta` as JSON (keys sorted, without META_SHA_KEY), computed on its JSON
    round trip so that the value written and the value read back hash alike."""
    body = json.loads(json.dumps({k: v for k, v in meta.items() if k != META_SHA_KEY}))
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def seal(meta: dict) -> dict:
    """`meta` with its seal (META_SHA_KEY) set; call last, after every other field."""
    meta[META_SHA_KEY] = meta_digest(meta)
    return meta


def check_seal(ckpt_dir: Path, meta: dict) -> None:
    want = meta.get(META_SHA_KEY)
    if want is None or CHECKSUMS_KEY not in meta:
        return  # written before the metadata was checksummed
    if want != meta_digest(meta):
        raise CheckpointError(
            f"checkpoint {str(ckpt_dir)!r}: {META_FILE} is corrupt (its contents differ from "
            f"the SHA-256 recorded at save time: edited or damaged); {RESTORE_FIX}")


def verify_files(ckpt_dir: str | Path, meta: dict) -> None:
    """Compare every file with the size and SHA-256 recorded at save time in `meta` (collective
    when distributed: the files are shared out over the ranks).  Raises CheckpointError naming
    the first damaged or missing file.  Checkpoints written before checksums existed pass."""
    ckpt_dir = Path(ckpt_dir)
    expected = meta.get(CHECKSUMS_KEY)
    if expected is not None:
        check_checksums_entry(ckpt_dir, expected)
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
        if hash_file(path)["sha256"] != want["sha256"]:
            return f"{name} is damaged: its SHA-256 differs from the one recorded at save time"
        return None

    problems = split_over_ranks(sorted(expected), check)
    bad = [problems[name] for name in sorted(problems) if problems[name]]
    if bad:
        raise CheckpointError(
            f"checkpoint {str(ckpt_dir)!r} is corrupt: {bad[0]}"
            f"{f' (and {len(bad) - 1} more file(s))' if len(bad) > 1 else ''}; {RESTORE_FIX}")


def check_checksums_entry(ckpt_dir: Path, expected) -> None:
    """`checksums` must map file names to {"bytes": int, "sha256": hex string}; anything else
    means nemo_elastic.json was edited or damaged: one line naming the file."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {str(ckpt_dir)!r}: {META_FILE} is corrupt ('{CHECKSUMS_KEY}' {what}); "
            f"{RESTORE_FIX}")

    if not isinstance(expected, dict):
        raise bad(f"is a {type(expected).__name__}, not a mapping of file names")
    for name, want in expected.items():
        if not isinstance(want, dict) or not isinstance(want.get("bytes"), int) \
                or isinstance(want.get("bytes"), bool) or not isinstance(want.get("sha256"), str):
            raise bad(f"entry {name!r} is {want!r}, not {{'bytes': N, 'sha256': HEX}}")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise bad(f"entry {name!r} is not a file name inside the checkpoint")


def write_meta_file(ckpt_dir: Path, meta: dict) -> None:
    """Write `meta` (already sealed) as the checkpoint's metadata file, durably."""
    write_text_durably(Path(ckpt_dir) / META_FILE, json.dumps(meta, indent=2, sort_keys=True))


def add_checksummed_files(ckpt_dir: str | Path, names: list[str]) -> None:
    """Files written into a finished (not yet published) checkpoint after `save_checkpoint`
    (an export's `megatron_config.json` and `export.json`, `prepare`'s ranking): hash them into
    `checksums` (and re-seal the metadata), so every file a command reads is verified."""
    ckpt_dir = Path(ckpt_dir)
    meta = json.loads((ckpt_dir / META_FILE).read_text())
    checksums = meta.setdefault(CHECKSUMS_KEY, {})
    for name in names:
        checksums[name] = hash_file(ckpt_dir / name)
    write_meta_file(ckpt_dir, seal(meta))
