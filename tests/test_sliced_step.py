"""Sliced execution of hard sub-networks (`elastic/sliced.py`) and several budgets per teacher
forward (`elastic.budget_sampling=all`).

The reference is the masked forward (`execution="masked"`, itself tested against the physically
sliced model in test_masked_vs_sliced.py): the sliced forward must give the same logits / loss,
the same gradient for every parent parameter (zero where the masked one is zero) and the same
gradient for the router's probabilities, for hard sub-networks and for the router's hard mode
(argmax prefix x its probability), with dropped layers, soft depth gates and recompute; then for
the whole elastic step (router, teacher, KD + budget loss) at TP=1, TP=2 and PP=2.
"""

import random

import pytest
import torch

from nemo_elastic import runtime
from nemo_elastic.elastic.masks import SoftAxis, SoftLayer, SoftSubNetwork
from nemo_elastic.elastic.specs import build_elastic_model
from nemo_elastic.elastic.subnet import sample_subnetwork
from tests.conftest import perturb, tiny_config
from tests.test_recompute import RECOMPUTE, _grads, _hard, _models, _tokens

TOL = 1e-5


def _scaled(cfg, seed):
    """The router's hard mode on every axis: random logits -> softmax -> argmax prefix x its
    probability; a soft depth gate on layer 1 and layer 3 dropped ("M-*M-")."""
    gen = torch.Generator().manual_seed(seed)
    leaves = []

    def axis(choices):
        logits = (2 * torch.randn(len(choices), generator=gen)).requires_grad_()
        leaves.append(logits)
        return SoftAxis(choices=choices, probs=torch.softmax(logits, 0), mode="scaled")

    gate = torch.tensor(0.4).requires_grad_()
    leaves.append(gate)
    layers = [SoftLayer(mamba_num_heads=axis([4, 2]), mamba_head_dim=axis([8, 6, 3])),
              SoftLayer(keep=torch.sigmoid(gate), ffn_hidden_size=axis([64, 40, 16])),
              SoftLayer(num_attention_heads=axis([4, 2])),
              SoftLayer(keep=False, mamba_num_heads=4, mamba_head_dim=8),
              SoftLayer(ffn_hidden_size=axis([64, 24, 8]))]
    return SoftSubNetwork(hidden_size=axis([32, 24, 16]), layers=layers), leaves


def _run(model, tokens, pos, subnet, leaves, execution):
    model.zero_grad(set_to_none=True)
    for leaf in leaves:
        leaf.grad = None
    loss = model(tokens, pos, None, labels=tokens, subnetwork=subnet, execution=execution).mean()
    loss.backward()
    # A dropped layer has no gradient in either execution; elsewhere the masked forward leaves
    # zeros on pruned weights where the sliced one leaves... zeros too (the slices' backward).
    params = dict(model.named_parameters())
    grads = {n: torch.zeros_like(params[n]) if g is None and n in params else g
             for n, g in _grads(model, leaves).items()}
    return loss.detach(), grads


def test_random_hard_subnetworks_sliced_equal_masked(megatron_env):
    """Every axis, heterogeneous sizes, dropped layers, a sequence longer than the Mamba chunk:
    logits and all parameter gradients."""
    cfg = tiny_config({"hybrid_layer_pattern": "M-*M-*-", "mamba_num_heads": 8,
                       "mamba_num_groups": 2, "num_attention_heads": 4, "num_query_groups": 2})
    model = perturb(build_elastic_model(cfg), seed=2)
    rng = random.Random(13)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 37))
    pos = torch.arange(37).expand_as(tokens)
    dropped = 0
    for _ in range(6):
        subnet = sample_subnetwork(cfg.model, rng)
        dropped += len(subnet.layers) - len(subnet.kept_layers)
        masked = _run(model, tokens, pos, subnet, [], "masked")
        sliced = _run(model, tokens, pos, subnet, [], "sliced")
        torch.testing.assert_close(sliced[0], masked[0], rtol=TOL, atol=0)
        _assert_same_rel(sliced[1], masked[1], subnet.describe(cfg.model))
    assert dropped > 0


