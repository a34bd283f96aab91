"""examples/slurm: the sbatch scripts parse, their dry run prints every node's exact command for
2 nodes x 8 GPUs, and the requeue-on-preemption logic runs against stand-ins for srun, torchrun,
scontrol and nemo-elastic (no Slurm here)."""

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SLURM = ROOT / "examples" / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sbatch")) + [SLURM / "launch.sh"]


def _run(script, tmp_path, *args, **env):
    """The script in `tmp_path` (with the repo's conf/ linked there), the venv's nemo-elastic
    on PATH: the dry run validates the recipe with `nemo-elastic check`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    clean["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{clean.get('PATH', '')}"
    if not (tmp_path / "conf").exists():
        (tmp_path / "conf").symlink_to(ROOT / "conf")
    return subprocess.run(["bash", str(SLURM / script), *args], cwd=tmp_path, text=True,
                          capture_output=True, env={**clean, **env}, timeout=60)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_valid_bash(script):
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _node_commands(stdout):
    return {line[1:line.index("]")]: shlex.split(line[line.index("]") + 1:])
            for line in stdout.splitlines() if line.startswith("[")}


def test_train_dry_run_for_2_nodes_x_8_gpus(tmp_path):
    (tmp_path / "out/elastic/checkpoints").mkdir(parents=True)
    (tmp_path / "out/elastic/checkpoints/latest").write_text("iter_0000200\n")
    out = _run("train.sbatch", tmp_path, "data.indexed.prefix=/data/my corpus", DRY_RUN="1",
               NODES="2", GPUS_PER_NODE="8", TP="8", PP="1", INIT="/ckpt/prepared", OUT="out",
               CONTAINER_IMAGE="nvcr.io/nvidia/nemo:25.09", CONTAINER_MOUNTS="/data:/data")
    assert out.returncode == 0, out.stderr
    assert "2 node(s) x 8 GPU(s) = 16 ranks, TP=8 PP=1 DP=2" in out.stdout
    assert "recipe OK for train: TP=8 PP=1, DP=2" in out.stdout
    assert "resume from 'iter_0000200'" in out.stdout
    srun = shlex.split(next(l for l in out.stdout.splitlines() if l.startswith("srun: "))[6:])
    assert srun == ["srun", "--kill-on-bad-exit=1", "--nodes=2", "--ntasks-per-node=1",
                    "--container-image=nvcr.io/nvidia/nemo:25.09", "--container-mounts=/data:/data"]
    nodes = _node_commands(out.stdout)
    assert list(nodes) == ["node001", "node002"]
    expected = [
        "torchrun", "--nnodes=2", "--nproc_per_node=8", "--rdzv_id=dryrun",
        "--rdzv_backend=c10d", "--rdzv_endpoint=node001:29500", "--no-python", "nemo-elastic",
        "train", "--config", "conf/nemotron_nano_12b.yaml", "--no-progress",
        "parallel.tensor_model_parallel_size=8", "parallel.pipeline_model_parallel_size=1",
        "output_dir=out", "elastic.init_checkpoint=/ckpt/prepared",
        "data.indexed.prefix=/data/my corpus"]
    assert nodes["node001"] == nodes["node002"] == expected


def test_pretrain_dry_run_for_2_nodes_x_8_gpus(tmp_path):
    out = _run("pretrain.sbatch", tmp_path, "train.iters=400", DRY_RUN="1", NODES="2",
               GPUS_PER_NODE="8", TP="8", OUT="out12b")
    assert out.returncode == 0, out.stderr
    nodes = _node_commands(out.stdout)
    assert list(nodes) == ["node001", "node002"]
    assert nodes["node001"] == nodes["node002"] == [
        "torchrun", "--nnodes=2", "--nproc_per_node=8", "--rdzv_id=dryrun",
        "--rdzv_backend=c10d", "--rdzv_endpoint=node001:29500", "--no-python", "nemo-elastic",
        "pretrain", "--config", "conf/nemotron_nano_12b.yaml", "--no-progress",
        "parallel.tensor_model_parallel_size=8", "parallel.pipeline_model_parallel_size=1",
        "output_dir=out12b", "train.iters=400"]


def test_dry_run_validates_the_recipe_for_the_world_size(tmp_path):
    """The README's TP=4 PP=2 dry run of the 12B recipe (a pattern without '|') used to print
    a valid-looking command; the job would have failed after queueing."""
    out = _run("train.sbatch", tmp_path, DRY_RUN="1", NODES="2", GPUS_PER_NODE="8", TP="4",
               PP="2", INIT="/ckpt/p")
    assert out.returncode == 2 and "hybrid_layer_pattern" in out.stderr
    assert "separate the stages with '|'" in out.stderr and "torchrun" not in out.stdout
    out = _run("train.sbatch", tmp_path, "elastic.budgets.6b=2.0", DRY_RUN="1", NODES="2",
               INIT="/ckpt/p")
    assert out.returncode == 2 and "elastic.budgets.6b=2.0" in out.stderr


def test_parallel_sizes_that_do_not_fit_the_job_are_refused(tmp_path):
    out = _run("train.sbatch", tmp_path, DRY_RUN="1", NODES="2", TP="3", INIT="/ckpt/p")
    assert out.returncode == 2 and "TP=3 x PP=1 = 3 does not divide" in out.stderr
    out = _run("train.sbatch", tmp_path, DRY_RUN="1")
    assert out.returncode != 0 and "set INIT" in out.stderr


def test_export_dry_run_one_verified_export_of_the_family(tmp_path):
    out = _run("export.sbatch", tmp_path, DRY_RUN="1", BUDGETS="9b 6b", CKPT="run/elastic",
               DEST="exp")
    assert out.returncode == 0, out.stderr
    assert _node_commands(out.stdout)["node001"] == [
        "nemo-elastic", "export", "--ckpt", "run/elastic", "--budget", "9b", "--budget", "6b",
        "--format", "hf", "--out", "exp"]
    out = _run("export.sbatch", tmp_path, DRY_RUN="1", FORMAT="megatron", CKPT="c", DEST="d",
               OVERWRITE="1")
    assert _node_commands(out.stdout)["node001"] == \
        ["nemo-elastic", "export", "--ckpt", "c", "--all", "--format", "megatron", "--out", "d",
         "--overwrite"]
    assert _run("export.sbatch", tmp_path, DRY_RUN="1", FORMAT="onnx").returncode == 2


def _stand_in(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("wrote_checkpoint, restarts, requeued", [
    (True, "0", True),     # preempted after a new checkpoint: requeue, the rerun resumes
    (False, "0", False),   # failed before any new checkpoint: no requeue loop
    (True, "20", False),   # MAX_REQUEUES reached
])
def test_preempted_run_requeues_itself_only_after_a_new_checkpoint(tmp_path, wrote_checkpoint,
                                                                   restarts, requeued):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    # srun runs its command once (one node); torchrun runs the worker command after --no-python
    _stand_in(bin_dir, "srun", 'while [[ "$1" == --* ]]; do shift; done; exec "$@"\n')
    _stand_in(bin_dir, "torchrun", 'while [ "$1" != --no-python ]; do shift; done; shift; '
                                   'exec "$@"\n')
    _stand_in(bin_dir, "scontrol", f'echo "scontrol $*" >> {log}\n'
                                   'if [ "$1" = show ]; then echo gpu-a; echo gpu-b; fi\n')
    write = "mkdir -p out/elastic/checkpoints; echo iter_0000050 > out/elastic/checkpoints/latest"
    _stand_in(bin_dir, "nemo-elastic", f'echo "nemo-elastic $*" >> {log}\n'
              f'{write if wrote_checkpoint else ""}\n'
              'echo "SIGTERM received: checkpoint saved" >&2; exit 1\n')
    out = _run("train.sbatch", tmp_path, INIT="/ckpt/p", OUT="out", TP="8",
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="77",
               SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_GPUS_ON_NODE="8",
               SLURM_SUBMIT_DIR=str(ROOT), SLURM_RESTART_COUNT=restarts)
    assert out.returncode == 1, out.stdout + out.stderr
    calls = log.read_text().splitlines()
    assert calls[1].startswith("nemo-elastic train --config conf/nemotron_nano_12b.yaml")
    assert "rendezvous gpu-a:29500" in out.stdout
    assert ("scontrol requeue 77" in calls) == requeued
