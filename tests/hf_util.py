"""Helpers for the Hugging Face NemotronH tests: tiny random models and logits on both sides."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SEQ_LEN = 40  # > CHUNK: the Mamba scan crosses chunk boundaries (and one chunk is partial)
CHUNK = 16
VOCAB = 64


def hf_config(pattern: str = "M-M*-", **overrides):
    """A tiny `NemotronHConfig`.

    time_step_min is tiny: transformers clamps dt >= time_step_min at run time, Megatron-Core
    does not (see `hf_adapter.NO_DT_CLAMP`); parity is compared with the clamp inactive.
    """
    from transformers import NemotronHConfig

    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, hybrid_override_pattern=pattern, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=48, mamba_num_heads=4,
        mamba_head_dim=8, n_groups=2, ssm_state_size=8, conv_kernel=4, chunk_size=CHUNK,
        max_position_embeddings=256, use_cache=False, time_step_min=1e-6)
    kwargs.update(overrides)
    return NemotronHConfig(**kwargs)


def _perturbed(name: str, p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random value for parameter `name`, far from transformers' defaults (ones / arange)."""
    rand = torch.rand(p.shape, generator=gen)
    randn = torch.randn(p.shape, generator=gen)
    if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
        return 1 + 0.3 * randn
    if name.endswith("A_log"):
        return 2 * rand - 1  # A = -exp(A_log) in [-e, -1/e]
    if name.endswith("dt_bias"):
        return 3 * rand - 2.5  # softplus in ~[0.08, 0.97]
    if name.endswith(".D"):
        return randn
    if name.endswith("conv1d.bias"):
        return 0.2 * randn
    return randn * p.shape[-1] ** -0.5  # fan-in scaled weights (conv: over its kernel)


def random_hf_model(cfg, seed: int = 0):
    """`NemotronHForCausalLM(cfg)` in eval mode with every parameter moved off its init value."""
    from transformers import NemotronHForCausalLM

    torch.manual_seed(seed)
    model = NemotronHForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            before = p.detach().clone()
            p.copy_(_perturbed(name, p, gen))
            assert not torch.equal(before, p), f"{name} kept its default value"
    return model


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits.float()


def save_hf(model, directory: Path, **kwargs) -> Path:
    model.save_pretrained(str(directory), **kwargs)
    return directory


def our_logits(ckpt: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of our Megatron model loaded from `ckpt` (one-process runtime, torch path)."""
    from nemo_elastic import runtime
    from nemo_elastic.checkpoint import config_from_checkpoint, load_checkpoint
    from nemo_elastic.config import ParallelConfig
    from nemo_elastic.model import build_hybrid_model

    with runtime.distributed(ParallelConfig()):
        cfg = config_from_checkpoint(ckpt)
        model = build_hybrid_model(cfg, spec_backend="local").eval()
        load_checkpoint(ckpt, model=model, restore_rng=False)
        b, s = tokens.shape
        with torch.no_grad():
            return model(tokens, torch.arange(s).expand(b, s), None).float()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|."""
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def tokens(batch: int = 2, seq: int = SEQ_LEN, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
