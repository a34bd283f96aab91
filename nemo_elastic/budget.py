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

Later issues extend this module with counts for nested sub-networks.
"""

from __future__ import annotations

from nemo_elastic.config import ATTENTION, MAMBA, MLP, ModelConfig

__all__ = ["attention_layer_parameters", "count_parameters", "embedding_parameters",
           "layer_parameters", "mamba_layer_parameters", "mlp_layer_parameters",
           "parameter_breakdown"]


def mamba_layer_parameters(m: ModelConfig) -> int:
    """Parameters of one Mamba2 layer (pre-norm + mixer)."""
    h, d = m.hidden_size, m.mamba_d_inner
    heads, bc = m.mamba_num_heads, 2 * m.mamba_num_groups * m.mamba_state_dim
    conv_dim = d + bc  # channels of the depthwise conv: [x | B | C]
    in_proj = (2 * d + bc + heads) * h  # rows [z | x | B | C | dt]
    conv = conv_dim * m.mamba_conv_kernel + conv_dim  # weight [conv_dim, 1, k] + bias
    return h + in_proj + conv + 3 * heads + d + h * d


def attention_layer_parameters(m: ModelConfig) -> int:
    """Parameters of one self-attention layer (pre-norm + fused qkv + output projection)."""
    h, c = m.hidden_size, m.head_dim
    qkv = (m.num_attention_heads + 2 * m.num_query_groups) * c * h
    return h + qkv + h * m.num_attention_heads * c


def mlp_layer_parameters(m: ModelConfig) -> int:
    """Parameters of one MLP layer (pre-norm + up + down projection)."""
    return m.hidden_size + 2 * m.ffn_hidden_size * m.hidden_size


def embedding_parameters(m: ModelConfig) -> int:
    """Input embedding + untied output layer + final norm."""
    return 2 * m.vocab_size * m.hidden_size + m.hidden_size


_PER_LAYER = {MAMBA: mamba_layer_parameters, ATTENTION: attention_layer_parameters,
              MLP: mlp_layer_parameters}


def layer_parameters(m: ModelConfig, symbol: str) -> int:
    """Parameters of one layer of type `symbol` ('M', '*' or '-')."""
    try:
        return _PER_LAYER[symbol](m)
    except KeyError:
        raise ValueError(f"layer symbol {symbol!r}: expected one of 'M', '*', '-'") from None


def parameter_breakdown(m: ModelConfig) -> dict[str, int]:
    """{'embedding', 'mamba', 'attention', 'mlp', 'total'} parameter counts."""
    symbols = m.layer_symbols
    out = {"embedding": embedding_parameters(m),
           "mamba": symbols.count(MAMBA) * mamba_layer_parameters(m),
           "attention": symbols.count(ATTENTION) * attention_layer_parameters(m),
           "mlp": symbols.count(MLP) * mlp_layer_parameters(m)}
    out["total"] = sum(out.values())
    return out


def count_parameters(m: ModelConfig) -> int:
    """Total parameter count of the full (parent) model described by `m`."""
    return parameter_breakdown(m)["total"]
