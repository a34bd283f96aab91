"""Mixture-of-experts parents (Nemotron 3): the 'E' layer on Megatron-Core's MoELayer.

* the layer's output equals a float64 loop over tokens and experts written from the weights
  (sigmoid scores, score-correction bias, grouped top-k, normalised top-k weights, routed
  scaling factor, squared-ReLU experts, shared expert);
* closed-form total and active parameter counts equal a hand calculation, the built model and
  transformers' NemotronH (also for the published Nemotron 3 Nano 30B-A3B shape);
* import-hf / export of MoE `nemotron_h` checkpoints: logits equal transformers' (1e-4), the
  export reloads in stock transformers with the same tensors;
* the recipe's MoE section is validated at load.
"""

from __future__ import annotations

import pytest
import torch

from nemo_elastic.cost_model import count_active_parameters, count_parameters, parameter_breakdown
from nemo_elastic.config import ConfigError, ModelConfig
from tests.conftest import perturb, tiny_config, tiny_model_dict

F64 = torch.float64
MOE = dict(num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=24,
           moe_shared_expert_intermediate_size=16, moe_router_topk_scaling_factor=2.5)


def _moe_cfg(pattern="ME*E", **moe):
    return tiny_config({"hybrid_layer_pattern": pattern, "moe": {**MOE, **moe}})


# ------------------------------------------------------------------------------ the oracle

