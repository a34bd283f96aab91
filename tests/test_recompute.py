"""Activation recompute (full and selective) sees the masks of its own forward call.

Recompute on == off: same loss and the same gradients for every parameter and for the router
logits, for hard, soft one-hot and soft non-one-hot sub-networks (with dropped and soft-gated
layers), also when two micro-batches with different sub-networks interleave (1F1B order).
"""

import types

import pytest
import torch

from nemo_elastic.elastic import SubNetwork
from nemo_elastic.elastic.masks import SoftAxis, SoftLayer, SoftSubNetwork
from nemo_elastic.elastic.recompute import check_config
from nemo_elastic.elastic.specs import build_elastic_model
from nemo_elastic.elastic.state import ADOPTED
from tests.conftest import perturb, soft_one_hot, tiny_config

PATTERN = "M-*M-"  # Mamba, MLP, attention, Mamba, MLP
RTOL = 1e-6

FULL = dict(recompute_granularity="full")
RECOMPUTE = {
    "full-uniform-1": dict(FULL, recompute_method="uniform", recompute_num_layers=1),
    "full-uniform-2": dict(FULL, recompute_method="uniform", recompute_num_layers=2),
    "full-block-3": dict(FULL, recompute_method="block", recompute_num_layers=3),
    "selective-core_attn": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
    "selective-layernorm": dict(recompute_granularity="selective", recompute_modules=["layernorm"]),
    "selective-mlp": dict(recompute_granularity="selective", recompute_modules=["mlp"]),
    "selective-all": dict(recompute_granularity="selective",
                          recompute_modules=["core_attn", "layernorm", "mlp"]),
}


@pytest.fixture
def recompute_env(megatron_env):
    """The runtime's CPU measures make Megatron's activation checkpoints run without a GPU
    (empty CUDA RNG state, Transformer-Engine fp8 off: `compat._activation_checkpoints_without_gpu`)."""
    return megatron_env


def _cfg():
    return tiny_config({"hybrid_layer_pattern": PATTERN})


def _models(cfg, **recompute):
    """(reference without recompute, model with `recompute`) sharing perturbed weights."""
    reference = perturb(build_elastic_model(cfg))
    model = build_elastic_model(cfg, **recompute)
    model.load_state_dict(reference.state_dict())
    return reference, model


def _tokens(cfg, b=2, s=24):
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.model.vocab_size, (b, s), generator=gen)
    return tokens, torch.arange(s).expand(b, s)


def _hard(cfg):
    """Every axis pruned, heterogeneous FFN, the second Mamba layer dropped."""
    s = SubNetwork.uniform(cfg.model, hidden_size=20, mamba_num_heads=2, mamba_head_dim=5,
                           num_attention_heads=2, ffn_hidden_size=40, drop_layers=[3])
    return s.replace_layer(4, ffn_hidden_size=24)


def _hard_b(cfg):
    """Another sub-network (micro-batch B): other sizes, the first MLP layer dropped."""
    return SubNetwork.uniform(cfg.model, hidden_size=24, mamba_num_heads=4, mamba_head_dim=3,
                              num_attention_heads=4, ffn_hidden_size=16, drop_layers=[1])


def _soft_mixture(cfg):
    """(SoftSubNetwork, router leaves): non-one-hot probabilities = softmax(leaf logits) on every
    axis, a soft gate on layer 1, layer 3 dropped.  Fresh leaves with fixed values per call."""
    gen = torch.Generator().manual_seed(7)
    leaves = []

    def axis(choices):
        logits = torch.randn(len(choices), generator=gen).requires_grad_()
        leaves.append(logits)
        return SoftAxis(choices=choices, probs=torch.softmax(logits, 0), mode="mixture")

    gate_logit = torch.tensor(0.3).requires_grad_()
    leaves.append(gate_logit)
    layers = [SoftLayer(mamba_num_heads=axis([4, 2]), mamba_head_dim=axis([8, 6, 3])),
              SoftLayer(keep=torch.sigmoid(gate_logit), ffn_hidden_size=axis([64, 40, 16])),
              SoftLayer(num_attention_heads=axis([4, 2])),
              SoftLayer(keep=False, mamba_num_heads=4, mamba_head_dim=8),
              SoftLayer(ffn_hidden_size=axis([64, 24]))]
    return SoftSubNetwork(hidden_size=axis([32, 24, 16]), layers=layers), leaves


