"""NVIDIA ModelOpt's Minitron pruning (`mcore_minitron`) of this project's `HybridModel`, on CPU.

ModelOpt (`pip install nemo_elastic[peers]`, pinned `nvidia-modelopt==0.47.0`) prunes
Megatron-Core GPT / hybrid models built with Transformer Engine.  This project's CPU model uses
the *local* spec (separate torch `RMSNorm` pre-norms, `ColumnParallelLinear` QKV,
`DotProductAttention`, a torch gated norm in the Mamba mixer) and has no TE nor mamba-ssm.  Six
things stop ModelOpt there; `install()` applies the smallest fix for each, all kept in this
module and pinned to 0.47.0 because they touch ModelOpt internals:

0. the Megatron plugin imports `transformer_engine` / `mamba_ssm` at module top and the failure
   is swallowed (`mcore_minitron` never registers): import it once under inert stand-ins
   (removed from `sys.modules` right after, so the project's own TE / kernel probes are
   unaffected), with Megatron's `ExtendedRMSNorm` name mapped to the project's gated norm;
1. `torch.nn.RMSNorm` has no dynamic module: register one (slices `weight`, `normalized_shape`);
2. `SelfAttention` asserts a TE core attention: local dynamic QKV / output projections (ModelOpt's
   own group-aware index logic reused) and dynamic head counts on `DotProductAttention`;
3. the hidden-size importance hooks read TE's fused norm+linear output: hook the separate
   pre-norm modules' outputs instead (the same statistic, the normalized layer input);
4. the Mamba layer's separate pre-norm is not converted (pruning "succeeds", forward fails):
   convert and export `layer.norm` too;
5. depth pruning's layer-count gather uses a 0-dim tensor gloo cannot gather: not supported
   here (`num_layers` constraints are refused); the elastic family prunes width only.

`prune()` runs ModelOpt's own `mtp.prune(mode="mcore_minitron")` (its activation hooks, its
sorting, its candidate grid and `top_k` scoring) and returns the pruned weights with the
`ModelConfig` of the pruned shape; the weights load strictly into `build_hybrid_model` of that
config (`tests/test_peers_modelopt.py` checks the logits match).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
import types
from typing import Callable, Optional
from unittest import mock

import torch

logger = logging.getLogger(__name__)

MODELOPT_VERSION = "0.47.0"
# ModelOpt's export_config names -> this project's ModelConfig fields
WIDTH_FIELDS = {"hidden_size": "hidden_size", "ffn_hidden_size": "ffn_hidden_size",
                "num_attention_heads": "num_attention_heads",
                "mamba_num_heads": "mamba_num_heads", "mamba_head_dim": "mamba_head_dim"}

_INSTALLED = False


def modelopt_version() -> Optional[str]:
    """The installed nvidia-modelopt version, or None."""
    from importlib import metadata

    try:
        return metadata.version("nvidia-modelopt")
    except metadata.PackageNotFoundError:
        return None


def require_modelopt() -> None:
    """ImportError (one line, with the fix) unless the pinned ModelOpt is installed."""
    v = modelopt_version()
    if v is None:
        raise ImportError("nvidia-modelopt is not installed: pip install -e '.[peers]' "
                          "(or `make install-peers`)")
    if v != MODELOPT_VERSION:
        raise ImportError(f"nvidia-modelopt=={v} is installed; the CPU adapter is pinned to "
                          f"{MODELOPT_VERSION} (pip install nvidia-modelopt=={MODELOPT_VERSION})")


# ----------------------------------------------------------------------------- fix 0: import

def _inert_module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


def _inert_class(name: str) -> type:
    def _refuse(self, *a, **k):
        raise RuntimeError(f"{name} is a stand-in for ModelOpt's import on CPU; not buildable")
    return type(name, (torch.nn.Module,), {"__init__": _refuse})


@contextlib.contextmanager
def _import_stand_ins():
    """`transformer_engine` (with `pytorch.LayerNorm/RMSNorm`) and `mamba_ssm` importable, and
    Megatron's `ExtendedRMSNorm` = the project's gated norm, only while ModelOpt is imported."""
    from megatron.core import utils as mcore_utils
    from megatron.core.ssm import mamba_mixer

    from nemo_elastic.model.mamba import ShardedGatedRMSNorm

    te_pt = _inert_module("transformer_engine.pytorch", LayerNorm=_inert_class("TELayerNorm"),
                          RMSNorm=_inert_class("TERMSNorm"))
    # __version__ 0.0.0: Megatron's TE version probes then take their no-TE branches
    stand_ins = {"transformer_engine": _inert_module("transformer_engine", pytorch=te_pt,
                                                     __version__="0.0.0"),
                 "transformer_engine.pytorch": te_pt, "mamba_ssm": _inert_module("mamba_ssm")}
    saved = {k: sys.modules.get(k) for k in stand_ins}
    saved_norm = mamba_mixer.ExtendedRMSNorm
    saved_te_version = getattr(mcore_utils, "_te_version", None)
    sys.modules.update(stand_ins)
    mamba_mixer.ExtendedRMSNorm = ShardedGatedRMSNorm
    try:
        yield
    finally:
        mamba_mixer.ExtendedRMSNorm = saved_norm
        mcore_utils._te_version = saved_te_version  # Megatron caches the probed TE version
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _replace_te_placeholders() -> None:
    """Megatron's TE wrapper names are MagicMocks (or None) without TE; ModelOpt registers and
    `isinstance`-checks them: give each a distinct inert class (never built on CPU)."""
    import megatron.core.extensions.transformer_engine as mte

    for name in dir(mte):
        value = getattr(mte, name)
        if name.startswith("TE") and (value is None or isinstance(value, mock.Mock)):
            setattr(mte, name, _inert_class(name))


def install() -> None:
    """Import ModelOpt's Megatron prune plugin on CPU and apply fixes 1-4 (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    require_modelopt()
    if "transformer_engine" not in sys.modules and any(
            k.startswith("modelopt.torch.nas.plugins.megatron") for k in sys.modules):
        logger.warning("modelopt was imported before nemo_elastic.peers.modelopt_minitron.install")
    _replace_te_placeholders()
    with _import_stand_ins(), mock.patch("warnings.warn"):
        import modelopt.torch.nas.plugins.megatron as nas_mcore  # noqa: F401
        import modelopt.torch.prune as mtp  # noqa: F401
        import modelopt.torch.prune.plugins.mcore_minitron as minitron  # noqa: F401
    from modelopt.torch.prune.pruning import PruneModeRegistry

    if "mcore_minitron" not in PruneModeRegistry or not nas_mcore.HAS_MAMBA:
        raise ImportError("ModelOpt's mcore_minitron mode did not register on this machine")
    _register_norms(nas_mcore)
    _register_attention(nas_mcore)
    _register_mamba_layer(nas_mcore)
    minitron._register_hidden_size_importance = _hidden_size_importance_from_norms(minitron)
    _INSTALLED = True


