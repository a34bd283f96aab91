"""Error types for problems in what the user gave us (a config, a file, a flag), and the
error contract of both command lines (`nemo-elastic`, NeMo-Run's `nemo elastic`).

The contract: a user error (`UserError`, or an `OSError` on a path the user gave) is printed as
one line naming the field/path and the fix (`user_error_line`) and the command exits with status
2; any other exception is a bug and keeps its traceback.  `setup_logging` is the logging both
command lines start with.
"""

import errno
import logging
import os
import sys
from typing import Optional


class UserError(ValueError):
    """Bad user input; the message names the field, value (or path) and the fix."""


class DataError(UserError):
    """A data file or tokenizer cannot be used as given."""


class ConfigError(UserError):
    """A configuration value breaks a rule; the message names the field, value and fix."""


def first_repeated(values):
    """The first value that occurs a second time in `values` (None: all distinct)."""
    seen = []
    for value in values:
        if value in seen:
            return value
        seen.append(value)
    return None


def fail(field_name: str, value, rule: str) -> None:
    """Raise the one-line ConfigError `field=value: rule`."""
    raise ConfigError(f"{field_name}={value!r}: {rule}")


def require_positive(obj, *names: str, prefix: str) -> None:
    """Each attribute `names` of `obj` must be a positive int (bools are not ints here)."""
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            fail(f"{prefix}{name}", value, "must be a positive integer")


