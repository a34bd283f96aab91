"""The one evaluation path: validation loss and answer accuracy of any sub-network, any TP/PP.

The oracle is the physically sliced model (`export.slicing`) evaluated as a plain HybridModel:
the masked elastic parent under a hard `SubNetwork`, through Megatron's schedule, must give the
same loss, at TP=1 and under TP=2 / PP=2, and the same greedy answers.
"""

import json
import random

import pytest
import torch

from nemo_elastic import runtime
from nemo_elastic.checkpoint import load_checkpoint, save_checkpoint
from nemo_elastic.config import ParallelConfig
from nemo_elastic.data import iterate_once
from nemo_elastic.data.loaders import build_training_data
from nemo_elastic.elastic import SubNetwork
from nemo_elastic.elastic.specs import build_elastic_model
from nemo_elastic.elastic.subnet import sample_subnetwork
from nemo_elastic.export.slicing import slice_model
from nemo_elastic.data.evaluate import answer_accuracy
from nemo_elastic.training.evaluation import (answer_accuracy_of, evaluate_subnetwork,
                                              greedy_logits_fn, validation_loss)
from tests.conftest import perturb, tiny_config
from tests.multiproc import run_multiprocess

TOL = 1e-5
PATTERN = "M-*M-"
SECTIONS = dict(data={"seq_length": 48, "micro_batch_size": 4, "global_batch_size": 8,
                      "synthetic": {"num_train": 40, "num_val": 60}},
                train={"eval_iters": 2, "eval_accuracy_samples": 4})


def _config(pattern=PATTERN, **parallel):
    return tiny_config({"hybrid_layer_pattern": pattern}, parallel=parallel, **SECTIONS)


def _subnet(model):
    """Every axis pruned, heterogeneous per layer, layers 1 and 3 dropped (one per PP stage)."""
    s = SubNetwork.uniform(model, hidden_size=20, mamba_num_heads=2, mamba_head_dim=5,
                           num_attention_heads=2, ffn_hidden_size=40, drop_layers=[1, 3])
    return s.replace_layer(4, ffn_hidden_size=24)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture
def parent(megatron_env):
    cfg = _config()
    return cfg, perturb(build_elastic_model(cfg)), build_training_data(cfg, megatron_env)


def test_masked_schedule_loss_equals_sliced_model_loss(megatron_env, parent):
    cfg, elastic, data = parent
    rng = random.Random(3)
    for subnet in [_subnet(cfg.model), *(sample_subnetwork(cfg.model, rng) for _ in range(3))]:
        masked = validation_loss(cfg, elastic, data, 2, megatron_env, subnetwork=subnet)
        child_cfg, child = slice_model(elastic, cfg, subnet)
        sliced = validation_loss(child_cfg, child, data, 2, megatron_env)
        assert _rel(masked, sliced) <= TOL, (subnet.describe(cfg.model), masked, sliced)


def test_full_subnetwork_equals_plain_call_and_smaller_differs(megatron_env, parent):
    cfg, elastic, data = parent
    plain = validation_loss(cfg, elastic, data, 2, megatron_env)
    full = validation_loss(cfg, elastic, data, 2, megatron_env,
                           subnetwork=SubNetwork.full(cfg.model))
    small = validation_loss(cfg, elastic, data, 2, megatron_env, subnetwork=_subnet(cfg.model))
    assert _rel(full, plain) <= TOL
    assert _rel(small, plain) > 1e-3  # the sub-network really is what ran
    assert validation_loss(cfg, elastic, data, 2, megatron_env) == plain  # same batches each time


