"""A resumed optimizer adopts the current recipe's learning-rate / weight-decay schedule."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SCHEDULE_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")  # the LR/WD schedule's per-group
# values, which Megatron also uses to match saved optimizer param groups to the current ones


def adopt_schedule_hyperparameters(saved: Any, optimizer, ckpt_dir: Path) -> None:
    """A resume with a changed learning rate (train.lr / min_lr, elastic.lr / min_lr) or weight
    decay: the saved param groups get the current config's values, so Megatron finds them
    (it keys them by these values) and the new schedule applies from the resumed iteration
    (as Megatron-LM's --override-opt_param-scheduler).  Adam's moments are kept."""
    current = {tuple((k, g.get(k)) for k in SCHEDULE_KEYS) for g in optimizer.param_groups}
    if len(current) != 1:  # per-group schedules: leave Megatron's matching as it is
        return
    values = dict(next(iter(current)))
    changed = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            groups = node.get("param_groups")
            if isinstance(groups, list):
                for g in groups:
                    if isinstance(g, dict):
                        for k, v in values.items():
                            if k in g and g[k] != v:
                                changed.add(f"{k} {g[k]} -> {v}")
                                g[k] = v
            for v in node.values():
                if v is not groups:
                    walk(v)

    walk(saved)
    if changed:
        logger.warning("resuming %s with a changed learning-rate/weight-decay schedule (%s): "
                       "the new values apply from the resumed iteration", ckpt_dir,
                       ", ".join(sorted(changed)))
