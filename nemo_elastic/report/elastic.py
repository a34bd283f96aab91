"""Plots and TensorBoard events of an elastic run, rebuilt from its metrics history."""

from __future__ import annotations

import logging
from pathlib import Path

from nemo_elastic.report.common import plot_axes, save_plot

logger = logging.getLogger(__name__)


def plot_kd_by_budget(history: list[dict], names: list[str], path: Path) -> Path:
    """Training KD loss of each budget (micro-batches that drew it) and its validation LM loss."""
    fig, ax = plot_axes()
    for k, name in enumerate(names):
        pts = [(h["iteration"], h["kd_by_budget"][name]) for h in history
               if name in h.get("kd_by_budget", {})]
        color = f"C{k}"
        if pts:
            ax.plot(*zip(*pts), linewidth=0.8, alpha=0.7, color=color, label=f"{name} KD (train)")
        val = [(h["iteration"], h["val_by_budget"][name]) for h in history
               if name in h.get("val_by_budget", {})]
        if val:
            ax.plot(*zip(*val), "o--", color=color, label=f"{name} LM loss (val)")
    for h in history[1:]:
        if h.get("stage") != history[history.index(h) - 1].get("stage"):
            ax.axvline(h["iteration"], color="grey", linewidth=0.8)  # curriculum stage change
    ax.set_xlabel("iteration")
    ax.set_ylabel("nats/token")
    ax.set_title("per-budget distillation")
    return save_plot(fig, ax, path, None)


def plot_router_choices(history: list[dict], names: list[str], router, path: Path) -> Path:
    """Each budget's chosen size on every axis, as a fraction of the parent's, over training."""
    import matplotlib.pyplot as plt

    records = [h for h in history if "choices" in h]
    axes_names = [*router.choices, "params_fraction"]
    fig, axs = plt.subplots(1, len(axes_names), figsize=(3.0 * len(axes_names), 3.2), dpi=120,
                            squeeze=False)
    for ax, axis in zip(axs[0], axes_names):
        full = max(router.choices[axis]) if axis in router.choices else 1.0
        for k, name in enumerate(names):
            pts = [(h["iteration"], h["choices"][name][axis] / full) for h in records]
            if pts:
                ax.plot(*zip(*pts), color=f"C{k}", label=name)
        ax.set_title("parameters" if axis == "params_fraction" else axis)
        ax.set_xlabel("iteration")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axs[0][0].set_ylabel("chosen size / parent")
    axs[0][-1].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_tensorboard(history: list[dict], log_dir: Path) -> None:
    """Scalars of every iteration as TensorBoard events (rewritten from the whole history)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency; a stripped environment may lack it
        logger.warning("tensorboard is not installed: no event files in %s", log_dir)
        return
    import shutil

    shutil.rmtree(log_dir, ignore_errors=True)
    writer = SummaryWriter(str(log_dir))
    try:
        for h in history:
            it = h["iteration"]
            for key in ("kd", "budget_loss", "ce", "lr", "router_lr", "tau", "logit_scale",
                        "grad_norm", "router_grad_norm"):
                if isinstance(h.get(key), (int, float)):
                    writer.add_scalar(f"train/{key}", h[key], it)
            for group in ("kd_by_budget", "val_by_budget"):
                for name, value in h.get(group, {}).items():
                    writer.add_scalar(f"{group}/{name}", value, it)
            for name, sizes in h.get("choices", {}).items():
                for axis, size in sizes.items():
                    writer.add_scalar(f"choices/{name}/{axis}", size, it)
    finally:
        writer.close()
