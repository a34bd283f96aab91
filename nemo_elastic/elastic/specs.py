"""Elastic ModuleSpec and model builder: the parent's local spec with elastic subclasses."""

from __future__ import annotations

from megatron.core.transformer.spec_utils import ModuleSpec

from nemo_elastic.config import Config
from nemo_elastic.elastic.attention import ElasticSelfAttention
from nemo_elastic.elastic.mamba import ElasticMambaMixer
from nemo_elastic.elastic.mlp import ElasticMLP
from nemo_elastic.elastic.model import ElasticHybridModel
from nemo_elastic.elastic.moe import ElasticMoELayer
from nemo_elastic.elastic.norm import elastic_norm_builder
from nemo_elastic.elastic.stack import ElasticHybridStack
from nemo_elastic.model.specs import local_hybrid_stack_spec


def elastic_hybrid_stack_spec(*, d_conv: int = 4, chunk_size: int = 128) -> ModuleSpec:
    """Same wiring, parameter names and checkpoint keys as the parent's local spec."""
    return local_hybrid_stack_spec(d_conv=d_conv, chunk_size=chunk_size, mixer=ElasticMambaMixer,
                                   attention=ElasticSelfAttention, mlp=ElasticMLP,
                                   stack=ElasticHybridStack, norm=elastic_norm_builder,
                                   moe=ElasticMoELayer)


def build_elastic_model(cfg: Config, **kwargs) -> ElasticHybridModel:
    """The elastic parent for this rank's pipeline stage (runtime must be initialized)."""
    from nemo_elastic.model.build import build_hybrid_model

    m = cfg.model
    spec = elastic_hybrid_stack_spec(d_conv=m.mamba_conv_kernel, chunk_size=m.mamba_chunk_size)
    return build_hybrid_model(cfg, spec=spec, model_cls=_ElasticFactory(m), **kwargs)


class _ElasticFactory:
    """Passes our ModelConfig to ElasticHybridModel through build_hybrid_model's `model_cls`."""

    def __init__(self, model_config) -> None:
        self.model_config = model_config

    def __call__(self, **kwargs) -> ElasticHybridModel:
        return ElasticHybridModel(model_config=self.model_config, **kwargs)
