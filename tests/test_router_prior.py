"""`elastic.router.init: zero_shot` (issue 22 item 5): each budget's router choice starts at the
best zero-shot uniform cut inside its band.

Oracles: the cuts are enumerated independently (every combination of the lattice's choices,
kept when it is a uniform cut: each cut axis at its choice nearest one common fraction) and costed
with the closed-form cost model; the score of the winner is recomputed as the LM loss of the
physically sliced model (`slice_model`) on the training micro-batches, by hand."""

import itertools
import shutil

import pytest
import torch

from nemo_elastic.config import ConfigError
from nemo_elastic.config_elastic import ElasticConfig
from nemo_elastic.cost_model import count_parameters, subnetwork_parameters
from nemo_elastic.elastic.router_prior import search_prior
from nemo_elastic.elastic.subnet import SubNetwork
from nemo_elastic.router import PRIOR_PREFIX, ElasticRouter
from nemo_elastic.sizes import ELASTIC_AXES
from tests.conftest import tiny_config

BUDGETS = {"full": 1.0, "75pct": 0.75, "50pct": 0.5}
FRACTIONS = [1.0, 0.9375, 0.875, 0.8125, 0.75, 0.6875, 0.625, 0.5625, 0.5, 0.4375, 0.375]


def _model():
    return tiny_config({"hybrid_layer_pattern": "M-*M-M-", "mamba_num_heads": 8,
                        "mamba_num_groups": 2, "hidden_size": 64, "ffn_hidden_size": 128,
                        "kv_channels": 16}).model


def _router(init="zero_shot", **kw):
    e = ElasticConfig(iters=100, warmup_iters=0, budgets=BUDGETS, width_fractions=FRACTIONS,
                      router={"hidden_dim": 16, "init": init}, **kw)
    return ElasticRouter(_model(), e, total_iters=100)


def _planted(m):
    """A made-up loss of a sub-network's sizes: hidden costs most to cut, attention least."""
    weights = {"hidden_size": 3.0, "mamba_num_heads": 1.3, "num_attention_heads": 0.2,
               "ffn_hidden_size": 0.7}

    def score(sub: SubNetwork) -> float:
        sizes = {"hidden_size": sub.hidden_size, **{
            f: getattr(layer, f) for layer in sub.layers for f in weights
            if getattr(layer, f, None) is not None}}
        return sum(w * (1 - sizes[f] / getattr(m, f)) for f, w in weights.items())
    return score


def _uniform_cuts_by_enumeration(router):
    """Every combination of the lattice's choices that is a uniform cut (each axis whole or at
    its choice nearest one fraction f < 1 common to the cut axes), as SubNetworks built from
    sizes."""
    m, axes = router.model, list(router.choices)
    nearest = lambda axis, f: min(router.choices[axis],  # noqa: E731
                                  key=lambda c: abs(c - f * router.choices[axis][0]))
    out = []
    for sizes in itertools.product(*(router.choices[a] for a in axes)):
        cut = {a: s for a, s in zip(axes, sizes) if s != router.choices[a][0]}
        if cut and any(all(nearest(a, f) == s for a, s in cut.items())
                       for f in FRACTIONS if f < 1):
            out.append(SubNetwork.uniform(m, **{ELASTIC_AXES[a][1]: s for a, s in cut.items()}))
    return out


def test_search_takes_the_lowest_scoring_uniform_cut_inside_each_band():
    router = _router()
    m, full = router.model, count_parameters(router.model)
    score, calls = _planted(m), []
    choices, report = search_prior(router, lambda sub: calls.append(sub) or score(sub))
    candidates = _uniform_cuts_by_enumeration(router)
    assert len({c.describe(m) for c in calls}) == len(calls)  # each cut scored once
    for b, (name, target) in enumerate(BUDGETS.items()):
        chosen = router.hard_subnetwork(choices[name])
        if target == 1.0:
            assert chosen == SubNetwork.full(m)
            continue
        inside = [c for c in candidates
                  if abs(subnetwork_parameters(m, c) / (target * full) - 1) <= 0.05 + 1e-9]
        assert inside, name
        best = min(inside, key=score)
        assert chosen.describe(m) == best.describe(m), name
        row = next(r for r in report if r["budget"] == name)
        assert row["candidates"] == len(inside) and row["loss"] == pytest.approx(score(best))