def reference_moe(x, w, m) -> torch.Tensor:
    """Float64 loop over tokens and experts: x [T, h]; w: the layer's tensors (float64)."""
    out = torch.zeros_like(x)
    E, k = m.num_moe_experts, m.moe_router_topk
    groups, group_topk = m.moe_router_num_groups, m.moe_router_group_topk
    for t in range(x.shape[0]):
        xt = x[t]
        scores = torch.sigmoid(w["router"] @ xt)
        choice = scores + w["bias"]
        if groups > 1:  # a group scores the sum of its top-2 experts; keep the best groups
            per = choice.view(groups, E // groups)
            best = per.topk(2, dim=-1).values.sum(-1).topk(group_topk).indices
            allowed = torch.zeros(groups, dtype=torch.bool)
            allowed[best] = True
            choice = choice.masked_fill(~allowed.repeat_interleave(E // groups), float("-inf"))
        top = choice.topk(k).indices
        weights = scores[top] / scores[top].sum() * m.moe_router_topk_scaling_factor
        for j, e in enumerate(top.tolist()):
            hidden = torch.relu(w["fc1"][e] @ xt) ** 2
            out[t] += weights[j] * (w["fc2"][e] @ hidden)
        out[t] += w["shared_fc2"] @ (torch.relu(w["shared_fc1"] @ xt) ** 2)
    return out


def _layer_tensors(layer) -> dict:
    mlp = layer.mlp
    experts = mlp.experts.local_experts
    return {"router": mlp.router.weight.detach().to(F64),
            "bias": mlp.router.expert_bias.detach().to(F64),
            "fc1": [e.linear_fc1.weight.detach().to(F64) for e in experts],
            "fc2": [e.linear_fc2.weight.detach().to(F64) for e in experts],
            "shared_fc1": mlp.shared_experts.linear_fc1.weight.detach().to(F64),
            "shared_fc2": mlp.shared_experts.linear_fc2.weight.detach().to(F64)}


@pytest.mark.parametrize("moe", [{}, dict(moe_router_num_groups=4, moe_router_group_topk=1)],
                         ids=["flat", "grouped"])
def test_moe_layer_matches_float64_loop(moe, megatron_env):
    from nemo_elastic.model import build_hybrid_model

    cfg = _moe_cfg(**moe)
    model = perturb(build_hybrid_model(cfg))
    layer = model.decoder.layers[1]
    with torch.no_grad():  # a score-correction bias large enough to change the routing
        layer.mlp.router.expert_bias.copy_(0.3 * torch.randn(8, generator=torch.Generator()
                                                             .manual_seed(3)))
    x = torch.randn(12, 2, 32, generator=torch.Generator().manual_seed(0))  # [s, b, h]
    model.eval()
    with torch.no_grad():
        normed = layer.pre_mlp_layernorm(x)
        ours, _ = layer.mlp(normed)
        full, _ = layer(x, attention_mask=None)
    w = _layer_tensors(layer)
    ref = reference_moe(normed.reshape(-1, 32).to(F64), w, cfg.model.moe).reshape(x.shape)
    assert (ours.to(F64) - ref).abs().max() / ref.abs().max() < 1e-6
    # the layer: residual + MoE(pre-norm(x))
    assert torch.allclose(full.to(F64), x.to(F64) + ref, atol=1e-5)
    # the bias changed the choice of experts for some token (else the test would not see it)
    w_nobias = dict(w, bias=torch.zeros_like(w["bias"]))
    other = reference_moe(normed.reshape(-1, 32).to(F64), w_nobias, cfg.model.moe)
    assert not torch.allclose(other, ref.reshape(-1, 32))


# ------------------------------------------------------------------------------ counts

def _hand_count(h=32, V=64, E=8, f=24, fs=16, k=2):
    mamba_d, G, N, H, K = 4 * 8, 2, 8, 4, 4
    mamba = h + (2 * mamba_d + 2 * G * N + H) * h + (mamba_d + 2 * G * N) * (K + 1) \
        + 3 * H + mamba_d + h * mamba_d
    attention = h + (4 + 2 * 2) * 8 * h + h * 4 * 8
    moe = h + E * h + E * 2 * f * h + 2 * fs * h
    moe_active = h + E * h + k * 2 * f * h + 2 * fs * h
    embedding = 2 * V * h + h
    return (embedding + mamba + attention + 2 * moe,
            embedding + mamba + attention + 2 * moe_active)


def test_total_and_active_counts(megatron_env):
    from nemo_elastic.model import build_hybrid_model
    from nemo_elastic.model import module_parameters as count_built

    cfg = _moe_cfg()
    total, active = _hand_count()
    assert count_parameters(cfg.model) == total == count_built(build_hybrid_model(cfg))
    assert count_active_parameters(cfg.model) == active
    breakdown = parameter_breakdown(cfg.model)
    assert (breakdown["total"], breakdown["active"]) == (total, active)
    dense = tiny_config()
    assert count_active_parameters(dense.model) == count_parameters(dense.model)
    assert "moe" not in parameter_breakdown(dense.model)


def _hf_model_on_meta(m: ModelConfig):
    from transformers import NemotronHForCausalLM

    from nemo_elastic.export import hf_config_from_model

    with torch.device("meta"):
        return NemotronHForCausalLM(hf_config_from_model(m))


def _hf_active(hf_model, topk: int) -> int:
    """transformers' parameters with each MoE layer's routed experts cut to `topk` of them."""
    total = 0
    for name, p in hf_model.named_parameters():
        if ".mixer.experts." in name:
            total += p.numel() // p.shape[0] * topk  # [E, out, in] -> topk experts
        else:
            total += p.numel()
    return total


def test_counts_match_transformers():
    pytest.importorskip("transformers")
    m = _moe_cfg().model
    hf_model = _hf_model_on_meta(m)
    assert sum(p.numel() for p in hf_model.parameters()) == count_parameters(m)
    assert _hf_active(hf_model, 2) == count_active_parameters(m)


def test_nemotron3_nano_recipe_counts():
    """conf/nemotron3_nano_30b_a3b.yaml has the published shape: 31.6B total, 3.2B active
    without the input embedding table (3.6B with it), NVIDIA's numbers; transformers agrees."""
    pytest.importorskip("transformers")
    from nemo_elastic.config import load_config

    m = load_config("conf/nemotron3_nano_30b_a3b.yaml").model
    total, active = count_parameters(m), count_active_parameters(m)
    assert total == 31_577_937_344
    assert active == 3_580_073_408
    assert round(total / 1e9, 1) == 31.6
    assert round((active - m.vocab_size * m.hidden_size) / 1e9, 1) == 3.2
    hf_model = _hf_model_on_meta(m)
    assert sum(p.numel() for p in hf_model.parameters()) == total
    assert _hf_active(hf_model, m.moe.moe_router_topk) == active


# ------------------------------------------------------------------------------ HF parity

def _hf_moe_model(seed=0, **overrides):
    from tests.hf_util import hf_config, random_hf_model

    kwargs = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                  moe_shared_expert_intermediate_size=16, routed_scaling_factor=2.5, n_group=1,
                  topk_group=1, norm_topk_prob=True)
    kwargs.update(overrides)
    model = random_hf_model(hf_config(kwargs.pop("pattern", "MEM*E-"), **kwargs), seed=seed)
    gen = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():  # the score-correction bias is a buffer: move it off zero too
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.3 * torch.randn(buf.shape, generator=gen))
    return model


@pytest.mark.parametrize("overrides", [
    {}, pytest.param(dict(n_group=2, topk_group=1), marks=pytest.mark.slow)],
                         ids=["flat", "grouped"])
def test_hf_moe_logits_both_directions(overrides, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from nemo_elastic.export import export_hf, import_hf
    from tests.hf_util import hf_logits, our_logits, rel_err, save_hf, tokens

    hf_model = _hf_moe_model(**overrides)
    hf_dir = save_hf(hf_model, tmp_path / "hf")
    ids = tokens()
    ref = hf_logits(hf_model, ids)
    ckpt = import_hf(hf_dir, tmp_path / "ckpt")
    ours = our_logits(ckpt, ids)
    assert rel_err(ours, ref) <= 1e-4
    out = export_hf(ckpt, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert rel_err(hf_logits(reloaded, ids), ref) <= 1e-4
    for (name, a), (_, b) in zip(sorted(hf_model.state_dict().items()),
                                 sorted(reloaded.state_dict().items())):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------ validation

@pytest.mark.parametrize("moe,field", [
    (dict(moe_router_topk=9), "model.moe.moe_router_topk"),
    (dict(moe_router_num_groups=3), "model.moe.moe_router_num_groups"),
    (dict(moe_router_num_groups=4, moe_router_group_topk=2), "model.moe.moe_router_topk"),
    (dict(moe_norm_topk_prob=False), "model.moe.moe_norm_topk_prob"),
    (dict(moe_latent_size=16), "model.moe.moe_latent_size"),
    (dict(moe_router_topk_scaling_factor=0.0), "model.moe.moe_router_topk_scaling_factor"),
    (dict(num_moe_experts=0), "model.moe.num_moe_experts"),
    (dict(moe_expert_count=3), "model.moe.moe_expert_count"),
])
def test_moe_section_validated(moe, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _moe_cfg(**moe)


def test_moe_pattern_needs_section_and_ep_divides_experts():
    with pytest.raises(ConfigError, match="model.moe is not set"):
        ModelConfig(**tiny_model_dict(hybrid_layer_pattern="ME"))
    with pytest.raises(ConfigError, match="parallel.expert_model_parallel_size"):
        tiny_config({"hybrid_layer_pattern": "ME", "moe": MOE},
                    parallel={"expert_model_parallel_size": 3})
    with pytest.raises(ConfigError, match="parallel.expert_model_parallel_size"):
        tiny_config(parallel={"expert_model_parallel_size": 2})


# ------------------------------------------------------------------------------ training

FAST = ["data.synthetic.num_train=400", "data.synthetic.num_val=32", "data.seq_length=64",
        "data.micro_batch_size=4", "data.global_batch_size=8", "train.eval_iters=1",
        "train.eval_accuracy_samples=0", "train.warmup_iters=0", "train.iters=1",
        "train.eval_interval=1", "train.save_interval=1"]


@pytest.mark.slow
def test_expert_bias_update_is_aux_loss_free_balancing(tmp_path, monkeypatch):
    """One pretraining step: every router's bias moves by rate * sign(mean load - load), the
    load counted over the step's tokens (Megatron-Core's update in finalize_model_grads)."""
    from megatron.core.transformer.moe.router import TopKRouter

    from nemo_elastic import runtime
    from nemo_elastic.checkpoint import load_checkpoint, resolve_checkpoint
    from nemo_elastic.config import load_config
    from nemo_elastic.model import build_hybrid_model
    from nemo_elastic.training.pretrain import pretrain

    loads: dict[int, torch.Tensor] = {}
    original = TopKRouter.routing

    def counting(self, logits, *args, **kwargs):
        probs, routing_map = original(self, logits, *args, **kwargs)
        if self.training and torch.is_grad_enabled():
            loads[self.layer_number] = loads.get(self.layer_number, 0) + routing_map.sum(0)
        return probs, routing_map

    monkeypatch.setattr(TopKRouter, "routing", counting)
    cfg = load_config("conf/tiny_moe.yaml", [*FAST, f"output_dir={tmp_path}"])
    pretrain(cfg, progress=False)
    assert sorted(loads) == [2, 4, 6]  # layer numbers (1-based) of the 'E' layers
    rate = cfg.model.moe.moe_router_bias_update_rate
    with runtime.distributed(cfg.parallel):
        model = build_hybrid_model(cfg)
        load_checkpoint(resolve_checkpoint(tmp_path), model=model, restore_rng=False)
        for layer in model.decoder.layers:
            if layer.layer_number in loads:
                load = loads[layer.layer_number].float()
                expected = rate * torch.sign(load.mean() - load)
                assert torch.allclose(layer.mlp.router.expert_bias, expected), layer.layer_number
                assert expected.abs().sum() > 0


def _ep_rank(rank, world_size, ckpt, tokens_path, out_dir):
    from nemo_elastic import runtime
    from nemo_elastic.checkpoint import load_checkpoint
    from nemo_elastic.model import build_hybrid_model

    cfg = tiny_config({"hybrid_layer_pattern": "ME*E", "moe": MOE},
                      parallel={"expert_model_parallel_size": 2})
    with runtime.distributed(cfg.parallel):
        import torch.distributed as dist

        model = build_hybrid_model(cfg)
        load_checkpoint(ckpt, model=model, restore_rng=False)
        tokens = torch.load(tokens_path)[rank]
        pos = torch.arange(tokens.shape[1]).expand_as(tokens)
        loss = model(tokens, pos, None, labels=tokens).sum()
        loss.backward()
        grads = {}
        for name, p in model.named_parameters():
            if ".local_experts." in name:  # this rank's experts: rank * 4 + local index
                local = int(name.split(".local_experts.")[1].split(".")[0])
                name = name.replace(f".local_experts.{local}.",
                                    f".local_experts.{rank * 4 + local}.")
                grads[name] = p.grad.clone()
            else:  # replicated: sum over the two ranks' batches
                grad = p.grad.clone()
                dist.all_reduce(grad)
                grads[name] = grad
        torch.save({"loss": loss.detach(), "grads": grads}, f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow
def test_expert_parallel_2_equals_1(tmp_path):
    """EP=2 (two gloo ranks, 4 experts each, all-to-all dispatch): the losses and every gradient
    equal one process holding all 8 experts."""
    from nemo_elastic import runtime
    from nemo_elastic.checkpoint import save_checkpoint
    from nemo_elastic.model import build_hybrid_model
    from tests.multiproc import run_multiprocess

    cfg = _moe_cfg(pattern="ME*E")
    tokens = torch.randint(0, 64, (2, 2, 24), generator=torch.Generator().manual_seed(1))
    with runtime.distributed(cfg.parallel):
        model = perturb(build_hybrid_model(cfg))
        save_checkpoint(tmp_path / "ckpt", cfg=cfg, model=model, kind="test")
        losses = []
        for r in range(2):
            pos = torch.arange(24).expand(2, 24)
            losses.append(model(tokens[r], pos, None, labels=tokens[r]).sum())
        sum(losses).backward()
        reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.save(tokens, tmp_path / "tokens.pt")
    run_multiprocess(_ep_rank, 2, tmp_path / "ckpt", tmp_path / "tokens.pt", tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in range(2):
        assert torch.allclose(ranks[r]["loss"], losses[r].detach(), rtol=1e-5)
    grads = {**ranks[0]["grads"], **ranks[1]["grads"]}
    assert sorted(grads) == sorted(reference)
    for name, ref in reference.items():
        assert torch.allclose(grads[name], ref, rtol=1e-4, atol=1e-5), name
