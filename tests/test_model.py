"""The hybrid parent on Megatron-Core: names, forward/backward, checkpoint round-trip, and one
Mamba layer against a float64 sequential recurrence composed by hand from its weights."""

import torch

from nemo_elastic.checkpoint import load_checkpoint, read_meta, save_checkpoint
from nemo_elastic.model import build_hybrid_model
from nemo_elastic.runtime import set_seed
from tests.conftest import perturb, tiny_config
from tests.test_ops import oracle_conv, oracle_gated_norm, oracle_ssd

F64 = torch.float64


def _inputs(cfg, b=2, s=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (b, s), generator=gen)
    return tokens, torch.arange(s).expand(b, s)


def test_upstream_parameter_names(megatron_env):
    cfg = tiny_config({"hybrid_layer_pattern": "M-*"})
    names = {n for n, _ in build_hybrid_model(cfg).named_parameters()}
    mamba = ["norm.weight", "mixer.in_proj.weight", "mixer.conv1d_weight", "mixer.conv1d_bias",
             "mixer.dt_bias", "mixer.A_log", "mixer.D", "mixer.norm.weight", "mixer.out_proj.weight"]
    expected = {"embedding.word_embeddings.weight", "decoder.final_norm.weight", "output_layer.weight"}
    expected |= {f"decoder.layers.0.{n}" for n in mamba}
    expected |= {"decoder.layers.1.pre_mlp_layernorm.weight", "decoder.layers.1.mlp.linear_fc1.weight",
                 "decoder.layers.1.mlp.linear_fc2.weight"}
    expected |= {"decoder.layers.2.input_layernorm.weight",
                 "decoder.layers.2.self_attention.linear_qkv.weight",
                 "decoder.layers.2.self_attention.linear_proj.weight"}
    assert names == expected


def test_forward_backward_on_cpu(megatron_env):
    cfg = tiny_config()
    model = build_hybrid_model(cfg)
    tokens, pos = _inputs(cfg, s=37)  # not a multiple of the Mamba chunk (16)
    logits = model(tokens, pos, None)
    assert logits.shape == (2, 37, cfg.model.vocab_size) and torch.isfinite(logits).all()
    loss = model(tokens, pos, None, labels=tokens)
    assert loss.shape == (2, 37)
    loss.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_causality(megatron_env):
    """Changing token t must not change logits before t (Mamba conv/scan and attention)."""
    cfg = tiny_config()
    model = build_hybrid_model(cfg)
    perturb(model)
    tokens, pos = _inputs(cfg, s=30)
    changed = tokens.clone()
    changed[:, 20] = (changed[:, 20] + 1) % cfg.model.vocab_size
    with torch.no_grad():
        a, b = model(tokens, pos, None), model(changed, pos, None)
    assert torch.equal(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_dist_checkpoint_round_trip_bit_exact(megatron_env, tmp_path):
    cfg = tiny_config()
    set_seed(1)
    source = build_hybrid_model(cfg)
    perturb(source, seed=3)
    path = save_checkpoint(tmp_path / "ckpt", cfg=cfg, model=source, kind="test")
    assert read_meta(path)["config"]["model"]["hidden_size"] == cfg.model.hidden_size
    set_seed(2)
    target = build_hybrid_model(cfg)
    assert not torch.equal(target.output_layer.weight, source.output_layer.weight)
    load_checkpoint(path, model=target)
    src, tgt = dict(source.named_parameters()), dict(target.named_parameters())
    for name, p in src.items():
        assert torch.equal(p, tgt[name]), name
    tokens, pos = _inputs(cfg)
    with torch.no_grad():
        assert torch.equal(source(tokens, pos, None), target(tokens, pos, None))


def _mamba_layer_oracle(layer, hidden, eps):
    """hidden [s, b, h] -> hidden + Mamba2(RMSNorm(hidden)), float64, sequential recurrence."""
    mixer = layer.mixer
    d_in, g, n, nh, p = mixer.d_inner, mixer.ngroups, mixer.d_state, mixer.nheads, mixer.headdim
    x64 = hidden.detach().to(F64).transpose(0, 1)  # [b, s, h]
    normed = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * layer.norm.weight.to(F64)
    zxbcdt = normed @ mixer.in_proj.weight.to(F64).T
    z, xbc, dt = zxbcdt.split([d_in, d_in + 2 * g * n, nh], dim=-1)
    xbc = oracle_conv(xbc, mixer.conv1d_weight[:, 0, :], mixer.conv1d_bias, silu=True)
    x, B, C = xbc.split([d_in, g * n, g * n], dim=-1)
    b, s = x.shape[:2]
    y, _ = oracle_ssd(x.reshape(b, s, nh, p), dt, -torch.exp(mixer.A_log.to(F64)),
                      B.reshape(b, s, g, n), C.reshape(b, s, g, n), D=mixer.D,
                      dt_bias=mixer.dt_bias)
    y = oracle_gated_norm(y.reshape(b, s, d_in), mixer.norm.weight, z=z, eps=mixer.norm.eps,
                          group_size=d_in // g, norm_before_gate=False)
    out = y @ mixer.out_proj.weight.to(F64).T
    return (x64 + out).transpose(0, 1)


def test_mamba_layer_equals_sequential_recurrence(megatron_env):
    cfg = tiny_config({"hybrid_layer_pattern": "M", "mamba_num_groups": 2, "mamba_num_heads": 4})
    model = build_hybrid_model(cfg)
    perturb(model, seed=5)
    layer = model.decoder.layers[0]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 2, cfg.model.hidden_size, generator=gen)  # [s, b, h], s % chunk != 0
    with torch.no_grad():
        out = layer(hidden, attention_mask=None)
    ref = _mamba_layer_oracle(layer, hidden, cfg.model.layernorm_epsilon)
    rel = (out.to(F64) - ref).norm() / ref.norm()
    assert rel < 1e-5, rel