def test_the_offsets_make_the_search_choice_the_routers_start():
    router = _router()
    choices, _ = search_prior(router, _planted(router.model))
    router.set_prior(choices, 2.0)
    family = router.family()
    for name in BUDGETS:
        assert family[name] == router.hard_subnetwork(choices[name]), name
    # under the first iteration's Gumbel noise (tau 1, scale 1) each axis draws the chosen
    # choice more often than any other (the router still explores the rest)
    b = router.index("50pct")
    for axis, idx in choices["50pct"].items():
        drawn = [int(router(b, iteration=0, micro_batch=k).probs[axis][0].argmax())
                 for k in range(200)]
        assert max(set(drawn), key=drawn.count) == idx[0], axis
    router.set_prior(choices, 0.0)  # no offset: the random router's own argmax again
    assert router.family() == _router().family()
    with pytest.raises(ValueError, match="router.init=zero_shot"):
        _router(init="random").set_prior(choices, 2.0)


def test_router_init_is_validated_and_a_budget_reorder_moves_its_offsets():
    from pathlib import Path

    from nemo_elastic.checkpoint.fingerprint import permute_router_state

    with pytest.raises(ConfigError, match="elastic.router.init='warm'"):
        _router(init="warm")
    with pytest.raises(ConfigError, match="elastic.router.init_batches=0"):
        ElasticConfig(router={"init_batches": 0})
    router = _router()
    router.set_prior(search_prior(router, _planted(router.model))[0], 2.0)
    state = {"router": router.state_dict()}
    order = ["50pct", "full", "75pct"]
    moved = permute_router_state(state, list(BUDGETS), order, Path("x"))["router"]
    keys = [k for k in state["router"] if k.startswith(PRIOR_PREFIX)]
    assert keys
    for key in keys:
        for j, name in enumerate(order):
            assert torch.equal(moved[key][j], state["router"][key][list(BUDGETS).index(name)])


def _lm_loss_by_hand(model, dataset, n):
    """Token-mean cross-entropy over the loss mask of the first `n` samples of `dataset`."""
    total = count = 0.0
    with torch.no_grad():
        for i in range(n):
            s = dataset[i]
            tokens = s["tokens"][None]
            pos = torch.arange(tokens.shape[1])[None]
            logits = model(tokens, pos, None)
            ce = torch.nn.functional.cross_entropy(logits[0].float(), s["labels"],
                                                   reduction="none")
            total += float((ce * s["loss_mask"]).sum())
            count += float(s["loss_mask"].sum())
    return total / count


