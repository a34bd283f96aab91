"""The closed-form cost model: parameters and memory of the hybrid Mamba2 / attention / MLP model.

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
    MoE        h (pre-norm) + E h (router gate; the expert score-correction bias is a buffer,
               not a parameter, as in Megatron-Core and transformers) + E 2 f_e h (E routed
               squared-ReLU experts) + 2 f_s h (shared expert, 0 without one)
    model      2 V h (embedding + untied output layer) + h (final norm)

Active parameters (what one token touches): the same walk with k routed experts per MoE layer
instead of E (`moe_active`: h + E h + k 2 f_e h + 2 f_s h); the embedding and output layer count
in full, as in NVIDIA's "active parameters including embeddings".

`model.per_layer` overrides the sizes of single layers (heterogeneous models, e.g. extracted
sub-networks); `subnetwork_parameters` counts a `SubNetwork` of a parent.

Inference memory, in bytes, of the model serving `MemorySpec` (B = batch, S = sequence length,
bp = bytes per parameter, bc = bytes per cached value; paper-digest §5.4):

    weights      parameters * bp
    attention    KV cache 2 B S g c bc per attention layer (K and V of the g KV groups; KV groups
                 are never pruned and query heads do not change it; 0 for a dropped layer)
    Mamba2       SSM state B H P N bc + conv state B (d + 2GN)(k - 1) bc per Mamba layer
                 (P = head dim; the conv state is the last k - 1 inputs of [x | B | C])
    MLP          nothing cached

The defaults (batch 1, 131072 tokens, bf16) are those of Megatron-LM's Flextron memory budget
(`--budget-type mem`, `mem_infer_seq_len` 131072).  Flextron leaves out the conv state (~3% of
the Mamba cache); it is included here because a server allocates it all the same.  (Megatron,
mamba-ssm and HF allocate k conv columns, one more than the state needs; vLLM allocates k - 1,
counted here.)  Activations are not counted: they are transient and depend on the kernels and
the prefill chunking, not on the model's shape alone.  `memory_breakdown` / `count_memory` /
`subnetwork_memory` mirror the parameter functions; `GB` = 1e9 bytes.

One walk (`cost_terms`) serves the exact counts here and the probability-weighted expected
costs of `nemo_elastic.elastic.expected_cost`, so the two cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from nemo_elastic.errors import ConfigError, require_positive
from nemo_elastic.sizes import ATTENTION, ELASTIC_AXES, GROUPED, MAMBA, MLP, MOE, MOE_FIELDS

# The cost model is a leaf: `config` imports it to check memory budgets, so it imports neither
# `config` nor `elastic.subnet`, not even for type checking.  In annotations (never evaluated),
# ModelConfig is `nemo_elastic.config.ModelConfig`, SubNetwork `nemo_elastic.elastic.subnet`'s.
ModelConfig = SubNetwork = Any

__all__ = ["GB", "MemorySpec", "active_parameter_breakdown", "attention_layer_parameters",
           "attention_parameters", "count_active_parameters", "moe_parameters",
           "cost_terms", "count_memory", "count_parameters", "embedding_parameters",
           "kv_cache_bytes", "layer_parameters", "mamba_layer_parameters", "mamba_parameters",
           "mamba_state_bytes", "memory_breakdown", "memory_from_terms", "memory_gb",
           "mlp_layer_parameters", "mlp_parameters", "parameter_breakdown",
           "parameters_from_terms", "smallest_cost", "smallest_fraction", "smallest_memory",
           "subnetwork_active_parameters",
           "subnetwork_memory",
           "subnetwork_parameters"]

GB = 1e9  # bytes; budgets in GB are decimal gigabytes, as in Flextron's memory budget


@dataclass(frozen=True, kw_only=True)
class MemorySpec:
    """How the model is served when its memory is counted: `batch_size` sequences of
    `seq_length` tokens, weights stored at `bytes_per_param` and the KV / Mamba caches at
    `bytes_per_cache` bytes per value (2 = bf16 / fp16, 4 = fp32, 1 = fp8)."""

    batch_size: int = 1
    seq_length: int = 131072
    bytes_per_param: float = 2.0
    bytes_per_cache: float = 2.0

    def __post_init__(self) -> None:
        require_positive(self, "batch_size", "seq_length", prefix="memory.")
        for name in ("bytes_per_param", "bytes_per_cache"):
            value = getattr(self, name)
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not math.isfinite(value) or value <= 0):
                raise ConfigError(f"memory.{name}={value!r}: must be a positive number of bytes "
                                  "per value (2 for bf16/fp16, 4 for fp32, 1 for fp8)")


def _size(m: ModelConfig, field_name: str, layer: Optional[int]) -> int:
    """Global size, or layer `layer`'s size when `model.per_layer` overrides it."""
    if layer is None:
        return getattr(m.moe, field_name) if field_name in MOE_FIELDS else getattr(m, field_name)
    return m.layer_size(field_name, layer)


