"""`elastic.router.init: zero_shot`: each budget's router choice starts at the best zero-shot cut.

Why (issue 22 item 5): in hard mode the router hears only "scale the chosen prefix up or down",
never "another cut would be better", so a random start settles where its early noise put it.
In the main job's elastic stage the 50 % budget froze on a cut of Mamba heads, the axis that
costs most to cut, and lost to every fixed cut of the same size.

Candidates, on the router's own lattice: for every non-empty subset S of the router's axes and
every fraction f < 1 of `elastic.width_fractions`, each axis in S (every row of a heterogeneous
axis; depth: the layer count) takes its choice closest to f x its largest choice, every other
axis stays whole.  A budget's candidates are those whose cost - parameters, active parameters or
memory, as the budget loss counts it - is inside its band; each distinct cut is scored once by
`score(subnetwork)` (lower is better; the trainer's: LM loss of the initial weights on the first
`router.init_batches` training micro-batches, never validation data) and the lowest wins, ties
to the earlier candidate (fewer axes cut, larger f).  The full budget starts at the full model.
A budget with no candidate inside its band gets no offset (logged) and starts at random.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Callable

logger = logging.getLogger(__name__)


def uniform_cuts(router) -> list[dict[str, list[int]]]:
    """Distinct cuts {axis: choice index per output row} of every axis subset at every width
    fraction < 1, in order: fewer axes first, then larger fractions.  The full model is not
    one of them."""
    axes = list(router.routers)
    fractions = sorted({float(f) for f in router.config.width_fractions if f < 1},
                       reverse=True)
    cuts, seen = [], set()
    for k in range(1, len(axes) + 1):
        for subset in itertools.combinations(axes, k):
            for f in fractions:
                cut = {}
                for axis in subset:
                    sizes = router.choices[axis]
                    j = min(range(len(sizes)), key=lambda i: abs(sizes[i] - f * sizes[0]))
                    cut[axis] = [j] * router.routers[axis].n_outputs
                key = tuple((a, tuple(v)) for a, v in sorted(cut.items()) if any(v))
                if key and key not in seen:
                    seen.add(key)
                    cuts.append(cut)
    return cuts


def search_prior(router, score: Callable) -> tuple[dict, list[dict]]:
    """-> ({budget: {axis: indices}} for `ElasticRouter.set_prior`, one report row per budget).
    `score(SubNetwork) -> float` is called once per distinct cut inside some budget's band."""
    cuts = [(cut, router.hard_subnetwork(cut)) for cut in uniform_cuts(router)]
    costs = [router.cost_of(sub) for _, sub in cuts]
    scores: dict[int, float] = {}
    choices, report = {}, []
    for b, name in enumerate(router.names):
        if router.is_full(b):
            choices[name] = {axis: [0] * r.n_outputs for axis, r in router.routers.items()}
            continue
        inside = [j for j, cost in enumerate(costs) if router.inside_band(cost, b)]
        for j in inside:
            if j not in scores:
                scores[j] = float(score(cuts[j][1]))
        if not inside:
            logger.warning("router.init=zero_shot: no uniform cut of the lattice is inside "
                           "budget %s's band; its router starts at random", name)
            report.append({"budget": name, "candidates": 0})
            continue
        best = min(inside, key=lambda j: (scores[j], j))
        choices[name] = cuts[best][0]
        report.append({"budget": name, "candidates": len(inside), "loss": scores[best],
                       "fraction": costs[best] / router.full_cost,
                       "summary": cuts[best][1].describe(router.model),
                       "worst_loss": max(scores[j] for j in inside)})
    return choices, report


def apply_zero_shot_prior(cfg, router, model, data, info) -> list[dict]:
    """Score the cuts with the LM loss of `model` (the initial weights) on the first
    `router.init_batches` micro-batches of `data`'s TRAINING set (`cfg`: the first stage's), set
    the router's offsets and log the choices.  Every rank computes the same values (the loss is
    reduced over data-parallel ranks and pipeline stages) and so the same offsets."""
    from nemo_elastic.training.evaluation import validation_loss

    r = cfg.elastic.router
    on_train = dataclasses.replace(data, val_dataset=data.train_iter.dataset)
    search_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                    eval_iters=r.init_batches))

    def score(subnetwork) -> float:
        return validation_loss(search_cfg, model, on_train, 1, info, subnetwork=subnetwork,
                               all_stages=True)

    choices, report = search_prior(router, score)
    router.set_prior(choices, r.init_margin)
    for row in report:
        if row["candidates"]:
            logger.info("router.init=zero_shot: %s starts at %s (%s; "
                        "LM loss %.4f on %d training micro-batches, best of %d cuts in its band, "
                        "worst %.4f)", row["budget"], row["summary"], _cost_text(router, row),
                        row["loss"], r.init_batches, row["candidates"], row["worst_loss"])
    return report


def _cost_text(router, row: dict) -> str:
    """A start's size as its budget counts it: '77.9 % of the full cost', or for a memory
    budget '320.40 kB of the parent's 411.54 kB memory'."""
    if router.memory_spec is None:
        return f"{100 * row['fraction']:.1f} % of the full cost"
    from nemo_elastic.units import readable_bytes

    return (f"{readable_bytes(row['fraction'] * router.full_cost)} of the parent's "
            f"{readable_bytes(router.full_cost)} memory")
