"""`SubNetwork`: the hard (integer) description of one nested sub-network of a parent model.

A sub-network keeps, after importance reordering (every axis sorted most-important first):

* hidden channels ``[0, hidden_size)`` - one size for the whole model (embedding, every norm,
  every projection reading or writing the residual stream, final norm, output layer);
* per Mamba layer: ``mamba_num_heads`` heads, the same number ``mamba_num_heads / G`` in each of
  the G groups (the first heads of each group; B/C/state are never pruned), and the first
  ``mamba_head_dim`` channels of every kept head;
* per attention layer: ``num_attention_heads`` query heads, the first ``num_attention_heads / Q``
  of each of the Q query groups (KV groups are kept);
* per MLP layer: the first ``ffn_hidden_size`` neurons;
* per MoE layer: the first ``num_moe_experts`` routed experts (their router gate rows and
  score-correction bias entries with them), the first ``moe_ffn_hidden_size`` neurons of every
  kept expert and the first ``moe_shared_expert_intermediate_size`` of the shared expert;
* per layer: ``keep`` (depth); a dropped layer passes the residual stream through unchanged.

Layer sizes may differ per layer (heterogeneous); the hidden size is global.  Pure Python: no
torch import, so budgets can be counted and validated anywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from nemo_elastic.config import (ATTENTION, GROUPED, GROUPED_WHY, LAYER_FIELDS, MAMBA, MLP, MOE,
                                 MOE_FIELDS, SIZE_FIELDS, ConfigError, ModelConfig)


@dataclass(frozen=True, kw_only=True)
class LayerChoice:
    """Sizes for one global layer. Fields that do not apply to the layer's type are None."""

    keep: bool = True
    mamba_num_heads: Optional[int] = None
    mamba_head_dim: Optional[int] = None
    num_attention_heads: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    num_moe_experts: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    moe_shared_expert_intermediate_size: Optional[int] = None  # None also: no shared expert

    def sizes(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in SIZE_FIELDS if getattr(self, f) is not None}


