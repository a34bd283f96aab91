"""Pretraining with Megatron-Core's schedule + optimizer: learning, resume, crash safety."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from nemo_elastic import runtime
from nemo_elastic.checkpoint import LATEST_FILE, latest_checkpoint, load_checkpoint, read_meta
from nemo_elastic.config import load_config
from nemo_elastic.model import build_hybrid_model
from nemo_elastic.training.pretrain import pretrain

FAST = ["data.synthetic.num_train=2000", "data.synthetic.num_val=100", "data.seq_length=64",
        "data.micro_batch_size=8", "data.global_batch_size=16", "train.eval_iters=2",
        "train.eval_accuracy_samples=8", "train.log_interval=5"]


def _cfg(out_dir, *extra):
    return load_config("conf/tiny.yaml", [*FAST, f"output_dir={out_dir}", *extra])


def test_pretrain_learns_far_below_uniform(tmp_path):
    result = pretrain(_cfg(tmp_path, "train.iters=60", "train.eval_interval=30",
                           "train.save_interval=30", "train.warmup_iters=5"), progress=False)
    assert result.final_val_loss < 0.6 * result.uniform_loss, result
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0] - 1.0
    assert (tmp_path / "loss.png").stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["iterations"] == 60
    assert math.isclose(summary["final_val_loss"], result.final_val_loss)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "iter_0000060"


def _load_params(cfg, ckpt):
    model = build_hybrid_model(cfg)
    state = load_checkpoint(ckpt, model=model, restore_rng=False)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, state


def test_resume_is_bit_exact(tmp_path):
    """20 iterations in one go == resume from the iteration-10 checkpoint and train 10 more:
    model, optimizer moments, LR schedule, data position and RNG all restored."""
    args = ["train.iters=20", "train.warmup_iters=3", "train.eval_interval=10",
            "train.save_interval=10"]
    straight = pretrain(_cfg(tmp_path / "a", *args), progress=False)
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a/checkpoints/iter_0000010", tmp_path / "b/checkpoints/iter_0000010")
    (tmp_path / "b/checkpoints" / LATEST_FILE).write_text("iter_0000010\n")
    resumed = pretrain(_cfg(tmp_path / "b", *args), progress=False)

    assert [h["iteration"] for h in resumed.history] == list(range(11, 21))
    assert [h["train_loss"] for h in resumed.history] == \
        [h["train_loss"] for h in straight.history[10:]]
    cfg = _cfg(tmp_path / "a", *args)
    with runtime.distributed(cfg.parallel):
        a, state_a = _load_params(cfg, tmp_path / "a/checkpoints/iter_0000020")
        b, state_b = _load_params(cfg, tmp_path / "b/checkpoints/iter_0000020")
    assert state_a["data_state"] == state_b["data_state"]
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_already_finished_run_is_not_retrained(tmp_path):
    cfg = _cfg(tmp_path, "train.iters=4", "train.warmup_iters=1", "train.save_interval=2",
               "train.eval_interval=2")
    first = pretrain(cfg, progress=False)
    again = pretrain(cfg, progress=False)
    assert again.history == []
    # nothing lost or made NaN by the rerun: same figures, whole metrics file kept
    assert again.final_val_loss == first.final_val_loss
    assert again.final_train_loss == first.final_train_loss
    summary = json.loads((tmp_path / "summary.json").read_text())  # strict JSON: no NaN
    assert math.isfinite(summary["final_val_loss"]) and math.isfinite(summary["final_train_loss"])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["iteration"] for l in lines] == [1, 2, 3, 4]
    assert read_meta(latest_checkpoint(tmp_path / "checkpoints"))["iteration"] == 4


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_rerun_resumes(tmp_path):
    """Slurm preemption: SIGTERM -> checkpoint at the iteration boundary, exit; rerun resumes."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "nemo_elastic.cli", "pretrain", "--config", "conf/tiny.yaml",
           "--no-progress", *FAST, f"output_dir={out}", "train.iters=100000",
           "train.save_interval=100000", "train.eval_interval=100000", "train.warmup_iters=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    for line in proc.stdout:  # wait until the training loop runs
        log.append(line)
        if "training iterations" in line:
            break
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    log = "".join(log) + rest
    assert proc.returncode != 0, log
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt is not None, log
    stopped_at = read_meta(ckpt)["iteration"]
    assert stopped_at > 0 and "SIGTERM received" in log, log
    rerun = pretrain(_cfg(out, f"train.iters={stopped_at + 2}", "train.save_interval=100000", "train.warmup_iters=1",
                          "train.eval_interval=100000"), progress=False)
    assert [h["iteration"] for h in rerun.history] == [stopped_at + 1, stopped_at + 2]