def _assert_same_rel(actual, expected, what, tol=TOL):
    """Equal up to fp32 rounding: max |a - e| <= tol * G for every tensor, G the largest gradient
    entry of its group (model parameters / router).  Not each tensor's own scale: a tiny
    gradient (e.g. through the norm of a 1-channel hidden size, whose derivative is ~eps/x^2)
    carries the rounding of the masked norm's eps correction at its own relative size."""
    assert actual.keys() == expected.keys()
    for router in (False, True):
        names = [n for n in expected if n.startswith("router") == router]
        if not names:
            continue
        scale = max(expected[n].abs().max() for n in names).clamp_min(1e-30)
        for n in names:
            rel = ((actual[n] - expected[n]).abs().max() / scale).item()
            assert rel <= tol, f"{what}: {n} differs by {rel:.3g} of the largest gradient"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_router_hard_mode_sliced_equals_masked_with_router_gradients(megatron_env, seed):
    cfg = tiny_config({"hybrid_layer_pattern": "M-*M-"})
    model = perturb(build_elastic_model(cfg), seed=seed)
    tokens, pos = _tokens(cfg)
    masked = _run(model, tokens, pos, *_scaled(cfg, seed), "masked")
    soft, leaves = _scaled(cfg, seed)
    sliced = _run(model, tokens, pos, soft, leaves, "sliced")
    torch.testing.assert_close(sliced[0], masked[0], rtol=TOL, atol=0)
    _assert_same_rel(sliced[1], masked[1], f"seed {seed}")
    assert all(sliced[1][f"router.{i}"].abs().sum() > 0 for i in range(len(leaves)))


def test_config_switches_are_validated():
    from nemo_elastic.config import ConfigError, load_config

    assert load_config("conf/tiny.yaml").elastic.execution == "sliced"
    with pytest.raises(ConfigError, match=r"elastic.execution='fast': must be one of"):
        load_config("conf/tiny.yaml", ["elastic.execution=fast"])
    with pytest.raises(ConfigError, match=r"elastic.budget_sampling='some': must be one of"):
        load_config("conf/tiny.yaml", ["elastic.budget_sampling=some"])


def test_soft_mixture_and_mask_objects_are_refused(megatron_env):
    cfg = tiny_config({"hybrid_layer_pattern": "M-*M-"})
    model = build_elastic_model(cfg)
    tokens, pos = _tokens(cfg)
    soft, _ = _scaled(cfg, 0)
    soft.hidden_size.mode = "mixture"
    with pytest.raises(ValueError, match=r"sliced execution needs the router's hard mode.*"
                                         r"execution='masked'"):
        model(tokens, pos, None, subnetwork=soft, execution="sliced")
    with pytest.raises(TypeError, match="needs a SubNetwork or a SoftSubNetwork"):
        model(tokens, pos, None, subnetwork=model.resolve(_hard(cfg)), execution="sliced")
    with pytest.raises(ValueError, match="execution='fast': must be one of"):
        model(tokens, pos, None, subnetwork=_hard(cfg), execution="fast")


@pytest.mark.parametrize("recompute", ["full-uniform-1", "full-block-3", "selective-all"])
def test_sliced_with_recompute_equals_masked_without(recompute_env, recompute):
    """The recompute re-binds the sizes and slices the weights again in the backward pass."""
    cfg = tiny_config({"hybrid_layer_pattern": "M-*M-"})
    reference, model = _models(cfg, **RECOMPUTE[recompute])
    tokens, pos = _tokens(cfg)
    for make in (lambda: (_hard(cfg), []), lambda: _scaled(cfg, 5)):
        expected = _run(reference, tokens, pos, *make(), "masked")
        actual = _run(model, tokens, pos, *make(), "sliced")
        torch.testing.assert_close(actual[0], expected[0], rtol=TOL, atol=0)
        _assert_same_rel(actual[1], expected[1], recompute)


@pytest.fixture
def recompute_env(megatron_env):
    return megatron_env


# ----------------------------------------------------------------------------- the elastic step