def test_a_fresh_run_scores_the_sliced_models_on_training_batches_and_resumes_exactly(tmp_path):
    """Through `train`: the chosen cut's logged loss is the sliced model's LM loss on the first
    init_batches training micro-batches; the run resumes bit-exactly (offsets restored, not
    searched again)."""
    import json
    import logging

    from nemo_elastic import runtime
    from nemo_elastic.checkpoint import LATEST_FILE, load_checkpoint
    from nemo_elastic.config import ParallelConfig
    from nemo_elastic.data.loaders import build_training_data
    from nemo_elastic.elastic.specs import build_elastic_model
    from nemo_elastic.export.slicing import slice_model
    from nemo_elastic.training.train import train
    from tests.test_train import _cfg, _parent

    _parent(tmp_path)
    args = ("elastic.router.init=zero_shot", "elastic.router.init_batches=2")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("nemo_elastic.elastic.router_prior")
    level = log.level
    log.setLevel(logging.INFO)  # setLevel, not .level =: it clears the loggers' isEnabledFor cache
    log.addHandler(handler)
    try:
        straight = train(_cfg(tmp_path, *args, stage1=2, stage2=2), progress=False)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    logged = {r.args[0]: r.args for r in records if r.args}
    cfg = _cfg(tmp_path, *args).single_process()
    stage1 = cfg.elastic.curriculum[0]
    stage_cfg = _cfg(tmp_path, *args, f"data.seq_length={stage1.seq_length}",
                     f"data.micro_batch_size={stage1.micro_batch_size}").single_process()
    family = {r["name"]: SubNetwork.from_dict(r["subnetwork"]) for r in straight.family}
    with runtime.distributed(ParallelConfig()) as info:
        data = build_training_data(stage_cfg, info)
        parent = build_elastic_model(cfg)
        load_checkpoint(tmp_path / "parent", model=parent, restore_rng=False)
        parent.eval()
        for name in ("75pct", "50pct"):
            # the family after 4 iterations is still the search's choice (the margin holds)
            assert family[name].describe(cfg.model) == logged[name][1], name
            _, child = slice_model(parent, cfg, family[name])
            child.eval()
            n = 2 * stage1.micro_batch_size
            assert logged[name][3] == pytest.approx(
                _lm_loss_by_hand(child, data.train_iter.dataset, n), rel=1e-5), name
    losses = [h["kd"] for h in straight.history]
    run = tmp_path / "resume"
    ckpt = "iter_0000002"
    shutil.copytree(tmp_path / "run/elastic/checkpoints" / ckpt, run / "elastic/checkpoints" / ckpt)
    (run / "elastic/checkpoints" / LATEST_FILE).write_text(ckpt + "\n")
    shutil.copy(tmp_path / "run/elastic/metrics.jsonl", run / "elastic/metrics.jsonl")
    resumed = train(_cfg(tmp_path, *args, f"output_dir={run}", stage1=2, stage2=2),
                    progress=False)
    assert [h["kd"] for h in resumed.history] == losses[2:]
    assert resumed.family == straight.family
    metrics = [json.loads(x) for x in (run / "elastic/metrics.jsonl").read_text().splitlines()]
    assert [m["kd"] for m in metrics] == losses


@pytest.mark.parametrize("kind", ["heterogeneous_and_depth", "memory", "mamba_head_dim"])
def test_every_kind_of_router_starts_inside_its_bands(kind):
    """Per-layer axes, dropped layers, memory budgets and the head-channel axis: each budget's
    start is inside its band as the cost model counts it, and is the router's argmax."""
    from nemo_elastic.cost_model import GB, MemorySpec, count_memory, subnetwork_memory

    m = _model()
    kw = {"heterogeneous_and_depth": dict(heterogeneous=["ffn", "mamba_heads"],
                                          depth_choices=[7, 6, 5]),
          "mamba_head_dim": dict(axes=["hidden", "mamba_heads", "mamba_head_dim", "ffn"]),
          }.get(kind, {})
    # short context: the weights dominate (the KV cache of a kept attention layer cannot shrink)
    spec = {"batch_size": 1, "seq_length": 64, "bytes_per_param": 2.0, "bytes_per_cache": 2.0}
    if kind == "memory":
        parent = count_memory(m, MemorySpec(**spec)) / GB
        kw = dict(budget_type="memory", memory=spec,
                  budgets={"full": parent, "75pct": 0.75 * parent, "60pct": 0.6 * parent})
    e = ElasticConfig(iters=100, warmup_iters=0, width_fractions=FRACTIONS,
                      router={"hidden_dim": 16, "init": "zero_shot"},
                      **{"budgets": BUDGETS, **kw})
    router = ElasticRouter(m, e, total_iters=100, layer_ranking=list(range(m.num_layers)))
    choices, _ = search_prior(router, _planted(m))
    router.set_prior(choices, 2.0)
    family = router.family()
    for name, target in e.budgets.items():
        sub = family[name]
        assert sub == router.hard_subnetwork(choices[name]), name
        cost = subnetwork_memory(m, sub, MemorySpec(**spec)) / GB if kind == "memory" \
            else subnetwork_parameters(m, sub) / count_parameters(m)
        assert abs(cost / target - 1) <= 0.05 + 1e-9, (name, cost, target)
    if kind == "heterogeneous_and_depth":
        assert any(k.startswith(PRIOR_PREFIX) and v.shape[1] > 1
                   for k, v in router.state_dict().items())
