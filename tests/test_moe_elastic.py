"""Elastic MoE axes: routed experts (a prefix: the router's gate rows and bias entries follow),
expert FFN width and shared-expert width.  Masked elastic logits == the physically sliced plain
Megatron-Core model (`export.slicing`), per axis and all together with the dense axes."""

from __future__ import annotations

import random

import pytest
import torch

from nemo_elastic.elastic.specs import build_elastic_model
from nemo_elastic.elastic.subnet import SubNetwork, sample_subnetwork
from nemo_elastic.export.slicing import slice_model
from tests.conftest import perturb, tiny_config

TOL = 1e-5
MOE = dict(num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=24,
           moe_shared_expert_intermediate_size=16, moe_router_topk_scaling_factor=2.5)


def _parent(pattern="ME*E-", seed=0):
    cfg = tiny_config({"hybrid_layer_pattern": pattern, "moe": MOE})
    elastic = perturb(build_elastic_model(cfg), seed)
    gen = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():  # a score-correction bias that changes the routing
        for name, buf in elastic.named_buffers():
            if name.endswith("router.expert_bias"):
                buf.copy_(0.3 * torch.randn(buf.shape, generator=gen))
    return cfg, elastic


def _rel_error(cfg, elastic, subnet, tokens) -> float:
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    _, child = slice_model(elastic, cfg, subnet)
    with torch.no_grad():
        masked = elastic(tokens, pos, None, subnetwork=subnet)
        sliced = child(tokens, pos, None)
    return ((masked - sliced).norm() / sliced.norm()).item()


@pytest.mark.parametrize("axes", [("experts",), ("expert_ffn",), ("shared_ffn",),
                                  ("experts", "expert_ffn", "shared_ffn", "hidden", "mamba",
                                   "attention", "ffn", "depth")],
                         ids=["experts", "expert_ffn", "shared_ffn", "all"])
def test_moe_axes_masked_equal_sliced(megatron_env, axes):
    cfg, elastic = _parent()
    rng = random.Random(str(axes))
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator()
                           .manual_seed(0))
    for _ in range(3):
        subnet = sample_subnetwork(cfg.model, rng, axes=axes)
        err = _rel_error(cfg, elastic, subnet, tokens)
        assert err <= TOL, (subnet.describe(cfg.model), err)


def test_dropped_experts_are_never_routed_to(megatron_env):
    """Keeping 3 of 8 experts: the kept experts receive every token's top-2; the others none."""
    cfg, elastic = _parent("ME")
    subnet = SubNetwork.uniform(cfg.model, num_moe_experts=3)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24))
    router = elastic.decoder.layers[1].mlp.router
    router.local_tokens_per_expert.zero_()
    elastic(tokens, torch.arange(24).expand(2, 24), None, subnetwork=subnet)
    load = router.local_tokens_per_expert
    assert load[3:].sum() == 0 and load[:3].sum() == 2 * 24 * 2
    # the bias itself is untouched by the masking
    assert torch.isfinite(router.expert_bias).all()


# ------------------------------------------------------------------------------ importance

def _batches(n=2, b=2, s=24, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [{"tokens": torch.randint(0, 64, (b, s), generator=gen),
             "position_ids": torch.arange(s).expand(b, s)} for _ in range(n)]


def _hand_expert_scores(layer, inputs, moe):
    """REAP sum and token count per expert, from the layer's weights in float64."""
    mlp = layer.mlp
    W = mlp.router.weight.detach().double()
    bias = mlp.router.expert_bias.detach().double()
    experts = mlp.experts.local_experts
    reap, count = torch.zeros(len(experts), dtype=F64), torch.zeros(len(experts), dtype=F64)
    for x in torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs]).double():
        scores = torch.sigmoid(W @ x)
        top = (scores + bias).topk(moe.moe_router_topk).indices
        g = scores[top] / scores[top].sum() * moe.moe_router_topk_scaling_factor
        for j, e in enumerate(top.tolist()):
            e_mod = experts[e]
            y = e_mod.linear_fc2.weight.double() @ (
                torch.relu(e_mod.linear_fc1.weight.double() @ x) ** 2)
            reap[e] += (g[j] * y).norm()
            count[e] += 1
    return reap, count


F64 = torch.float64


