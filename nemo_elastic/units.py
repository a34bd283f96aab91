"""Sizes as people read them (pure Python: the recipe checks use it without torch)."""


def readable_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def target_text(row: dict) -> str:
    """A budget's target with its unit: '0.75 of the parameters', '0.75 of the active
    parameters' (MoE) or '0.5 GB (memory)'."""
    if row.get("budget_type") == "memory":
        return f"{readable_bytes(float(row['target']) * 1e9)} (memory)"
    if row.get("budget_type") == "active":
        return f"{row['target']:g} of the active parameters"
    return f"{row['target']:g} of the parameters"


def parameters_text(row: dict) -> str:
    """A family row's size: '224,128 (73.7%)', and with MoE layers ', active 113,536 (80.1%)'
    (what one token touches, as a fraction of the parent's active parameters)."""
    text = f"{row['parameters']:,} ({row['parameter_fraction']:.1%})"
    if "active_parameters" in row:
        text += f", active {row['active_parameters']:,}"
        if "active_fraction" in row:  # rows written before it was stored lack it
            text += f" ({row['active_fraction']:.1%})"
    return text


def memory_text(row: dict) -> str:
    """', memory 210.30 kB' for a memory budget's family row (its size in its target's unit,
    at the row's `memory_spec`); '' for a params / active budget."""
    if row.get("budget_type") != "memory" or "memory_bytes" not in row:
        return ""
    return f", memory {readable_bytes(float(row['memory_bytes']))}"


def size_text(row: dict) -> str:
    """A family row's size as every table shows it: `parameters_text`, and for a memory budget
    its memory (`memory_text`), so that a budget given in GB is shown in bytes too."""
    return parameters_text(row) + memory_text(row)
