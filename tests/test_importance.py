"""Importance scores, reordering, depth ranking and `prepare` (CPU; TP=2 / DP=2 tier is slow)."""

import json

import pytest
import torch

from nemo_elastic import runtime
from nemo_elastic.checkpoint import CheckpointError, load_checkpoint, read_meta, save_checkpoint
from nemo_elastic.config import ConfigError, ParallelConfig
from nemo_elastic.elastic.specs import build_elastic_model
from nemo_elastic.importance import (Aggregation, compute_scores, depth_rankings,
                                     permutations_from_scores, permute_state_dict,
                                     random_permutations, validate_permutations)
from nemo_elastic.importance.prepare import PLOT_FILE, RANKING_FILE, prepare
from nemo_elastic.model import build_hybrid_model
from tests.conftest import tiny_config
from tests.multiproc import run_multiprocess

# Every layer type; 2 Mamba groups of 4 heads, 2 query groups of 2 heads.
PATTERN = "M-M*-"
MODEL = {"hybrid_layer_pattern": PATTERN, "mamba_num_heads": 8}
SMALL_DATA = {"seq_length": 64, "micro_batch_size": 4, "global_batch_size": 4,
              "synthetic": {"num_train": 200, "num_val": 20}}
RTOL = 1e-5


def _cfg(**sections):
    return tiny_config(MODEL, **sections)


def _perturb(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _batches(cfg, n=3, b=2, s=32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [{"tokens": torch.randint(0, cfg.model.vocab_size, (b, s), generator=gen),
             "position_ids": torch.arange(s).expand(b, s)} for _ in range(n)]


def _logits(model, batches):
    model.eval()
    with torch.no_grad():
        return torch.cat([model(b["tokens"], b["position_ids"], None) for b in batches])


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _permuted_copy(cfg, model, perms):
    other = build_elastic_model(cfg)
    other.load_state_dict(permute_state_dict(model.state_dict(), cfg.model, perms))
    return other


# --------------------------------------------------------------------------- aggregation

def test_aggregation_parse_and_reductions():
    assert Aggregation.parse("mean/l2") == Aggregation(sequence="mean", batch="l2")
    assert Aggregation.parse("sum") == Aggregation(sequence="sum", batch="sum")
    with pytest.raises(ValueError, match="aggregation.batch='max'"):
        Aggregation.parse("mean/max")
    a = torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]]])  # [s=2, b=2, n=1]
    agg = Aggregation(sequence="mean", batch="l2")  # per sample: 2, 3 -> sqrt(4 + 9)
    assert agg.finalize(agg.accumulate(None, a), 2).item() == pytest.approx(13 ** 0.5)
    agg = Aggregation(sequence="l2", batch="mean")  # per sample: sqrt(10), sqrt(20)
    assert agg.finalize(agg.accumulate(None, a), 2).item() == pytest.approx((10 ** .5 + 20 ** .5) / 2)


# --------------------------------------------------------------------------- function preserved

def test_permuted_model_computes_the_same_logits(megatron_env):
    cfg = _cfg()
    model = _perturb(build_elastic_model(cfg))
    batches = _batches(cfg)
    reference = _logits(model, batches)
    scores = compute_scores(model, batches, cfg.model, progress=False)
    for perms in (random_permutations(cfg.model, torch.Generator().manual_seed(3)),
                  permutations_from_scores(scores, cfg.model)):
        assert not torch.equal(perms.hidden, torch.arange(cfg.model.hidden_size))
        permuted = _permuted_copy(cfg, model, perms)
        assert _rel(_logits(permuted, batches), reference) <= RTOL