def test_loss_is_token_mean_over_the_first_eval_iters_micro_batches(megatron_env, parent):
    """With one micro-batch per iteration: the token mean over the first `eval_iters`
    validation micro-batches (what the retired one-process `subnetwork_loss` computed)."""
    cfg, elastic, data = parent
    subnet = _subnet(cfg.model)
    batches = iterate_once(data.val_dataset, cfg.data.micro_batch_size)
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for _, b in zip(range(cfg.train.eval_iters), batches):
            loss = elastic(b["tokens"], b["position_ids"], None, labels=b["labels"],
                           subnetwork=subnet)
            mask = b["loss_mask"].double()
            total += torch.stack([(loss.double() * mask).sum(), mask.sum()])
    reference = (total[0] / total[1]).item()
    assert _rel(validation_loss(cfg, elastic, data, 1, megatron_env, subnetwork=subnet),
                reference) <= TOL


def test_answer_accuracy_of_subnetwork_equals_sliced_model(megatron_env, parent):
    cfg, elastic, data = parent
    subnet = _subnet(cfg.model)
    masked = answer_accuracy_of(cfg, elastic, data, megatron_env, subnetwork=subnet)
    child_cfg, child = slice_model(elastic, cfg, subnet)
    sliced = answer_accuracy_of(child_cfg, child, data, megatron_env)
    assert masked["n"] == cfg.train.eval_accuracy_samples
    assert masked == sliced  # accuracy and every greedy completion
    # the oracle: the MASKED nested model, a full forward per token (no slicing, no state)
    oracle = answer_accuracy(greedy_logits_fn(elastic.eval(), subnet), data.tokenizer,
                             data.val_problems[:cfg.train.eval_accuracy_samples], batch_size=3)
    assert oracle == masked
    full = answer_accuracy_of(cfg, elastic, data, megatron_env)
    assert [e["completion"] for e in full["examples"]] != \
        [e["completion"] for e in masked["examples"]]


def test_evaluate_subnetwork_reports_both_metrics(megatron_env, parent):
    cfg, elastic, data = parent
    subnet = _subnet(cfg.model)
    result = evaluate_subnetwork(cfg, elastic, data, megatron_env, subnet, 2)
    assert result["val_loss"] == validation_loss(cfg, elastic, data, 2, megatron_env,
                                                 subnetwork=subnet)
    expected = answer_accuracy_of(cfg, elastic, data, megatron_env, subnetwork=subnet)
    assert result["answer_accuracy"] == expected["accuracy"]


# --- TP=2 and PP=2 (two gloo processes) ------------------------------------------------------

def _parallel_loss(rank, world_size, tmp_path, layout):
    pattern, parallel = {"tp2": (PATTERN, {"tensor_model_parallel_size": 2}),
                         "pp2": ("M-|*M-", {"pipeline_model_parallel_size": 2})}[layout]
    cfg = _config(pattern, **parallel)
    with runtime.distributed(cfg.parallel) as info:
        model = build_elastic_model(cfg)
        load_checkpoint(tmp_path / "ckpt", model=model, restore_rng=False)
        data = build_training_data(cfg, info)
        loss = validation_loss(cfg, model, data, 2, info, subnetwork=_subnet(cfg.model),
                               all_stages=True)
    (tmp_path / f"{layout}_{rank}.json").write_text(json.dumps(loss))


@pytest.mark.slow
def test_tp2_and_pp2_subnetwork_loss_equal_tp1(tmp_path):
    cfg = _config()
    with runtime.distributed(ParallelConfig()) as info:
        model = perturb(build_elastic_model(cfg))
        reference = validation_loss(cfg, model, build_training_data(cfg, info), 2, info,
                                    subnetwork=_subnet(cfg.model))
        save_checkpoint(tmp_path / "ckpt", cfg=cfg, model=model, kind="test")
    for layout in ("tp2", "pp2"):
        run_multiprocess(_parallel_loss, 2, tmp_path, layout)
        for rank in range(2):  # every rank has the value, the first pipeline stage included
            loss = json.loads((tmp_path / f"{layout}_{rank}.json").read_text())
            assert _rel(loss, reference) <= TOL, (layout, rank, loss, reference)
