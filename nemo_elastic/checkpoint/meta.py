"""A checkpoint's typed metadata (`nemo_elastic.json`): what it is, how far it was trained,
the config it was trained with, and, for an elastic checkpoint, its budget family.

`CheckpointMeta` is the one place that knows the fields and their types: `save_checkpoint`
builds one, `read_meta` checks a file through one, so an edited or damaged file is one line
naming the file and the field instead of a TypeError later.  Fields a writer adds (`segment`,
`fingerprint`, `importance`, an export's `parent`, ...) ride along in `extra` and are written
at the top level of the JSON, as before the type existed (old files read unchanged).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

from nemo_elastic.checkpoint.errors import CheckpointError, root_cause
from nemo_elastic.checkpoint.integrity import CHECKSUMS_KEY, META_SHA_KEY, RESTORE_FIX, \
    check_seal, seal, verify_files
from nemo_elastic.checkpoint.names import CHECKPOINTS_DIR, LATEST_FILE, MEGATRON_FILES, META_FILE

FORMAT_VERSION = 1
TRAINING_KINDS = ("pretrain", "elastic")  # runs whose checkpoints/latest is kept up to date

# one row of an elastic checkpoint's family: field -> accepted types (name and subnetwork
# always present, the others checked where present)
FAMILY_ROW = {"name": str, "subnetwork": dict, "target": (int, float), "budget_type": str,
              "summary": str, "parameters": int, "parameter_fraction": (int, float),
              "memory_bytes": (int, float)}
_REQUIRED_ROW_KEYS = ("name", "subnetwork")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointMeta:
    """The fields of `nemo_elastic.json` (see the module docstring)."""

    kind: str
    iteration: Optional[int]
    config: dict  # the resolved recipe (`config.to_dict`)
    has_optimizer: bool = False
    parallel_layout: Optional[list] = None  # [PP, TP] the checkpoint was written at
    checksums: Optional[dict] = None  # {file: {"bytes", "sha256"}}; None: older format
    family: Optional[list[dict]] = None  # an elastic checkpoint's budgets (FAMILY_ROW each)
    format_version: int = FORMAT_VERSION
    extra: dict = dataclasses.field(default_factory=dict)  # writer-specific fields

    _FIELDS = ("kind", "iteration", "config", "has_optimizer", "parallel_layout", "checksums",
               "family", "format_version")

    def as_dict(self) -> dict[str, Any]:
        """The JSON object written to disk (unsealed): extra fields at the top level; fields of
        an older format that were absent stay absent."""
        out = {k: getattr(self, k) for k in self._FIELDS}
        for key in ("family", "parallel_layout", CHECKSUMS_KEY):
            if out[key] is None:
                del out[key]
        out.update(self.extra)
        return out

    def sealed(self) -> dict[str, Any]:
        return seal(self.as_dict())

    @classmethod
    def from_dict(cls, raw: dict, ckpt_dir: Path | str = "?") -> "CheckpointMeta":
        """Check the fields commands read; raises CheckpointError naming `ckpt_dir`'s file."""
        check_fields(Path(ckpt_dir), raw)
        known = {k: raw[k] for k in cls._FIELDS if k in raw}
        extra = {k: v for k, v in raw.items() if k not in cls._FIELDS and k != META_SHA_KEY}
        known.setdefault("kind", "")
        known.setdefault("iteration", None)
        return cls(**known, extra=extra)

    @classmethod
    def read(cls, ckpt_dir: str | Path) -> "CheckpointMeta":
        return cls.from_dict(read_meta(ckpt_dir), ckpt_dir)