# Size-generic formulas: plain arithmetic, so ints give exact counts and (in
# `nemo_elastic.elastic.expected_cost`) probability-weighted expected sizes give a differentiable cost.

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


def moe_parameters(h, experts, ffn, shared, topk=None):
    """One MoE layer (pre-norm + router gate [E, h] + E routed experts [f_e, h] + [h, f_e] +
    shared expert [f_s, h] + [h, f_s]); with `topk`, the parameters one token touches (only
    `topk` routed experts; the whole gate scores every expert)."""
    routed = experts if topk is None else topk
    return h + experts * h + routed * 2 * ffn * h + 2 * (shared or 0) * h


def kv_cache_bytes(spec: MemorySpec, query_groups: int, head_dim: int):
    """KV cache of one attention layer: K and V, [S, B, g, c] each."""
    return 2 * spec.batch_size * spec.seq_length * query_groups * head_dim * spec.bytes_per_cache


def mamba_state_bytes(spec: MemorySpec, heads, head_dim, groups: int, state: int,
                      conv_kernel: int):
    """Inference cache of one Mamba2 layer: SSM state [B, H, P, N] + conv state
    [B, d + 2GN, k - 1] (the last k - 1 conv inputs; see the module docstring)."""
    ssm = spec.batch_size * heads * head_dim * state
    conv = spec.batch_size * (heads * head_dim + 2 * groups * state) * (conv_kernel - 1)
    return (ssm + conv) * spec.bytes_per_cache


def mamba_layer_parameters(m: ModelConfig, layer: Optional[int] = None) -> int:
    """Parameters of one Mamba2 layer (pre-norm + mixer); `layer` = global index for per-layer
    sizes (None: the global sizes)."""
    return layer_parameters(m, MAMBA, layer)


def attention_layer_parameters(m: ModelConfig, layer: Optional[int] = None) -> int:
    """Parameters of one self-attention layer (pre-norm + fused qkv + output projection)."""
    return layer_parameters(m, ATTENTION, layer)


def mlp_layer_parameters(m: ModelConfig, layer: Optional[int] = None) -> int:
    """Parameters of one MLP layer (pre-norm + up + down projection)."""
    return layer_parameters(m, MLP, layer)


def embedding_parameters(m: ModelConfig, hidden=None):
    """Input embedding + untied output layer + final norm (at width `hidden`, default the
    model's)."""
    h = m.hidden_size if hidden is None else hidden
    return 2 * m.vocab_size * h + h


def layer_parameters(m: ModelConfig, symbol: str, layer: Optional[int] = None) -> int:
    """Parameters of one layer of type `symbol` ('M', '*' or '-'); `layer` as above."""
    if symbol not in (MAMBA, ATTENTION, MLP, MOE):
        raise ValueError(f"layer symbol {symbol!r}: expected one of 'M', '*', '-', 'E'")
    terms = _layer_terms(m, symbol, m.hidden_size, lambda f: _size(m, f, layer), None)
    return next(iter(terms.values()))


def _layer_terms(m: ModelConfig, symbol: str, h, size: Callable[[str], Any],
                 spec: Optional[MemorySpec]) -> dict[str, Any]:
    """One layer's cost terms: its parameters under its kind ('mamba' / 'attention' / 'mlp')
    and, with `spec`, its cache bytes ('mamba_state' / 'kv_cache')."""
    if symbol == MAMBA:
        heads, head_dim = size("mamba_num_heads"), size("mamba_head_dim")
        shape = (m.mamba_num_groups, m.mamba_state_dim, m.mamba_conv_kernel)
        terms = {"mamba": mamba_parameters(h, heads, head_dim, *shape)}
        if spec is not None:
            terms["mamba_state"] = mamba_state_bytes(spec, heads, head_dim, *shape)
    elif symbol == ATTENTION:
        terms = {"attention": attention_parameters(h, size("num_attention_heads"),
                                                   m.num_query_groups, m.head_dim)}
        if spec is not None:
            terms["kv_cache"] = kv_cache_bytes(spec, m.num_query_groups, m.head_dim)
    elif symbol == MOE:
        shape = (size("num_moe_experts"), size("moe_ffn_hidden_size"),
                 size("moe_shared_expert_intermediate_size"))
        terms = {"moe": moe_parameters(h, *shape),
                 "moe_active": moe_parameters(h, *shape, topk=m.moe.moe_router_topk)}
    else:
        terms = {"mlp": mlp_parameters(h, size("ffn_hidden_size"))}
    return terms


