"""Reliability as a user meets it (issue 12): every bad input is one line (exit 2: field or file,
value, fix; never a traceback), nothing wrong is accepted silently, checkpoints prove they are
whole, no run output is lost, one run per output folder."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from nemo_elastic import cli
from nemo_elastic.checkpoint import (CHECKSUMS_KEY, LATEST_FILE, META_FILE, CheckpointError,
                                     config_from_checkpoint, latest_checkpoint,
                                     load_checkpoint, read_meta)
from nemo_elastic.run.lock import OutputLock
from nemo_elastic.config import load_config
from nemo_elastic.errors import UserError
from nemo_elastic.training.pretrain import pretrain

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "conf" / "tiny.yaml")
FAST = ["data.synthetic.num_train=300", "data.synthetic.num_val=40", "data.seq_length=64",
        "data.micro_batch_size=8", "data.global_batch_size=8", "train.eval_iters=1",
        "train.eval_accuracy_samples=2", "train.warmup_iters=0", "train.eval_interval=100"]


class ErrorLines(logging.Handler):
    """Collects what the CLI logs at ERROR level."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """`nemo-elastic ARGV` in this process: (exit status, the error lines it printed)."""
    handler = ErrorLines()
    logger = logging.getLogger("nemo_elastic")
    logger.addHandler(handler)
    capsys.readouterr()
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse: its own one-line message on stderr
        rc = exc.code
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    lines = handler.lines + [l for l in err.splitlines() if "error:" in l]
    return rc, lines


def assert_one_line_error(rc: int, lines: list[str], *fragments: str) -> str:
    assert rc == 2, (rc, lines)
    assert len(lines) == 1, lines
    line = lines[0]
    assert "\n" not in line and "Traceback" not in line and 'File "' not in line, line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Broken inputs of every kind a user might hand over."""
    root = tmp_path_factory.mktemp("inputs")
    f = {"bad_yaml": root / "bad.yaml", "bad_subnet": root / "subnet.yaml",
         "list_yaml": root / "list.yaml", "a_dir": root / "adir", "a_file": root / "afile",
         "bad_tokenizer": root / "tokenizer.json", "corpus": root / "corpus.txt"}
    f["bad_yaml"].write_text("model:\n  hidden_size: [64\n")
    f["bad_subnet"].write_text("hidden_size: 32\nlayers: [{keep: true}\n")
    f["list_yaml"].write_text("- 1\n- 2\n")
    f["a_dir"].mkdir()
    f["a_file"].write_text("not a directory\n")
    f["bad_tokenizer"].write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": ')
    f["corpus"].write_text("one document\n\nanother one\n")
    hf = root / "hf"
    hf.mkdir()
    from tests.hf_util import hf_config

    hf_config().save_pretrained(hf)  # a valid nemotron_h config.json
    full = b'{"x": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}'
    header = len(full).to_bytes(8, "little") + full
    (hf / "model.safetensors").write_bytes(header + bytes(20))  # 20 of the 64 tensor bytes
    f["hf_truncated"] = hf
    return f


# ------------------------------------------------------------------------------ 1. one line