@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_router_hard_mode_depth_drops_layers_and_sliced_skips_them(megatron_env, seed):
    """The router's hard mode on the depth axis (paper mode 1): the argmax depth choice's layers
    are gated by its probability, the other layers are dropped (False) and the sliced forward
    does not run them; masked == sliced (loss, model and router gradients, the depth router
    included); the family's depth is the argmax choice; the budget loss counts the layers'
    survival probabilities exactly as the soft (mixture) mode does.  (The hidden axis stays
    fixed here: its probability's gradient is a near-cancelling sum - RMSNorm is scale-invariant
    up to eps - whose fp32 rounding reaches ~4e-5 of the largest router gradient; the test above
    covers it without depth.)"""
    from nemo_elastic.config_elastic import ElasticConfig
    from nemo_elastic.elastic.expected_cost import expected_parameters
    from nemo_elastic.router import ElasticRouter

    cfg = tiny_config({"hybrid_layer_pattern": "M-*M-"})
    ranking = [3, 1, 4, 0, 2]  # least important first
    counts = [5, 4, 3, 2]

    def router(mode):
        return ElasticRouter(cfg.model, ElasticConfig(
            budgets={"full": 1.0, "b70": 0.7, "b45": 0.45}, iters=10, warmup_iters=0,
            axes=["mamba_heads", "ffn"], depth_choices=counts, seed=seed,
            router={"mode": mode}), total_iters=10, layer_ranking=ranking)

    hard, soft = router("hard"), router("soft")
    budget, target = 1 + seed % 2, 1 + seed % 3  # target: a depth choice that drops layers
    with torch.no_grad():  # lift the target choice's logit by 2 (at iteration 0: tau = scale = 1)
        net = hard.routers["depth"].net
        h = net[1](net[0](torch.eye(3, dtype=net[0].weight.dtype)[budget]))
        net[2].weight[target] += 2.0 * h / h.dot(h)
    soft.load_state_dict(hard.state_dict())
    out = hard(budget, noise=False)
    depth_p = out.probs["depth"][0]
    best = int(torch.argmax(depth_p))
    assert best == target and 0.3 < float(depth_p[best].detach()) < 0.999  # a gate, unsaturated
    kept = sorted(ranking[len(ranking) - counts[best]:])
    layers = out.subnetwork.layers
    assert [i for i, layer in enumerate(layers) if layer.keep is not False] == kept
    assert all(torch.equal(layers[i].keep, depth_p[best]) for i in kept)
    assert out.subnetwork.hard().kept_layers == kept
    mix = soft(budget, noise=False)
    assert torch.allclose(mix.probs["depth"], out.probs["depth"])
    assert expected_parameters(cfg.model, out.subnetwork).item() == pytest.approx(
        expected_parameters(cfg.model, mix.subnetwork).item(), rel=1e-6)

    model = perturb(build_elastic_model(cfg), seed=seed)
    tokens, pos = _tokens(cfg)
    ran = []
    hooks = [layer.register_forward_hook(lambda mod, a, o, i=i: ran.append(i))
             for i, layer in enumerate(model.decoder.layers)]
    results = {}
    for execution in ("masked", "sliced"):
        out = hard(budget, noise=False)
        probs = [out.probs[axis] for axis in sorted(out.probs)]  # the router's outputs
        for t in probs:
            t.retain_grad()
        ran.clear()
        loss, grads = _run(model, tokens, pos, out.subnetwork, probs, execution)
        # an axis whose layers are all dropped gets no gradient in either execution
        results[execution] = loss, {n: torch.zeros(1) if g is None else g
                                    for n, g in grads.items()}
        if execution == "sliced":
            assert sorted(set(ran)) == kept
    for h in hooks:
        h.remove()
    torch.testing.assert_close(results["sliced"][0], results["masked"][0], rtol=TOL, atol=0)
    _assert_same_rel(results["sliced"][1], results["masked"][1], f"seed {seed}")
    depth_grad = results["sliced"][1][f"router.{sorted(out.probs).index('depth')}"]
    assert depth_grad[0, best] != 0 and depth_grad.count_nonzero() == 1


PATTERNS = {"tp1": ("M-*M-", {}), "tp2": ("M-*M-", {"tensor_model_parallel_size": 2}),
            "pp2": ("M-|*M-", {"pipeline_model_parallel_size": 2})}


def _dropping(router, num_layers):
    """Make the router's output drop a layer chosen by (budget, micro-batch), so that the steps
    below run sub-networks with dropped layers (the tiny recipe has no depth axis)."""
    forward = router.forward

    def with_drops(index, *, iteration=0, micro_batch=0, noise=True):
        out = forward(index, iteration=iteration, micro_batch=micro_batch, noise=noise)
        out.subnetwork.layers[(3 * index + micro_batch) % num_layers].keep = False
        return out

    router.forward = with_drops


