"""Human-readable outputs of `prepare`: ``ranking.json`` and the layer-importance plot.

``ranking.json``::

    {"calibration": {aggregation, samples, tokens, seconds, ...},
     "hidden": {"permutation": [...], "sorted_scores": [...]},
     "layers": {"0": {"type": "M", "mamba_heads": {...}, "mamba_channels": {...}},
                "1": {"type": "-", "ffn": {...}}, "3": {"type": "*", "attention_heads": {...}}},
     "depth": {"selected": "iterative", "layer_ranking": [...least -> most important],
               "methods": {"iterative": {"order", "scores", "rounds"}, "one_shot": ..., "cosine": ...}}}

``permutation[new] = old`` (the parent's index now at position ``new``); ``sorted_scores`` are
the scores in the new order (non-increasing, within each group for heads).  Mamba
``mamba_channels`` ordered per head (the default) holds one list per parent head (``[H][P]``,
row h: head h's channel order and its per-(head, channel) scores in that order).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from nemo_elastic.config import ATTENTION, MAMBA, MLP, MOE, ModelConfig
from nemo_elastic.importance.depth import DepthRanking
from nemo_elastic.importance.order import Permutations
from nemo_elastic.importance.scores import ImportanceScores

LAYER_COLORS = {MAMBA: "tab:blue", ATTENTION: "tab:orange", MLP: "tab:green", MOE: "tab:purple"}
LAYER_NAMES = {MAMBA: "Mamba2", ATTENTION: "attention", MLP: "MLP", MOE: "MoE"}


def _axis(scores: torch.Tensor, perm: torch.Tensor) -> dict:
    """scores [n] and perm [n]; or per-head scores [H, P] and perm [H, P] (row by row)."""
    scores, perm = scores.cpu(), perm.cpu()
    ordered = scores.gather(1, perm) if perm.dim() == 2 else scores[perm]
    return {"permutation": perm.tolist(), "sorted_scores": ordered.tolist()}


def _scores_of(s, axis: str, p) -> torch.Tensor:
    """The scores an axis was sorted by: a per-head Mamba channel order [H, P] was sorted by
    the per-(head, channel) scores, a shared one [P] by the channel scores."""
    if axis == "mamba_channels" and p.mamba_channels.dim() == 2:
        return s.mamba_head_channel
    return getattr(s, axis)


def ranking_document(scores: ImportanceScores, perms: Permutations,
                     depth: Mapping[str, DepthRanking], selected: str) -> dict:
    layers = {}
    for i, s in scores.layers.items():
        p = perms.layers[i]
        layers[str(i)] = {"type": s.kind, **{axis: _axis(_scores_of(s, axis, p), getattr(p, axis))
                                              for axis in s.axes()}}
    return {
        "calibration": scores.summary(),
        "hidden": _axis(scores.hidden, perms.hidden),
        "layers": layers,
        "depth": {"selected": selected, "layer_ranking": depth[selected].order,
                  "methods": {name: r.to_dict() for name, r in depth.items()}},
    }


def write_ranking(path: Path, document: dict) -> Path:
    from nemo_elastic.report.common import strict_json

    path.write_text(strict_json(document, indent=1))
    return path


PANEL_TITLES = {
    "iterative": "iterative nMSE of logits (in the layer's removal round)",
    "one_shot": "one-shot nMSE of logits (layer removed alone)",
    "cosine": "1 - cos(layer input, output)",
}


def panel_data(ranking: DepthRanking, num_layers: int) -> tuple[list[float], list[int]]:
    """(bar heights, labels) of one ranking's panel, both from that ranking: the height is the
    layer's score, the label its position in the ranking's own drop order (1 = dropped first)."""
    position = {j: k + 1 for k, j in enumerate(ranking.order)}
    heights = [ranking.scores.get(j, float("nan")) for j in range(num_layers)]
    return heights, [position[j] for j in range(num_layers)]


def plot_layer_importance(depth: Mapping[str, DepthRanking], model_cfg: ModelConfig,
                          path: Path, selected: str = "iterative") -> Path:
    """One bar chart per depth ranking (iterative, one-shot, cosine - those computed), coloured
    by layer type.  In each panel the bar heights are that ranking's scores and the label above
    each bar is the layer's position in THAT ranking's drop order (1 = dropped first), so
    heights and labels always come from the same ranking.  The panel of `selected` (the ranking
    `prepare` stores in the checkpoint) is marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    symbols = model_cfg.layer_symbols
    layers = list(range(len(symbols)))
    panels = [(name, depth[name]) for name in PANEL_TITLES
              if name in depth and depth[name].scores]
    width = max(6.4, 0.45 * len(layers))  # readable bars for deep models
    fig, axes = plt.subplots(max(1, len(panels)), 1, figsize=(width, 2.6 * max(1, len(panels))),
                             dpi=120, squeeze=False)
    for ax, (name, ranking) in zip(axes[:, 0], panels):
        values, labels = panel_data(ranking, len(layers))
        bars = ax.bar(layers, values, color=[LAYER_COLORS[symbols[j]] for j in layers])
        for label, bar in zip(labels, bars):
            if bar.get_height() == bar.get_height():  # not NaN
                ax.annotate(str(label), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
        positive = [v for v in values if v == v and v > 0]
        if positive and max(positive) / min(positive) > 100:
            ax.set_yscale("log")
        used = " - used by prepare" if name == selected else ""
        ax.set_title(f"{PANEL_TITLES[name]}{used}", fontsize=9)
        ax.margins(y=0.18)  # room for the labels
        ax.set_xticks(layers)
        ax.set_xticklabels([f"{j}{symbols[j]}" for j in layers], fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    handles = [Patch(color=c, label=LAYER_NAMES[s]) for s, c in LAYER_COLORS.items()
               if s in symbols]
    fig.legend(handles=handles, fontsize=7, loc="upper center", ncol=len(handles))
    axes[-1, 0].set_xlabel("layer (label above a bar: its position in that panel's drop order, "
                           "1 = dropped first)")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.25 / fig.get_figheight()))
    fig.savefig(path)
    plt.close(fig)
    return path
