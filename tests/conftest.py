"""Shared fixtures: a one-process Megatron runtime (gloo on CPU) and tiny configs."""

from __future__ import annotations

import logging
import warnings

import pytest

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*absl.logging is not installed.*")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or long tests (run in CI; -m 'not slow' skips)")
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped cleanly without it)")
    logging.getLogger("megatron").setLevel(logging.WARNING)


@pytest.fixture
def megatron_env():
    """Initialize torch.distributed (1 process) + Megatron parallel state; torn down after."""
    from nemo_elastic import runtime
    from nemo_elastic.config import ParallelConfig

    with runtime.distributed(ParallelConfig(), seed=1234) as info:
        yield info


def tiny_model_dict(**overrides) -> dict:
    """A small valid model section (dict form) for tests; override any field."""
    model = dict(
        hybrid_layer_pattern="M-M*-", hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
        num_query_groups=2, kv_channels=8, mamba_num_heads=4, mamba_head_dim=8, mamba_num_groups=2,
        mamba_state_dim=8, mamba_conv_kernel=4, mamba_chunk_size=16, vocab_size=64,
        max_sequence_length=128)
    model.update(overrides)
    return model


def tiny_config(model_overrides: dict | None = None, **sections):
    from nemo_elastic.config import Config, from_dict

    data = {"model": tiny_model_dict(**(model_overrides or {}))}
    data.update(sections)
    return from_dict(Config, data)


def perturb(model, seed: int = 0, scale: float = 0.1):
    """Move every parameter away from its init (norm weights != 1, D != 1, ...), in place."""
    import torch

    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype))
    return model


def soft_one_hot(cfg, subnet, mode):
    """A SoftSubNetwork whose one-hot probabilities select `subnet`'s sizes."""
    import torch

    from nemo_elastic.elastic.masks import SoftAxis, SoftLayer, SoftSubNetwork

    def axis(value, full):
        choices = sorted({value, full, max(1, value // 2)}, reverse=True)
        probs = torch.zeros(len(choices), requires_grad=False)
        probs[choices.index(value)] = 1.0
        return SoftAxis(choices=choices, probs=probs.requires_grad_(), mode=mode)

    m = cfg.model
    layers = []
    for sym, layer in zip(m.layer_symbols, subnet.layers):
        if sym == "M":
            heads = layer.mamba_num_heads
            choices = sorted({heads, m.mamba_num_heads}, reverse=True)
            probs = torch.tensor([1.0 if c == heads else 0.0 for c in choices], requires_grad=True)
            layers.append(SoftLayer(keep=layer.keep, mamba_num_heads=SoftAxis(choices, probs, mode),
                                    mamba_head_dim=axis(layer.mamba_head_dim, m.mamba_head_dim)))
        elif sym == "*":
            heads = layer.num_attention_heads
            choices = sorted({heads, m.num_attention_heads}, reverse=True)
            probs = torch.tensor([1.0 if c == heads else 0.0 for c in choices], requires_grad=True)
            layers.append(SoftLayer(keep=layer.keep, num_attention_heads=SoftAxis(choices, probs, mode)))
        elif sym == "E":  # MoE: expert count, expert width, shared-expert width
            layers.append(SoftLayer(keep=layer.keep, **{
                f: axis(getattr(layer, f), getattr(m.moe, f))
                for f in ("num_moe_experts", "moe_ffn_hidden_size",
                          "moe_shared_expert_intermediate_size")}))
        else:
            layers.append(SoftLayer(keep=layer.keep, ffn_hidden_size=axis(layer.ffn_hidden_size,
                                                                          m.ffn_hidden_size)))
    return SoftSubNetwork(hidden_size=axis(subnet.hidden_size, m.hidden_size), layers=layers)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 3-iteration pretrain run (the reliability tests' small recipe), a checkpoint
    after every iteration."""
    from nemo_elastic.config import load_config
    from nemo_elastic.training.pretrain import pretrain
    from tests.test_reliability import FAST, TINY

    out = tmp_path_factory.mktemp("run")
    pretrain(load_config(TINY, [*FAST, "train.iters=3", "train.save_interval=1",
                                f"output_dir={out}"]), progress=False)
    return out
