"""`nemo-elastic` as a user meets it: exit codes and one-line messages for bad input, the
preprocess -> indexed pretrain path, the help text, the 12B recipe, the example scripts."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nemo_elastic import cli
from nemo_elastic.cost_model import count_parameters, parameter_breakdown
from nemo_elastic.checkpoint import latest_checkpoint, read_meta
from nemo_elastic.config import load_config
from nemo_elastic.training.pretrain import pretrain

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "conf" / "tiny.yaml")
# Small and quick (the same knobs as tests/test_pretrain.py).
FAST = ["data.synthetic.num_train=2000", "data.synthetic.num_val=100", "data.seq_length=64",
        "data.micro_batch_size=8", "data.global_batch_size=16", "train.eval_iters=2",
        "train.eval_accuracy_samples=8", "train.log_interval=5", "train.warmup_iters=1"]


# ------------------------------------------------------------------------------ bad user input

def test_unknown_override_exits_2_naming_the_key_and_the_fix():
    """Through the installed entry point: one line on stderr, no traceback, exit status 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "nemo_elastic.cli", "pretrain", "--config", TINY, "train.iterz=5"],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert "train.iterz" in proc.stderr and "did you mean 'iters'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_override_in_process(caplog):
    assert cli.main(["pretrain", "--config", TINY, "train.iterz=5"]) == 2
    assert "unknown config key 'train.iterz'; did you mean 'iters'?" in caplog.text


def test_eval_of_a_missing_checkpoint_exits_2(tmp_path, caplog):
    missing = tmp_path / "nonexistent"
    assert cli.main(["eval", "--ckpt", str(missing)]) == 2
    assert f"checkpoint '{missing}' does not exist" in caplog.text


def _model_checkpoint(path: Path) -> Path:
    """A real model-only checkpoint of the small test shape at `path` (kind 'pretrain')."""
    from nemo_elastic import runtime
    from nemo_elastic.checkpoint import save_checkpoint
    from nemo_elastic.config import ParallelConfig
    from nemo_elastic.model import build_hybrid_model
    from tests.conftest import tiny_config

    cfg = tiny_config()
    with runtime.distributed(ParallelConfig()):
        save_checkpoint(path, cfg=cfg, model=build_hybrid_model(cfg), kind="pretrain")
    return path


