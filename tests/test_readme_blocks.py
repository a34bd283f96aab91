"""Every ```python block of the README runs as written (CPU-sized), in a fresh interpreter, from
a folder that holds what the README's commands before it would have made (`conf/`, and
`export/megatron/50pct` from `nemo-elastic export`).  A block that needs hardware this machine
lacks says so in a `<!-- readme-test: needs ... -->` line right above it and is skipped here.
(The README's Megatron loading snippet failed as written: no imports, no Megatron runtime.)
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
def _blocks(language: str = "python"):
    """(code, needs) of every ```LANGUAGE block of the README, optionally preceded by a
    `<!-- readme-test: needs ... -->` marker, with its line as the test id."""
    block = re.compile(r"(?:<!-- readme-test: (?P<needs>[^>]*?) -->\n)?(?P<indent>[ \t]*)```"
                       + language + r"\n(?P<code>.*?)\n(?P=indent)```", re.S)
    text = (ROOT / "README.md").read_text()
    out = []
    for m in block.finditer(text):
        line = text[:m.start("code")].count("\n") + 1
        out.append(pytest.param(textwrap.dedent(m.group("code")), m.group("needs"),
                                id=f"README.md:{line}"))
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """conf/ and export/megatron/50pct, as the README's commands leave them."""
    from nemo_elastic import cli, runtime
    from nemo_elastic.config import ParallelConfig
    from nemo_elastic.elastic import SubNetwork
    from nemo_elastic.elastic.specs import build_elastic_model
    from tests.conftest import perturb, tiny_config
    from tests.test_export_budget import _save_family

    root = tmp_path_factory.mktemp("readme")
    (root / "conf").symlink_to(ROOT / "conf")
    cfg = tiny_config({"hybrid_layer_pattern": "M-*M-"})
    half = SubNetwork.uniform(cfg.model, hidden_size=16, mamba_num_heads=2, ffn_hidden_size=32)
    with runtime.distributed(ParallelConfig()):
        _save_family(root / "elastic", cfg, perturb(build_elastic_model(cfg), seed=1),
                     {"full": SubNetwork.full(cfg.model), "50pct": half})
    assert cli.main(["export", "--ckpt", str(root / "elastic"), "--budget", "50pct", "--format",
                     "megatron", "--out", str(root / "export/megatron")]) == 0
    return root


def test_the_readme_has_python_blocks():
    assert len(_blocks()) >= 3


@pytest.mark.slow  # a fresh interpreter per block (megatron imports)
@pytest.mark.parametrize("code,needs", _blocks())
def test_readme_python_block_runs_as_written(workdir, code, needs):
    if needs:
        import torch

        if "CUDA" in needs and not torch.cuda.is_available():
            pytest.skip(f"README says: {needs}")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, text=True,
                         capture_output=True, timeout=300)
    assert out.returncode == 0, f"{code}\n--- stderr ---\n{out.stderr[-3000:]}"


# ----------------------------------------------------------------------------- bash blocks
# Every ```bash block is checked as written without running it (its commands train for minutes,
# or need a corpus, GPUs, Slurm or Docker): each `nemo-elastic` command (also under `torchrun -m
# nemo_elastic.cli`) must parse with the CLI's own parser, and a recipe it names, with its
# key=value overrides, must load and validate; `make` targets must exist in the Makefile;
# scripts run by python / bash / sbatch must exist and `python -c` code must compile.  Any
# other program (docker, nemo, ...) needs a `<!-- readme-test: needs ... -->` line above the
# block saying what it needs.
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def _commands(code: str) -> list[list[str]]:
    """argv of each command: continuations joined, comments dropped; in a transcript (lines
    starting with `$ `) only the prompted lines are commands, the rest is output."""
    import shlex

    lines = code.splitlines()
    if any(line.startswith("$ ") for line in lines):
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    joined, commands = "", []
    for line in lines:
        joined += line
        if joined.endswith("\\"):
            joined = joined[:-1] + " "
            continue
        argv = shlex.split(joined, comments=True)
        joined = ""
        while argv and ENV_ASSIGNMENT.match(argv[0]):
            argv = argv[1:]
        if argv:
            commands.append(argv)
    return commands


def _check_nemo_elastic(argv: list[str]) -> None:
    from nemo_elastic.cli import build_parser
    from nemo_elastic.config import load_config

    try:
        args = build_parser().parse_args([a[1:] if a.startswith("$'") else a for a in argv])
    except SystemExit as exc:  # argparse printed the reason to stderr
        raise AssertionError(f"`nemo-elastic {' '.join(argv)}` does not parse") from exc
    if hasattr(args, "overrides"):  # a recipe and its overrides must validate
        load_config(ROOT / (getattr(args, "config", None) or "conf/tiny.yaml"), args.overrides)


def _check_command(argv: list[str], needs) -> None:
    program = os.path.basename(argv[0])
    if program == "nemo-elastic":
        _check_nemo_elastic(argv[1:])
    elif program == "torchrun" and "nemo_elastic.cli" in argv:
        _check_nemo_elastic(argv[argv.index("nemo_elastic.cli") + 1:])
    elif program == "make":
        targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))
        assert set(argv[1:]) <= targets, f"make {argv[1:]}: targets are {sorted(targets)}"
    elif program.startswith("python"):
        if argv[1] == "-c":
            compile(argv[2], "<readme>", "exec")
        else:
            assert (ROOT / argv[1]).is_file(), f"{argv}: no script {argv[1]}"
    elif program in ("bash", "sbatch"):
        script = next(a for a in argv[1:] if not a.startswith("-"))
        assert (ROOT / script).is_file(), f"{argv}: no script {script}"
    else:
        assert needs, (f"`{' '.join(argv)}`: {program} is not checked here; say what the block "
                       "needs in a `<!-- readme-test: needs ... -->` line above it")


def test_the_readme_has_bash_blocks():
    assert len(_blocks("bash")) >= 5


@pytest.mark.parametrize("code,needs", _blocks("bash"))
def test_readme_bash_block_commands_are_valid_as_written(code, needs):
    commands = _commands(code)
    assert commands, code
    for argv in commands:
        _check_command(argv, needs)
