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
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<needs>[^>]*?) -->\n)?(?P<indent>[ \t]*)```python\n"
                   r"(?P<code>.*?)\n(?P=indent)```", re.S)


def _blocks():
    text = (ROOT / "README.md").read_text()
    out = []
    for m in BLOCK.finditer(text):
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
