"""Masked elastic forward under tensor and pipeline parallelism (two gloo processes on CPU)."""

import pytest
import torch

from nemo_elastic import runtime
from nemo_elastic.checkpoint import load_checkpoint, save_checkpoint
from nemo_elastic.config import ParallelConfig
from nemo_elastic.elastic import SubNetwork
from nemo_elastic.elastic.specs import build_elastic_model
from tests.conftest import perturb, tiny_config
from tests.multiproc import run_multiprocess

pytestmark = pytest.mark.slow

PATTERN = "M-*M-"


def _subnet(model):
    """Every axis pruned, heterogeneous per layer, one layer dropped on each pipeline stage."""
    s = SubNetwork.uniform(model, hidden_size=20, mamba_num_heads=2, mamba_head_dim=5,
                           num_attention_heads=2, ffn_hidden_size=40, drop_layers=[1, 3])
    return s.replace_layer(4, ffn_hidden_size=24)


def _reference(tmp_path, pattern):
    """TP=1, PP=1: save perturbed weights, return (tokens, masked per-token loss)."""
    cfg = tiny_config({"hybrid_layer_pattern": pattern})
    with runtime.distributed(ParallelConfig()):
        model = build_elastic_model(cfg)
        perturb(model)
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 37))
        pos = torch.arange(37).expand(2, 37)
        with torch.no_grad():
            logits = model(tokens, pos, None, subnetwork=_subnet(cfg.model))
            loss = model(tokens, pos, None, labels=tokens, subnetwork=_subnet(cfg.model))
        save_checkpoint(tmp_path / "ckpt", cfg=cfg, model=model, kind="test")
    torch.save(tokens, tmp_path / "tokens.pt")
    return logits, loss


def _tp2(rank, world_size, tmp_path):
    cfg = tiny_config({"hybrid_layer_pattern": PATTERN},
                      parallel={"tensor_model_parallel_size": 2})
    with runtime.distributed(cfg.parallel):
        model = build_elastic_model(cfg)
        load_checkpoint(tmp_path / "ckpt", model=model)
        tokens = torch.load(tmp_path / "tokens.pt")
        pos = torch.arange(tokens.shape[1]).expand_as(tokens)
        with torch.no_grad():
            logits = model(tokens, pos, None, runtime_gather_output=True,
                           subnetwork=_subnet(cfg.model))
        if rank == 0:
            torch.save(logits, tmp_path / "tp2.pt")


def test_tp2_masked_logits_equal_tp1(tmp_path):
    reference, _ = _reference(tmp_path, PATTERN)
    run_multiprocess(_tp2, 2, tmp_path)
    tp2 = torch.load(tmp_path / "tp2.pt")
    rel = ((tp2 - reference).norm() / reference.norm()).item()
    assert rel <= 1e-5, rel


def _pp2(rank, world_size, tmp_path):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg = tiny_config({"hybrid_layer_pattern": "M-|*M-"},
                      parallel={"pipeline_model_parallel_size": 2})
    with runtime.distributed(cfg.parallel):
        model = build_elastic_model(cfg)
        load_checkpoint(tmp_path / "ckpt", model=model)
        tokens = torch.load(tmp_path / "tokens.pt")
        pos = torch.arange(tokens.shape[1]).expand_as(tokens)
        subnet = _subnet(cfg.model)

        def step(data_iterator, m):
            batch = next(data_iterator)
            out = m(batch, pos, None, labels=batch, subnetwork=subnet)
            return out, lambda o: (o.sum(), {"per_token": o.detach()})

        with torch.no_grad():
            outputs = get_forward_backward_func()(
                forward_step_func=step, data_iterator=iter([tokens]), model=[model],
                num_microbatches=1, seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
                forward_only=True)
        if rank == world_size - 1:
            torch.save(outputs[0]["per_token"], tmp_path / "pp2.pt")


def test_pp2_with_dropped_layers_on_both_stages_equals_pp1(tmp_path):
    _, reference = _reference(tmp_path, PATTERN)
    run_multiprocess(_pp2, 2, tmp_path)
    pp2 = torch.load(tmp_path / "pp2.pt")
    rel = ((pp2 - reference).norm() / reference.norm()).item()
    assert rel <= 1e-5, rel