def test_expert_importance_and_reorder(megatron_env):
    """REAP and frequency equal a float64 hand computation; reordering the experts (and expert /
    shared neurons) by them keeps the function, and the reordered model ranks its experts
    0, 1, 2, ... (its best experts are the prefix every budget keeps)."""
    from nemo_elastic.importance import compute_scores, permutations_from_scores
    from nemo_elastic.importance import permute_state_dict

    cfg, elastic = _parent("ME*E")
    elastic.eval()
    batches = _batches()
    inputs = []
    handle = elastic.decoder.layers[1].pre_mlp_layernorm.register_forward_hook(
        lambda m, a, out: inputs.append(out.detach()))
    scores = compute_scores(elastic, batches, cfg.model, progress=False)
    handle.remove()
    reap_sum, count = _hand_expert_scores(elastic.decoder.layers[1], inputs, cfg.model.moe)
    s = scores.layers[1]
    assert torch.allclose(s.expert_reap, reap_sum / count.clamp(min=1), rtol=1e-6)
    assert torch.allclose(s.expert_frequency, count / count.sum())
    assert torch.equal(s.experts, s.expert_reap)  # REAP is the default criterion
    freq = compute_scores(elastic, batches, cfg.model, expert_criterion="frequency",
                          progress=False)
    assert torch.equal(freq.layers[1].experts, freq.layers[1].expert_frequency)

    perms = permutations_from_scores(scores, cfg.model)
    assert torch.equal(perms.layers[1].experts,
                       torch.sort(s.expert_reap, descending=True, stable=True).indices)
    other = build_elastic_model(cfg)
    other.load_state_dict(permute_state_dict(elastic.state_dict(), cfg.model, perms))
    other.eval()
    with torch.no_grad():
        ref = torch.cat([elastic(b["tokens"], b["position_ids"], None) for b in batches])
        out = torch.cat([other(b["tokens"], b["position_ids"], None) for b in batches])
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5
    after = compute_scores(other, batches, cfg.model, progress=False).layers[1]
    assert torch.allclose(after.expert_reap, torch.sort(s.expert_reap, descending=True).values,
                          rtol=1e-5)


# ------------------------------------------------------------------------------ parallel

PARALLEL = {"tp2": ("ME*E-", {"tensor_model_parallel_size": 2}),
            "ep2": ("ME*E-", {"expert_model_parallel_size": 2}),
            "pp2": ("ME|*E-", {"pipeline_model_parallel_size": 2})}


def _parallel_subnet(m):
    """Every MoE axis pruned (per-layer experts), hidden pruned, one layer dropped."""
    s = SubNetwork.uniform(m, hidden_size=24, num_moe_experts=6, moe_ffn_hidden_size=12,
                           moe_shared_expert_intermediate_size=8, drop_layers=[2])
    return s.replace_layer(3, num_moe_experts=4)


def _parallel_rank(rank, world_size, case, tmp_path):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_elastic import runtime
    from nemo_elastic.checkpoint import load_checkpoint

    pattern, parallel = PARALLEL[case]
    cfg = tiny_config({"hybrid_layer_pattern": pattern, "moe": MOE}, parallel=parallel)
    with runtime.distributed(cfg.parallel):
        model = build_elastic_model(cfg)
        load_checkpoint(tmp_path / "ckpt", model=model, restore_rng=False)
        model.eval()
        tokens = torch.load(tmp_path / "tokens.pt")
        pos = torch.arange(tokens.shape[1]).expand_as(tokens)
        subnet = _parallel_subnet(cfg.model)

        def step(data_iterator, m):
            batch = next(data_iterator)
            out = m(batch, pos, None, labels=batch, subnetwork=subnet)
            return out, lambda o: (o.sum(), {"per_token": o.detach()})

        with torch.no_grad():
            outputs = get_forward_backward_func()(
                forward_step_func=step, data_iterator=iter([tokens]), model=[model],
                num_microbatches=1, seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
                forward_only=True)
        if rank == world_size - 1:
            torch.save(outputs[0]["per_token"], tmp_path / "out.pt")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(PARALLEL))