def _step(trainer, probs, execution, sampling):
    """One forward-backward of the elastic step from the start of the data, no optimizer step:
    (record, model gradients of this rank, router gradients)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    seg = trainer.segments[0]
    seg._data = None  # the same micro-batches every time
    trainer.step.execution, trainer.step.sampling = execution, sampling
    trainer.ddp.train()
    trainer.ddp.zero_grad_buffer()
    trainer.begin_iteration(1, seg)
    trainer.step.begin_iteration(1, probs)
    losses = get_forward_backward_func()(
        forward_step_func=trainer.forward_step, data_iterator=seg.data.train_iter,
        model=[trainer.ddp], num_microbatches=trainer.num_microbatches(seg),
        seq_length=seg.seq_length, micro_batch_size=seg.micro_batch_size, forward_only=False,
        **trainer.schedule_kwargs(seg))
    return (trainer.reduce_losses(losses),
            {n: p.main_grad.clone() for n, p in trainer.model.named_parameters()},
            {n: p.grad.clone() for n, p in trainer.router.named_parameters()})


def _uneven_ffn(model, cfg, layout):
    """A hard sub-network whose FFN prefix (24 of 64 neurons) lies wholly in TP rank 0's block:
    under TP=2 rank 1 keeps no neuron and contributes zeros to the all-reduce."""
    from nemo_elastic.elastic import SubNetwork

    subnet = SubNetwork.uniform(cfg.model, hidden_size=24, mamba_num_heads=2, mamba_head_dim=5,
                                num_attention_heads=2, ffn_hidden_size=24, drop_layers=[3])
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 40), generator=gen)
    pos = torch.arange(40).expand_as(tokens)
    masked = _run(model, tokens, pos, subnet, [], "masked")
    sliced = _run(model, tokens, pos, subnet, [], "sliced")
    torch.testing.assert_close(sliced[0], masked[0], rtol=TOL, atol=0)
    _assert_same_rel(sliced[1], masked[1], f"{layout}: uneven FFN")
    model.zero_grad(set_to_none=True)


def _check_layout(rank, world_size, tmp_path, layout):
    """In one layout: sliced step == masked step (loss, every local gradient, router), and the
    shared-teacher step over all budgets == the probability-weighted sum of one-budget steps."""
    from nemo_elastic.training.elastic.trainer import parent_config
    from nemo_elastic.training.train import build_trainer
    from tests.test_train import _cfg

    pattern, parallel = PATTERNS[layout]
    overrides = [f"parallel.{k}={v}" for k, v in parallel.items()]
    cfg, init, teacher = parent_config(_cfg(tmp_path, *overrides, f"output_dir={tmp_path / layout}",
                                            pattern=pattern, stage1=2, stage2=1))
    with runtime.distributed(cfg.parallel) as info:
        trainer = build_trainer(cfg, init, teacher, info)
        if layout != "pp2":
            _uneven_ffn(trainer.model, cfg, layout)
        _dropping(trainer.router, cfg.model.num_layers)
        probs = [0.5, 0.3, 0.2]
        masked = _step(trainer, probs, "masked", "one")
        sliced = _step(trainer, probs, "sliced", "one")
        drawn = list(trainer.step.budgets_drawn)
        assert trainer.step.execution == "sliced" and len(set(drawn)) >= 1
        for key in ("kd", "budget_loss"):
            assert sliced[0][key] == pytest.approx(masked[0][key], rel=TOL), key
        _assert_same_rel(sliced[1], masked[1], f"{layout}: model")
        _assert_same_rel(sliced[2], masked[2], f"{layout}: router")
        assert any(g.abs().sum() > 0 for g in sliced[2].values())

        shared = _step(trainer, probs, "sliced", "all")
        assert trainer.step.budgets_drawn == [0, 1, 2] * trainer.num_microbatches(
            trainer.segments[0])
        each = [_step(trainer, [float(i == b) for i in range(3)], "sliced", "one")
                for b in range(3)]
        assert shared[0]["kd"] == pytest.approx(sum(p * e[0]["kd"] for p, e in zip(probs, each)),
                                                rel=TOL)
        for part, what in ((1, "model"), (2, "router")):
            expected = {n: sum(p * e[part][n] for p, e in zip(probs, each)) for n in shared[part]}
            _assert_same_rel(shared[part], expected, f"{layout}: all budgets, {what}")


def test_sliced_step_equals_masked_step_and_shared_teacher_sums_budgets(tmp_path):
    from tests.test_train import _parent

    _parent(tmp_path)
    _check_layout(0, 1, tmp_path, "tp1")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_sliced_step_equals_masked_step_tp2_pp2(tmp_path, layout):
    from tests.multiproc import run_multiprocess
    from tests.test_train import _parent

    _parent(tmp_path)
    run_multiprocess(_check_layout, 2, tmp_path, layout)