def test_a_checkpoint_of_the_wrong_kind_is_one_line_naming_what_to_pass(tmp_path, caplog):
    """Every path a user may hand --ckpt that is not a checkpoint: one line, exit 2, the path
    and what to pass instead (before: 'is not a directory' and 'has no nemo_elastic.json: not
    a nemo_elastic checkpoint' named no fix; a main job's run folder, whose latest checkpoint
    is the parent, did not point at the elastic run inside it)."""
    hf = tmp_path / "hf"  # what `export --format hf` writes
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    unsaved = tmp_path / "unsaved_run"  # a run stopped before its first checkpoint
    (unsaved / "checkpoints").mkdir(parents=True)
    (tmp_path / "file.json").write_text("{}")
    run = tmp_path / "run"  # a main job's run folder: RUN/checkpoints (parent) + RUN/elastic
    _model_checkpoint(run / "checkpoints" / "iter_0000002")
    (run / "checkpoints" / "latest").write_text("iter_0000002\n")
    (run / "elastic" / "checkpoints").mkdir(parents=True)
    (run / "elastic" / "checkpoints" / "latest").write_text("iter_0000004\n")
    # a checkpoint a running run pruned (train.keep_checkpoints) after this command resolved
    # the run's `latest` to it: the run is named, and what happened
    (run / "elastic" / "checkpoints" / "iter_0000004").mkdir()
    pruned = run / "elastic" / "checkpoints" / "iter_0000002"
    cases = [
        (["info", str(pruned)], f"the run in '{run / 'elastic'}' is now at iter_0000004 (its "
         "`latest`); with train.keep_checkpoints a run deletes older checkpoints"),
        (["info", str(hf)], f"convert it with `nemo-elastic import-hf {hf} --out CKPT`"),
        (["info", str(unsaved)], "whose checkpoints/ has no `latest`"),
        (["info", str(tmp_path / "file.json")], "is not a directory; pass a checkpoint folder"),
        (["info", str(tmp_path / "none")], "does not exist; pass a checkpoint folder"),
        (["extract", "--ckpt", str(run), "--budget", "50pct", "--out", str(tmp_path / "x")],
         f"pass a checkpoint of an elastic run, e.g. '{run / 'elastic'}'"),
        (["generate", "--ckpt", str(run), "--budget", "50pct", "--prompt", "Q"],
         f"pass a checkpoint of an elastic run, e.g. '{run / 'elastic'}'")]
    caplog.clear()  # info on the main job's folder: the parent, and where its family is
    with caplog.at_level("INFO", logger="nemo_elastic"):
        assert cli.main(["info", str(run)]) == 0
    assert f"the elastic run beside it is {run / 'elastic'}" in caplog.text
    for argv, fix in cases:
        caplog.clear()
        assert cli.main(argv) == 2, argv
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "\n" not in errors[0] and fix in errors[0], (argv, errors)
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A real 2-iteration pretrain checkpoint (model + optimizer + RNG + data position)."""
    out = tmp_path_factory.mktemp("pretrained")
    pretrain(load_config(TINY, [*FAST, "train.iters=2", f"output_dir={out}"]), progress=False)
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt is not None and read_meta(ckpt)["iteration"] == 2
    return ckpt


def _copy(ckpt: Path, tmp_path: Path) -> Path:
    dst = tmp_path / ckpt.name
    shutil.copytree(ckpt, dst)
    return dst


def test_eval_of_a_good_checkpoint_works(tiny_checkpoint, tmp_path, capsys):
    """The control for the two damaged-checkpoint tests below; `eval` prints its result to
    stdout (a table, or --json), writes it with --out, and reports the same validation loss as
    the training run's summary for the same checkpoint."""
    import json

    assert cli.main(["eval", "--ckpt", str(tiny_checkpoint), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "validation loss" in table and str(tiny_checkpoint) in table
    out = tmp_path / "eval.json"
    assert cli.main(["eval", "--ckpt", str(tiny_checkpoint), "--json", "--out", str(out),
                     "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    summary = json.loads((tiny_checkpoint.parent.parent / "summary.json").read_text())
    assert printed["val_loss"] == pytest.approx(summary["final_val_loss"], rel=1e-6)
    assert f"{printed['val_loss']:.4f}" in table
    assert printed["answer_accuracy"] == summary["answer_accuracy"]


def test_eval_out_replaces_an_earlier_result_never_another_file(tiny_checkpoint, tmp_path,
                                                                 caplog):
    """`eval --out FILE` over a file that is not an earlier result (a user's notes) is one
    line, exit 2, the file unchanged (before: silently replaced by the JSON); over an earlier
    result it writes again."""
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    argv = ["eval", "--ckpt", str(tiny_checkpoint), "--no-progress", "train.eval_iters=1",
            "train.eval_accuracy_samples=0", "--out"]
    assert cli.main([*argv, str(notes)]) == 2
    assert f"--out='{notes}' exists and is not an earlier `eval` result" in caplog.text
    assert notes.read_text() == "precious"
    out = tmp_path / "eval.json"
    assert cli.main([*argv, str(out)]) == 0 and cli.main([*argv, str(out)]) == 0


def test_pretrain_resumed_on_other_data_is_refused(tiny_checkpoint, caplog):
    """`pretrain` resumes through the loop's data check too (`check_data_matches`): another
    corpus or seed is one line naming the field and exits 2, the run folder untouched."""
    import hashlib

    run = tiny_checkpoint.parent.parent
    digest = lambda: {p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
                      for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}
    before = digest()
    for change, old in (("data.seed=9", "1234"), ("data.synthetic.num_train=50", "2000")):
        caplog.clear()
        assert cli.main(["pretrain", "--config", TINY, "--no-progress", *FAST, "train.iters=3",
                         f"output_dir={run}", change]) == 2
        field, value = change.split("=")
        assert f"{field}={value} differs from checkpoint" in caplog.text and \
            f"trained on {field}={old}" in caplog.text and "another output_dir" in caplog.text
    assert digest() == before


def test_eval_of_a_checkpoint_without_metadata_exits_2(tiny_checkpoint, tmp_path, caplog):
    ckpt = _copy(tiny_checkpoint, tmp_path)
    (ckpt / ".metadata").unlink()
    assert cli.main(["eval", "--ckpt", str(ckpt)]) == 2
    assert f"checkpoint '{ckpt}' is incomplete: .metadata is missing" in caplog.text


def test_eval_of_a_checkpoint_with_a_garbage_shard_exits_2(tiny_checkpoint, tmp_path, caplog):
    ckpt = _copy(tiny_checkpoint, tmp_path)
    shards = sorted(ckpt.glob("*.distcp"))
    assert shards
    shards[0].write_bytes(b"this is not a checkpoint shard" * 100)
    assert cli.main(["eval", "--ckpt", str(ckpt)]) == 2
    assert f"checkpoint '{ckpt}' is corrupt: {shards[0].name} has 3,000 bytes" in caplog.text


# ------------------------------------------------------------ preprocess -> indexed pretraining

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _write_corpus_and_tokenizer(root: Path) -> tuple[Path, Path, int]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 25))).tolist()) + f" {i}."
            for i in range(300)]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<pad>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = root / "tokenizer.json"
    tk.save(str(tokenizer))
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return corpus, tokenizer, tk.get_vocab_size()


