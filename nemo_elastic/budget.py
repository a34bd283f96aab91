"""Closed-form parameter counts for the hybrid Mamba2 / attention / MLP model.

Pure Python (no torch / megatron import): a recipe's size can be checked anywhere.  The formulas
follow the Megatron-Core parameter layout built by `nemo_elastic.model.build_hybrid_model` (which
is also the Hugging Face `NemotronHForCausalLM` layout: no biases except the Mamba conv1d bias,
untied embedding / output layer, one pre-norm per layer, a final norm).

Per layer (h = hidden, d = mamba_num_heads * mamba_head_dim, G = mamba groups, N = state dim,
H = mamba heads, k = conv kernel, a = attention heads, g = query groups, c = head dim, f = ffn):

    Mamba2     h (pre-norm) + (2d + 2GN + H) h (in_proj [z|x|B|C|dt]) + (d + 2GN)(k + 1)
               (depthwise conv1d weight + bias over [x|B|C]) + 3H (dt_bias, A_log, D)
               + d (gated norm) + h d (out_proj)
    attention  h + (a + 2g) c h (fused qkv) + h a c (linear_proj)
    MLP        h + 2 f h (squared-ReLU, not gated)
    model      2 V h (embedding + untied output layer) + h (final norm)

`model.per_layer` overrides the sizes of single layers (heterogeneous models, e.g. extracted
sub-networks); `subnetwork_parameters` counts a `SubNetwork` of a parent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from nemo_elastic.config import ATTENTION, MAMBA, MLP, ModelConfig

if TYPE_CHECKING:  # pure Python either way; avoid importing the elastic package at load time
    from nemo_elastic.elastic.subnet import SubNetwork

__all__ = ["attention_layer_parameters", "attention_parameters", "count_parameters",
           "embedding_parameters", "layer_parameters", "mamba_layer_parameters",
           "mamba_parameters", "mlp_layer_parameters", "mlp_parameters", "parameter_breakdown",
           "subnetwork_parameters"]


def _size(m: ModelConfig, field_name: str, layer: Optional[int]) -> int:
    """Global size, or layer `layer`'s size when `model.per_layer` overrides it."""
    return getattr(m, field_name) if layer is None else m.layer_size(field_name, layer)


# Size-generic formulas: plain arithmetic, so ints give exact counts and (in
# `nemo_elastic.elastic.cost`) probability-weighted expected sizes give a differentiable cost.

def mamba_parameters(h, heads, head_dim, groups: int, state: int, conv_kernel: int):
    """One Mamba2 layer (pre-norm + mixer) with `heads` x `head_dim` inner channels."""
    d = heads * head_dim
    bc = 2 * groups * state
    conv_dim = d + bc  # channels of the depthwise conv: [x | B | C]
    in_proj = (2 * d + bc + heads) * h  # rows [z | x | B | C | dt]
    conv = conv_dim * conv_kernel + conv_dim  # weight [conv_dim, 1, k] + bias
    return h + in_proj + conv + 3 * heads + d + h * d


def attention_parameters(h, heads, query_groups: int, head_dim: int):
    """One self-attention layer (pre-norm + fused qkv + output projection)."""
    return h + (heads + 2 * query_groups) * head_dim * h + h * heads * head_dim


def mlp_parameters(h, ffn):
    """One MLP layer (pre-norm + up + down projection, squared-ReLU, not gated)."""
    return h + 2 * ffn * h


def mamba_layer_parameters(m: ModelConfig, layer: Optional[int] = None) -> int:
    """Parameters of one Mamba2 layer (pre-norm + mixer); `layer` = global index for per-layer
    sizes (None: the global sizes)."""
    return mamba_parameters(m.hidden_size, _size(m, "mamba_num_heads", layer),
                            _size(m, "mamba_head_dim", layer), m.mamba_num_groups,
                            m.mamba_state_dim, m.mamba_conv_kernel)


def attention_layer_parameters(m: ModelConfig, layer: Optional[int] = None) -> int:
    """Parameters of one self-attention layer (pre-norm + fused qkv + output projection)."""
    return attention_parameters(m.hidden_size, _size(m, "num_attention_heads", layer),
                                m.num_query_groups, m.head_dim)


def mlp_layer_parameters(m: ModelConfig, layer: Optional[int] = None) -> int:
    """Parameters of one MLP layer (pre-norm + up + down projection)."""
    return mlp_parameters(m.hidden_size, _size(m, "ffn_hidden_size", layer))


def embedding_parameters(m: ModelConfig, hidden=None):
    """Input embedding + untied output layer + final norm (at width `hidden`, default the
    model's)."""
    h = m.hidden_size if hidden is None else hidden
    return 2 * m.vocab_size * h + h


_PER_LAYER = {MAMBA: mamba_layer_parameters, ATTENTION: attention_layer_parameters,
              MLP: mlp_layer_parameters}


def layer_parameters(m: ModelConfig, symbol: str, layer: Optional[int] = None) -> int:
    """Parameters of one layer of type `symbol` ('M', '*' or '-'); `layer` as above."""
    try:
        count = _PER_LAYER[symbol]
    except KeyError:
        raise ValueError(f"layer symbol {symbol!r}: expected one of 'M', '*', '-'") from None
    return count(m, layer)


def parameter_breakdown(m: ModelConfig) -> dict[str, int]:
    """{'embedding', 'mamba', 'attention', 'mlp', 'total'} parameter counts (per-layer aware)."""
    out = {"embedding": embedding_parameters(m), "mamba": 0, "attention": 0, "mlp": 0}
    kind = {MAMBA: "mamba", ATTENTION: "attention", MLP: "mlp"}
    for i, symbol in enumerate(m.layer_symbols):
        out[kind[symbol]] += layer_parameters(m, symbol, i)
    out["total"] = sum(out.values())
    return out


def count_parameters(m: ModelConfig) -> int:
    """Total parameter count of the model described by `m` (heterogeneous layers included)."""
    return parameter_breakdown(m)["total"]


def subnetwork_parameters(m: ModelConfig, subnet: "SubNetwork") -> int:
    """Parameters of the physically sliced sub-network `subnet` of parent `m`
    (= `count_parameters(subnet.model_config(m))`; validates `subnet` against `m`)."""
    return count_parameters(subnet.model_config(m))
