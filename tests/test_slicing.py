"""Slicing a parent into a sub-network model (`nemo_elastic.export.slicing` / `extract`), and the
heterogeneous per-layer sizes it produces (builder, dist checkpoint, closed-form count).

Index expectations are spelled out here as explicit row lists, not recomputed with the helpers
under test; function-level checks use identities that need no slicing code (a zero-output block
is the identity on the residual stream; a zeroed squared-ReLU neuron contributes nothing).
"""

import dataclasses
import random

import pytest
import torch

from nemo_elastic.cost_model import count_parameters as closed_form_count
from nemo_elastic.cost_model import subnetwork_parameters
from nemo_elastic.checkpoint import (
    CheckpointError, config_from_checkpoint, load_checkpoint, read_meta, save_checkpoint)
from nemo_elastic.config import ConfigError
from nemo_elastic.elastic.subnet import SubNetwork
from nemo_elastic.export.extract import extract_checkpoint
from nemo_elastic.export.hf_adapter import HFConfigError, hf_config_from_model
from nemo_elastic.export.slicing import SlicingError, slice_model, slice_state_dict
from nemo_elastic.model import build_hybrid_model, module_parameters
from nemo_elastic.runtime import set_seed
from tests.conftest import tiny_config
from tests.conftest import perturb as _perturb
from tests.test_model import _inputs

# Layers: 0 M, 1 -, 2 *, 3 M, 4 -, 5 *.  Mamba: H=8 heads in G=2 groups (4 each), P=8, N=8
# (in_proj rows [z 64 | x 64 | B 16 | C 16 | dt 8] = 168).  Attention: 4 heads in Q=2 groups,
# head dim 8 (qkv rows per group [q q k v] x 8 = 32).  FFN 64, hidden 32, vocab 64.
PARENT = {"hybrid_layer_pattern": "M-*M-*", "mamba_num_heads": 8, "mamba_head_dim": 8,
          "mamba_num_groups": 2, "num_attention_heads": 4, "num_query_groups": 2, "kv_channels": 8}


def _parent(per_layer=None, seed=0):
    cfg = tiny_config({**PARENT, "per_layer": per_layer})
    set_seed(seed)
    model = build_hybrid_model(cfg)
    _perturb(model, seed=seed + 1)
    model.eval()
    return cfg, model


def _logits(model, cfg, seed=0):
    tokens, pos = _inputs(cfg, b=2, s=24, seed=seed)
    with torch.no_grad():
        return model(tokens, pos, None)


