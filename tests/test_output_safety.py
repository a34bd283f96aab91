"""Issue 20, classes 2-4 and 8: a command's output never overlaps what it reads, one writer per
output folder, all-or-none outputs, stale staging removed, the umask honoured.

Every command that reads a checkpoint and writes a folder (extract --budget / --all / sizes,
export --budget / --all, prepare, eval --out) is given an output equal to, inside, or a parent
of its input, a symlink to it, and a folder inside a run's `checkpoints/`: each refuses in one
line with exit 2, and not one byte of the run changes."""

import hashlib
import os
import shutil
import stat
import subprocess
import sys

import pytest

from nemo_elastic.cli import main
from nemo_elastic.checkpoint import LATEST_FILE
from tests.test_export_budget import save_hand_made_family


def _digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder RUN/checkpoints/{iter_0000001, latest} holding a nested family."""
    root = tmp_path_factory.mktemp("safety")
    ckpts = root / "run" / "checkpoints"
    save_hand_made_family(ckpts / "iter_0000001")
    (ckpts / LATEST_FILE).write_text("iter_0000001\n")
    return root


COMMANDS = {
    "extract --budget": lambda c, o: ["extract", "--ckpt", c, "--budget", "uniform", "--out", o],
    "extract --all": lambda c, o: ["extract", "--ckpt", c, "--all", "--out", o],
    "extract sizes": lambda c, o: ["extract", "--ckpt", c, "--hidden-size", "16", "--out", o],
    "export --budget": lambda c, o: ["export", "--ckpt", c, "--budget", "uniform", "--format",
                                     "megatron", "--out", o],
    "export --all": lambda c, o: ["export", "--ckpt", c, "--all", "--format", "megatron",
                                  "--out", o],
    "prepare": lambda c, o: ["prepare", "--ckpt", c, "--out", o],
    "eval --out": lambda c, o: ["eval", "--ckpt", c, "--out", o],
}
PLACES = {  # where the output goes, relative to the run (what the line must say)
    "equal": ("run/checkpoints/iter_0000001", "itself"),
    "inside": ("run/checkpoints/iter_0000001/sliced", "inside"),
    "parent": ("run/checkpoints", "contains the input"),
    "grandparent": ("run", "contains the input"),
    "symlink": ("link_to_ckpt", "itself"),
    "beside, in checkpoints/": ("run/checkpoints/mine", "checkpoints folder"),
}


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("command", COMMANDS)
def test_no_command_writes_into_over_or_under_what_it_reads(run, command, place, caplog):
    link = run / "link_to_ckpt"
    if not link.exists():
        link.symlink_to(run / "run/checkpoints/iter_0000001")
    before = _digest(run / "run")
    rel, says = PLACES[place]
    argv = COMMANDS[command](str(run / "run/checkpoints/iter_0000001"), str(run / rel))
    if command != "eval --out":
        argv.append("--overwrite")
    caplog.clear()
    assert main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "--out=" in errors[0], errors
    if command != "eval --out" or place not in ("parent", "grandparent"):
        assert says in errors[0], errors
    assert _digest(run / "run") == before
    assert not any(p.name.startswith(".") and p.name.endswith(".lock")
                   for p in (run / "run/checkpoints").iterdir())


def test_a_run_folder_and_a_live_run_are_not_overwritten(run, tmp_path, caplog):
    """--out naming a run (it holds checkpoints/latest) or a folder inside a running job's
    run folder (its .lock is held by another process) is refused."""
    before = _digest(run / "run")
    ckpt = str(run / "run/checkpoints/iter_0000001")
    other = tmp_path / "other"
    shutil.copytree(run / "run", other)
    assert main(["extract", "--ckpt", ckpt, "--all", "--out", str(other), "--overwrite"]) == 2
    assert "holds a training run" in caplog.text
    live = tmp_path / "live"
    live.mkdir()
    holder = _hold_lock(live / ".lock")
    try:
        caplog.clear()
        assert main(["extract", "--ckpt", ckpt, "--all", "--out", str(live / "fam")]) == 2
        assert f"pid {holder.pid}" in caplog.text and "running job" in caplog.text
    finally:
        holder.kill()
        holder.wait()
    assert _digest(run / "run") == before


def _hold_lock(path):
    """A process holding flock on `path` (as OutputLock / output_lock do) until killed."""
    code = ("import fcntl, os, sys, time\n"
            f"h = open({str(path)!r}, 'a+'); fcntl.flock(h, fcntl.LOCK_EX)\n"
            "h.seek(0); h.truncate(); h.write(f'{os.getpid()}\\n'); h.flush()\n"
            "print('ready', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_second_writer_of_one_output_refuses(run, tmp_path, caplog):
    from nemo_elastic.run.output_lock import lock_path

    out = tmp_path / "fam"
    holder = _hold_lock(lock_path(out))
    try:
        for argv in (["export", "--all", "--format", "megatron"], ["extract", "--all"]):
            caplog.clear()
            assert main([*argv, "--ckpt", str(run / "run"), "--out", str(out)]) == 2
            assert f"is being written by another command (pid {holder.pid})" in caplog.text
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()


@pytest.mark.parametrize("command", ["export --all", "extract --all"])
def test_an_output_another_command_wrote_meanwhile_is_not_replaced(run, tmp_path, monkeypatch,
                                                                   caplog, command):
    """Two commands whose locks differ can still write the same folder: `extract --budget
    uniform --out A/uniform` (locks A/uniform) while `export --all --out A` (locks A) runs.
    The folder that appears meanwhile is the other command's: the commit refuses in one line,
    exit 2, leaves it byte for byte, and publishes nothing of its own (before: both exited 0
    and the second commit silently replaced the first's output)."""
    import nemo_elastic.export.budgets as budgets_mod
    import nemo_elastic.export.extract as extract_mod

    side = tmp_path / "side"  # what the other command writes, made by a real extract
    assert main(["extract", "--ckpt", str(run / "run"), "--budget", "uniform", "--out",
                 str(side)]) == 0
    out = tmp_path / "A"
    module, name = (budgets_mod, "_write_megatron") if command == "export --all" else \
        (extract_mod, "save_checkpoint")
    original = getattr(module, name)

    def write_while_another_command_writes(*args, **kw):
        if not (out / "uniform").exists():
            shutil.copytree(side, out / "uniform")  # the other command's commit lands
        return original(*args, **kw)

    monkeypatch.setattr(module, name, write_while_another_command_writes)
    argv = command.split() + (["--format", "megatron"] if command.startswith("export") else [])
    caplog.clear()
    assert main([*argv, "--ckpt", str(run / "run"), "--out", str(out)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and f"--out='{out / 'uniform'}' appeared while this command ran" \
        in errors[0], errors
    assert [p.name for p in out.iterdir()] == ["uniform"]
    assert _digest(out / "uniform") == _digest(side)
    assert [p.name for p in tmp_path.rglob(".*export*")] == []


OVERWRITERS = {  # command -> (argv for run R and out O, the folder that is replaced)
    "extract --budget": (lambda c, o: ["extract", "--ckpt", c, "--budget", "uniform", "--out",
                                       o], ""),
    "extract sizes": (lambda c, o: ["extract", "--ckpt", c, "--hidden-size", "16", "--out", o],
                      ""),
    "extract --all": (lambda c, o: ["extract", "--ckpt", c, "--all", "--out", o], "uniform"),
    "export --budget": (lambda c, o: ["export", "--ckpt", c, "--budget", "uniform", "--format",
                                      "megatron", "--out", o], "uniform"),
    "export hf (whole)": (lambda c, o: ["export", "--ckpt", c, "--format", "hf", "--out", o], ""),
    "prepare": (lambda c, o: ["prepare", "--ckpt", c, "--out", o], ""),
    "import-hf": (lambda c, o: ["import-hf", c, "--out", o], ""),
}


@pytest.mark.parametrize("command", OVERWRITERS)
def test_overwrite_never_deletes_a_folder_no_command_wrote(run, tmp_path, caplog, command):
    """--overwrite replaces an earlier output; a user's own folder (notes, data) in its place is
    refused in one line naming a file of it, and not a byte of it changes.  Before, every
    command deleted the whole folder (the 'already exists' line even advised --overwrite)."""
    argv, inner = OVERWRITERS[command]
    out = tmp_path / "mine"
    user = out / inner if inner else out
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("precious")
    (user / "sub" / "data.csv").write_text("1,2")
    before = _digest(out)
    source = str(run / "run") if command != "import-hf" else str(tmp_path / "hf")
    if command == "import-hf":  # an HF folder to import (the refusal comes first)
        assert main(["export", "--ckpt", str(run / "run"), "--format", "hf", "--out",
                     source]) == 0
    caplog.clear()
    assert main([*argv(source, str(out)), "--overwrite"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and f"--out={str(user)!r} holds files that no nemo-elastic command " \
        "wrote (e.g. 'notes.txt')" in errors[0], errors
    assert _digest(out) == before


def test_overwrite_still_replaces_an_earlier_output(run, tmp_path):
    out = tmp_path / "x"
    for _ in range(2):  # an extract over an extract, an export over an export
        assert main(["extract", "--ckpt", str(run / "run"), "--budget", "uniform", "--out",
                     str(out), "--overwrite"]) == 0
        assert main(["export", "--ckpt", str(run / "run"), "--all", "--format", "hf", "--out",
                     str(tmp_path / "hf"), "--overwrite", "--hf-per-layer"]) == 0


@pytest.mark.parametrize("command", ["pretrain", "train"])
def test_a_run_folder_is_never_a_checkpoint_or_an_exported_model(run, tmp_path, caplog,
                                                                   command):
    """`pretrain output_dir=X` / `train elastic.output_dir=X` where X is a checkpoint or an
    exported Hugging Face folder: refused in one line naming the field and what X is, X
    untouched.  Before, pretrain checked nothing: it wrote checkpoints/, metrics and its
    config.json into a prepared checkpoint, and replaced an HF folder's config.json (the
    exported model no longer loaded)."""
    hf = tmp_path / "hf"
    assert main(["export", "--ckpt", str(run / "run"), "--format", "hf", "--out", str(hf)]) == 0
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run / "run" / "checkpoints" / "iter_0000001", ckpt)
    field = "output_dir" if command == "pretrain" else "elastic.output_dir"
    for target, kind in ((ckpt, "a checkpoint"), (hf, "a Hugging Face model folder")):
        before = _digest(target)
        caplog.clear()
        argv = [command, "--no-progress", "train.iters=2", "train.warmup_iters=1",
                f"{field}={target}"]
        if command == "train":
            argv += [f"elastic.init_checkpoint={run / 'run'}", f"output_dir={tmp_path / 'o'}",
                     "elastic.curriculum.1.seq_length=96"]
        assert main(argv) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and f"{field}={str(target)!r} is {kind}, not a run folder" \
            in errors[0], errors
        assert _digest(target) == before and not (target / "checkpoints").exists()


def test_extract_all_is_all_or_none_and_removes_stale_staging(run, tmp_path, monkeypatch):
    import nemo_elastic.export.extract as extract_mod
    from nemo_elastic.checkpoint import save_checkpoint

    out = tmp_path / "fam"
    stale = tmp_path / ".fam.export-deadbeef"  # left by a SIGKILLed writer
    (stale / "uniform").mkdir(parents=True)
    calls = []

    def failing_save(path, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(path))
        return save_checkpoint(path, **kw)

    monkeypatch.setattr(extract_mod, "save_checkpoint", failing_save)
    assert main(["extract", "--ckpt", str(run / "run"), "--all", "--out", str(out)]) == 2
    assert len(calls) == 2 and not out.exists() and not stale.exists()
    assert [p.name for p in tmp_path.iterdir() if "export" in p.name] == []
    monkeypatch.undo()
    old_umask = os.umask(0o022)
    try:
        assert main(["extract", "--ckpt", str(run / "run"), "--all", "--out", str(out)]) == 0
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in out.iterdir()) == ["full", "hetero", "shallow", "uniform"]
    # class 8: the output is readable by others under umask 022
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for path in out.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path


def test_an_edited_metadata_file_is_refused_by_every_reader(run, tmp_path, caplog):
    """Class 5: nemo_elastic.json is sealed by its own SHA-256; a valid-JSON edit of a budget's
    hidden_size is refused (it used to export and 'verify' a wrong model)."""
    import json

    ckpt = tmp_path / "ck"
    shutil.copytree(run / "run/checkpoints/iter_0000001", ckpt)
    meta = json.loads((ckpt / "nemo_elastic.json").read_text())
    row = next(r for r in meta["family"] if r["name"] == "uniform")
    row["subnetwork"]["hidden_size"] = 16
    (ckpt / "nemo_elastic.json").write_text(json.dumps(meta))
    for argv in (["info", str(ckpt)],
                 ["export", "--ckpt", str(ckpt), "--budget", "uniform", "--format", "megatron",
                  "--out", str(tmp_path / "x")],
                 ["extract", "--ckpt", str(ckpt), "--budget", "uniform", "--out",
                  str(tmp_path / "y")]):
        caplog.clear()
        assert main(argv) == 2, argv
        assert "nemo_elastic.json is corrupt (its contents differ from the SHA-256" in \
            caplog.text, argv
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_damaged_byte_in_any_checkpoint_file_is_named_by_info(run, tmp_path, caplog):
    """Class 5: every file of a checkpoint is covered; `info` (which used to exit 0 on a
    damaged shard) names the damaged file."""
    src = run / "run/checkpoints/iter_0000001"
    names = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
    assert "nemo_elastic.json" in names and any(n.endswith(".distcp") for n in names)
    for name in names:
        ckpt = tmp_path / f"ck_{name.replace('/', '_')}"
        shutil.copytree(src, ckpt)
        data = bytearray((ckpt / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (ckpt / name).write_bytes(bytes(data))
        caplog.clear()
        assert main(["info", str(ckpt)]) == 2, name
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and name in errors[0], (name, errors)


def test_an_hf_export_follows_the_umask(run, tmp_path):
    """Class 8: safetensors' save_file makes 0600 files and mkdtemp 0700 folders whatever the
    umask; an export is readable by the group and others under umask 022."""
    pytest.importorskip("transformers")
    out = tmp_path / "hf"
    old_umask = os.umask(0o022)
    try:
        assert main(["export", "--ckpt", str(run / "run"), "--budget", "uniform", "--format",
                     "hf", "--out", str(out)]) == 0
    finally:
        os.umask(old_umask)
    paths = [out, *out.rglob("*")]
    assert any(p.name.endswith(".safetensors") for p in paths)
    for path in paths:
        want = 0o755 if path.is_dir() else 0o644
        assert stat.S_IMODE(path.stat().st_mode) == want, (path, oct(path.stat().st_mode))
