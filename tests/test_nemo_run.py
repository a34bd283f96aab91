"""`nemo elastic ...` (NeMo-Run, the `nemo` extra) and the promise that without the extras nothing
in the package imports nemo_run or megatron.bridge.

The `nemo` commands run as real subprocesses (NeMo-Run's own CLI, entry point discovery
included); their results are checked against what `nemo-elastic` does on the same checkpoint.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def _env(tmp_path) -> dict:
    # torchrun (the local executor) must be on PATH; NeMo-Run's experiment dirs go to tmp.
    return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "NEMORUN_HOME": str(tmp_path / "nemo_run_home"), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT)}


def _nemo(tmp_path, *args, timeout=300) -> subprocess.CompletedProcess:
    nemo = shutil.which("nemo", path=str(VENV_BIN))
    assert nemo, "the nemo extra is installed but its `nemo` command is not"
    return subprocess.run([nemo, *args], cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=timeout)


# ----------------------------------------------------------------------------- without extras

PROBE = """
import importlib, json, pkgutil, sys
import nemo_elastic, nemo_elastic.cli
# every module of the package except the adapters that are the extras' own (integrations/)
for mod in pkgutil.walk_packages(nemo_elastic.__path__, "nemo_elastic."):
    if mod.name != "nemo_elastic.integrations" and \
            not mod.name.startswith("nemo_elastic.integrations."):
        importlib.import_module(mod.name)
rc = nemo_elastic.cli.main(["info", sys.argv[1], "--json"])
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("nemo_run", "leptonai", "fiddle")
             or m.startswith("megatron.bridge") or m.startswith("transformer_engine"))
print(json.dumps({"rc": rc, "bad": bad}))
"""


def test_without_the_extras_nothing_imports_nemo_run_or_megatron_bridge(elastic_ckpt):
    out = subprocess.run([sys.executable, "-c", PROBE, str(elastic_ckpt)], cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    *info, result = out.stdout.strip().splitlines()
    assert json.loads(result) == {"rc": 0, "bad": []}
    # and nemo-elastic works unchanged: `info --json` read the family
    assert [b["name"] for b in json.loads("\n".join(info))["budgets"]] == \
        ["full", "uniform", "hetero", "shallow"]


@pytest.fixture(scope="module")
def elastic_ckpt(tmp_path_factory):
    """A tiny nested checkpoint with a family (hand-made as in test_export_budget)."""
    from tests.test_export_budget import save_hand_made_family

    return save_hand_made_family(tmp_path_factory.mktemp("nemo_ckpt") / "ckpt")


# ----------------------------------------------------------------------------- with the extra

@pytest.mark.slow  # each `nemo` process starts NeMo-Run and its entry points (~10-25 s)
def test_nemo_help_lists_elastic_and_its_commands(tmp_path):
    pytest.importorskip("nemo_run")
    out = _nemo(tmp_path, "--help")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "elastic" in out.stdout
    out = _nemo(tmp_path, "elastic", "--help")
    assert out.returncode == 0, out.stderr[-2000:]
    for command in ("pretrain", "prepare", "train", "export", "info", "generate"):
        assert command in out.stdout, command


@pytest.mark.slow  # each `nemo` process starts NeMo-Run and its entry points (~10-25 s)
def test_nemo_elastic_info_and_export_equal_nemo_elastic(elastic_ckpt, tmp_path):
    pytest.importorskip("nemo_run")
    from safetensors.torch import load_file

    from nemo_elastic import cli

    out = _nemo(tmp_path, "elastic", "info", f"ckpt={elastic_ckpt}")
    assert out.returncode == 0, out.stderr[-3000:]
    table = [line.split("|")[0].strip() for line in out.stdout.splitlines() if "|" in line]
    assert table == ["budget", "full", "uniform", "hetero", "shallow"]

    ours = tmp_path / "ours"
    assert cli.main(["export", "--ckpt", str(elastic_ckpt), "--budget", "uniform",
                     "--out", str(ours)]) == 0
    theirs = tmp_path / "theirs"
    out = _nemo(tmp_path, "elastic", "export", f"ckpt={elastic_ckpt}", "budget=uniform",
                f"out={theirs}", "--yes")
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in theirs.iterdir()) == sorted(p.name for p in ours.iterdir())
    ours, theirs = ours / "uniform", theirs / "uniform"  # the budget's folder under OUT
    assert sorted(p.name for p in theirs.iterdir()) == sorted(p.name for p in ours.iterdir())
    assert json.loads((theirs / "config.json").read_text()) == \
        json.loads((ours / "config.json").read_text())
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # the same guarantees: an existing output is refused without overwrite=true
    out = _nemo(tmp_path, "elastic", "export", f"ckpt={elastic_ckpt}", "budget=uniform",
                f"out={theirs.parent}", "--yes")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "overwrite=true" in out.stderr
    assert "--overwrite" not in out.stderr  # spelled for this CLI, not nemo-elastic's
    # an unknown budget: one line, the trained names, this CLI's spelling
    out = _nemo(tmp_path, "elastic", "export", f"ckpt={elastic_ckpt}", "budget=nope",
                f"out={tmp_path / 'none'}", "--yes")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "budget='nope'" in out.stderr and "uniform" in out.stderr
    assert not (tmp_path / "none").exists()


def test_user_errors_are_spelled_for_the_nemo_cli():
    pytest.importorskip("nemo_run")
    from nemo_elastic.integrations.nemo_run_cli import nemo_spelling

    assert nemo_spelling("'o' already exists; add --overwrite to replace it") == \
        "'o' already exists; add overwrite=true to replace it"
    assert nemo_spelling("--format='x': choose one of hf, megatron") == \
        "format='x': choose one of hf, megatron"
    assert nemo_spelling("--budget 'b': no such trained budget; use --all or --hf-per-layer") \
        == "budget='b': no such trained budget; use all=true or hf_per_layer=true"
    assert nemo_spelling("name --budget NAME (repeatable)") == "name budget=NAME (repeatable)"
    assert nemo_spelling("no flags here -- none") == "no flags here -- none"


DRY_RUN = """
import sys
import nemo_run as run
from nemo_elastic.integrations import nemo_run_cli as nr
executor = nr.slurm_executor(account="acct", partition="batch", nodes=2, gpus_per_node=8,
                             container_image="nvcr.io/nvidia/nemo:25.09",
                             container_mounts=["/data:/data"], job_dir=sys.argv[1])
