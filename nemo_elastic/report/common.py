"""Plain-text tables, strict JSON and matplotlib plots written to a run's output folder."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence


def json_safe(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None (NaN is not JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def strict_json(obj: Any, indent: Optional[int] = None) -> str:
    """`obj` as strict JSON: a non-finite number (a diverged loss) is null, never NaN."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


def fmt_loss(value: Optional[float]) -> str:
    """A loss in nats/token, as every table and log line prints it: 4 decimals, 'n/a' if absent."""
    return "n/a" if value is None or value != value else f"{value:.4f}"


def fmt_pct(value: Optional[float]) -> str:
    """A fraction (answer accuracy, share of parameters) as a percentage with one decimal."""
    return "n/a" if value is None or value != value else f"{100 * value:.1f}%"


def format_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(header)]
    line = "+".join("-" * (w + 2) for w in widths)
    fmt = lambda cells: "|".join(f" {c:<{w}} " for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(header), line, *(fmt(r) for r in rows)])


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """The same table in Markdown (the `report.md` files)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def plot_axes():
    """A headless (Agg) figure and axes of the size used for every plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.0), dpi=120)


def save_plot(fig, ax, path: Path, uniform_loss: Optional[float]) -> Path:
    import matplotlib.pyplot as plt

    if uniform_loss is not None:
        ax.axhline(uniform_loss, color="grey", linestyle="--", label="uniform guess")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_curves(history: list[dict], path: Path, *, uniform_loss: Optional[float] = None) -> Path:
    """Train / validation loss vs iteration (PNG)."""
    fig, ax = plot_axes()
    its = [h["iteration"] for h in history]
    ax.plot(its, [h["train_loss"] for h in history], label="train", linewidth=1)
    val = [(h["iteration"], h["val_loss"]) for h in history if "val_loss" in h]
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats/token)")
    return save_plot(fig, ax, path, uniform_loss)


def plot_budgets(records: list[dict], path: Path, *, uniform_loss: Optional[float] = None) -> Path:
    """Validation loss vs parameters of budget sub-networks, one line per weight ordering."""
    fig, ax = plot_axes()
    for name in dict.fromkeys(r["weights"] for r in records):
        rows = sorted((r["parameters"], r["val_loss"]) for r in records if r["weights"] == name)
        ax.plot(*zip(*rows), "o-", label=name)
    ax.set_xlabel("parameters of the sub-network")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("zero-shot prefix sub-networks")
    return save_plot(fig, ax, path, uniform_loss)
