"""`nemo_elastic.layout`: the one table of parameter axes covers every parameter the model
builder creates (also per-layer sizes), and its fused axes follow the packing Megatron-Core's
own modules compute with (checked against the module attributes, not the layout itself)."""

import pytest
import torch

from nemo_elastic import layout
from nemo_elastic.model import build_hybrid_model
from tests.conftest import tiny_config

PER_LAYER = [{"mamba_num_heads": 2}, {"ffn_hidden_size": 16}, {"num_attention_heads": 2}, {}, {}]


def test_every_parameter_has_its_axes_and_the_full_index_is_identity(megatron_env):
    cfg = tiny_config({"hybrid_layer_pattern": "M-*M-", "per_layer": PER_LAYER})
    model = build_hybrid_model(cfg, spec_backend="local")
    m = cfg.model
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    for key, t in sd.items():
        layer, name, axes = layout.tensor_axes(m, key, t.shape)  # raises on unknown / bad shape
        assert len(axes) == t.dim(), key
    mixer = model.decoder.layers[0].mixer  # Megatron-Core's own sizes of the per-layer Mamba
    sizes = layout.axis_sizes(m, 0)
    assert sizes["heads"] == mixer.nheads == 2
    assert sizes["in_proj"] == mixer.in_proj.weight.shape[0]
    assert sizes["conv"] == mixer.conv1d_weight.shape[0]
    full = {i: layout.LayerIndex(
        m=m, layer=i, hidden=torch.arange(m.hidden_size),
        heads=torch.arange(layout.axis_sizes(m, i)["heads"]) if s != "-" else None,
        channels=torch.arange(m.layer_size("mamba_head_dim", i)) if s == "M" else None,
        ffn=torch.arange(m.layer_size("ffn_hidden_size", i)) if s == "-" else None)
        for i, s in enumerate(m.layer_symbols)}
    full[None] = layout.LayerIndex(m=m, layer=None, hidden=torch.arange(m.hidden_size))
    same = layout.reindex_state_dict(sd, m, full.get)
    assert same.keys() == sd.keys() and all(torch.equal(same[k], sd[k]) for k in sd)
    with pytest.raises(layout.LayoutError, match="expected"):
        layout.tensor_axes(m, "decoder.layers.1.mlp.linear_fc1.weight", (64, 32))
    with pytest.raises(layout.LayoutError, match="unexpected attention tensor"):
        layout.tensor_axes(m, "decoder.layers.2.self_attention.linear_qkv.bias", (8,))


def test_qkv_split_and_fuse_per_layer_heads():
    m = tiny_config({"hybrid_layer_pattern": "M-*M-", "per_layer": PER_LAYER}).model
    a, Q, c, h = 2, m.num_query_groups, m.head_dim, m.hidden_size  # layer 2 has 2 heads
    qkv = torch.randn((a + 2 * Q) * c, h)
    q, k, v = layout.split_qkv(qkv, m, 2)
    assert q.shape == (a * c, h) and k.shape == v.shape == (Q * c, h)
    # group 0 rows: [q head 0 | k0 | v0]; group 1: [q head 1 | k1 | v1]
    block = (a // Q + 2) * c
    assert torch.equal(q[:c], qkv[:c]) and torch.equal(k[:c], qkv[c:2 * c])
    assert torch.equal(v[c:], qkv[block + 2 * c:block + 3 * c])
    assert torch.equal(layout.fuse_qkv(q, k, v, m, 2), qkv)
    # a kept head order: slicing a prefix / permuting inside groups keep k and v rows
    idx = layout.LayerIndex(m=m, layer=2, hidden=torch.arange(h), heads=torch.tensor([1, 0]))
    with pytest.raises(layout.LayoutError, match="group by group"):
        idx.axis("qkv")