print(nr.sbatch_script(run.Partial(nr.train, recipe=nr.nemotron_nano_12b()), executor))
"""


def test_slurm_executor_dry_run_renders_the_multi_node_sbatch_script(tmp_path):
    pytest.importorskip("nemo_run")
    # a subprocess: NeMo-Run's local tunnel reads stdin, which pytest captures
    out = subprocess.run([sys.executable, "-c", DRY_RUN, str(tmp_path / "jobs")], cwd=tmp_path,
                         env={**_env(tmp_path), "NEMORUN_HOME": str(tmp_path / "home")},
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    script = out.stdout[out.stdout.index("#!/bin/bash"):]
    lines = script.splitlines()
    for directive in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--account=acct",
                      "--partition=batch", "--requeue", "--signal=TERM@300", "--exclusive"):
        assert f"#SBATCH {directive}" in lines, directive
    srun = next(line for line in lines if line.startswith("srun "))
    assert "--container-image nvcr.io/nvidia/nemo:25.09" in srun
    assert "/data:/data" in srun
    torchrun = srun[srun.index("torchrun"):].split()
    assert torchrun[torchrun.index("--nnodes") + 1] == "2"
    assert torchrun[torchrun.index("--nproc-per-node") + 1] == "8"
    assert torchrun[torchrun.index("--node-rank") + 1] == "$SLURM_NODEID"
    assert "--rdzv-backend" in torchrun and "nemo_run.core.runners.fdl_runner" in torchrun
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert "export TORCHX_MAX_RETRIES=20" in lines  # preemption: requeue, then resume
    # the task each worker builds: our train() on the 12B recipe (TP=8: 2 x 8 GPUs = DP 2)
    from omegaconf import OmegaConf

    task = OmegaConf.load(next((tmp_path / "home").rglob("*_config.yaml")))
    assert task._target_ == "nemo_elastic.integrations.nemo_run_cli.train"
    assert task.recipe.parallel.tensor_model_parallel_size == 8
    from nemo_elastic.config import load_config

    assert task.recipe.model.hybrid_layer_pattern == \
        load_config(ROOT / "conf/nemotron_nano_12b.yaml").model.hybrid_layer_pattern


@pytest.mark.slow
def test_nemo_elastic_train_runs_on_two_gloo_processes_through_the_local_executor(tmp_path):
    pytest.importorskip("nemo_run")
    from nemo_elastic import runtime
    from nemo_elastic.checkpoint import read_meta, save_checkpoint
    from nemo_elastic.config import ParallelConfig
    from nemo_elastic.model import build_hybrid_model
    from tests.conftest import perturb, tiny_config

    cfg = tiny_config({"hybrid_layer_pattern": "M-*M-", "max_sequence_length": 256})
    with runtime.distributed(ParallelConfig()):
        save_checkpoint(tmp_path / "parent", cfg=cfg, kind="test",
                        model=perturb(build_hybrid_model(cfg), seed=3))
    out = _nemo(tmp_path, "elastic", "train", "--factory", "tiny",
                f"recipe.output_dir={tmp_path / 'run'}",
                f"recipe.elastic.init_checkpoint={tmp_path / 'parent'}",
                "recipe.elastic.curriculum[0].iters=2", "recipe.elastic.curriculum[1].iters=1",
                "recipe.elastic.warmup_iters=1", "recipe.elastic.router.warmup_iters=1",
                "recipe.elastic.router.hidden_dim=16", "recipe.elastic.budget_sampling=one",
                "recipe.data.synthetic.num_train=400",
                "recipe.data.synthetic.num_val=40", "recipe.train.eval_iters=1",
                "recipe.train.eval_accuracy_samples=4",
                "run.executor=elastic_local", "run.executor.ntasks_per_node=2", "--yes",
                timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0 and "finished: SUCCEEDED" in log, log[-5000:]
    assert "[default0]" in log and "[default1]" in log  # two torchrun workers
    elastic = tmp_path / "run" / "elastic"
    metrics = [json.loads(line) for line in (elastic / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [1, 2, 3]
    assert [m["stage"] for m in metrics] == ["stage1", "stage1", "stage2"]
    # data parallel over the 2 processes: each rank ran half of stage 1's 4 micro-batches
    assert sum(metrics[0]["budgets_drawn"].values()) == 2
    meta = read_meta(elastic / "checkpoints" / "iter_0000003")
    assert meta["kind"] == "elastic" and [r["name"] for r in meta["family"]] == \
        ["full", "75pct", "50pct"]


def test_recipe_factories_are_the_yaml_recipes_and_overrides_are_validated():
    pytest.importorskip("nemo_run")
    import fiddle as fdl
    from nemo_elastic.config import ConfigError, load_config
    from nemo_elastic.integrations import nemo_run_cli as nr

    for name, factory in (("tiny", nr.tiny), ("nemotron_nano_12b", nr.nemotron_nano_12b)):
        built = fdl.build(factory())
        assert built == load_config(ROOT / "conf" / nr.RECIPES[name])
        # `--factory NAME` resolves through NeMo-Run's parse_factory, as the CLI does
        from nemo_run.cli.cli_parser import parse_factory

        for entry in (nr.train, nr.pretrain):
            task = parse_factory(entry, "", entry, name)
            assert task.__fn_or_cls__ is entry and fdl.build(task.recipe) == built
    config = nr.tiny()
    config.elastic.curriculum[1].iters = 7  # what recipe.elastic.curriculum[1].iters=7 sets
    assert fdl.build(config).elastic.total_iters == 157
    config.data.micro_batch_size = 5  # global batch 16 is not a multiple: refused at build
    with pytest.raises(ConfigError, match="data.global_batch_size=16: must be a multiple"):
        fdl.build(config)