def _params(model):
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _random_subnet(m, rng):
    """Random heterogeneous sub-network: sizes multiple of the groups, >= 1 dropped layer."""
    sub = SubNetwork.uniform(m, hidden_size=rng.choice([16, 24, 32]),
                             drop_layers=[rng.randrange(m.num_layers)])
    for i, sym in enumerate(m.layer_symbols):
        if sym == "M":
            heads = m.layer_size("mamba_num_heads", i)
            sub = sub.replace_layer(i, mamba_num_heads=2 * rng.randint(1, heads // 2),
                                    mamba_head_dim=rng.randint(1, m.layer_size("mamba_head_dim",
                                                                                i)))
        elif sym == "*":
            heads = m.layer_size("num_attention_heads", i)
            sub = sub.replace_layer(i, num_attention_heads=2 * rng.randint(1, heads // 2))
        else:
            ffn = m.layer_size("ffn_hidden_size", i)
            sub = sub.replace_layer(i, ffn_hidden_size=rng.randint(1, ffn))
    return sub.validate(m)


def test_full_subnetwork_is_bit_identical(megatron_env):
    cfg, parent = _parent()
    child_cfg, child = slice_model(parent, cfg, SubNetwork.full(cfg.model))
    assert child_cfg.model == cfg.model
    src, dst = _params(parent), _params(child)
    assert src.keys() == dst.keys()
    for name, t in src.items():
        assert torch.equal(t, dst[name]), name
    assert torch.equal(_logits(parent, cfg), _logits(child, cfg))


HETEROGENEOUS_PARENT = [{"mamba_num_heads": 4}, {"ffn_hidden_size": 48}, {},
                        {"mamba_head_dim": 6}, {}, {"num_attention_heads": 2}]


@pytest.mark.parametrize("parent_per_layer", [None, HETEROGENEOUS_PARENT])
def test_random_subnetworks_match_fresh_child_shapes(megatron_env, parent_per_layer):
    cfg, parent = _parent(parent_per_layer)
    parent_sd = _params(parent)
    rng = random.Random(7 if parent_per_layer else 3)
    for _ in range(3):
        sub = _random_subnet(cfg.model, rng)
        child_model_cfg = sub.model_config(cfg.model)
        fresh = build_hybrid_model(dataclasses.replace(cfg, model=child_model_cfg))
        expected = {k: tuple(v.shape) for k, v in _params(fresh).items()}
        sliced = slice_state_dict(parent_sd, cfg.model, sub)
        assert {k: tuple(v.shape) for k, v in sliced.items()} == expected, sub.describe(cfg.model)
        assert module_parameters(fresh) == subnetwork_parameters(cfg.model, sub)
        child_cfg, child = slice_model(parent, cfg, sub)  # strict load
        assert child_cfg.model == child_model_cfg
        assert child_cfg.parallel.tensor_model_parallel_size == 1
        assert torch.isfinite(_logits(child, child_cfg)).all()


def test_mamba_attention_and_depth_indices(megatron_env):
    cfg, parent = _parent()
    p = _params(parent)
    sub = SubNetwork.uniform(cfg.model, hidden_size=24, mamba_num_heads=4, mamba_head_dim=5,
                             num_attention_heads=2, ffn_hidden_size=40, drop_layers=[1])
    s = slice_state_dict(p, cfg.model, sub)
    h = 24
    # Layer 0 (Mamba, kept as 0): heads {0,1} of group 0 and {4,5} of group 1, 5 of 8 channels.
    inner = [head * 8 + c for head in (0, 1, 4, 5) for c in range(5)]
    bc = list(range(128, 160))  # B (128..143) and C (144..159), untouched
    rows = inner + [64 + i for i in inner] + bc + [160 + head for head in (0, 1, 4, 5)]
    pre, new = "decoder.layers.0.mixer.", "decoder.layers.0.mixer."
    assert torch.equal(s[new + "in_proj.weight"], p[pre + "in_proj.weight"][rows][:, :h])
    conv = inner + list(range(64, 96))  # [x | B | C] over 64 + 16 + 16 channels
    assert torch.equal(s[new + "conv1d_weight"], p[pre + "conv1d_weight"][conv])
    assert torch.equal(s[new + "conv1d_bias"], p[pre + "conv1d_bias"][conv])
    for name in ("dt_bias", "A_log", "D"):
        assert torch.equal(s[new + name], p[pre + name][[0, 1, 4, 5]]), name
    assert torch.equal(s[new + "norm.weight"], p[pre + "norm.weight"][inner])
    assert torch.equal(s[new + "out_proj.weight"], p[pre + "out_proj.weight"][:h][:, inner])
    assert torch.equal(s["decoder.layers.0.norm.weight"], p["decoder.layers.0.norm.weight"][:h])
    # Layer 1 (MLP) dropped: parent layer 2 (attention) becomes child layer 1, and so on.
    assert not any(k.startswith("decoder.layers.5.") for k in s)
    qkv = s["decoder.layers.1.self_attention.linear_qkv.weight"]
    parent_qkv = p["decoder.layers.2.self_attention.linear_qkv.weight"]
    # group 0 rows 0..31 = [q0 | q1 | k0 | v0], group 1 rows 32..63 = [q2 | q3 | k1 | v1]
    keep = [*range(0, 8), *range(16, 32), *range(32, 40), *range(48, 64)]  # q0 k0 v0 q2 k1 v1
    assert torch.equal(qkv, parent_qkv[keep][:, :h])
    proj = p["decoder.layers.2.self_attention.linear_proj.weight"]
    assert torch.equal(s["decoder.layers.1.self_attention.linear_proj.weight"],
                       proj[:h][:, [*range(0, 8), *range(16, 24)]])
    assert torch.equal(s["decoder.layers.2.mixer.A_log"],
                       p["decoder.layers.3.mixer.A_log"][[0, 1, 4, 5]])
    assert torch.equal(s["decoder.layers.3.mlp.linear_fc1.weight"],
                       p["decoder.layers.4.mlp.linear_fc1.weight"][:40, :h])
    assert torch.equal(s["decoder.layers.3.mlp.linear_fc2.weight"],
                       p["decoder.layers.4.mlp.linear_fc2.weight"][:h, :40])
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        assert torch.equal(s[name], p[name][:, :h])
    assert torch.equal(s["decoder.final_norm.weight"], p["decoder.final_norm.weight"][:h])


def test_ffn_slice_equals_zeroed_neurons(megatron_env):
    cfg, parent = _parent()
    sub = SubNetwork.uniform(cfg.model).replace_layer(1, ffn_hidden_size=40).replace_layer(
        4, ffn_hidden_size=17)
    child_cfg, child = slice_model(parent, cfg, sub)
    with torch.no_grad():
        for layer, kept in ((1, 40), (4, 17)):
            mlp = parent.decoder.layers[layer].mlp
            mlp.linear_fc1.weight[kept:] = 0.0  # relu(0)^2 = 0: the neuron is silent
            mlp.linear_fc2.weight[:, kept:] = 0.0
    # Same terms up to exact zeros; the matmul may group the sums differently: tight tolerance.
    torch.testing.assert_close(_logits(child, child_cfg), _logits(parent, cfg),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layer,weight", [(0, "mixer.out_proj.weight"),
                                          (1, "mlp.linear_fc2.weight"),
                                          (2, "self_attention.linear_proj.weight")])
def test_dropped_layer_equals_zero_output_block(megatron_env, layer, weight):
    cfg, parent = _parent()
    child_cfg, child = slice_model(parent, cfg, SubNetwork.uniform(cfg.model, drop_layers=[layer]))
    assert child_cfg.model.num_layers == cfg.model.num_layers - 1
    with torch.no_grad():
        parent.decoder.layers[layer].get_parameter(weight).zero_()
    assert torch.equal(_logits(child, child_cfg), _logits(parent, cfg))


def test_heterogeneous_dist_checkpoint_round_trip_and_count(megatron_env, tmp_path):
    per_layer = [{"mamba_num_heads": 2, "mamba_head_dim": 3}, {"ffn_hidden_size": 24}, {},
                 {"mamba_num_heads": 6}, {}, {"num_attention_heads": 2}]
    cfg, source = _parent(per_layer, seed=4)
    mixer = source.decoder.layers[0].mixer
    # in_proj rows [z 6 | x 6 | B 16 | C 16 | dt 2]
    assert (mixer.nheads, mixer.headdim, tuple(mixer.in_proj.weight.shape)) == (2, 3, (46, 32))
    assert source.decoder.layers[5].self_attention.linear_qkv.weight.shape == ((2 + 4) * 8, 32)
    assert module_parameters(source) == closed_form_count(cfg.model)
    path = save_checkpoint(tmp_path / "ckpt", cfg=cfg, model=source, kind="test")
    loaded_cfg = config_from_checkpoint(path)
    assert loaded_cfg.model.per_layer == per_layer
    set_seed(9)
    target = build_hybrid_model(loaded_cfg)
    load_checkpoint(path, model=target)
    src, tgt = _params(source), _params(target)
    assert src.keys() == tgt.keys() and all(torch.equal(t, tgt[k]) for k, t in src.items())
    target.eval()
    assert torch.equal(_logits(source, cfg), _logits(target, cfg))


def test_extract_checkpoint_end_to_end(megatron_env, tmp_path):
    cfg, parent = _parent()
    parent_path = save_checkpoint(tmp_path / "parent", cfg=cfg, model=parent, iteration=5)
    sub = SubNetwork.uniform(cfg.model, hidden_size=24, drop_layers=[4]).replace_layer(
        0, mamba_num_heads=2, mamba_head_dim=6).replace_layer(5, num_attention_heads=2)
    out = extract_checkpoint(tmp_path / "parent", sub, tmp_path / "child")
    meta = read_meta(out)
    assert meta["kind"] == "extract" and meta["parent"] == str(parent_path)
    assert SubNetwork.from_dict(meta["subnetwork"]) == sub
    child_cfg = config_from_checkpoint(out)
    assert child_cfg.model == sub.model_config(cfg.model) and child_cfg.model.per_layer
    set_seed(11)
    loaded = build_hybrid_model(child_cfg)
    load_checkpoint(out, model=loaded)
    loaded.eval()
    _, sliced = slice_model(parent, cfg, sub)
    assert torch.equal(_logits(loaded, child_cfg), _logits(sliced, child_cfg))
    with pytest.raises(CheckpointError, match="already exists"):
        extract_checkpoint(tmp_path / "parent", sub, out)


def test_errors_name_the_problem(megatron_env):
    cfg, parent = _parent()
    with pytest.raises(ConfigError, match=r"layers\[0\].mamba_num_heads=3"):
        slice_state_dict(_params(parent), cfg.model,
                         SubNetwork.full(cfg.model).replace_layer(0, mamba_num_heads=3))
    other = tiny_config({**PARENT, "ffn_hidden_size": 32}).model
    with pytest.raises(SlicingError, match="linear_fc1.weight.*expected"):
        slice_state_dict(_params(parent), other, SubNetwork.full(other))
    child_cfg = SubNetwork.uniform(cfg.model, num_attention_heads=2).model_config(cfg.model)
    het = dataclasses.replace(child_cfg,
                              per_layer=[{}, {}, {"num_attention_heads": 4}, {}, {}, {}])
    with pytest.raises(HFConfigError, match=r"model\.per_layer"):
        hf_config_from_model(het)


def test_slice_model_needs_runtime():
    cfg = tiny_config(PARENT)
    with pytest.raises(SlicingError, match="TP=1, PP=1"):
        slice_model(torch.nn.Linear(1, 1), cfg, SubNetwork.full(cfg.model))