# ----------------------------------------------------------------------------- fixes 1-4

def _override(registry, nn_cls: type, dm_cls: type, key: str) -> None:
    """(Re-)register `dm_cls` for `nn_cls` in ModelOpt's DMRegistry, dropping generated
    subclass entries built from an earlier registration."""
    registry._registry[nn_cls] = dm_cls
    registry._key_registry[nn_cls] = key
    for sub in [c for c in registry._dynamic_classes if issubclass(c, nn_cls)]:
        registry._rule_classes.pop(registry._dynamic_classes.pop(sub), None)


def _register_norms(nas_mcore) -> None:
    """Fix 1: `torch.nn.RMSNorm` (the local spec's pre-norms and final norm) as a dynamic
    module over `num_features` (weight [hidden] and normalized_shape sliced)."""
    from modelopt.torch.nas.modules import _DynamicLayerNorm

    class _DynamicTorchRMSNorm(_DynamicLayerNorm):
        def _setup(self, *, num_features=None):
            if num_features is None:
                return super()._setup()
            self._register_hparam("num_features", num_features)
            self._register_dynamic_attribute("weight", self._cut_to_active_features)
            self._register_dynamic_attribute("normalized_shape", self._get_normalized_shape)

    _override(nas_mcore.DMRegistry, torch.nn.RMSNorm, _DynamicTorchRMSNorm, "nn.RMSNorm")


