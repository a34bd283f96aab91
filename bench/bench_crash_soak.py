"""Crash soak of elastic training (`nemo-elastic train`): SIGKILL at random moments, resume.

One uninterrupted run is the reference.  A second run on a fresh output folder is killed with
SIGKILL again and again (a kill per cycle, cycling through the kinds of moment below) and rerun with
the same command each time:

  random      a random delay after the run made progress (a new checkpoint since the rerun)
  save        while a checkpoint is being written (its `.iter_N.tmp` directory exists)
  transition  the moment the last checkpoint of curriculum stage 1 is published
  startup     a random delay after the process started (the bench adds it to the cycle): while
              it imports, reads the checkpoint and resumes, or trains, before any new save

then run to the end.  Checked after every kill: no process of the killed run is left (helper
processes are found by a tag in their environment).  Checked at the end: every tensor of the
final checkpoint (model, optimizer, router, RNG states) is bit-identical to the reference run's,
and `metrics.jsonl` holds every iteration exactly once with the reference's records (every
field but timings).  PASS needs all the requested kills to have happened.

    python bench/bench_crash_soak.py --kills 20 --seed 0 [--workdir DIR]

`tests/test_crash_soak.py` runs it with 5 kills in CI (slow-marked).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "conf" / "tiny.yaml"
TAG = "NEMO_ELASTIC_SOAK_TAG"
KINDS = ("random", "save", "transition")  # the CI test's cycle
BENCH_KINDS = KINDS + ("startup",)
logger = logging.getLogger("bench_crash_soak")

MODEL = dict(hybrid_layer_pattern="M-*M-", hidden_size=32, ffn_hidden_size=64,
             num_attention_heads=4, num_query_groups=2, kv_channels=8, mamba_num_heads=4,
             mamba_head_dim=8, mamba_num_groups=2, mamba_state_dim=8, mamba_conv_kernel=4,
             mamba_chunk_size=16, vocab_size=64, max_sequence_length=128)


def overrides(root: Path, out: Path, stage1: int, stage2: int) -> list[str]:
    """A tiny elastic recipe: two curriculum stages, a checkpoint after every iteration."""
    return [f"model.{k}={v}" for k, v in MODEL.items()] + [
        "data.synthetic.num_train=400", "data.synthetic.num_val=40", "data.seq_length=64",
        "data.micro_batch_size=4", "data.global_batch_size=8", "train.eval_accuracy_samples=2",
        "train.eval_iters=1", f"output_dir={out}", f"elastic.init_checkpoint={root / 'parent'}",
        f"elastic.curriculum.0.iters={stage1}", f"elastic.curriculum.1.iters={stage2}",
        "elastic.curriculum.0.seq_length=64", "elastic.curriculum.0.global_batch_size=8",
        "elastic.curriculum.0.micro_batch_size=4", "elastic.curriculum.1.seq_length=96",
        "elastic.curriculum.1.global_batch_size=4", "elastic.curriculum.1.micro_batch_size=4",
        "elastic.warmup_iters=1", "elastic.router.warmup_iters=1", "elastic.save_interval=1",
        "elastic.eval_interval=100", "elastic.log_interval=1", "elastic.router.hidden_dim=16"]


def make_parent(root: Path) -> Path:
    """A random (perturbed, so far from init) parent checkpoint of the tiny shape."""
    import torch

    from nemo_elastic import runtime
    from nemo_elastic.checkpoint import save_checkpoint
    from nemo_elastic.config import Config, ParallelConfig, from_dict
    from nemo_elastic.model import build_hybrid_model

    cfg = from_dict(Config, {"model": MODEL, "output_dir": str(root / "unused")})
    with runtime.distributed(ParallelConfig()):
        model = build_hybrid_model(cfg)
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        save_checkpoint(root / "parent", cfg=cfg, model=model, kind="test", overwrite=True)
    return root / "parent"


def _command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "nemo_elastic.cli", "train", "--config", str(TINY),
            "--no-progress", *args]


def _env(tag: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env[TAG] = tag
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def tagged_processes(tag: str) -> list[int]:
    """Pids of live processes whose environment carries `TAG=tag` (a run and its helpers)."""
    needle = f"{TAG}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:  # gone, or not ours to read
            continue
    return found


def _reap(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_to_end(args: list[str], tag: str, log: Path) -> None:
    with open(log, "a") as out:
        proc = subprocess.run(_command(args), env=_env(tag), stdout=out, stderr=out)
    if proc.returncode != 0:
        raise RuntimeError(f"nemo-elastic train failed (exit {proc.returncode}); see {log}")


def _iterations(ckpt_root: Path) -> list[int]:
    if not ckpt_root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in ckpt_root.iterdir()
                  if p.is_dir() and p.name.startswith("iter_"))


def _partial_saves(ckpt_root: Path) -> set:
    """The `.iter_N.tmp` directories of saves in progress (or cut by a kill), each identified by
    name, inode and change time (a rerun that redoes the save recreates the directory)."""
    if not ckpt_root.is_dir():
        return set()
    found = set()
    for p in ckpt_root.iterdir():
        if p.name.startswith(".iter_") and p.name.endswith(".tmp"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            found.add((p.name, st.st_ino, st.st_ctime_ns))
    return found


def _saving(ckpt_root: Path, stale: set = frozenset()) -> bool:
    return bool(_partial_saves(ckpt_root) - stale)


def kill_once(args: list[str], ckpt_root: Path, kind: str, stage1: int, rng: random.Random,
              tag: str, log: Path, timeout: float = 300.0) -> dict:
    """Start the run, SIGKILL it at a moment of `kind`; returns what happened."""
    before = max(_iterations(ckpt_root), default=0)
    stale = _partial_saves(ckpt_root)  # left by an earlier kill: not a save of this run
    with open(log, "a") as out:
        proc = subprocess.Popen(_command(args), env=_env(tag), stdout=out, stderr=out,
                                start_new_session=True)
    started = time.monotonic()
    deadline = started + timeout
    delay = rng.uniform(0.0, 0.6)
    startup_delay = rng.uniform(0.5, 5.0)  # start-up (imports, resume) takes ~3-4 s here
    moment = None
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            done = _iterations(ckpt_root)
            if kind == "save" and _saving(ckpt_root, stale):
                moment = "during the save after iteration %d" % (max(done, default=0) + 1)
            elif kind == "transition" and stage1 in done:
                moment = f"at the stage transition (iteration {stage1} saved)"
            elif kind == "random" and max(done, default=0) > before:
                time.sleep(delay)
                moment = f"{delay:.2f} s after iteration {max(done)} was saved"
            elif kind == "startup" and time.monotonic() >= started + startup_delay:
                moment = f"{startup_delay:.2f} s after the process started"
            if moment:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    time.sleep(0.5)  # give helpers (if any existed) a moment to notice their parent is gone
    orphans = tagged_processes(tag)
    _reap(orphans)
    return {"kind": kind, "killed": moment is not None, "moment": moment,
            "exit": proc.returncode, "resumed_from": before,
            "saved_after": max(_iterations(ckpt_root), default=0),
            "partial_save_left": _saving(ckpt_root, stale), "orphans": orphans}


def final_state(ckpt: Path) -> dict:
    """Every entry of a checkpoint (torch_dist format read without a process group)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(ckpt), f"{tmp}/state.pt")
        return torch.load(f"{tmp}/state.pt", weights_only=False)