def read_json_file(path: Path, what: str, *, error=None, fix: str = RESTORE_FIX) -> Any:
    """json.loads of a file this project wrote; an unreadable, cut or garbage file raises one
    line (`error`, default CheckpointError) naming it as `what`, with `fix`."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        cause = root_cause(err) if isinstance(err, OSError) else \
            f"not valid JSON: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        raise (error or CheckpointError)(
            f"{what} is corrupt ({cause}); {fix}") from None


PASS_A_CHECKPOINT = ("pass a checkpoint folder (the one holding nemo_elastic.json) or a run's "
                     "output folder (its latest checkpoint is used)")


def _pruned(ckpt_dir: Path) -> Optional[str]:
    """For a missing checkpoint of a run's series whose `latest` names another one: it was
    pruned (train.keep_checkpoints), possibly while this command read the run; else None."""
    latest = ckpt_dir.parent / LATEST_FILE
    if ckpt_dir.parent.name != CHECKPOINTS_DIR or not latest.is_file():
        return None
    newest = latest.read_text().strip()
    if newest == ckpt_dir.name:
        return None
    return (f"the run in {str(ckpt_dir.parent.parent)!r} is now at {newest} (its `latest`); "
            "with train.keep_checkpoints a run deletes older checkpoints as it saves, also "
            "while a command reads them: rerun to read the newest, or pass a checkpoint the "
            "run keeps")


def _not_a_checkpoint(folder: Path) -> str:
    """Why a folder without nemo_elastic.json is not a checkpoint, and what to pass instead."""
    weights = any(folder.glob("*.safetensors")) or \
        (folder / "model.safetensors.index.json").is_file()
    if (folder / "config.json").is_file() and weights:
        return ("it is a Hugging Face folder; convert it with `nemo-elastic import-hf "
                f"{folder} --out CKPT` and pass CKPT")
    if (folder / CHECKPOINTS_DIR).is_dir():
        return ("a run folder whose checkpoints/ has no `latest` (the run saved no checkpoint "
                "yet, or was stopped before its first save); rerun it, or pass a checkpoint "
                "folder")
    return f"not a nemo_elastic checkpoint, or an interrupted write; {PASS_A_CHECKPOINT}"


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    """Read `nemo_elastic.json` (checked field by field and against its seal) as a dict; raises
    CheckpointError naming the path if missing/corrupt.  `CheckpointMeta.read`: the typed view."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.exists():
        raise CheckpointError(f"checkpoint {str(ckpt_dir)!r} does not exist; "
                              f"{_pruned(ckpt_dir) or PASS_A_CHECKPOINT}")
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint {str(ckpt_dir)!r} is not a directory; "
                              f"{PASS_A_CHECKPOINT}")
    meta_path = ckpt_dir / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {str(ckpt_dir)!r} has no {META_FILE}: "
                              f"{_not_a_checkpoint(ckpt_dir)}")
    for required in MEGATRON_FILES:
        if not (ckpt_dir / required).is_file():
            raise CheckpointError(
                f"checkpoint {str(ckpt_dir)!r} is incomplete: {required} is missing")
    meta = read_json_file(meta_path, f"checkpoint {str(ckpt_dir)!r}: {META_FILE}")
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"checkpoint {str(ckpt_dir)!r}: {META_FILE} has no 'config' entry"
                              f"; {RESTORE_FIX}")
    check_fields(ckpt_dir, meta)
    check_seal(ckpt_dir, meta)
    # Megatron's own metadata.json (its sharded backend): garbage there fails deep inside the
    # load with no file name (StopIteration: 0)
    megatron_meta = read_json_file(ckpt_dir / "metadata.json",
                                   f"checkpoint {str(ckpt_dir)!r}: metadata.json")
    if not isinstance(megatron_meta, dict) or "sharded_backend" not in megatron_meta:
        raise CheckpointError(f"checkpoint {str(ckpt_dir)!r}: metadata.json is corrupt (no "
                              f"'sharded_backend' entry); {RESTORE_FIX}")
    return meta


def check_fields(ckpt_dir: Path, meta: dict) -> None:
    """The fields of nemo_elastic.json that commands read (iteration, kind, the trained budget
    family) have the types save_checkpoint wrote; an edited or damaged file is one line naming
    the file and the field, not a TypeError later."""
    def bad(field: str, value) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {str(ckpt_dir)!r}: {META_FILE} is corrupt ({field!r} is {value!r}); "
            f"{RESTORE_FIX}")

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
        for key, kind in FAMILY_ROW.items():
            value = row.get(key)
            if key in _REQUIRED_ROW_KEYS or key in row:
                if not isinstance(value, kind) or isinstance(value, bool):
                    raise bad(f"family[{row.get('name')!r}].{key}", value)


def verify_checkpoint(ckpt_dir: str | Path, meta: Optional[dict] = None) -> None:
    """Every file of `ckpt_dir` against the checksums of `meta` (read from `ckpt_dir` when not
    given); collective when distributed."""
    verify_files(ckpt_dir, read_meta(ckpt_dir) if meta is None else meta)
