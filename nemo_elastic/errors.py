"""Error types for problems in what the user gave us (a config, a file, a flag).

The CLI prints these as one line naming the field/path and the fix and exits with status 2;
any other exception is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad user input; the message names the field, value (or path) and the fix."""


class DataError(UserError):
    """A data file or tokenizer cannot be used as given."""


class ConfigError(UserError):
    """A configuration value breaks a rule; the message names the field, value and fix."""


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
