"""The curriculum schedule (`training.elastic.schedule.Curriculum`), the one object every reader
asks, against a step-by-step walk of the run written here independently."""

from pathlib import Path

import pytest

from nemo_elastic.config import load_config
from nemo_elastic.training.elastic.schedule import Curriculum, lr_factor

TINY = Path(__file__).resolve().parents[1] / "conf" / "tiny.yaml"
STAGES = ["elastic.curriculum=[{name: a, iters: 3, seq_length: 32, global_batch_size: 8, "
          "micro_batch_size: 4}, "
          "{name: b, tokens: 1000, seq_length: 64, global_batch_size: 4, micro_batch_size: 4, "
          "budget_probs: {full: 3, 50pct: 1}}]", "elastic.warmup_iters=1",
          "elastic.router.warmup_iters=1"]


def _walk(cfg, iteration):
    """(stage name, tokens seen after `iteration` iterations): one iteration at a time."""
    d, stages = cfg.data, cfg.elastic.curriculum
    spans = []
    for s in stages:
        seq, gbs = s.seq_length or d.seq_length, s.global_batch_size or d.global_batch_size
        spans += [(s.name, seq * gbs)] * s.iters
    tokens = sum(per for _, per in spans[:iteration]) + \
        max(0, iteration - len(spans)) * spans[-1][1]
    return spans[min(iteration, len(spans)) - 1][0], tokens


def test_stages_tokens_and_probabilities_follow_the_recipe():
    cfg = load_config(TINY, STAGES)
    c = Curriculum.of(cfg)
    # stage b was given in tokens: ceil(1000 / (4 x 64)) = 4 iterations, resolved in the recipe
    assert [s.iters for s in cfg.elastic.curriculum] == [3, 4]
    assert cfg.elastic.curriculum[1].tokens is None
    assert [(s.name, s.begin, s.end) for s in c.stages] == [("a", 0, 3), ("b", 3, 7)]
    assert c.total_iters == cfg.elastic.total_iters == 7
    for it in range(1, 10):
        name, tokens = _walk(cfg, it)
        assert c.stage_at(it).name == name and c.tokens_at(it) == tokens
    assert c.stage_change_tokens() == [3 * 32 * 8]
    names = cfg.elastic.budget_names
    assert dict(zip(names, c.stages[1].budget_probs)) == {n: {"full": 0.75, "50pct": 0.25}.get(
        n, 0.0) for n in names}
    assert c.stages[0].budget_probs == tuple(1 / len(names) for _ in names)
    data = c.stages[1].data_config(cfg.data)
    assert (data.seq_length, data.global_batch_size, data.seed) == (64, 4, cfg.data.seed + 1)


def test_one_implicit_stage_without_a_curriculum():
    cfg = load_config(TINY, ["elastic.curriculum=[]", "elastic.iters=5", "elastic.warmup_iters=1",
                             "elastic.router.warmup_iters=1"])
    c = Curriculum.of(cfg)
    assert [(s.name, s.begin, s.end) for s in c.stages] == [("elastic", 0, 5)]
    assert c.describe(cfg.elastic.budget_names) == "5 iterations"
    assert c.stage_change_tokens() == [] and cfg.elastic.curriculum == []


@pytest.mark.parametrize("style", ["constant", "linear", "cosine"])
def test_router_lr_factor_warms_up_then_decays_to_min_ratio(style):
    f = [lr_factor(i, warmup=4, total=20, style=style, min_ratio=0.1) for i in range(25)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0
    assert f[20] == f[24] == (1.0 if style == "constant" else pytest.approx(0.1))
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