def cost_terms(m: ModelConfig, spec: Optional[MemorySpec] = None, *, hidden=None,
               size: Optional[Callable[[str, int], Any]] = None,
               keep: Optional[Callable[[int], Any]] = None) -> dict[str, Any]:
    """The one per-layer walk behind every count: {'embedding', 'mamba', 'attention', 'mlp'}
    parameters and, with `spec`, {'kv_cache', 'mamba_state'} bytes.

    Defaults give the exact counts of `m` (per-layer aware).  `elastic.expected_cost` passes expected
    sizes instead: `hidden` (width), `size(field, layer)` (a layer's size) and `keep(layer)`
    (True, False = dropped, or a soft gate multiplying the layer's weights and cache).
    """
    h = m.hidden_size if hidden is None else hidden
    size = m.layer_size if size is None else size
    out: dict[str, Any] = {"embedding": embedding_parameters(m, h), "mamba": 0, "attention": 0,
                           "mlp": 0, "moe": 0, "moe_active": 0}
    if spec is not None:
        out.update(kv_cache=0, mamba_state=0)
    for i, symbol in enumerate(m.layer_symbols):
        gate = True if keep is None else keep(i)
        if gate is False:
            continue
        for key, value in _layer_terms(m, symbol, h, lambda f: size(f, i), spec).items():
            out[key] = out[key] + (value if gate is True else value * gate)
    return out


def parameters_from_terms(terms: dict[str, Any]):
    """Total parameters of a `cost_terms` result."""
    return (terms["embedding"] + terms["mamba"] + terms["attention"] + terms["mlp"]
            + terms.get("moe", 0))


def active_from_terms(terms: dict[str, Any]):
    """Active parameters (one token's) of a `cost_terms` result: MoE layers count k experts."""
    return parameters_from_terms(terms) - terms.get("moe", 0) + terms.get("moe_active", 0)


def memory_from_terms(terms: dict[str, Any], spec: MemorySpec) -> dict[str, Any]:
    """{'weights', 'kv_cache', 'mamba_state', 'total'} bytes of a `cost_terms(..., spec)` result."""
    out = {"weights": parameters_from_terms(terms) * spec.bytes_per_param,
           "kv_cache": terms["kv_cache"], "mamba_state": terms["mamba_state"]}
    out["total"] = out["weights"] + out["kv_cache"] + out["mamba_state"]
    return out


def parameter_breakdown(m: ModelConfig) -> dict[str, int]:
    """{'embedding', 'mamba', 'attention', 'mlp', 'total'} parameter counts (per-layer aware);
    a model with MoE layers also has 'moe' (all experts), 'moe_active' and 'active'."""
    out = cost_terms(m)
    total, active = parameters_from_terms(out), active_from_terms(out)
    if not m.has_moe:
        del out["moe"], out["moe_active"]
    else:
        out["active"] = active
    out["total"] = total
    return out


def count_active_parameters(m: ModelConfig) -> int:
    """Parameters one token touches (= `count_parameters` for a model without MoE layers)."""
    return active_from_terms(cost_terms(m))


def active_parameter_breakdown(m: ModelConfig) -> dict[str, int]:
    """{'total', 'active'} parameters of `m`."""
    terms = cost_terms(m)
    return {"total": parameters_from_terms(terms), "active": active_from_terms(terms)}


def count_parameters(m: ModelConfig) -> int:
    """Total parameter count of the model described by `m` (heterogeneous layers included)."""
    return parameter_breakdown(m)["total"]


def subnetwork_parameters(m: ModelConfig, subnet: "SubNetwork") -> int:
    """Parameters of the physically sliced sub-network `subnet` of parent `m`
    (= `count_parameters(subnet.model_config(m))`; validates `subnet` against `m`)."""
    return count_parameters(subnet.model_config(m))


def subnetwork_active_parameters(m: ModelConfig, subnet: "SubNetwork") -> int:
    """Active parameters (one token's) of the sliced sub-network `subnet` of parent `m`
    (= `count_active_parameters(subnet.model_config(m))`; validates `subnet`)."""
    return count_active_parameters(subnet.model_config(m))