def _register_attention(nas_mcore) -> None:
    """Fix 2: SelfAttention with the local spec's ColumnParallelLinear QKV, RowParallelLinear
    projection and DotProductAttention; head pruning keeps every query group (ModelOpt's rule)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from modelopt.torch.opt.dynamic import DynamicModule

    qkv_te = nas_mcore._DynamicTEQKVLayerNormColumnParallelLinear
    proj_te = nas_mcore._DynamicTEProjRowParallelLinear

    class _QKV:
        """linear_qkv: output [groups x (q heads + k + v) x kv_channels] follows the heads."""

        def _setup(self, *, num_attention_heads, hidden_size):
            self._register_hparam("input_size", hidden_size)
            self._register_hparam("num_attention_heads", num_attention_heads)
            size = lambda mod, val: ((num_attention_heads.active + 2 * mod.config.num_query_groups)  # noqa: E731
                                     * mod.config.kv_channels)
            self._register_dynamic_attribute("output_size", size)
            self._register_dynamic_attribute("output_size_per_partition", size)
            self._register_dynamic_attribute("weight", qkv_te._get_weight)
            if getattr(self, "bias", None) is not None:
                self._register_dynamic_attribute("bias", qkv_te._get_bias)

        _get_output_size_indices = qkv_te._get_output_size_indices

    class _Proj:
        """linear_proj: input [heads x kv_channels] follows the heads, output the hidden size."""

        def _setup(self, *, num_attention_heads, hidden_size):
            self._register_hparam("output_size", hidden_size)
            self._register_hparam("num_attention_heads", num_attention_heads)
            size = lambda mod, val: num_attention_heads.active * mod.config.kv_channels  # noqa: E731
            self._register_dynamic_attribute("input_size", size)
            self._register_dynamic_attribute("input_size_per_partition", size)
            self._register_dynamic_attribute("weight", proj_te._get_weight)
            if getattr(self, "bias", None) is not None:
                self._register_dynamic_attribute("bias", proj_te._get_bias)

        _get_input_size_indices = proj_te._get_input_size_indices

    dyn_qkv = type("_DynamicLocalQKV", (_QKV, DynamicModule, ColumnParallelLinear), {})
    dyn_proj = type("_DynamicLocalProj", (_Proj, DynamicModule, RowParallelLinear), {})

    class _DynamicLocalSelfAttention(nas_mcore._DynamicSelfAttention):
        def _setup(self, *, hidden_size):
            if not self._prunes_attention_heads():
                return super()._setup(hidden_size=hidden_size)
            if not isinstance(self.core_attention, DotProductAttention):
                return super()._setup(hidden_size=hidden_size)  # the TE spec: upstream path
            heads = nas_mcore.NumAttentionHeadsHp(self.num_attention_heads_per_partition,
                                                  self.num_query_groups_per_partition)
            self._register_hparam("num_attention_heads", heads)
            self._register_dynamic_attribute("num_attention_heads_per_partition",
                                             lambda mod, val: heads.active)
            core = type("_DynamicLocalCoreAttention",
                        (DynamicModule, type(self.core_attention)), {"_setup": lambda s: None})
            core.convert(self.core_attention)
            kv = self.config.kv_channels
            self.core_attention._register_dynamic_attribute(
                "num_attention_heads_per_partition", lambda mod, val: heads.active)
            self.core_attention._register_dynamic_attribute(
                "hidden_size_per_partition", lambda mod, val: heads.active * kv)
            dyn_qkv.convert(self.linear_qkv, num_attention_heads=heads, hidden_size=hidden_size)
            dyn_proj.convert(self.linear_proj, num_attention_heads=heads, hidden_size=hidden_size)

    _override(nas_mcore.DMRegistry, SelfAttention, _DynamicLocalSelfAttention,
              "megatron.core.transformer.attention.SelfAttention")


def _register_mamba_layer(nas_mcore) -> None:
    """Fix 4: the Mamba layer's separate pre-norm follows the hidden size."""
    from megatron.core.ssm.mamba_layer import MambaLayer
    from megatron.core.transformer.identity_op import IdentityOp

    class _DynamicLocalMambaLayer(nas_mcore._DynamicMambaLayer):
        def _setup(self, *, hidden_size):
            super()._setup(hidden_size=hidden_size)
            if not isinstance(self.norm, IdentityOp):
                nas_mcore.DMRegistry.convert(self.norm, num_features=hidden_size)

        def export(self):
            if not isinstance(self.norm, IdentityOp):
                self.norm.export()
            return super().export()

    _override(nas_mcore.DMRegistry, MambaLayer, _DynamicLocalMambaLayer,
              "megatron.core.ssm.mamba_layer.MambaLayer")