def _soft_one_hot(cfg, mode):
    soft = soft_one_hot(cfg, _hard(cfg), mode)
    axes = [soft.hidden_size] + [getattr(layer, f) for layer in soft.layers
                                 for f in ("mamba_num_heads", "mamba_head_dim",
                                           "num_attention_heads", "ffn_hidden_size")]
    return soft, [a.probs for a in axes if isinstance(a, SoftAxis)]


SUBNETS = {
    "hard": lambda cfg: (_hard(cfg), []),
    "soft-one-hot-mixture": lambda cfg: _soft_one_hot(cfg, "mixture"),
    "soft-one-hot-scaled": lambda cfg: _soft_one_hot(cfg, "scaled"),
    "soft-mixture": _soft_mixture,
}


def _grads(model, leaves):
    """Gradients of every parameter (None kept) and of the router leaves, detached copies."""
    out = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
    out.update({f"router.{i}": None if leaf.grad is None else leaf.grad.clone()
                for i, leaf in enumerate(leaves)})
    return out


def _assert_same(actual, expected, what):
    """Gradients equal up to fp32 rounding: max |a - e| <= RTOL * G per tensor, G the largest
    gradient entry of its group (model parameters / router leaves).  Not per tensor's own max:
    some gradients are near-cancelling sums (Mamba D, or the chosen size of a one-hot router
    axis, ~1e-3 of G) whose rounding differs with the summation order - which recompute changes
    (upstream's own, unmasked "layernorm" recompute already does)."""
    assert actual.keys() == expected.keys()
    for router in (False, True):
        names = [n for n in expected if n.startswith("router.") == router]
        for n in names:
            assert (actual[n] is None) == (expected[n] is None), f"{what}: {n} gradient presence"
        names = [n for n in names if expected[n] is not None]
        if not names:
            continue
        scale = max(expected[n].abs().max() for n in names).clamp_min(1e-30)
        for n in names:
            rel = ((actual[n] - expected[n]).abs().max() / scale).item()
            assert rel <= RTOL, f"{what}: {n} max difference {rel:.3g} of the largest gradient"


def _loss_and_grads(model, tokens, pos, subnet, leaves):
    model.zero_grad(set_to_none=True)
    loss = model(tokens, pos, None, labels=tokens, subnetwork=subnet).mean()
    loss.backward()
    return loss.detach(), _grads(model, leaves)


@pytest.mark.parametrize("recompute", list(RECOMPUTE))
def test_recompute_on_equals_off(recompute_env, recompute):
    cfg = _cfg()
    reference, model = _models(cfg, **RECOMPUTE[recompute])
    tokens, pos = _tokens(cfg)
    for kind, make in SUBNETS.items():
        expected_loss, expected = _loss_and_grads(reference, tokens, pos, *make(cfg))
        loss, grads = _loss_and_grads(model, tokens, pos, *make(cfg))
        torch.testing.assert_close(loss, expected_loss, rtol=RTOL, atol=0)
        _assert_same(grads, expected, f"{recompute}/{kind}")
        router = [g for n, g in grads.items() if n.startswith("router.")]
        if kind == "soft-mixture":  # every router leaf is reached, through recomputed layers too
            assert all(g is not None and g.abs().sum() > 0 for g in router)
        elif kind != "hard":
            assert any(g is not None and g.abs().sum() > 0 for g in router)


@pytest.mark.parametrize("recompute", ["full-uniform-1", "full-block-3", "selective-all"])
def test_interleaved_micro_batches_recompute_with_their_own_masks(recompute_env, recompute):
    """1F1B order: forward A, forward B, backward A, backward B - with different sub-networks."""
    cfg = _cfg()
    reference, model = _models(cfg, **RECOMPUTE[recompute])
    tokens, pos = _tokens(cfg)
    tokens_b = torch.roll(tokens, 5, dims=1)
    snapshots = []
    for m in (reference, model):
        m.zero_grad(set_to_none=True)
        soft_a, leaves = _soft_mixture(cfg)
        loss_a = m(tokens, pos, None, labels=tokens, subnetwork=soft_a).mean()
        loss_b = m(tokens_b, pos, None, labels=tokens_b, subnetwork=_hard_b(cfg)).mean()
        loss_a.backward()
        after_a = _grads(m, leaves)
        loss_b.backward()
        snapshots.append((loss_a.detach(), loss_b.detach(), after_a, _grads(m, leaves)))
    (ref_a, ref_b, ref_after_a, ref_after_b), (a, b, after_a, after_b) = snapshots
    assert not torch.allclose(ref_a, ref_b)
    torch.testing.assert_close((a, b), (ref_a, ref_b), rtol=RTOL, atol=0)
    _assert_same(after_a, ref_after_a, f"{recompute}: backward A")
    _assert_same(after_b, ref_after_b, f"{recompute}: backward B")


