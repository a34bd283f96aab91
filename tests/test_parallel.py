"""Two gloo processes on CPU: tensor, data and pipeline parallelism agree with one process."""

import json

import pytest
import torch

from nemo_elastic import runtime
from nemo_elastic.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from nemo_elastic.config import ParallelConfig, load_config
from nemo_elastic.model import build_hybrid_model
from tests.conftest import perturb, tiny_config
from tests.multiproc import run_multiprocess

pytestmark = pytest.mark.slow

FAST = ["data.synthetic.num_train=1000", "data.synthetic.num_val=64", "data.seq_length=64",
        "data.micro_batch_size=4", "data.global_batch_size=8", "train.eval_iters=2",
        "train.eval_accuracy_samples=0", "train.warmup_iters=2", "train.iters=8",
        "train.eval_interval=4", "train.save_interval=4"]


def _tp2_logits(rank, world_size, ckpt, tokens_path, out_path):
    cfg = tiny_config(parallel={"tensor_model_parallel_size": 2})
    with runtime.distributed(cfg.parallel):
        model = build_hybrid_model(cfg)
        load_checkpoint(ckpt, model=model)  # written at TP=1: dist_checkpointing reshards
        tokens = torch.load(tokens_path)
        pos = torch.arange(tokens.shape[1]).expand_as(tokens)
        with torch.no_grad():
            logits = model(tokens, pos, None, runtime_gather_output=True)
        if rank == 0:
            torch.save(logits, out_path)


def test_tensor_parallel_2_equals_1(tmp_path):
    cfg = tiny_config()
    with runtime.distributed(ParallelConfig()):
        model = build_hybrid_model(cfg)
        perturb(model)
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 37))
        with torch.no_grad():
            reference = model(tokens, torch.arange(37).expand(2, 37), None)
        save_checkpoint(tmp_path / "ckpt", cfg=cfg, model=model, kind="test")
    torch.save(tokens, tmp_path / "tokens.pt")
    run_multiprocess(_tp2_logits, 2, tmp_path / "ckpt", tmp_path / "tokens.pt", tmp_path / "tp2.pt")
    tp2 = torch.load(tmp_path / "tp2.pt")
    rel = ((tp2 - reference).norm() / reference.norm()).item()
    assert rel <= 1e-5, rel


def _pretrain_rank(rank, world_size, overrides):
    from nemo_elastic.training.pretrain import pretrain

    result = pretrain(load_config("conf/tiny.yaml", overrides), progress=False)
    if rank == 0:
        out = load_config("conf/tiny.yaml", overrides).output_dir
        with open(f"{out}/history.json", "w") as f:
            json.dump(result.history, f)


def test_data_parallel_2_equals_two_micro_batches(tmp_path):
    """DP=2 x 1 micro-batch == DP=1 x 2 micro-batches: same samples, same averaged gradient."""
    from nemo_elastic.training.pretrain import pretrain

    single = pretrain(load_config("conf/tiny.yaml", [*FAST, f"output_dir={tmp_path / 'dp1'}"]),
                      progress=False)
    run_multiprocess(_pretrain_rank, 2, [*FAST, f"output_dir={tmp_path / 'dp2'}"])
    dp2 = json.loads((tmp_path / "dp2" / "history.json").read_text())
    for a, b in zip(single.history, dp2, strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-5 * abs(a["train_loss"]), (a, b)


def test_pipeline_parallel_2_trains_and_its_checkpoint_loads_at_pp1(tmp_path):
    out = tmp_path / "pp2"
    overrides = [*FAST, f"output_dir={out}", "model.hybrid_layer_pattern=M-M*|-M-",
                 "parallel.pipeline_model_parallel_size=2"]
    run_multiprocess(_pretrain_rank, 2, overrides)
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    pp2_val = history[-1]["val_loss"]

    # The PP=2 checkpoint (layers keyed by global number) loads into a one-stage model and gives
    # the validation loss the pipeline computed.
    from nemo_elastic.data.loaders import build_training_data
    from nemo_elastic.training.evaluation import validation_loss

    cfg = load_config("conf/tiny.yaml", [*FAST, f"output_dir={out}",
                                         "model.hybrid_layer_pattern=M-M*-M-"])
    with runtime.distributed(cfg.parallel) as info:
        model = build_hybrid_model(cfg)
        load_checkpoint(resolve_checkpoint(out), model=model, restore_rng=False)
        data = build_training_data(cfg, info)
        pp1_val = validation_loss(cfg, model, data, 2, info)
    assert abs(pp1_val - pp2_val) <= 1e-5 * pp2_val, (pp1_val, pp2_val)