def require_number(obj, *names: str, prefix: str, low: float = 0.0, low_open: bool = True,
                   high: float = float("inf")) -> None:
    """Each attribute must be a real number in (low, high] (or [low, high] with low_open=False);
    a string or NaN is named as such instead of failing inside a comparison."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            fail(f"{prefix}{name}", value, "must be a number")
        if (value <= low if low_open else value < low) or value > high:
            bracket = "(" if low_open else "["
            fail(f"{prefix}{name}", value, f"must be in {bracket}{low:g}, {high:g}]")


class TrainingDiverged(UserError):
    """The training loss became non-finite; the message names the iteration, stage and budgets
    and says which checkpoint is kept."""


def output_path_error(field_name: str, path, err: OSError) -> UserError:
    """One line for an OSError met while creating or writing output `path` of `field_name`."""
    import errno

    where = f"{field_name}={str(path)!r}"
    code = getattr(err, "errno", None)
    culprit = f" ({err.filename})" if getattr(err, "filename", None) not in (None, str(path)) \
        else ""
    if code in (errno.EEXIST, errno.ENOTDIR):
        return UserError(f"{where}: an existing file{culprit} is in the way of this directory; "
                         f"choose another {field_name} or move the file")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"{where}: not writable ({err.strerror.lower()}{culprit}); choose a "
                         f"{field_name} in a folder you can write to")
    if code == errno.ENOSPC:
        return UserError(f"{where}: no space left on device; free disk space or choose "
                         f"another {field_name}")
    return UserError(f"{where}: cannot be created ({(err.strerror or str(err)).lower()}"
                     f"{culprit}); choose another {field_name}")


def ensure_output_dir(path, field_name: str):
    """Create output directory `path` (and its parents); returns it as a Path.  An existing
    file in the way, a read-only or missing place raises one line naming `field_name`."""
    from pathlib import Path

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise output_path_error(field_name, path, err) from None
    _require_writable(path, field_name)
    return path


def _require_writable(path, field_name: str, error=UserError) -> None:
    """Existing folder `path` can be written into, else one line naming `field_name`."""
    import errno
    import os

    if not os.access(path, os.W_OK | os.X_OK):
        raise error(str(output_path_error(field_name, path, PermissionError(
            errno.EACCES, "Permission denied", str(path)))))


def check_output_path(path, field_name: str, overwrite: bool = False, error=UserError) -> None:
    """Before any work: output directory `path` of `field_name` can be written.  An existing
    file in the way (which --overwrite does not replace), an existing output without
    `overwrite`, or a place where the folder cannot be created raises one line naming
    `field_name`; nothing is left behind (a missing parent is probed by creating and removing
    it).  Raises `error` (a UserError class, e.g. CheckpointError)."""
    import errno
    import os
    from pathlib import Path

    path = Path(path)
    where = f"{field_name}={str(path)!r}"
    if path.exists() and not path.is_dir():
        raise error(f"{where}: an existing file is in the way (--overwrite replaces only an "
                        f"output folder); choose another {field_name} or move the file")
    if path.exists() and not overwrite:
        raise error(f"{where} already exists; add --overwrite to replace it")
    if path.is_dir() and overwrite:
        stranger = _not_an_output(path)
        if stranger is not None:
            raise error(f"{where} holds files that no nemo-elastic command wrote (e.g. "
                        f"{stranger!r}), and --overwrite would delete the whole folder; "
                        "--overwrite replaces only an earlier output (a checkpoint, an exported "
                        f"folder) or an empty folder: choose another {field_name}, or move "
                        "those files")
    probe = path.absolute()
    while not probe.parent.exists() and probe.parent != probe:
        probe = probe.parent
    parent = probe.parent
    if not parent.is_dir():
        raise error(str(output_path_error(field_name, path, NotADirectoryError(
            errno.ENOTDIR, "Not a directory", str(parent)))))
    if not path.exists():
        try:
            os.mkdir(probe)
            os.rmdir(probe)
        except OSError as err:
            raise error(str(output_path_error(field_name, path, err))) from None
    else:
        _require_writable(path, field_name, error)


# What marks a folder as one of our outputs (so --overwrite may replace it): a checkpoint
# (extract, prepare, import-hf, export --format megatron), an exported budget's record, or a
# Hugging Face model folder (export --format hf).
_OUTPUT_MARKERS = ((("nemo_elastic.json",), "a checkpoint"),
                   (("export.json",), "an exported budget"),
                   (("config.json", "model.safetensors"), "a Hugging Face model folder"),
                   (("config.json", "model.safetensors.index.json"), "a Hugging Face model folder"))


def output_kind(path) -> Optional[str]:
    """'a checkpoint' / 'an exported budget' / 'a Hugging Face model folder' when folder `path`
    is such an output of ours (by its marker files), else None."""
    from pathlib import Path

    path = Path(path)
    for marker, kind in _OUTPUT_MARKERS:
        if all((path / f).is_file() for f in marker):
            return kind
    return None


def _not_an_output(path) -> Optional[str]:
    """None when existing folder `path` is empty or an output a command of ours wrote (what
    --overwrite may replace); else the name of one entry in it, for the refusal."""
    entries = sorted(p.name for p in path.iterdir())
    if not entries or output_kind(path) is not None:
        return None
    return entries[0]


# ------------------------------------------------------------------ the command-line contract

def one_line(message: str) -> str:
    """`message` with every run of whitespace (newlines included) as one space."""
    return " ".join(message.split())


_OS_ERROR_FIXES = {
    errno.ENOENT: "check the path", errno.EEXIST: "choose another path or remove it",
    errno.ENOTDIR: "a file is in the way: choose another path",
    errno.EISDIR: "pass a file, not a directory",
    errno.EACCES: "choose a location you can read/write",
    errno.EPERM: "choose a location you can read/write",
    errno.EROFS: "choose a writable location",
    errno.ENOSPC: "free disk space or choose another location"}


def os_error_line(err: OSError) -> str:
    """'path: what went wrong; the fix' for an OSError (its own message if it has no errno)."""
    if not err.strerror:  # raised with a message of ours
        return str(err)
    where = f"{err.filename}: " if err.filename else ""
    return f"{where}{err.strerror.lower()}; {_OS_ERROR_FIXES.get(err.errno, 'check the path')}"


def user_error_line(err: BaseException) -> Optional[str]:
    """The one line a command prints for `err` when it is a user error; None for a bug."""
    if isinstance(err, UserError):  # CheckpointError, ConfigError, DataError, TrainingDiverged
        return one_line(str(err))
    if isinstance(err, OSError):  # a missing input, an output that cannot be written, full disk
        return one_line(os_error_line(err))
    return None


def setup_logging(verbose: bool) -> None:
    """Log lines on stderr (rank 0 at INFO, other ranks WARNING; DEBUG with `verbose`), with
    Megatron's and torch's GPU-only chatter quieted."""
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    # Megatron logs and warns a lot about GPU-only features; keep the output readable.
    logging.getLogger("megatron").setLevel(logging.WARNING if not verbose else logging.INFO)
    logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").setLevel(logging.ERROR)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    if not verbose:
        import warnings

        warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron(\..*)?")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed\..*")