def differences(a: dict, b: dict) -> list[str]:
    import torch

    diff = sorted(set(a) ^ set(b))
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        if torch.is_tensor(x):
            same = torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y)
        else:
            same = _equal(x, y)
        if not same:
            diff.append(key)
    return diff


def _equal(x, y) -> bool:
    import io

    import torch

    if torch.is_tensor(x) or torch.is_tensor(y):
        return torch.is_tensor(x) and torch.is_tensor(y) and torch.equal(x, y)
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_equal(u, v) for u, v in zip(x, y))
    if isinstance(x, io.BytesIO) and isinstance(y, io.BytesIO):
        return x.getvalue() == y.getvalue()
    try:
        import numpy as np

        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            return bool(np.array_equal(x, y))
    except ImportError:
        pass
    return x == y


def _record(m: dict) -> dict:
    """A metrics record without its timings (the only fields a resumed run may change)."""
    return {k: v for k, v in m.items() if "time" not in k and not k.endswith("_s")}


def crash_soak(root: Path, *, kills: int = 5, seed: int = 0, stage1: int = 6,
               stage2: int = 6, kinds: tuple = KINDS) -> dict:
    """The whole soak in `root`; returns a summary (raises nothing on a mismatch: check it)."""
    from nemo_elastic.checkpoint import latest_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    make_parent(root)
    log = root / "soak.log"
    tag = uuid.uuid4().hex
    ref_out, out = root / "reference", root / "killed"
    started = time.perf_counter()
    run_to_end(overrides(root, ref_out, stage1, stage2), tag, log)
    reference_s = time.perf_counter() - started
    rng = random.Random(seed)
    args = overrides(root, out, stage1, stage2)
    ckpt_root = out / "elastic" / "checkpoints"
    cycles = []
    for kind in [kinds[i % len(kinds)] for i in range(kills)]:
        if kind == "transition" and stage1 in _iterations(ckpt_root):
            kind = "save"  # the transition is behind us: kill mid-save instead
        cycle = kill_once(args, ckpt_root, kind, stage1, rng, tag, log)
        cycles.append(cycle)
        logger.info("kill %d (%s): %s", len(cycles), kind, cycle)
        if not cycle["killed"]:
            break  # the run finished before the moment came
    run_to_end(args, tag, log)  # the rerun that finishes the run
    ref_ckpt = latest_checkpoint(ref_out / "elastic" / "checkpoints")
    ckpt = latest_checkpoint(ckpt_root)
    diff = differences(final_state(ref_ckpt), final_state(ckpt))
    ref_metrics = [json.loads(l) for l in (ref_out / "elastic/metrics.jsonl").read_text().splitlines()]
    metrics = [json.loads(l) for l in (out / "elastic/metrics.jsonl").read_text().splitlines()]
    summary = {
        "kills": sum(c["killed"] for c in cycles), "cycles": cycles,
        "kills_during_save": sum(c["killed"] and c["kind"] == "save" for c in cycles),
        "kills_at_transition": sum(c["killed"] and c["kind"] == "transition" for c in cycles),
        "partial_saves_left_by_kills": sum(c["partial_save_left"] for c in cycles),
        "orphans": [p for c in cycles for p in c["orphans"]],
        "final_iteration": [ref_ckpt.name, ckpt.name],
        "tensors_compared": len(final_state(ckpt)), "differing_entries": diff,
        "metrics_iterations": [m["iteration"] for m in metrics],
        "metrics_equal_reference": [_record(m) for m in metrics] ==
                                   [_record(m) for m in ref_metrics],
        "reference_run_s": round(reference_s, 1),
        "total_s": round(time.perf_counter() - started, 1)}
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage1", type=int, default=None,
                        help="iterations of stage 1 (default: max(12, 3 x kills), so that every "
                        "kill finds a run still going)")
    parser.add_argument("--stage2", type=int, default=None, help="iterations of stage 2 (same)")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    args = parser.parse_args()
    args.stage1 = args.stage1 or max(12, 3 * args.kills)
    args.stage2 = args.stage2 or max(12, 3 * args.kills)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="crash_soak_"))
    summary = crash_soak(root, kills=args.kills, seed=args.seed, stage1=args.stage1,
                         stage2=args.stage2, kinds=BENCH_KINDS)
    print(json.dumps({k: v for k, v in summary.items() if k != "cycles"}, indent=2))
    final = summary["final_iteration"]
    ok = summary["kills"] == args.kills and final[0] == final[1] \
        and not summary["differing_entries"] and not summary["orphans"] \
        and summary["metrics_equal_reference"] \
        and summary["metrics_iterations"] == list(range(1, args.stage1 + args.stage2 + 1))
    if summary["kills"] < args.kills:
        print(f"only {summary['kills']} of {args.kills} kills happened before the run finished: "
              "use more iterations (--stage1/--stage2) for this many kills")
    print("PASS: bit-exact after %d kills" % summary["kills"] if ok else "FAIL")
    if args.workdir is None and ok:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