@dataclass(frozen=True, kw_only=True)
class SubNetwork:
    hidden_size: int
    layers: tuple[LayerChoice, ...]

    # ------------------------------------------------------------------ construction
    @classmethod
    def full(cls, model: ModelConfig) -> "SubNetwork":
        return cls.uniform(model)

    @classmethod
    def uniform(cls, model: ModelConfig, *, hidden_size: Optional[int] = None,
                mamba_num_heads: Optional[int] = None, mamba_head_dim: Optional[int] = None,
                num_attention_heads: Optional[int] = None, ffn_hidden_size: Optional[int] = None,
                drop_layers: Iterable[int] = (), **moe_sizes: Optional[int]) -> "SubNetwork":
        """Same sizes in every layer of a type (None = the parent's); `drop_layers` are global
        0-based layer indices; `moe_sizes`: num_moe_experts, moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size."""
        bad = sorted(set(moe_sizes) - set(MOE_FIELDS))
        if bad:
            raise TypeError(f"SubNetwork.uniform got unexpected size(s) {bad}")
        given = {"mamba_num_heads": mamba_num_heads, "mamba_head_dim": mamba_head_dim,
                 "num_attention_heads": num_attention_heads, "ffn_hidden_size": ffn_hidden_size,
                 **{f: moe_sizes.get(f) for f in MOE_FIELDS}}
        drop = set(drop_layers)
        layers = []
        for i, sym in enumerate(model.layer_symbols):
            sizes = {f: given[f] if given[f] is not None else model.layer_size(f, i)
                     for f in LAYER_FIELDS[sym]}
            layers.append(LayerChoice(keep=i not in drop, **sizes))
        return cls(hidden_size=hidden_size if hidden_size is not None else model.hidden_size,
                   layers=tuple(layers))

    def replace_layer(self, index: int, **changes) -> "SubNetwork":
        layers = list(self.layers)
        layers[index] = dataclasses.replace(layers[index], **changes)
        return dataclasses.replace(self, layers=tuple(layers))

    # ------------------------------------------------------------------ validation
    def validate(self, model: ModelConfig, tp_size: int = 1) -> "SubNetwork":
        """Raise ConfigError naming the field if this is not a sub-network of `model` that
        tensor parallelism of size `tp_size` can run (masked or sliced). Returns self."""
        p = "subnetwork."
        symbols = model.layer_symbols
        if len(self.layers) != len(symbols):
            raise ConfigError(f"{p}layers has {len(self.layers)} entries; the parent has "
                              f"{len(symbols)} layers (pattern {model.hybrid_layer_pattern!r})")
        _check_range(f"{p}hidden_size", self.hidden_size, model.hidden_size, "model.hidden_size")
        if not any(layer.keep for layer in self.layers):
            raise ConfigError(f"{p}layers: every layer is dropped; keep at least one")
        for i, (sym, layer) in enumerate(zip(symbols, self.layers)):
            lp = f"{p}layers[{i}]"
            for f in SIZE_FIELDS:
                value = getattr(layer, f)
                if f not in LAYER_FIELDS[sym]:
                    if value is not None:
                        raise ConfigError(f"{lp}.{f}={value!r}: layer {i} is {_KIND[sym]}; "
                                          f"{f} does not apply (leave it None)")
                    continue
                parent = model.layer_size(f, i)
                if value is None and parent is None:  # e.g. a MoE layer without shared expert
                    continue
                if value is None or parent is None:
                    raise ConfigError(f"{lp}.{f}={value!r}: layer {i} is {_KIND[sym]} and "
                                      f"needs {f} {'None' if parent is None else 'set'}")
                _check_range(f"{lp}.{f}", value, parent, f"model.{f}")
            for f in LAYER_FIELDS[sym]:
                if f in GROUPED:
                    _check_multiple(f"{lp}.{f}", getattr(layer, f), f"model.{GROUPED[f]}",
                                    getattr(model, GROUPED[f]), GROUPED_WHY[f])
            if sym == MOE:
                _check_moe_layer(lp, layer, model, i, tp_size)
            if sym == MLP and tp_size > 1:
                _check_multiple(f"{lp}.ffn_hidden_size", layer.ffn_hidden_size,
                                "parallel.tensor_model_parallel_size", tp_size,
                                "tensor parallelism splits FFN neurons evenly")
        return self

    # ------------------------------------------------------------------ queries
    def is_full(self, model: ModelConfig) -> bool:
        return self == SubNetwork.full(model)

    @property
    def kept_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.keep]

    def model_config(self, model: ModelConfig) -> ModelConfig:
        """The physically smaller model's ModelConfig (dropped layers removed; heterogeneous
        layer sizes go to `per_layer`; pipeline separators dropped: the result is one stage)."""
        self.validate(model)
        kept = self.kept_layers
        symbols = model.layer_symbols
        pattern = "".join(symbols[i] for i in kept)
        base: dict[str, Any] = {"hidden_size": self.hidden_size}
        per_layer: list[dict[str, int]] = []
        for f in SIZE_FIELDS:
            values = [getattr(self.layers[i], f) for i in kept
                      if getattr(self.layers[i], f) is not None]
            # The global value: the most common one (or the parent's when no layer has the type).
            if values:
                base[f] = max(set(values), key=values.count)
            elif f in MOE_FIELDS:
                base[f] = getattr(model.moe, f) if model.moe is not None else None
            else:
                base[f] = getattr(model, f)
        for i in kept:
            per_layer.append({f: v for f, v in self.layers[i].sizes().items() if v != base[f]})
        fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
        moe_base = {f: base.pop(f) for f in MOE_FIELDS}
        if model.moe is not None:  # the MoE sizes live in the model's `moe` section
            fields["moe"] = dataclasses.replace(model.moe, **moe_base)
        fields.update(base, hybrid_layer_pattern=pattern,
                      per_layer=per_layer if any(per_layer) else None)
        if model.kv_channels is None:
            fields["kv_channels"] = model.head_dim  # keep head size when heads are pruned
        return ModelConfig(**fields)

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size,
                "layers": [dataclasses.asdict(layer) for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SubNetwork":
        unknown = set(data) - {"hidden_size", "layers"}
        if unknown:
            raise ConfigError(f"subnetwork: unknown key(s) {sorted(unknown)}; "
                              "expected 'hidden_size' and 'layers'")
        layers = []
        valid = {f.name for f in dataclasses.fields(LayerChoice)}
        for i, layer in enumerate(data.get("layers", ())):
            bad = set(layer) - valid
            if bad:
                raise ConfigError(f"subnetwork.layers[{i}]: unknown key(s) {sorted(bad)}; "
                                  f"valid: {sorted(valid)}")
            layers.append(LayerChoice(**layer))
        return cls(hidden_size=data["hidden_size"], layers=tuple(layers))

    def describe(self, model: ModelConfig) -> str:
        """One line, one notation: `SIZE of PARENT` per axis; an axis whose kept layers differ
        lists them by global layer index, e.g.
        'hidden 48 of 64, mamba_num_heads 8 of 8, ffn_hidden_size {1: 96, 4: 120} of 192'."""
        parts = [f"hidden {self.hidden_size} of {model.hidden_size}"]
        for f in SIZE_FIELDS:
            sizes = {i: getattr(layer, f) for i, layer in enumerate(self.layers)
                     if layer.keep and getattr(layer, f) is not None}
            if not sizes:
                continue
            parents = sorted({model.layer_size(f, i) for i in sizes})
            parent = "/".join(map(str, parents))
            if len(set(sizes.values())) == 1:
                parts.append(f"{f} {next(iter(sizes.values()))} of {parent}")
            else:
                per_layer = ", ".join(f"{i}: {v}" for i, v in sizes.items())
                parts.append(f"{f} {{{per_layer}}} of {parent}")
        dropped = [i for i, layer in enumerate(self.layers) if not layer.keep]
        if dropped:
            parts.append(f"dropped layers {dropped}")
        return ", ".join(parts)


_KIND = {MAMBA: "a Mamba layer", ATTENTION: "an attention layer", MLP: "an MLP layer",
         MOE: "a MoE layer"}


def _check_moe_layer(lp: str, layer: "LayerChoice", model: ModelConfig, i: int,
                     tp_size: int) -> None:
    """A MoE layer keeps at least top-k experts; expert groups allow no expert pruning; tensor
    parallelism splits the expert and shared-expert neurons evenly."""
    moe, experts = model.moe, layer.num_moe_experts
    if experts < moe.moe_router_topk:
        raise ConfigError(f"{lp}.num_moe_experts={experts}: must be >= "
                          f"model.moe.moe_router_topk={moe.moe_router_topk} (every token is "
                          "routed to top-k experts)")
    if moe.moe_router_num_groups > 1 and experts != model.layer_size("num_moe_experts", i):
        raise ConfigError(f"{lp}.num_moe_experts={experts}: expert pruning needs "
                          f"model.moe.moe_router_num_groups=1 (it is {moe.moe_router_num_groups})")
    for f in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
        if tp_size > 1 and getattr(layer, f) is not None:
            _check_multiple(f"{lp}.{f}", getattr(layer, f), "parallel.tensor_model_parallel_size",
                            tp_size, "tensor parallelism splits expert neurons evenly")


def _check_range(name: str, value: Any, parent: int, parent_name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= parent:
        raise ConfigError(f"{name}={value!r}: must be an integer in [1, {parent_name}={parent}]")


def _check_multiple(name: str, value: int, of_name: str, of: int, why: str) -> None:
    if value % of != 0:
        lower = value - value % of
        hint = f"{lower} or {lower + of}" if lower else f"{of}"
        raise ConfigError(f"{name}={value}: must be a multiple of {of_name}={of} ({why}); "
                          f"use e.g. {hint}")


AXES = ("hidden", "mamba", "head_dim", "attention", "ffn", "depth", "experts", "expert_ffn",
        "shared_ffn")


def sample_subnetwork(model: ModelConfig, rng, axes: Sequence[str] = AXES) -> SubNetwork:
    """A uniformly random valid sub-network varying only `axes` (per layer: heterogeneous).

    `rng` is a `random.Random`; used by tests, benchmarks and sandwich-style sampling.
    """
    bad = sorted(set(axes) - set(AXES))
    if bad:
        raise ValueError(f"axes={list(axes)}: unknown {bad}; choose from {list(AXES)}")

    def draw(lo: int, hi: int, step: int = 1) -> int:
        return rng.randint(max(1, lo // step), hi // step) * step

    subnet = SubNetwork.uniform(model, hidden_size=draw(1, model.hidden_size)
                                if "hidden" in axes else None)
    for i, sym in enumerate(model.layer_symbols):
        size = lambda f: model.layer_size(f, i)  # noqa: E731
        if sym == MAMBA:
            changes = {}
            if "mamba" in axes:
                g = model.mamba_num_groups
                changes["mamba_num_heads"] = draw(g, size("mamba_num_heads"), g)
            if "head_dim" in axes:
                changes["mamba_head_dim"] = draw(1, size("mamba_head_dim"))
            subnet = subnet.replace_layer(i, **changes)
        elif sym == MOE:
            changes = {}
            if "experts" in axes and model.moe.moe_router_num_groups == 1:
                changes["num_moe_experts"] = draw(model.moe.moe_router_topk,
                                                  size("num_moe_experts"))
            if "expert_ffn" in axes:
                changes["moe_ffn_hidden_size"] = draw(1, size("moe_ffn_hidden_size"))
            if "shared_ffn" in axes and size("moe_shared_expert_intermediate_size"):
                changes["moe_shared_expert_intermediate_size"] = draw(
                    1, size("moe_shared_expert_intermediate_size"))
            subnet = subnet.replace_layer(i, **changes)
        elif sym == ATTENTION and "attention" in axes:
            q = model.num_query_groups
            subnet = subnet.replace_layer(i, num_attention_heads=draw(q, size("num_attention_heads"), q))
        elif sym == MLP and "ffn" in axes:
            subnet = subnet.replace_layer(i, ffn_hidden_size=draw(1, size("ffn_hidden_size")))
    if "depth" in axes:
        n = model.num_layers
        for i in rng.sample(range(n), rng.randint(0, n - 1)):
            subnet = subnet.replace_layer(i, keep=False)
    return subnet.validate(model)
