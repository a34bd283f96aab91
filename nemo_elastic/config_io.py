"""dict <-> dataclass with strict key checking: unknown keys are named with the closest match.

Pure Python; shared by every config section (`config.py`, `config_elastic.py`).
"""

from __future__ import annotations

import dataclasses
import difflib
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
            kwargs[key] = value
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