def test_scores_same_on_plain_and_elastic_model(megatron_env):
    cfg = _cfg()
    plain = _perturb(build_hybrid_model(cfg, spec_backend="local"))
    elastic = build_elastic_model(cfg)
    elastic.load_state_dict(plain.state_dict())
    batches = _batches(cfg)
    a = compute_scores(plain, batches, cfg.model, progress=False)
    b = compute_scores(elastic, batches, cfg.model, progress=False)
    torch.testing.assert_close(a.hidden, b.hidden)
    for i in a.layers:
        for axis, values in a.layers[i].axes().items():
            torch.testing.assert_close(values, b.layers[i].axes()[axis])


def _assert_non_increasing(name, values, groups=1, rtol=1e-6):
    per = values.numel() // groups
    v = values.view(groups, per)
    slack = rtol * values.abs().max()
    assert bool((v[:, 1:] <= v[:, :-1] + slack).all()), f"{name}: {values.tolist()}"


def test_rescored_permuted_model_has_sorted_scores(megatron_env):
    cfg = _cfg()
    m = cfg.model
    model = _perturb(build_elastic_model(cfg))
    batches = _batches(cfg)
    agg = Aggregation(sequence="l2", batch="mean")
    before = compute_scores(model, batches, m, agg, progress=False)
    perms = permutations_from_scores(before, m)
    after = compute_scores(_permuted_copy(cfg, model, perms), batches, m, agg, progress=False)
    _assert_non_increasing("hidden", after.hidden)
    torch.testing.assert_close(after.hidden, before.hidden[perms.hidden], rtol=1e-5, atol=0)
    groups = {"mamba_heads": m.mamba_num_groups, "attention_heads": m.num_query_groups}
    for i, layer in after.layers.items():
        for axis, values in layer.axes().items():
            if axis == "mamba_channels":  # ordered per head: checked on [H, P] below
                continue
            _assert_non_increasing(f"layer {i} {axis}", values, groups.get(axis, 1))
            old = before.layers[i].axes()[axis][getattr(perms.layers[i], axis)]
            torch.testing.assert_close(values, old, rtol=1e-5, atol=0)
        if layer.kind == "M":  # new head j = old head heads[j], its channels in its own order
            heads, channels = perms.layers[i].mamba_heads, perms.layers[i].mamba_channels
            assert channels.shape == (m.mamba_num_heads, m.mamba_head_dim)
            for j, old in enumerate(heads.tolist()):
                _assert_non_increasing(f"layer {i} head {j} channels",
                                       layer.mamba_head_channel[j])
                torch.testing.assert_close(
                    layer.mamba_head_channel[j],
                    before.layers[i].mamba_head_channel[old][channels[old]], rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- planted structure

def _plant(model, cfg):
    """Make chosen units unimportant in the way each score measures; returns what was planted.

    Attention heads: the score is the norm of a head's softmax(QK^T)V output, and V is shared by
    the heads of a query group, so a head cannot be made small through V or linear_proj without
    touching its group.  What does change it is the attention pattern: a head with q = 0 attends
    uniformly (its output is a running mean of V, small because V varies over positions), while
    the other heads get a sharp pattern (q x 20: nearly one position, |output| ~ |V|).
    """
    m = cfg.model
    h, H, P, c = m.hidden_size, m.mamba_num_heads, m.mamba_head_dim, m.head_dim
    small = 1e-3
    planted = {"hidden": [5, 20], "ffn": (1, [7, 40]), "mamba_heads": (0, [1, 6]),
               "mamba_channel": (2, 3), "attention_head": (3, 2), "identity_layer": 4}
    layers = model.decoder.layers
    with torch.no_grad():
        for name, p in model.named_parameters():  # every pre-norm (and the final norm)
            if p.dim() == 1 and p.numel() == h and "norm" in name:
                p[planted["hidden"]] *= small
        layer, neurons = planted["ffn"]
        layers[layer].mlp.linear_fc1.weight[neurons] *= small
        layer, heads = planted["mamba_heads"]
        w = layers[layer].mixer.in_proj.weight  # rows [z | x | B | C | dt]
        for head in heads:
            w[H * P + head * P:H * P + (head + 1) * P] *= small
        layer, channel = planted["mamba_channel"]
        layers[layer].mixer.in_proj.weight[H * P + channel:2 * H * P:P] *= small
        layer, head = planted["attention_head"]
        per = m.num_attention_heads // m.num_query_groups
        qkv = layers[layer].self_attention.linear_qkv.weight  # per group [q heads | k | v]
        for j in range(m.num_attention_heads):
            g, local = divmod(j, per)
            rows = slice(g * (per + 2) * c + local * c, g * (per + 2) * c + (local + 1) * c)
            qkv[rows] *= 0.0 if j == head else 20.0
        layers[planted["identity_layer"]].mlp.linear_fc2.weight *= small  # near-identity layer
    return planted


def test_planted_unimportant_units_rank_last(megatron_env):
    cfg = _cfg()
    m = cfg.model
    model = _perturb(build_elastic_model(cfg))
    planted = _plant(model, cfg)
    batches = _batches(cfg, s=48)
    # the Mamba units are planted in in_proj's x block: score that signal (the paper's; the
    # default 'output' signal has its own planted test below)
    scores = compute_scores(model, batches, m, mamba_signal="x", progress=False)
    perms = permutations_from_scores(scores, m)
    assert set(perms.hidden[-2:].tolist()) == set(planted["hidden"])
    layer, neurons = planted["ffn"]
    assert set(perms.layers[layer].ffn[-2:].tolist()) == set(neurons)
    layer, heads = planted["mamba_heads"]
    per = m.mamba_num_heads // m.mamba_num_groups
    last_of_each_group = perms.layers[layer].mamba_heads.view(-1, per)[:, -1]
    assert last_of_each_group.tolist() == heads
    layer, channel = planted["mamba_channel"]
    assert perms.layers[layer].mamba_channels[:, -1].tolist() == [channel] * m.mamba_num_heads
    shared = permutations_from_scores(scores, m, mamba_channel_order="shared")
    assert shared.layers[layer].mamba_channels[-1].item() == channel
    layer, head = planted["attention_head"]
    assert perms.layers[layer].attention_heads[-1].item() == head
    depth = depth_rankings(model, batches, m, progress=False)
    assert depth["iterative"].order[0] == planted["identity_layer"]
    assert depth["one_shot"].order[0] == planted["identity_layer"]
    for ranking in depth.values():
        assert sorted(ranking.order) == list(range(m.num_layers))
    early = depth_rankings(model, batches[:1], m, methods=("iterative",), max_rounds=1,
                           progress=False)["iterative"]
    assert early.order[0] == planted["identity_layer"] and len(early.rounds) == 1
    assert sorted(early.order) == list(range(m.num_layers))


def test_head_permutations_never_cross_groups(megatron_env):
    cfg = _cfg()
    m = cfg.model
    model = _perturb(build_elastic_model(cfg))
    scores = compute_scores(model, _batches(cfg), m, progress=False)
    per_mamba = m.mamba_num_heads // m.mamba_num_groups
    per_attn = m.num_attention_heads // m.num_query_groups
    for perms in [permutations_from_scores(scores, m)] + [
            random_permutations(m, torch.Generator().manual_seed(s)) for s in range(5)]:
        for i, p in perms.layers.items():
            if p.kind == "M":
                assert (p.mamba_heads // per_mamba == torch.arange(m.mamba_num_heads) // per_mamba).all()
            if p.kind == "*":
                assert (p.attention_heads // per_attn == torch.arange(m.num_attention_heads) // per_attn).all()
    bad = random_permutations(m, torch.Generator().manual_seed(0))
    bad.layers[0].mamba_heads = torch.arange(m.mamba_num_heads).roll(1)  # head 7 -> group 0
    with pytest.raises(ValueError, match="must stay within their group"):
        validate_permutations(bad, m)


# --------------------------------------------------------------------------- per-head channels

def _per_head_channel_perms(m, seed):
    """Random structure-respecting permutations with hidden left in place and every Mamba
    head's channels in its own random order ([H, P], rows pairwise different)."""
    gen = torch.Generator().manual_seed(seed)
    perms = random_permutations(m, gen)
    perms.hidden = torch.arange(m.hidden_size)
    for p in perms.layers.values():
        if p.kind == "M":
            p.mamba_channels = torch.stack([torch.randperm(m.mamba_head_dim, generator=gen)
                                            for _ in range(m.mamba_num_heads)])
    return validate_permutations(perms, m)


def test_per_head_channel_prefix_keeps_each_heads_own_channels(megatron_env):
    """Per-head channel orders preserve the function (the parent's logits), and a head-dim prefix
    of the reordered model keeps, in every head, exactly that head's own first channels: the
    sliced tensors equal rows of the PARENT written out here by index arithmetic."""
    from nemo_elastic.elastic.subnet import SubNetwork
    from nemo_elastic.export.slicing import slice_state_dict

    cfg = _cfg()
    m = cfg.model
    H, P, G, N = m.mamba_num_heads, m.mamba_head_dim, m.mamba_num_groups, m.mamba_state_dim
    d, bc, keep = H * P, 2 * G * N, m.mamba_head_dim // 2
    model = _perturb(build_elastic_model(cfg))
    perms = _per_head_channel_perms(m, seed=4)
    batches = _batches(cfg)
    permuted = _permuted_copy(cfg, model, perms)
    assert _rel(_logits(permuted, batches), _logits(model, batches)) <= RTOL
    parent = model.state_dict()
    sliced = slice_state_dict(permuted.state_dict(), m,
                              SubNetwork.uniform(m, mamba_head_dim=keep).validate(m))
    for i, p in perms.layers.items():
        if p.kind != "M":
            continue
        heads = p.mamba_heads.tolist()  # new head j = parent head heads[j]
        inner = [h * P + int(p.mamba_channels[h, c]) for h in heads for c in range(keep)]
        rows = {"in_proj.weight": inner + [d + r for r in inner] + list(range(2 * d, 2 * d + bc))
                + [2 * d + bc + h for h in heads],
                "conv1d_weight": inner + list(range(d, d + bc)), "norm.weight": inner,
                "conv1d_bias": inner + list(range(d, d + bc)), "dt_bias": heads, "A_log": heads,
                "D": heads if parent[f"decoder.layers.{i}.mixer.D"].numel() == H else inner}
        pre = f"decoder.layers.{i}.mixer."
        for name, index in rows.items():
            assert torch.equal(sliced[pre + name], parent[pre + name][index]), name
        assert torch.equal(sliced[pre + "out_proj.weight"],
                           parent[pre + "out_proj.weight"][:, inner])


def test_per_head_order_ranks_each_heads_own_weak_channel_last(megatron_env):
    """Head h's weak channel is (3 h + 1) mod P (its gated-norm weight ~0, so out_proj reads ~0
    from it): the per-head order puts each head's own weak channel last; one shared order
    cannot (it has one last channel for all heads)."""
    cfg = _cfg()
    m = cfg.model
    H, P = m.mamba_num_heads, m.mamba_head_dim
    weak = [(3 * h + 1) % P for h in range(H)]
    model = _perturb(build_elastic_model(cfg))
    with torch.no_grad():
        for h, c in enumerate(weak):
            model.decoder.layers[0].mixer.norm.weight[h * P + c] *= 1e-3
    scores = compute_scores(model, _batches(cfg, s=48), m, progress=False)
    assert permutations_from_scores(scores, m).layers[0].mamba_channels[:, -1].tolist() == weak
    shared = permutations_from_scores(scores, m, mamba_channel_order="shared")
    assert shared.layers[0].mamba_channels.shape == (P,)
    with pytest.raises(ValueError, match="mamba_channel_order='bogus'"):
        permutations_from_scores(scores, m, mamba_channel_order="bogus")


def test_per_head_channel_permutations_are_validated(megatron_env):
    m = _cfg().model
    perms = _per_head_channel_perms(m, seed=1)
    perms.layers[0].mamba_channels[2, :2] = 0  # head 2: channel 0 twice
    with pytest.raises(ValueError, match=r"layers\[0\]\.mamba_channels\[2\] is not a permutation"):
        validate_permutations(perms, m)
    perms.layers[0].mamba_channels = perms.layers[0].mamba_channels[:3]
    with pytest.raises(ValueError, match=r"expected \[8, P\] or \[P\]"):
        validate_permutations(perms, m)
    with pytest.raises(ConfigError, match="mamba_channel_order"):
        prepare("no-such-checkpoint", "out", mamba_channel_order="bogus", progress=False)


# --------------------------------------------------------------------------- prepare end to end

def _parent_checkpoint(tmp_path, cfg):
    with runtime.distributed(ParallelConfig()):
        model = _perturb(build_elastic_model(cfg), seed=5)
        save_checkpoint(tmp_path / "parent", cfg=cfg, model=model, kind="pretrain")
    return tmp_path / "parent"


def test_prepare_writes_an_equivalent_reordered_checkpoint(tmp_path):
    cfg = _cfg(data=SMALL_DATA)
    parent = _parent_checkpoint(tmp_path, cfg)
    out = prepare(parent, tmp_path / "prepared", num_batches=2, aggregation="mean/l2",
                  progress=False)
    meta = read_meta(out)
    assert meta["kind"] == "prepared"
    assert sorted(meta["layer_ranking"]) == list(range(cfg.model.num_layers))
    assert meta["importance"]["aggregation"] == {"sequence": "mean", "batch": "l2"}
    ranking = json.loads((out / RANKING_FILE).read_text())
    assert ranking["depth"]["layer_ranking"] == meta["layer_ranking"]
    assert set(ranking["depth"]["methods"]) == {"iterative", "one_shot", "cosine"}
    assert sorted(ranking["hidden"]["permutation"]) == list(range(cfg.model.hidden_size))
    assert ranking["hidden"]["permutation"] != list(range(cfg.model.hidden_size))
    assert ranking["layers"]["1"]["type"] == "-" and "ffn" in ranking["layers"]["1"]
    assert meta["importance"]["mamba_channel_order"] == "per_head"
    channels = ranking["layers"]["0"]["mamba_channels"]  # one row per parent head
    assert len(channels["permutation"]) == cfg.model.mamba_num_heads
    for row, row_scores in zip(channels["permutation"], channels["sorted_scores"]):
        assert sorted(row) == list(range(cfg.model.mamba_head_dim))
        assert row_scores == sorted(row_scores, reverse=True)
    assert (out / PLOT_FILE).stat().st_size > 0
    with pytest.raises(CheckpointError, match="already exists"):
        prepare(parent, out, num_batches=1, progress=False)

    batches = _batches(cfg)
    with runtime.distributed(ParallelConfig()):
        original, prepared = build_elastic_model(cfg), build_elastic_model(cfg)
        load_checkpoint(parent, model=original, restore_rng=False)
        load_checkpoint(out, model=prepared, restore_rng=False)
        assert _rel(_logits(prepared, batches), _logits(original, batches)) <= RTOL
        assert not torch.equal(prepared.embedding.word_embeddings.weight,
                               original.embedding.word_embeddings.weight)


# --------------------------------------------------------------------------- TP=2 / DP=2

def _score_dict(scores, depth=None):
    out = {"hidden": scores.hidden}
    for i, layer in scores.layers.items():
        for axis, values in layer.axes().items():
            out[f"{i}.{axis}"] = values
    for name, ranking in (depth or {}).items():
        out[f"depth.{name}"] = torch.tensor([ranking.scores[j] for j in sorted(ranking.scores)])
    return out


def _parallel_scores(rank, world_size, tmp_path, tp):
    cfg = _cfg(parallel={"tensor_model_parallel_size": tp})
    with runtime.distributed(cfg.parallel) as info:
        model = build_elastic_model(cfg)
        load_checkpoint(tmp_path / "parent", model=model, restore_rng=False)
        batches = torch.load(tmp_path / "batches.pt")
        mine = batches[info.dp_rank::info.dp_size]  # this data-parallel rank's share
        scores = compute_scores(model, mine, cfg.model, progress=False)
        depth = depth_rankings(model, mine, cfg.model, methods=("one_shot", "cosine"),
                               progress=False)
        if rank == 0:
            torch.save(_score_dict(scores, depth), tmp_path / f"scores_tp{tp}.pt")


def _reference_scores(tmp_path):
    cfg = _cfg()
    batches = _batches(cfg, n=4)
    torch.save(batches, tmp_path / "batches.pt")
    with runtime.distributed(ParallelConfig()):
        model = _perturb(build_elastic_model(cfg), seed=7)
        save_checkpoint(tmp_path / "parent", cfg=cfg, model=model, kind="test")
        scores = compute_scores(model, batches, cfg.model, progress=False)
        depth = depth_rankings(model, batches, cfg.model, methods=("one_shot", "cosine"),
                               progress=False)
    return cfg, scores, _score_dict(scores, depth)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 1], ids=["tp2", "dp2"])
def test_scores_and_rankings_match_one_process(tmp_path, tp):
    """TP=2: the same batches on both ranks, head / neuron blocks all-gathered.  DP=2 (tp=1 on
    two processes): each rank scores half the batches, raw sums all-reduced."""
    cfg, scores, reference = _reference_scores(tmp_path)
    run_multiprocess(_parallel_scores, 2, tmp_path, tp)
    parallel = torch.load(tmp_path / f"scores_tp{tp}.pt")
    assert set(parallel) == set(reference)
    for key in reference:
        torch.testing.assert_close(parallel[key], reference[key], rtol=1e-4, atol=0, msg=key)
    ref_perms = permutations_from_scores(scores, cfg.model)
    assert torch.equal(ref_perms.hidden, torch.sort(parallel["hidden"], descending=True,
                                                    stable=True).indices)


def test_output_signal_scores_what_out_proj_reads(megatron_env):
    """mamba_signal='output': heads / channels whose gated-norm weight is ~0 (so out_proj reads
    ~0 from them) rank last, and the permutation still preserves the function."""
    cfg = _cfg()
    m = cfg.model
    H, P = m.mamba_num_heads, m.mamba_head_dim
    model = _perturb(build_elastic_model(cfg))
    with torch.no_grad():
        norm_w = model.decoder.layers[0].mixer.norm.weight  # [H*P], head-major
        for head in (1, 6):
            norm_w[head * P:(head + 1) * P] *= 1e-3
        model.decoder.layers[2].mixer.norm.weight[3::P] *= 1e-3  # channel 3 of every head
    batches = _batches(cfg, s=48)
    perms = permutations_from_scores(compute_scores(model, batches, m, mamba_signal="output",
                                                    progress=False), m)
    per = H // m.mamba_num_groups
    assert perms.layers[0].mamba_heads.view(-1, per)[:, -1].tolist() == [1, 6]
    assert perms.layers[2].mamba_channels[:, -1].tolist() == [3] * H
    x_perms = permutations_from_scores(compute_scores(model, batches, m, mamba_signal="x",
                                                      progress=False), m)
    assert x_perms.layers[0].mamba_heads.view(-1, per)[:, -1].tolist() != [1, 6]  # x can't see it
    with pytest.raises(ValueError, match="mamba_signal='bogus'"):
        compute_scores(model, batches, m, mamba_signal="bogus", progress=False)
