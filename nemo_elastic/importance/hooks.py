"""Forward hooks that accumulate activation magnitudes for the width scores (paper-digest §4.1).

What is recorded, per module of this rank's pipeline stage (layouts are Megatron's, sequence
first, TP-local):

* hidden channels: |LN(X)| of every layer's pre-norm output ``[s, b, h]`` - Mamba
  ``layers.i.norm``, attention ``layers.i.input_layernorm``, MLP ``layers.i.pre_mlp_layernorm``;
  one accumulator per norm (summed over norms when finalized).  ``decoder.final_norm`` is not
  scored: it feeds only the output layer, and with it the hidden order made every-axis prefixes
  worse on the trained tiny parent (all axes 50 %: 4.246 vs 4.146 without; without it the
  hidden order equals ModelOpt Minitron's, `bench/bench_order.py`);
* FFN neurons: |linear_fc2 input| ``[s, b, F_local]``, i.e. fc1's output AFTER the squared-ReLU
  (what actually reaches fc2; a neuron whose pre-activation is negative contributes nothing);
* Mamba: per (head, channel) ``[s, b, H_local, P]``, from one of two signals:
  ``mamba_signal="x"`` (the paper's Eq. 3-4): |x|, the x block of ``in_proj``'s output
  ``[z | x | B | C | dt]`` (before the conv); ``mamba_signal="output"``: |out_proj input|, the
  normalized gated SSM output the rest of the network actually reads (analogous to scoring FFN
  neurons at the fc2 input);
* attention heads: the per-head L2 norm of ``linear_proj``'s input ``[s, b, Hq_local * kv]``
  viewed ``[s, b, Hq_local, kv]``, i.e. of each head's softmax(QK^T)V output;
* MoE routed experts (`moe_experts`, per layer): over the tokens routed to expert e, the sum of
  g_e(x) * ||f_e(x)|| (REAP, the criterion Star Elastic uses: Megatron-Core's expert MLP
  already scales its activation by the gate weight, so this is the norm of the expert's
  output ``[n_e, h]``) and the token count (the frequency baseline); the expert neurons
  (`moe_expert_ffn`): sum over experts and routed tokens of |linear_fc2 input| ``[n_e, F_e]``;
  the shared expert's neurons like a dense FFN (`moe_shared_ffn`).  Expert scores need the
  local SequentialMLP experts and expert parallelism 1 (this rank holds every expert).

The hidden axis is not split by tensor parallelism; the other axes hold this rank's contiguous
block of heads / neurons (global order when concatenated over TP ranks).  Hooks need separate
norm modules: the local (torch) spec.  Transformer-Engine specs fuse the norm into the next
linear, so the recorder refuses them with a message naming the fix.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from nemo_elastic.config import ATTENTION, MAMBA, MLP, MOE, ModelConfig
from nemo_elastic.importance.aggregate import Aggregation

logger = logging.getLogger(__name__)

# Which pre-norm module feeds each layer type (local spec attribute names).
PRE_NORM = {MAMBA: "norm", ATTENTION: "input_layernorm", MLP: "pre_mlp_layernorm",
            MOE: "pre_mlp_layernorm"}
MAMBA_SIGNALS = ("x", "output")
# 'output' (what out_proj reads) by default: on the trained tiny parent its prefixes beat the
# paper's 'x' on Mamba heads (50 %: 2.599 vs 2.886), head channels (2.634 vs 3.299) and every
# axis at 75 % (2.201 vs 2.341; original order 2.274) - `bench/bench_order.py`.
DEFAULT_MAMBA_SIGNAL = "output"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HybridModel inside DDP / Float16Module wrappers (they expose it as `.module`)."""
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    return model


def _first(output):
    """Megatron linears return (output, bias); norms return a tensor."""
    return output[0] if isinstance(output, tuple) else output