def test_preprocess_then_pretrain_on_the_indexed_dataset(tmp_path):
    corpus, tokenizer, vocab = _write_corpus_and_tokenizer(tmp_path)
    prefix = tmp_path / "data" / "corpus"
    assert cli.main(["preprocess", "--input", str(corpus), "--tokenizer", str(tokenizer),
                     "--out", str(prefix), "--no-progress"]) == 0
    assert sorted(os.listdir(prefix.parent)) == ["corpus.bin", "corpus.idx"]

    vocab_size = -(-vocab // 64) * 64  # a multiple of 64 >= the tokenizer's vocabulary
    out = tmp_path / "run"
    assert cli.main([
        "pretrain", "--config", TINY, "--no-progress", "data.source=indexed",
        f"data.indexed.prefix={prefix}", f"data.indexed.tokenizer={tokenizer}",
        f"model.vocab_size={vocab_size}", "data.seq_length=64", "data.micro_batch_size=8",
        "data.global_batch_size=8", "train.iters=3", "train.warmup_iters=1", "train.eval_iters=2",
        f"output_dir={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 3
    assert math.isfinite(summary["final_train_loss"]) and math.isfinite(summary["final_val_loss"])
    assert summary["uniform_loss"] == pytest.approx(math.log(vocab))
    assert summary["answer_accuracy"] is None  # synthetic-only metric
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt is not None and ckpt.name == "iter_0000003"
    stored = read_meta(ckpt)["config"]["data"]
    assert stored["source"] == "indexed" and stored["indexed"]["prefix"] == str(prefix)


# ---------------------------------------------------------------------------------- help text

ALL_COMMANDS = ("run", "pretrain", "train", "info", "generate", "eval", "prepare", "preprocess",
                "import-hf", "export", "extract")


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ALL_COMMANDS:
        assert f"    {command} " in out, (command, out)


def test_run_help_shows_config_and_overrides(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: nemo-elastic run" in out
    for text in ("--config", "key=value", "train.iters=100", "--no-resume"):
        assert text in out, (text, out)


# ------------------------------------------------------------------------ recipes and examples

def test_nemotron_nano_12b_recipe_validates_and_has_the_papers_size():
    cfg = load_config(REPO / "conf" / "nemotron_nano_12b.yaml")
    m = cfg.model
    assert count_parameters(m) == 12_310_001_152
    assert (m.layer_symbols.count("M"), m.layer_symbols.count("*"), m.layer_symbols.count("-")) \
        == (28, 6, 28)
    assert parameter_breakdown(m)["embedding"] == 2 * 131072 * 5120 + 5120
    assert cfg.parallel.tensor_model_parallel_size == 8 and m.params_dtype == "bfloat16"
    assert cfg.data.source == "indexed"


def test_tiny_recipe_is_the_run_default():
    assert Path(cli._default_config()).resolve() == Path(TINY).resolve()
    load_config(TINY)


@pytest.mark.parametrize("script", ["examples/quickstart.sh", "examples/slurm/pretrain.sbatch"])
def test_example_scripts_are_valid_bash(script):
    path = REPO / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)


# ------------------------------------------------------------------------- preemption (Slurm)

@pytest.mark.slow
def test_sigterm_to_the_process_group_after_a_save_still_checkpoints(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "nemo_elastic.cli", "pretrain", "--config", TINY, "--no-progress",
           *FAST, f"output_dir={out}", "train.iters=100000", "train.save_interval=5",
           "train.eval_interval=100000"]
    env = dict(os.environ)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, env=env, start_new_session=True)
    log = []
    try:
        for line in proc.stdout:  # wait for a periodic save: the Manager process now exists
            log.append(line)
            if "saved checkpoint" in line:
                break
        time.sleep(1)
        os.killpg(proc.pid, signal.SIGTERM)  # as Slurm (all step processes) and torchrun (killpg)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = "".join(log) + rest
    assert "stopped by a signal at iteration" in log, log
    stopped_at = int(log.split("stopped by a signal at iteration ")[1].split(";")[0])
    assert read_meta(latest_checkpoint(out / "checkpoints"))["iteration"] == stopped_at


def test_preprocess_replaces_a_dataset_only_with_overwrite_and_never_a_users_file(tmp_path,
                                                                                   caplog):
    """`preprocess --out PREFIX` over an existing PREFIX.bin/.idx: refused without --overwrite
    (the dataset byte for byte); with it, an indexed dataset that preprocess wrote is replaced
    by the new corpus's, while a file that is not one (a user's PREFIX.idx, a lone PREFIX.bin)
    is refused and left as it was."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    corpus, tokenizer, _ = _write_corpus_and_tokenizer(tmp_path)
    prefix = tmp_path / "data" / "corpus"
    argv = ["preprocess", "--input", str(corpus), "--tokenizer", str(tokenizer),
            "--out", str(prefix), "--no-progress"]
    assert cli.main(argv) == 0
    before = {p.name: p.read_bytes() for p in prefix.parent.iterdir()}
    assert cli.main(argv) == 2
    assert "corpus.bin already exists; add --overwrite" in caplog.text
    assert {p.name: p.read_bytes() for p in prefix.parent.iterdir()} == before

    fewer = tmp_path / "fewer.jsonl"  # the first 3 documents: a different dataset
    fewer.write_text("".join(corpus.read_text(encoding="utf-8").splitlines(True)[:3]),
                     encoding="utf-8")
    assert cli.main([*argv[:2], str(fewer), *argv[3:], "--overwrite"]) == 0
    assert len(IndexedDataset(str(prefix))) == 3  # Megatron reads the new one back

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.idx").write_text("my index of notes")
    (mine / "lone.bin").write_bytes(b"\x00" * 8)
    for name, stranger in (("notes", "notes.idx"), ("lone", "lone.bin")):
        caplog.clear()
        assert cli.main([*argv[:5], "--out", str(mine / name), "--no-progress",
                         "--overwrite"]) == 2
        assert f"{stranger} is not an indexed dataset that preprocess wrote" in caplog.text
    assert sorted(p.name for p in mine.iterdir()) == ["lone.bin", "notes.idx"]
    assert (mine / "notes.idx").read_text() == "my index of notes"
