"""Crash soak of the family writers (`nemo-elastic export --all` and `extract --all`): SIGKILL at
random moments, rerun, compare with an uninterrupted reference.

A nested checkpoint with a hand-made family (the crash soak's tiny parent, three budgets) is
exported once without interruption (the reference).  Then, per command, a fresh output is
written again and again by a process that is SIGKILLed at a random moment after its staging
folder appeared (or at a random delay after start, every third kill), then rerun with the same
command until it finishes.  Checked after every kill: the output folder is either absent or
holds every budget, never some.  Checked at
the end: no hidden staging or lock file is left next to the output, and every tensor of every
budget equals the reference's.  PASS needs every requested kill to have happened.

    python bench/bench_export_soak.py --kills 6 --seed 0 [--workdir DIR]
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_crash_soak import _env, make_parent  # noqa: E402

logger = logging.getLogger("bench_export_soak")
BUDGETS = {"full": {}, "half": {"hidden_size": 16, "ffn_hidden_size": 32},
           "shallow": {"mamba_head_dim": 4, "drop_layers": [3, 4]}}


def make_family(root: Path) -> Path:
    """The tiny parent saved again as an elastic checkpoint whose family is BUDGETS."""
    from nemo_elastic import runtime
    from nemo_elastic.cost_model import MemorySpec, count_parameters, subnetwork_memory, \
        subnetwork_parameters
    from nemo_elastic.checkpoint import config_from_checkpoint, load_checkpoint, save_checkpoint
    from nemo_elastic.config import ParallelConfig
    from nemo_elastic.elastic import SubNetwork
    from nemo_elastic.elastic.specs import build_elastic_model

    parent = make_parent(root)
    cfg = config_from_checkpoint(parent)
    m, full = cfg.model, count_parameters(cfg.model)
    rows = []
    for name, sizes in BUDGETS.items():
        subnet = SubNetwork.uniform(m, **sizes)
        params = subnetwork_parameters(m, subnet)
        rows.append({"name": name, "subnetwork": subnet.to_dict(), "target": params / full,
                     "budget_type": "params", "summary": subnet.describe(m),
                     "parameters": params, "parameter_fraction": params / full,
                     "memory_bytes": subnetwork_memory(m, subnet, MemorySpec())})
    with runtime.distributed(ParallelConfig()):
        model = build_elastic_model(cfg)
        load_checkpoint(parent, model=model, restore_rng=False)
        # kind "elastic" also writes `latest`: the checkpoint gets a checkpoints folder of its own
        save_checkpoint(root / "ckpts" / "family", cfg=cfg, model=model, kind="elastic",
                        extra_meta={"family": rows}, overwrite=True)
    return root / "ckpts" / "family"


def argv(command: str, ckpt: Path, out: Path) -> list[str]:
    extra = ["--format", "megatron"] if command == "export" else []
    return [sys.executable, "-m", "nemo_elastic.cli", command, "--ckpt", str(ckpt), "--all",
            "--out", str(out), *extra]


def tensors(folder: Path) -> dict:
    """{budget: {parameter: tensor}} of an exported/extracted family folder (checksums
    verified by the load)."""
    from nemo_elastic.export.common import tp1_runtime
    from nemo_elastic.checkpoint import config_from_checkpoint, load_checkpoint
    from nemo_elastic.model import build_hybrid_model

    out = {}
    with tp1_runtime():
        for name in BUDGETS:
            cfg = config_from_checkpoint(folder / name).single_process()
            model = build_hybrid_model(cfg, spec_backend="local", perform_initialization=False)
            load_checkpoint(folder / name, model=model, restore_rng=False)
            out[name] = {k: v.detach().clone() for k, v in model.state_dict().items()
                         if not k.endswith("_extra_state")}
    return out


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir()
                  if p.name.startswith(f".{out.name}."))


def soak(command: str, ckpt: Path, work: Path, kills: int, rng: random.Random) -> dict:
    import torch

    ref = work / f"{command}_ref"
    subprocess.run(argv(command, ckpt, ref), env=_env("ref"), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    expected = tensors(ref)
    out = work / f"{command}_soak"
    done, partial, runs = 0, 0, 0
    while done < kills:
        if out.exists():
            shutil.rmtree(out)  # start a fresh write each cycle
        proc = subprocess.Popen(argv(command, ckpt, out), env=_env("soak"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        runs += 1
        start = time.time()
        if done % 3 == 2:
            time.sleep(rng.uniform(0.5, 8.0))  # startup, loading, or anywhere
        else:
            while proc.poll() is None and not any(".export-" in n for n in leftovers(out)):
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 1.5))  # while budgets are written and verified
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            done += 1
            logger.info("%s: kill %d after %.1f s; output %s", command, done, time.time() - start,
                        "complete" if out.exists() else "absent")
        if out.exists():
            names = sorted(p.name for p in out.iterdir())
            if names != sorted(BUDGETS):
                partial += 1
        rerun = subprocess.run(argv(command, ckpt, out) + ["--overwrite"], env=_env("soak"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        runs += 1
        if rerun.returncode != 0:
            raise RuntimeError(f"{command} rerun failed: {rerun.stderr[-2000:]}")
    got = tensors(out)
    equal = all(torch.equal(got[b][k], expected[b][k]) for b in BUDGETS for k in expected[b])
    return {"command": command, "kills": done, "runs": runs, "partial_outputs": partial,
            "leftovers": leftovers(out), "tensors_equal": equal}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=6, help="SIGKILLs per command")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="export_soak_"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    ckpt = make_family(work)
    results = [soak(command, ckpt, work, args.kills, rng) for command in ("export", "extract")]
    ok = True
    for r in results:
        good = r["kills"] == args.kills and r["partial_outputs"] == 0 and not r["leftovers"] \
            and r["tensors_equal"]
        ok &= good
        print(f"{r['command']:8s} kills {r['kills']}  runs {r['runs']}  partial outputs "
              f"{r['partial_outputs']}  leftovers {r['leftovers'] or 'none'}  tensors equal to "
              f"the uninterrupted run: {r['tensors_equal']}  {'PASS' if good else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