@pytest.mark.parametrize("modules,bad", [(["moe"], "moe"),
                                         (["mlp", "shared_experts"], "shared_experts")])
def test_unsupported_selective_recompute_is_refused_at_build(recompute_env, modules, bad):
    with pytest.raises(ValueError, match=rf"recompute_modules=.*\['{bad}'\] not supported.*remove"):
        build_elastic_model(_cfg(), recompute_granularity="selective", recompute_modules=modules)


def test_full_recompute_with_fp8_is_refused():
    config = types.SimpleNamespace(recompute_granularity="full", fp8="hybrid", fp4=None)
    with pytest.raises(ValueError, match="recompute_granularity='full' with fp8/fp4"):
        check_config(config)


def test_layernorm_recompute_without_transformer_engine_is_refused(megatron_env, monkeypatch):
    from megatron.core.tensor_parallel import random as mrandom

    monkeypatch.delattr(mrandom, "FP8GlobalStateManager", raising=False)
    with pytest.raises(ValueError, match="'layernorm' needs Transformer-Engine"):
        build_elastic_model(_cfg(), recompute_granularity="selective",
                            recompute_modules=["layernorm"])


def test_layer_whose_recompute_was_not_adopted_is_refused(recompute_env):
    """A masked forward never runs a Megatron selective recompute that would lose its masks."""
    cfg = _cfg()
    model = build_elastic_model(cfg)
    tokens, pos = _tokens(cfg)
    layer = model.decoder.layers[1]  # MLP layer, as if built outside ElasticHybridStack
    layer.recompute_mlp = True
    setattr(layer, ADOPTED, False)
    model(tokens, pos, None)  # the parent is unmasked: nothing to lose
    with pytest.raises(RuntimeError, match="layer 2: Megatron selective recompute .*recompute_mlp"):
        model(tokens, pos, None, subnetwork=_hard(cfg))


def _pp2_1f1b(rank, world_size, recomputes):
    """Megatron's 1F1B schedule on 2 stages, 4 micro-batches with 4 different sub-networks (hard
    and soft): stage 0 runs forward 1 before backward 0.  Gradients of this stage's parameters and
    router leaves with recompute == without."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_elastic import runtime

    cfg = tiny_config({"hybrid_layer_pattern": "M-|*M-"},
                      parallel={"pipeline_model_parallel_size": 2})
    tokens, pos = _tokens(cfg)

    def step(data_iterator, m):
        batch, subnet = next(data_iterator)
        out = m(batch, pos, None, labels=batch, subnetwork=subnet)
        return out, lambda o: (o.mean(), {"loss": o.detach().mean()})

    def grads(m):
        leaves, batches = [], []
        for i in range(4):
            subnet = (_hard(cfg), None, _hard_b(cfg), None)[i]
            if subnet is None:
                subnet, new = _soft_mixture(cfg)
                leaves += new
            batches.append((torch.roll(tokens, i, dims=1), subnet))
        m.zero_grad(set_to_none=True)
        get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(batches), model=[m], num_microbatches=4,
            seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=False)
        return _grads(m, leaves)

    with runtime.distributed(cfg.parallel):
        reference = perturb(build_elastic_model(cfg), seed=rank)
        expected = grads(reference)
        for recompute in recomputes:
            model = build_elastic_model(cfg, **RECOMPUTE[recompute])
            model.load_state_dict(reference.state_dict())
            _assert_same(grads(model), expected, f"pp2 stage {rank} {recompute}")


@pytest.mark.slow
def test_pp2_1f1b_micro_batches_with_different_subnetworks():
    from tests.multiproc import run_multiprocess

    run_multiprocess(_pp2_1f1b, 2, ["full-uniform-1", "full-block-3", "selective-all"])
