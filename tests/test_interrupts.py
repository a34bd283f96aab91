"""Issue 20, classes 4 and 7: an interrupted or killed writer never leaves a half-written
result, a rerun succeeds, and every bad input to import-hf (or a signal) is one line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemo_elastic.cli import main
from tests.test_output_safety import run  # noqa: F401  (the module fixture)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from tests.hf_util import hf_config, random_hf_model, save_hf

    root = tmp_path_factory.mktemp("hf")
    return save_hf(random_hf_model(hf_config()), root / "hf")


def _copy_hf(src, dst, edit=None):
    import shutil

    shutil.copytree(src, dst)
    if edit:
        raw = json.loads((dst / "config.json").read_text())
        edit(raw)
        (dst / "config.json").write_text(json.dumps(raw))
    return dst


@pytest.mark.parametrize("drop, named", [
    ("hybrid_override_pattern", "layers_block_type (or hybrid_override_pattern)"),
    ("hidden_size", "hidden_size"), ("vocab_size", "vocab_size")])
def test_import_hf_names_a_missing_config_field(hf_dir, tmp_path, caplog, drop, named):
    def edit(raw):
        raw.pop(drop, None)
        if drop == "hybrid_override_pattern":
            raw.pop("layers_block_type", None)

    src = _copy_hf(hf_dir, tmp_path / "hf", edit)
    assert main(["import-hf", str(src), "--out", str(tmp_path / "ck")]) == 2
    assert f"has no {named!r}" in caplog.text and not (tmp_path / "ck").exists()


def test_import_hf_refuses_nan_weights_and_a_missing_transformers(hf_dir, tmp_path, caplog,
                                                                  monkeypatch):
    import torch
    from safetensors.torch import load_file, save_file

    src = _copy_hf(hf_dir, tmp_path / "hf")
    weights = load_file(src / "model.safetensors")
    name = sorted(k for k in weights if k.endswith("in_proj.weight"))[0]
    weights[name][0, 0] = float("nan")
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    assert main(["import-hf", str(src), "--out", str(tmp_path / "ck")]) == 2
    assert f"{name} holds NaN or infinite values" in caplog.text
    assert not (tmp_path / "ck").exists()
    caplog.clear()
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "ck")]) == 2
    assert "needs `transformers`" in caplog.text and "pip install transformers" in caplog.text
    del torch


def _foreground_signals() -> None:
    """In the child: SIGINT and SIGTERM at their defaults, as for a command in a terminal's
    foreground.  A test run started in the background by a non-interactive shell (`make test
    &`, CI wrappers) inherits SIGINT ignored, and Python then installs no Ctrl-C handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _cli(*argv):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.Popen([sys.executable, "-m", "nemo_elastic.cli", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_foreground_signals)


def _wait_for(predicate, proc, timeout=300.0):
    start = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < timeout
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["export", "extract"])
def test_sigterm_sigint_and_sigkill_mid_write_then_a_rerun(run, tmp_path, command):  # noqa: F811
    """Signals while the staging folder is being written: SIGTERM and SIGINT print one line and
    leave nothing; SIGKILL leaves only the hidden staging folder, which the rerun removes; the
    rerun writes every budget."""
    out = tmp_path / "fam"
    argv = [command, "--ckpt", str(run / "run"), "--all", "--out", str(out)]
    if command == "export":
        argv += ["--format", "megatron"]
    staging = lambda: [p for p in tmp_path.iterdir() if p.name.startswith(".fam.export-")]  # noqa: E731
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGKILL) if command == "export" else \
        (signal.SIGKILL,)  # extract shares export's staging and signal handling
    for sig in signals:
        for _ in range(5):  # the export may finish between seeing its staging and the signal
            proc = _cli(*argv)
            _wait_for(lambda: staging(), proc)
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=120)
            if proc.returncode != 0:
                break
            shutil.rmtree(out)  # the signal came after the commit: a whole export, try again
        assert not out.exists(), sig
        if sig == signal.SIGKILL:
            assert proc.returncode == -9 and staging()  # the leftover
            continue
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 128 + sig, err
        assert lines and "Traceback" not in err, err
        assert f"interrupted by {signal.Signals(sig).name}" in lines[-1], err
        assert not staging(), sig
    rerun = _cli(*argv)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    assert not staging() and sorted(p.name for p in out.iterdir()) == \
        ["full", "hetero", "shallow", "uniform"]


def test_import_hf_and_preprocess_never_write_over_their_inputs(hf_dir, tmp_path, caplog):
    before = {p.name: p.read_bytes() for p in hf_dir.iterdir()}
    for out, says in ((hf_dir, "itself"), (hf_dir / "ck", "inside the input"),
                      (hf_dir.parent, "contains the input")):
        caplog.clear()
        assert main(["import-hf", str(hf_dir), "--out", str(out), "--overwrite"]) == 2
        assert says in caplog.text, caplog.text
    assert {p.name: p.read_bytes() for p in hf_dir.iterdir()} == before
    corpus = tmp_path / "c.bin"
    corpus.write_text("some text\n")
    caplog.clear()
    assert main(["preprocess", "--input", str(corpus), "--tokenizer", str(corpus), "--out",
                 str(tmp_path / "c")]) == 2
    assert "--out=" in caplog.text and "is the input --input=" in caplog.text
    assert corpus.read_text() == "some text\n"