def _hidden_size_importance_from_norms(minitron) -> Callable:
    """Fix 3: ModelOpt's hidden-size score (per channel: L2 over the batch of the mean |x| over
    the sequence, summed over hooks) on the outputs of the separate pre-norms (Mamba `norm`,
    attention `input_layernorm`, MLP `pre_mlp_layernorm`): with TE these are the layer-norm
    outputs ModelOpt reads from the fused norm+linear, so the statistic is the same."""
    from megatron.core.transformer.identity_op import IdentityOp

    def register(module, registry) -> None:
        module._register_temp_attribute("_activations", {})

        def hook(mod, inp, out):
            act = out.detach().to(torch.float32)  # [s, b, h]
            act = act.abs().mean(dim=0).pow(2).sum(dim=0)  # [h]
            acc = module._activations
            acc[id(mod)] = acc[id(mod)] + act if id(mod) in acc else act

        def estimate():
            assert module._activations, "no activations collected for hidden-size importance"
            scores = torch.stack([a.pow(0.5) for a in module._activations.values()]).sum(0)
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(scores)
            return scores

        for layer in module.decoder.layers:
            for name in ("norm", "input_layernorm", "pre_mlp_layernorm"):
                norm = getattr(layer, name, None)
                if norm is not None and not isinstance(norm, IdentityOp):
                    registry.register_hook(norm, hook, hook_type="forward")
        registry.register_importance(module, "hidden_size", estimate)

    return register


# ----------------------------------------------------------------------------- prune

@dataclasses.dataclass
class PruneResult:
    model_config: object  # nemo_elastic.config.ModelConfig of the pruned shape
    state_dict: dict  # the pruned weights (this project's / Megatron's parameter names)
    export_config: dict  # the chosen sizes (ModelOpt's names)
    parameters: int
    seconds: float
    candidates: list = dataclasses.field(default_factory=list)  # search: [{config, params, score}]


def minitron_config(*, hidden_size_divisor: int = 8, ffn_hidden_size_divisor: int = 8,
                    mamba_head_dim_divisor: int = 2):
    """ModelOpt's `mcore_minitron` mode config with divisors a toy model can use (the defaults,
    256 / 512, leave a 64-wide model only its own width)."""
    from modelopt.torch.prune.plugins.mcore_minitron import get_mcore_minitron_config

    return get_mcore_minitron_config(hidden_size_divisor=hidden_size_divisor,
                                     ffn_hidden_size_divisor=ffn_hidden_size_divisor,
                                     mamba_head_dim_divisor=mamba_head_dim_divisor)