def test_moe_masked_equals_sliced_under_parallelism(case, tmp_path):
    """TP=2, EP=2 and PP=2 (two gloo ranks): the masked sub-network's per-token loss equals the
    physically sliced one-process model's."""
    from nemo_elastic import runtime
    from nemo_elastic.checkpoint import save_checkpoint
    from nemo_elastic.config import ParallelConfig
    from tests.multiproc import run_multiprocess

    pattern = PARALLEL[case][0].replace("|", "")
    with runtime.distributed(ParallelConfig()):
        cfg, elastic = _parent(pattern)
        tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(5))
        _, child = slice_model(elastic, cfg, _parallel_subnet(cfg.model))
        with torch.no_grad():
            reference = child(tokens, torch.arange(24).expand(2, 24), None, labels=tokens)
        save_checkpoint(tmp_path / "ckpt", cfg=cfg, model=elastic, kind="test")
    torch.save(tokens, tmp_path / "tokens.pt")
    run_multiprocess(_parallel_rank, 2, case, tmp_path)
    out = torch.load(tmp_path / "out.pt")
    rel = ((out - reference).norm() / reference.norm()).item()
    assert rel <= 1e-5, rel


def test_moe_sliced_execution_equals_masked(megatron_env):
    """execution='sliced' (kept weight blocks, dropped experts get no tokens): same logits and
    the same parameter gradients as the masked forward."""
    cfg, elastic = _parent("ME*E-", seed=3)
    rng = random.Random(11)
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(24).expand(2, 24)
    for _ in range(2):
        subnet = sample_subnetwork(cfg.model, rng, axes=("experts", "expert_ffn", "shared_ffn",
                                                         "hidden", "depth"))
        grads = []
        for execution in ("masked", "sliced"):
            elastic.zero_grad(set_to_none=True)
            loss = elastic(tokens, pos, None, labels=tokens, subnetwork=subnet,
                           execution=execution).sum()
            loss.backward()
            grads.append((loss.detach(), {n: p.grad.clone() for n, p in elastic.named_parameters()
                                          if p.grad is not None}))
        (lm, gm), (ls, gs) = grads
        assert torch.allclose(lm, ls, rtol=1e-5), subnet.describe(cfg.model)
        for name, g in gm.items():
            other = gs.get(name, torch.zeros_like(g))
            assert (g - other).norm() <= 1e-5 * g.norm() + 1e-8, (name, (g - other).norm(),
                                                                 g.norm())


def test_router_soft_expert_axis(megatron_env):
    """A router's expert-count choice (one-hot probabilities, hard 'scaled' mode) computes the
    hard sub-network, and its probabilities receive a gradient through the routed experts;
    the router's expert-count choices never go below top-k."""
    from nemo_elastic.elastic.masks import SoftAxis, SoftLayer, SoftSubNetwork
    from nemo_elastic.router import axis_choices

    cfg, elastic = _parent("ME*E", seed=4)
    m = cfg.model
    assert min(axis_choices(m, "moe_experts", [1.0, 0.5, 0.1], 1)) == m.moe.moe_router_topk
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(4))
    pos = torch.arange(24).expand(2, 24)
    probs = torch.tensor([0.0, 1.0, 0.0], requires_grad=True)
    layers = []
    for i, sym in enumerate(m.layer_symbols):
        sizes = {f: m.layer_size(f, i) for f in
                 {"M": ("mamba_num_heads", "mamba_head_dim"), "*": ("num_attention_heads",),
                  "E": ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")}[sym]}
        if sym == "E":
            sizes["num_moe_experts"] = SoftAxis([8, 4, 2], probs, "scaled")
        layers.append(SoftLayer(**sizes))
    soft = SoftSubNetwork(hidden_size=m.hidden_size, layers=layers)
    hard = SubNetwork.uniform(m, num_moe_experts=4)
    out = elastic(tokens, pos, None, labels=tokens, subnetwork=soft)
    with torch.no_grad():
        ref = elastic(tokens, pos, None, labels=tokens, subnetwork=hard)
    assert torch.allclose(out.detach(), ref, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    assert probs.grad is not None and probs.grad[1].abs() > 0


def test_family_table_counts_total_and_active():
    """The family table of a MoE parent gives each budget's total and active parameters."""
    from nemo_elastic.cost_model import count_active_parameters, count_parameters
    from nemo_elastic.config import load_config
    from nemo_elastic.router import ElasticRouter as Router

    cfg = load_config("conf/tiny_moe.yaml")
    router = Router(cfg.model, cfg.elastic, total_iters=10)
    for row in router.family_table():
        child = SubNetwork.from_dict(row["subnetwork"]).model_config(cfg.model)
        assert row["parameters"] == count_parameters(child)
        assert row["active_parameters"] == count_active_parameters(child) < row["parameters"]
