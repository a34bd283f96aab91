"""Sizes as people read them (pure Python: the recipe checks use it without torch)."""


def readable_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def target_text(row: dict) -> str:
    """A budget's target with its unit: '0.75 of the parameters' or '0.5 GB (memory)'."""
    if row.get("budget_type") == "memory":
        return f"{readable_bytes(float(row['target']) * 1e9)} (memory)"
    return f"{row['target']:g} of the parameters"