CONFIG_CASES = {  # argv after the command and --config; fragments the one line must hold
    "yaml syntax": (["--config", "{bad_yaml}"], ["--config=", "bad.yaml", "invalid YAML at line",
                                                 "fix the file"]),
    "config is a dir": (["--config", "{a_dir}"], ["is a directory; pass a YAML file"]),
    "config is a list": (["--config", "{list_yaml}"], ["not a mapping of sections"]),
    "int field gets text": (["train.iters=ten"], ["train.iters='ten': must be an integer"]),
    "float field gets text": (["train.lr=fast"], ["train.lr='fast': must be a number"]),
    "float field gets nan": (["train.lr=.nan"], ["train.lr=nan: must be a finite number"]),
    "negative": (["train.lr=-1"], ["train.lr=-1.0: must be > 0"]),
    "unknown key": (["train.iterz=5"], ["unknown config key 'train.iterz'; did you mean"]),
    "unbalanced value": (["train.iters=[1"], ["override 'train.iters=[1'",
                                              "the value is invalid YAML",
                                              "quote it or fix the brackets"]),
    "no validation": (["data.synthetic.num_val=0"], ["data.synthetic.num_val=0", "validation"]),
    "split": (["data.source=indexed", "data.indexed.prefix=x", "data.indexed.tokenizer=y",
               "data.indexed.split=100,0,0"], ["data.indexed.split='100,0,0'", "validation"]),
    "split text": (["data.source=indexed", "data.indexed.prefix=x", "data.indexed.tokenizer=y",
                    "data.indexed.split=abc"], ["data.indexed.split='abc': must be three"]),
    "retention": (["train.keep_checkpoints=0"], ["train.keep_checkpoints=0: must be a positive"]),
    "output is a file": (["output_dir={a_file}"], ["output_dir=", "an existing file is in the way",
                                                   "choose another output_dir"]),
    "output under a file": (["output_dir={a_file}/run"], ["output_dir=", "existing file"]),
    "output not creatable": (["output_dir=/proc/nemo_elastic_test/run"],
                             ["output_dir='/proc/nemo_elastic_test/run'", "cannot be created"]),
    "bad tokenizer": (["data.source=indexed", "data.indexed.prefix={a_file}",
                       "data.indexed.tokenizer={bad_tokenizer}"],
                      ["not a valid Hugging Face tokenizer.json"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_recipe_or_override_is_one_line(case, files, tmp_path, capsys):
    args, fragments = CONFIG_CASES[case]
    args = [a.format(**files) for a in args]
    if "--config" not in args:
        args = ["--config", TINY, *FAST, f"output_dir={tmp_path / 'run'}", *args]
    rc, lines = run_cli(["pretrain", "--no-progress", *args], capsys)
    assert_one_line_error(rc, lines, *fragments)


def test_bad_inputs_of_the_other_commands_are_one_line(run_dir, files, tmp_path, capsys):
    ckpt = str(run_dir)
    cases = [
        (["extract", "--ckpt", ckpt, "--out", str(tmp_path / "e"), "--drop-layers", "1,x"],
         ["--drop-layers='1,x': 'x' is not an integer"]),
        (["extract", "--ckpt", ckpt, "--out", str(tmp_path / "e"), "--drop-layers", "1,99"],
         ["99 is outside [0, 6]"]),
        (["extract", "--ckpt", ckpt, "--out", str(tmp_path / "e"), "--drop-layers=-1"],
         ["-1 is outside [0, 6]"]),
        (["extract", "--ckpt", ckpt, "--out", str(tmp_path / "e"), "--drop-layers", "2,2"],
         ["2 is given twice"]),
        (["extract", "--ckpt", ckpt, "--out", str(tmp_path / "e")],
         ["no size given, so the output would be a copy of the parent"]),
        (["extract", "--ckpt", ckpt, "--out", str(tmp_path / "e"), "--subnet",
          str(files["bad_subnet"])], ["--subnet=", "invalid YAML at line 3"]),
        (["extract", "--ckpt", ckpt, "--out", str(tmp_path / "e"), "--hidden-size", "3x"],
         ["argument --hidden-size: invalid int value: '3x'"]),
        (["eval", "--ckpt", ckpt, "model.hidden_size=32"],
         ["model.hidden_size=32 does not match checkpoint", "model.hidden_size=64",
          "drop the override"]),
        (["eval", "--ckpt", ckpt, "model.hybrid_layer_pattern=M-M"],
         ["model.hybrid_layer_pattern='M-M' does not match checkpoint"]),
        (["prepare", "--ckpt", ckpt, "--out", str(tmp_path / "p"), "--aggregation", "max"],
         ["aggregation.sequence='max': must be one of"]),
        (["prepare", "--ckpt", ckpt, "--out", str(tmp_path / "p"), "--num-batches", "0"],
         ["--num-batches)=0: must be a positive integer"]),
        (["preprocess", "--input", str(files["corpus"]), "--tokenizer",
          str(files["bad_tokenizer"]), "--out", str(tmp_path / "c")],
         ["tokenizer.json' is not a valid Hugging Face tokenizer.json"]),
        (["import-hf", str(files["hf_truncated"]), "--out", str(tmp_path / "i")],
         ["model.safetensors' is not a readable safetensors file", "download or save it again"]),
        (["info", str(files["a_dir"])], ["has no nemo_elastic.json"]),
    ]
    for argv, fragments in cases:
        rc, lines = run_cli(argv, capsys)
        assert_one_line_error(rc, lines, *fragments)


def test_a_silently_ignored_layer_index_is_now_refused_and_a_good_one_still_works(run_dir, tmp_path,
                                                                                   capsys):
    """The control of the --drop-layers refusals above: a valid list extracts."""
    out = tmp_path / "dropped"
    rc, lines = run_cli(["extract", "--ckpt", str(run_dir), "--out", str(out),
                         "--drop-layers", "1,3"], capsys)
    assert rc == 0 and not lines
    assert config_from_checkpoint(out).model.hybrid_layer_pattern == "MM-M-"


# ------------------------------------------------------------------------------ 3. whole checkpoints

def _model_bytes(ckpt: Path, name: str) -> bytes:
    from nemo_elastic import runtime
    from nemo_elastic.config import ParallelConfig
    from nemo_elastic.model import build_hybrid_model

    with runtime.distributed(ParallelConfig()):
        model = build_hybrid_model(config_from_checkpoint(ckpt))
        load_checkpoint(ckpt, model=model, restore_rng=False)
        return model.state_dict()[name].detach().numpy().tobytes()


def test_tensor_bytes_damaged_behind_intact_headers_are_detected(run_dir, tmp_path, capsys):
    """Flip the bytes of one model tensor inside its shard (sizes and headers intact).  Without
    the recorded checksums the checkpoint loads the damaged values silently (the oracle that the
    damage is real); with them, load names the file."""
    good = latest_checkpoint(run_dir / "checkpoints")
    name = "embedding.word_embeddings.weight"
    original = _model_bytes(good, name)
    bad = tmp_path / good.name
    shutil.copytree(good, bad)
    shard = next(p for p in sorted(bad.glob("*.distcp")) if original[:64] in p.read_bytes())
    data = shard.read_bytes()
    at = data.index(original[:64])
    shard.write_bytes(data[:at] + bytes(b ^ 0x55 for b in data[at:at + 64]) + data[at + 64:])
    assert shard.stat().st_size == len(data)

    rc, lines = run_cli(["eval", "--ckpt", str(bad)], capsys)
    assert_one_line_error(rc, lines, f"checkpoint '{bad}' is corrupt: {shard.name} is damaged")
    with pytest.raises(CheckpointError, match="is corrupt"):
        _model_bytes(bad, name)

    meta = json.loads((bad / META_FILE).read_text())
    assert set(meta[CHECKSUMS_KEY]) >= {shard.name, ".metadata", "metadata.json"}
    del meta[CHECKSUMS_KEY]  # as written before checksums existed
    (bad / META_FILE).write_text(json.dumps(meta))
    loaded = _model_bytes(bad, name)
    assert loaded != original and loaded[64:] == original[64:]


def test_missing_and_truncated_files_are_named_with_their_root_cause(run_dir, tmp_path, capsys):
    good = latest_checkpoint(run_dir / "checkpoints")
    missing = tmp_path / "missing"
    shutil.copytree(good, missing)
    shard = sorted(missing.glob("*.distcp"))[0]
    shard.unlink()
    rc, lines = run_cli(["eval", "--ckpt", str(missing)], capsys)
    assert_one_line_error(rc, lines, f"is corrupt: {shard.name} is missing")
    cut = tmp_path / "cut"
    shutil.copytree(good, cut)
    shard = sorted(cut.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    rc, lines = run_cli(["eval", "--ckpt", str(cut)], capsys)
    assert_one_line_error(rc, lines, f"{shard.name} has 1,000 bytes")
    # an old-format checkpoint (no checksums) still names the file and only the root cause
    meta = json.loads((missing / META_FILE).read_text())
    del meta[CHECKSUMS_KEY]
    (missing / META_FILE).write_text(json.dumps(meta))
    rc, lines = run_cli(["eval", "--ckpt", str(missing)], capsys)
    assert_one_line_error(rc, lines, "could not be read: no such file or directory",
                          shard.name)


def _short_run(out: Path, *extra: str) -> list[str]:
    return [*FAST, "train.iters=3", "train.save_interval=1", f"output_dir={out}", *extra]


def test_a_full_disk_during_a_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """The third checkpoint's shard cannot be created: ENOSPC, injected where Megatron's writer
    opens its files (at open, not mid-write: torch's zip writer left behind by a failed write
    crashes the garbage collector of the process that goes on, which a test process does).
    One line says so, the partial directory is gone, `latest` is still the second checkpoint,
    and a rerun with space again finishes the run from it."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    opened = []

    def flaky_open(path, mode="r", *args, **kwargs):
        opened.append(path)
        if "iter_0000003" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(filesystem_async, "open", flaky_open, raising=False)
    out = tmp_path / "run"
    rc, lines = run_cli(["pretrain", "--config", TINY, "--no-progress", *_short_run(out)], capsys)
    line = assert_one_line_error(rc, lines, "iter_0000003", "no space left on device",
                                 "the last good checkpoint", "iter_0000002", "is kept",
                                 "free disk space")
    assert opened and "Traceback" not in line
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["iter_0000001", "iter_0000002", LATEST_FILE]
    assert latest_checkpoint(ckpts).name == "iter_0000002"
    monkeypatch.undo()
    rc, lines = run_cli(["pretrain", "--config", TINY, "--no-progress", *_short_run(out)], capsys)
    assert rc == 0 and not lines
    assert read_meta(latest_checkpoint(ckpts))["iteration"] == 3
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3]


def test_non_finite_loss_stops_before_saving_and_names_the_iteration(tmp_path, capsys):
    """lr=1e30: the first Adam step moves every weight by ~1e30 (still finite numbers, whose
    loss is not): the check before the first save catches it, so no checkpoint holds them."""
    out = tmp_path / "run"
    rc, lines = run_cli(["pretrain", "--config", TINY, "--no-progress",
                         *_short_run(out, "train.iters=4", "train.lr=1e30", "train.min_lr=0")],
                        capsys)
    assert_one_line_error(rc, lines, "the weights after iteration 1 (stage 'pretrain') give a "
                          "validation loss of nan", "no checkpoint was written", "lower train.lr")
    assert latest_checkpoint(out / "checkpoints") is None
    assert not (out / "checkpoints" / "iter_0000001").exists()


def test_retention_keeps_the_newest_checkpoints(tmp_path):
    out = tmp_path / "run"
    pretrain(load_config(TINY, _short_run(out, "train.iters=4", "train.keep_checkpoints=2")),
             progress=False)
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["iter_0000003", "iter_0000004", LATEST_FILE]
    assert latest_checkpoint(ckpts).name == "iter_0000004"


def test_a_second_run_on_a_locked_output_folder_refuses(tmp_path, capsys):
    out = tmp_path / "run"
    with OutputLock(out, "output_dir"):  # as a first run would hold it
        rc, lines = run_cli(["pretrain", "--config", TINY, "--no-progress", *_short_run(out)],
                            capsys)
        assert_one_line_error(rc, lines, f"output_dir='{out}' is in use by another run (pid "
                              f"{os.getpid()})", "choose another output_dir")
        assert not (out / "checkpoints").exists() and not (out / "config.json").exists()
    rc, lines = run_cli(["pretrain", "--config", TINY, "--no-progress", *_short_run(out)], capsys)
    assert rc == 0, lines  # released: the same command now runs


def test_the_main_job_locks_its_run_folder_for_all_its_stages(run_dir, tmp_path, capsys):
    """`run` holds the folder's lock from its first stage to its report: a second run refuses
    before touching anything -- also when pretraining is done and the other run is past it
    (pretrain's own lock used to be the only one) -- while the job's own stages (pretrain
    locks the same folder) nest inside its lock."""
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    before = sorted(p.name for p in out.iterdir())
    with OutputLock(out, "output_dir"):  # another run, in a later stage
        rc, lines = run_cli(["run", "--no-progress", *FAST, "train.iters=3",
                             "train.save_interval=1", f"output_dir={out}"], capsys)
        assert_one_line_error(rc, lines, f"output_dir='{out}' is in use by another run",
                              "choose another output_dir")
        assert sorted(p.name for p in out.iterdir()) == before  # no prepared/, no pipeline.json
    with OutputLock(out, "output_dir", nested=True):  # the job's own lock ...
        with OutputLock(out, "output_dir"), OutputLock(out, "output_dir"):  # ... lets stages in
            pass
    with pytest.raises(UserError, match="in use by another run"):  # a plain holder does not
        with OutputLock(out, "output_dir"), OutputLock(out, "output_dir"):
            pass
    with OutputLock(out, "output_dir"):  # all released
        pass


# ------------------------------------------------------------------------------ 4. no output lost

def test_rerun_of_a_finished_run_and_a_rejected_resume_change_nothing(run_dir, capsys):
    names = ["config.json", "metrics.jsonl", "summary.json", "loss.png", "answer_examples.json"]
    before = {n: ((run_dir / n).read_bytes(), (run_dir / n).stat().st_mtime_ns) for n in names}
    base = ["--config", TINY, "--no-progress", *FAST, "train.iters=3", "train.save_interval=1",
            f"output_dir={run_dir}"]
    rc, lines = run_cli(["pretrain", *base], capsys)
    assert rc == 0 and not lines
    # a resume that its checks reject (another model shape) must not touch config.json either
    rc, lines = run_cli(["pretrain", *base, "train.iters=5", "model.ffn_hidden_size=128"], capsys)
    assert_one_line_error(rc, lines, "model.ffn_hidden_size=128 does not match checkpoint",
                          "drop the override or start a new run (--no-resume")
    after = {n: ((run_dir / n).read_bytes(), (run_dir / n).stat().st_mtime_ns) for n in names}
    assert after == before
    summary = json.loads((run_dir / "summary.json").read_text())  # valid JSON, no NaN
    assert summary["iterations"] == 3 and summary["final_val_loss"] > 0
