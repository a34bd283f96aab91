"""dict <-> dataclass with strict key checking: unknown keys are named with the closest match.

Pure Python; shared by every config section (`config.py`, `config_elastic.py`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Mapping, get_type_hints

from nemo_elastic.errors import ConfigError


def _closest(name: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(sorted(valid))}"


def from_dict(cls: type, data: Mapping[str, Any], path: str = "") -> Any:
    """Build dataclass `cls` from a nested mapping (an instance passes through); unknown keys
    raise a ConfigError naming `path + key`."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path.rstrip('.') or 'config'}={data!r}: must be a mapping")
    hints = get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in valid:
            raise ConfigError(f"unknown config key {path + str(key)!r}{_closest(str(key), valid)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value or {}, f"{path}{key}.")
        else:
            kwargs[key] = check_type(value, hint, path + str(key))
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required config key(s): {', '.join(path + m for m in missing)}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # wrong types, or a section validated elsewhere
        raise ConfigError(f"{path.rstrip('.') or 'config'}: {err}") from err


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               list: "a list", tuple: "a list", dict: "a mapping"}


def check_type(value: Any, hint: Any, name: str, nullable: bool = False) -> Any:
    """`value` checked against the field's type hint (int, float, str, bool, list, dict and
    Optional of those; anything else passes).  Returns it, an integral float made an int and an
    int made a float; a wrong type or a non-finite float raises one line naming the field."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return check_type(value, options[0], name, nullable=True)
        return value
    base = origin or hint
    if base not in _TYPE_WORDS:
        return value
    ok = False
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
            and math.isfinite(value)
        if ok:
            value = float(value)
    elif base is str:
        ok = isinstance(value, str)
    elif base in (list, tuple):
        ok = isinstance(value, (list, tuple))
    elif base is dict:
        ok = isinstance(value, Mapping)
    if not ok and base is float and isinstance(value, float):
        raise ConfigError(f"{name}={value!r}: must be a finite number")
    if not ok:
        raise ConfigError(f"{name}={value!r}: must be {_TYPE_WORDS[base]}"
                          f"{' (or null)' if nullable else ''}")
    return value


def load_yaml(path: str | Path, field_name: str) -> Any:
    """A YAML (or JSON) file as plain Python data; a missing path, a directory or a syntax error
    raises one line naming `field_name`, the file, the line and the fix."""
    from omegaconf import OmegaConf

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{field_name}={str(path)!r} is a directory; pass a YAML file "
                          "(e.g. conf/tiny.yaml)")
    if not path.is_file():
        raise ConfigError(f"{field_name}={str(path)!r}: file does not exist")
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{field_name}={str(path)!r}: not a text file ({err.reason})") from None
    except OSError as err:
        raise ConfigError(f"{field_name}={str(path)!r}: cannot be read ({err.strerror})") from None
    except Exception as err:  # yaml's ScannerError/ParserError, OmegaConf's errors
        raise ConfigError(f"{field_name}={str(path)!r}: {yaml_problem(err)}; fix the file") \
            from None


def yaml_problem(err: BaseException) -> str:
    """One line for a YAML / OmegaConf error: the problem and where (line, column)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"invalid YAML{where}: {problem}"