def memory_breakdown(m: ModelConfig, spec: Optional[MemorySpec] = None) -> dict[str, float]:
    """{'weights', 'kv_cache', 'mamba_state', 'total'} inference memory in bytes of the model
    described by `m` (per-layer aware) served as `spec` (default `MemorySpec()`)."""
    spec = MemorySpec() if spec is None else spec
    return memory_from_terms(cost_terms(m, spec), spec)


def count_memory(m: ModelConfig, spec: Optional[MemorySpec] = None) -> float:
    """Total inference memory in bytes (weights + KV cache + Mamba state)."""
    return memory_breakdown(m, spec)["total"]


def subnetwork_memory(m: ModelConfig, subnet: "SubNetwork",
                      spec: Optional[MemorySpec] = None) -> float:
    """Memory in bytes of the sliced sub-network `subnet` of parent `m`
    (= `count_memory(subnet.model_config(m), spec)`; validates `subnet`)."""
    return count_memory(subnet.model_config(m), spec)


def memory_gb(m: ModelConfig, spec: Optional[MemorySpec] = None,
              subnet: Optional["SubNetwork"] = None) -> float:
    """`count_memory` (or `subnetwork_memory` of `subnet`) in GB (1e9 bytes)."""
    nbytes = count_memory(m, spec) if subnet is None else subnetwork_memory(m, subnet, spec)
    return nbytes / GB


def _uniform_cost(m: ModelConfig, measure: Callable[[dict], float], spec: Optional[MemorySpec],
                  sizes: dict, drop=()) -> float:
    """`measure(cost_terms)` of the sub-network with the same `sizes` in every layer of a type
    (`SubNetwork.uniform(m, **sizes, drop_layers=drop)`, counted without building it)."""
    size = lambda f, i: sizes[f] if sizes.get(f) is not None else m.layer_size(f, i)  # noqa: E731
    return measure(cost_terms(m, spec, hidden=sizes.get("hidden_size", m.hidden_size), size=size,
                              keep=lambda i: i not in drop))


def smallest_cost(m: ModelConfig, e, measure: Callable[[dict], float],
                  spec: Optional[MemorySpec] = None, *, largest: bool = False) -> float:
    """`measure` (of a `cost_terms(..., spec)` result: parameters, active parameters or memory)
    of the smallest sub-network the router can choose: every elastic width axis at its smallest
    choice (explicit `choices`, else the smallest width fraction rounded as `router.axis_choices`
    rounds it), each layer kept (with elastic depth: the parent's layers minus the ones that
    add most to `measure` it may drop, a lower bound).  `largest`: the largest sub-network
    instead (every axis at its largest choice; with elastic depth the layers that add least
    dropped, an upper bound).  `e`: the elastic section."""
    pick = max if largest else min
    sizes = {}
    for axis in e.axes:
        _, field_name = ELASTIC_AXES[axis]
        step = getattr(m, GROUPED[field_name]) if field_name in GROUPED else 1
        full = _size(m, field_name, None)  # MoE sizes live in model.moe
        size = pick(e.choices[axis]) if e.choices.get(axis) else \
            max(step, int(round(full * pick(e.width_fractions) / step)) * step)
        if field_name == "num_moe_experts":  # as router.axis_choices: top-k experts at least
            size = max(size, m.moe.moe_router_topk)
        sizes[field_name] = min(size, full)
    kept_all = _uniform_cost(m, measure, spec, sizes)
    if not e.depth_choices:
        return kept_all
    keep = pick(e.depth_choices)
    costs = [kept_all - _uniform_cost(m, measure, spec, sizes, {j})  # what each layer adds
             for j in range(m.num_layers)]
    order = sorted(range(m.num_layers), key=lambda j: costs[j] if largest else -costs[j])
    return _uniform_cost(m, measure, spec, sizes, set(order[:max(0, m.num_layers - keep)]))


def smallest_memory(m: ModelConfig, e, spec: MemorySpec, *, largest: bool = False) -> float:
    """Memory in bytes of the smallest (`largest`: largest) sub-network the router can choose
    (`smallest_cost`)."""
    return smallest_cost(m, e, lambda terms: memory_from_terms(terms, spec)["total"], spec,
                         largest=largest)


def smallest_fraction(m: ModelConfig, e, active: bool = False, *, largest: bool = False) -> float:
    """The smallest (`largest`: largest) fraction of the parent's parameters (`active`: of its
    active parameters) the router can reach (`smallest_cost`): the floor (ceiling) of a
    `params` / `active` budget."""
    count = active_from_terms if active else parameters_from_terms
    return smallest_cost(m, e, count, largest=largest) / count(cost_terms(m))