class ActivationRecorder:
    """Context manager: ``with ActivationRecorder(model, model_cfg, agg) as rec: model(...)``.

    Attributes after the forwards (raw running sums, see `Aggregation.accumulate`):
    ``hidden`` {norm name: [h]}, ``ffn`` {layer: [F_local]}, ``mamba`` {layer: [H_local, P]},
    ``attention`` {layer: [Hq_local]}, all float64; ``samples`` / ``tokens`` are counted by
    `count_batch` (the caller knows the batch).
    """

    def __init__(self, model: torch.nn.Module, model_cfg: ModelConfig,
                 aggregation: Aggregation, *, mamba_signal: str = DEFAULT_MAMBA_SIGNAL) -> None:
        if mamba_signal not in MAMBA_SIGNALS:
            raise ValueError(f"mamba_signal={mamba_signal!r}: must be one of {MAMBA_SIGNALS}")
        self.mamba_signal = mamba_signal
        self.model = unwrap(model)
        self.model_cfg = model_cfg
        self.agg = aggregation
        self.hidden: dict[str, torch.Tensor] = {}
        self.ffn: dict[int, torch.Tensor] = {}
        self.mamba: dict[int, torch.Tensor] = {}
        self.attention: dict[int, torch.Tensor] = {}
        # MoE layer -> {"reap": [E], "count": [E], "expert_ffn": [F_e]} raw sums (float64)
        self.moe_experts: dict[int, dict[str, torch.Tensor]] = {}
        self.moe_shared_ffn: dict[int, torch.Tensor] = {}
        self.samples = 0
        self.tokens = 0
        self._handles: list = []

    # ------------------------------------------------------------------ accumulation
    def _add(self, store: dict, key, a: torch.Tensor) -> None:
        store[key] = self.agg.accumulate(store.get(key), a)

    def count_batch(self, tokens: torch.Tensor) -> None:
        """tokens [b, s] of one micro-batch that was (or will be) run through the model."""
        self.samples += int(tokens.shape[0])
        self.tokens += int(tokens.numel())

    # ------------------------------------------------------------------ hook registration
    def __enter__(self) -> "ActivationRecorder":
        decoder = self.model.decoder
        symbols = self.model_cfg.layer_symbols
        try:
            for layer in decoder.layers:
                index = layer.layer_number - 1  # global 0-based layer index
                symbol = symbols[index]
                norm_name = PRE_NORM[symbol]
                self._hook_norm(getattr(layer, norm_name, None), f"layers.{index}.{norm_name}")
                if symbol == MAMBA:
                    self._hook_mamba(layer.mixer, index)
                elif symbol == ATTENTION:
                    self._hook_attention(layer.self_attention, index)
                elif symbol == MOE:
                    self._hook_moe(layer.mlp, index)
                else:
                    self._hook_ffn(layer.mlp, index)
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook_norm(self, norm: Optional[torch.nn.Module], name: str) -> None:
        if norm is None or type(norm).__name__ == "IdentityOp":
            raise ValueError(
                f"activation scores need the pre-norm module {name!r}, but this model has none "
                "(Transformer-Engine specs fuse the norm into the next linear); build the model "
                "with the local spec (build_hybrid_model(cfg, spec_backend='local') or "
                "build_elastic_model(cfg))")

        def hook(module, args, output):
            self._add(self.hidden, name, _first(output).abs())  # [s, b, h]

        self._handles.append(norm.register_forward_hook(hook))

    def _hook_mamba(self, mixer: torch.nn.Module, index: int) -> None:
        d_local, P = mixer.d_inner_local_tp, mixer.headdim
        if self.mamba_signal == "output":
            def pre_hook(module, args):
                y = args[0]  # [s, b, d_local] normalized gated SSM output, head-major channels
                self._add(self.mamba, index, y.unflatten(-1, (-1, P)).abs())

            self._handles.append(mixer.out_proj.register_forward_pre_hook(pre_hook))
            return

        def hook(module, args, output):
            zxbcdt = _first(output)  # [s, b, 2*d_local + 2*G_local*N + H_local]
            x = zxbcdt[..., d_local:2 * d_local]
            self._add(self.mamba, index, x.unflatten(-1, (-1, P)).abs())  # [s, b, H_local, P]

        self._handles.append(mixer.in_proj.register_forward_hook(hook))

    def _hook_attention(self, attention: torch.nn.Module, index: int) -> None:
        kv = attention.hidden_size_per_attention_head

        def hook(module, args):
            heads = args[0].unflatten(-1, (-1, kv))  # [s, b, Hq_local, kv]
            self._add(self.attention, index, heads.norm(dim=-1))  # [s, b, Hq_local]

        self._handles.append(attention.linear_proj.register_forward_pre_hook(hook))

    def _hook_moe(self, moe: torch.nn.Module, index: int) -> None:
        experts = getattr(moe.experts, "local_experts", None)
        if experts is None or len(experts) != moe.config.num_moe_experts:
            raise ValueError(f"layer {index}: expert importance needs every expert on this rank "
                             "as local SequentialMLP experts (local spec, expert parallelism 1)")
        n, F = len(experts), moe.config.moe_ffn_hidden_size
        store = self.moe_experts.setdefault(index, {
            "reap": torch.zeros(n, dtype=torch.float64),
            "count": torch.zeros(n, dtype=torch.float64), "expert_ffn": None})

        for e, expert in enumerate(experts):
            def out_hook(module, args, output, e=e):
                out = _first(output).detach().to(torch.float64)  # [n_e, h], gate-scaled
                store["reap"][e] += out.norm(dim=-1).sum().cpu()
                store["count"][e] += out.shape[0]

            def fc2_hook(module, args):
                act = args[0].detach().to(torch.float64).abs().sum(dim=0).cpu()  # [F_e_local]
                store["expert_ffn"] = act if store["expert_ffn"] is None else \
                    store["expert_ffn"] + act

            self._handles.append(expert.register_forward_hook(out_hook))
            self._handles.append(expert.linear_fc2.register_forward_pre_hook(fc2_hook))
        if F and moe.shared_experts is not None:
            def shared_hook(module, args):
                self._add(self.moe_shared_ffn, index, args[0].abs())  # [s, b, F_s_local]

            self._handles.append(moe.shared_experts.linear_fc2.register_forward_pre_hook(
                shared_hook))

    def _hook_ffn(self, mlp: torch.nn.Module, index: int) -> None:
        def hook(module, args):
            self._add(self.ffn, index, args[0].abs())  # [s, b, F_local], after the activation

        self._handles.append(mlp.linear_fc2.register_forward_pre_hook(hook))