def pruned_model_config(model_cfg, export_config: dict):
    """The project's ModelConfig with ModelOpt's chosen widths."""
    return dataclasses.replace(model_cfg, **{WIDTH_FIELDS[k]: int(v)
                                             for k, v in export_config.items()})


def prune(model: torch.nn.Module, model_cfg, forward_loop: Callable, *,
          export_config: Optional[dict] = None, params: Optional[float] = None,
          score_func: Optional[Callable] = None, top_k: int = 10,
          max_width_pruning: float = 0.4, hparams_to_skip: Optional[list] = None,
          divisors: Optional[dict] = None) -> PruneResult:
    """Prune `model` (a one-process `HybridModel` of `model_cfg`, modified in place) with
    ModelOpt's `mcore_minitron`: to `export_config` ({"hidden_size": 48, ...}), or by its
    parameter-constrained search (`params` = the largest parameter count; every candidate
    within `max_width_pruning` of each width is enumerated, the `top_k` largest scored with
    `score_func(model) -> higher is better`, the best kept).  `forward_loop(model)` feeds the
    calibration batches (ModelOpt runs it under no_grad in eval mode)."""
    install()
    import modelopt.torch.prune as mtp

    if (export_config is None) == (params is None):
        raise ValueError("prune: give exactly one of export_config or params")
    if export_config is not None:
        unknown = set(export_config) - set(WIDTH_FIELDS)
        if unknown:
            raise ValueError(f"prune: export_config keys {sorted(unknown)} are not supported on "
                             f"CPU (width only: {sorted(WIDTH_FIELDS)})")
        constraints = {"export_config": dict(export_config)}
        search = {"forward_loop": forward_loop}
    else:
        if score_func is None:
            raise ValueError("prune: a params constraint needs score_func")
        constraints = {"params": params}
        search = {"forward_loop": forward_loop, "score_func": score_func, "top_k": top_k,
                  "max_width_pruning": max_width_pruning, "max_depth_pruning": 0.0,
                  "hparams_to_skip": sorted({"num_layers", *(hparams_to_skip or [])})}
    start = time.perf_counter()
    with _quiet():
        model, state = mtp.prune(model, mode=[("mcore_minitron", minitron_config(
            **(divisors or {})))], constraints=constraints, dummy_input=None, config=search)
    seconds = time.perf_counter() - start
    chosen = _chosen_config(model, model_cfg)
    candidates = _candidates(state)
    cfg = pruned_model_config(model_cfg, chosen)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()
          if not k.endswith("_extra_state")}
    n = sum(p.numel() for p in model.parameters())
    logger.info("ModelOpt mcore_minitron: %s -> %s parameters (%.1f s)", chosen, f"{n:,}", seconds)
    return PruneResult(model_config=cfg, state_dict=sd, export_config=chosen, parameters=n,
                       seconds=seconds, candidates=candidates)


def _chosen_config(model, model_cfg) -> dict:
    """The pruned widths, read from the pruned modules (ModelOpt rewrites model.config too)."""
    c = model.config
    return {"hidden_size": c.hidden_size, "ffn_hidden_size": c.ffn_hidden_size,
            "num_attention_heads": c.num_attention_heads,
            "mamba_num_heads": c.mamba_num_heads, "mamba_head_dim": c.mamba_head_dim}


def _candidates(state) -> list:
    out = []
    for row in (state or {}).get("all_candidates_per_constraint", {}).values() \
            if isinstance(state, dict) else []:
        for cand in row:
            out.append({"config": dict(cand.ss_config), "metrics": dict(cand.metrics),
                        "score": cand.score})
    return out


@contextlib.contextmanager
def _quiet():
    """ModelOpt prints its model statistics tables with rich on every rank: keep them out of
    the caller's output (they go to the log at DEBUG)."""
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield
    if buf.getvalue():
        logger.debug("%s", buf.getvalue())
