"""Reliability, continued (issue 12 audit): the remaining ways a bad input ended in a traceback
or was accepted silently, non-finite weights saved as a good checkpoint, and renames that were
not durable.  Every refusal is checked against its oracle: exit 2 and exactly one line naming
the field or file."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest

from nemo_elastic.checkpoint import CHECKSUMS_KEY, META_FILE, latest_checkpoint
from tests.test_reliability import FAST, TINY, assert_one_line_error, run_cli


def _copy_latest(run_dir: Path, dst: Path) -> Path:
    shutil.copytree(latest_checkpoint(run_dir / "checkpoints"), dst)
    return dst


def _edit_meta(ckpt: Path, fn) -> None:
    """Edit nemo_elastic.json as a checkpoint written before the metadata was checksummed
    (with its checksum the edit itself is refused: test_resume_guard / test_metadata_sealed)."""
    meta = json.loads((ckpt / META_FILE).read_text())
    meta.pop("meta_sha256", None)
    fn(meta)
    (ckpt / META_FILE).write_text(json.dumps(meta))


# ------------------------------------------------------------------ 1a. sampling options

@pytest.mark.parametrize("flags,fragment", [
    (["--temperature", "nan"], "--temperature=nan: must be a finite number >= 0"),
    (["--temperature", "inf"], "--temperature=inf: must be a finite number >= 0"),
    (["--temperature", "-1"], "--temperature=-1.0: must be a finite number >= 0"),
    (["--temperature", "0.8", "--top-k", "0"], "--top-k=0: must be an integer >= 1"),
    (["--top-k", "-3"], "--top-k=-3: must be an integer >= 1"),
    (["--max-new-tokens", "-1"], "--max-new-tokens=-1: must be an integer >= 0"),
    (["--budget", "full"], "--budget 'full' is given twice"),
])
def test_bad_sampling_options_and_repeated_budgets_are_one_line(flags, fragment, tmp_path,
                                                                capsys):
    """Refused before any checkpoint is read (the path does not even exist)."""
    rc, lines = run_cli(["generate", "--ckpt", str(tmp_path / "nope"), "--budget", "full",
                         "--prompt", "Q:", *flags], capsys)
    assert_one_line_error(rc, lines, fragment)


def test_sampling_api_refuses_non_finite_temperature():
    from nemo_elastic.config import ConfigError
    from nemo_elastic.serve import decode

    with pytest.raises(ConfigError, match="temperature=nan: must be a finite number"):
        decode(lambda t: None, [1], max_new_tokens=1, eod_id=0, vocab_size=4,
               temperature=float("nan"))


def test_export_refuses_a_repeated_budget(tmp_path, capsys):
    rc, lines = run_cli(["export", "--ckpt", str(tmp_path / "nope"), "--budget", "full",
                         "--budget", "full", "--out", str(tmp_path / "x")], capsys)
    assert_one_line_error(rc, lines, "--budget 'full' is given twice")


# ------------------------------------------------------------------ 1b/1d. project-written files

@pytest.mark.parametrize("checksums,fragment", [
    ({"metadata.json": 5}, "entry 'metadata.json' is 5"),
    (["metadata.json"], "'checksums' is a list"),
    ({"metadata.json": {"bytes": "63", "sha256": "x"}}, "entry 'metadata.json'"),
])
def test_malformed_checksums_are_one_line_naming_the_file(checksums, fragment, run_dir,
                                                          tmp_path, capsys):
    ckpt = _copy_latest(run_dir, tmp_path / "ck")
    _edit_meta(ckpt, lambda m: m.__setitem__(CHECKSUMS_KEY, checksums))
    rc, lines = run_cli(["eval", "--ckpt", str(ckpt), "--no-progress"], capsys)
    assert_one_line_error(rc, lines, f"checkpoint '{ckpt}': {META_FILE} is corrupt", fragment)


@pytest.mark.parametrize("edit,commands,fragment", [
    ({"iteration": "x"}, ("info", "export"), "('iteration' is 'x')"),
    ({"family": 5}, ("info", "export"), "('family' is 5)"),
    ({"family": [{"name": "a", "subnetwork": {"x": 1}}]}, ("export",),
     "the sub-network of budget 'a'"),
    ({"family": [{"name": "a", "subnetwork": {"x": 1}}]}, ("info",),
     "a 'family' row lacks or mistypes 'target'"),
])
def test_malformed_metadata_fields_are_one_line_naming_the_file(edit, commands, fragment,
                                                                run_dir, tmp_path, capsys):
    ckpt = _copy_latest(run_dir, tmp_path / "ck")
    _edit_meta(ckpt, lambda m: m.update(edit))
    argvs = {"info": ["info", str(ckpt)],
             "export": ["export", "--ckpt", str(ckpt), "--budget", "a", "--out",
                        str(tmp_path / "x")]}
    for command in commands:
        rc, lines = run_cli(argvs[command], capsys)
        assert_one_line_error(rc, lines, f"checkpoint '{ckpt}': {META_FILE} is corrupt", fragment)


@pytest.mark.parametrize("checksums", [True, False])
def test_garbage_megatron_metadata_json_is_named(checksums, run_dir, tmp_path, capsys):
    ckpt = _copy_latest(run_dir, tmp_path / "ck")
    (ckpt / "metadata.json").write_text("garbage{")
    if not checksums:  # an older checkpoint: nothing else would name the file
        _edit_meta(ckpt, lambda m: m.pop(CHECKSUMS_KEY))
    rc, lines = run_cli(["eval", "--ckpt", str(ckpt), "--no-progress"], capsys)
    assert_one_line_error(rc, lines, f"checkpoint '{ckpt}': metadata.json is corrupt")
    rc, lines = run_cli(["info", str(ckpt)], capsys)
    assert_one_line_error(rc, lines, "metadata.json is corrupt")


@pytest.mark.parametrize("text", ['{"stages": {"pretrain": {"seco', "[1, 2]",
                                  '{"stages": {"pretrain": 5}}'])
def test_garbage_pipeline_json_is_one_line(text, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "pipeline.json").write_text(text)
    rc, lines = run_cli(["run", "--no-progress", *FAST, "train.iters=2",
                         f"output_dir={out}"], capsys)
    assert_one_line_error(rc, lines, f"'{out / 'pipeline.json'}' is corrupt", "--no-resume")


# ------------------------------------------------------------------ 1c. a changed learning rate

def test_resume_with_a_changed_learning_rate_uses_the_new_rate(run_dir, tmp_path, capsys):
    """Megatron keys saved optimizer groups by their LR: a changed train.lr/min_lr failed the
    resume with a ValueError; now the new (constant) rate applies from the resumed iteration,
    which is what the divergence message advises."""
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    rc, lines = run_cli(["pretrain", "--config", TINY, "--no-progress", *FAST, "train.iters=5",
                         "train.save_interval=1", "train.lr=1e-4", "train.min_lr=1e-5",
                         "train.lr_decay_style=constant", f"output_dir={out}"], capsys)
    assert rc == 0 and not lines, lines
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["lr"] for r in records[3:]] == [1e-4, 1e-4]
    assert records[2]["lr"] != 1e-4


def test_elastic_resume_with_a_changed_router_lr_uses_the_new_rate(tmp_path):
    """The router's own optimizer and LambdaLR schedule: torch restores the saved lr and
    base_lrs, so a changed elastic.router.lr was silently ignored on resume; now it applies
    from the resumed iteration (the schedule's position is kept), and an unchanged recipe
    resumes to exactly the uninterrupted run's router LRs."""
    from nemo_elastic.checkpoint import LATEST_FILE
    from nemo_elastic.training.train import train
    from tests.test_train import _cfg, _parent

    _parent(tmp_path)

    def run(out, *extra):
        train(_cfg(tmp_path, f"output_dir={out}", "elastic.save_interval=2", *extra),
              progress=False)
        return [json.loads(line) for line in
                (out / "elastic/metrics.jsonl").read_text().splitlines()]

    straight = run(tmp_path / "a")
    assert [r["iteration"] for r in straight] == [1, 2, 3, 4, 5, 6]
    for lr, name in ((None, "same"), ("5.0e-3", "half")):
        out = tmp_path / name
        shutil.copytree(tmp_path / "a", out)
        ckpts = out / "elastic/checkpoints"
        for later in ("iter_0000004", "iter_0000006"):
            shutil.rmtree(ckpts / later)
        (ckpts / LATEST_FILE).write_text("iter_0000002\n")
        resumed = run(out, *([f"elastic.router.lr={lr}"] if lr else []))
        assert [r["iteration"] for r in resumed] == [1, 2, 3, 4, 5, 6]
        ours = [r["router_lr"] for r in resumed]
        if lr is None:
            assert ours == [r["router_lr"] for r in straight]
        else:
            assert ours[:2] == [r["router_lr"] for r in straight[:2]]
            assert ours[2:] == pytest.approx([0.5 * r["router_lr"] for r in straight[2:]],
                                             rel=1e-12)

# ------------------------------------------------------------------ 2. non-finite weights

def _checkpoint_with_huge_weights(run_dir: Path, out: Path) -> Path:
    """The checkpoint a 1e30 step used to leave: finite weights whose loss is NaN."""
    import torch

    from nemo_elastic import runtime
    from nemo_elastic.checkpoint import config_from_checkpoint, load_checkpoint, save_checkpoint
    from nemo_elastic.config import ParallelConfig
    from nemo_elastic.model import build_hybrid_model

    good = latest_checkpoint(run_dir / "checkpoints")
    cfg = config_from_checkpoint(good)
    with runtime.distributed(ParallelConfig()):
        model = build_hybrid_model(cfg)
        load_checkpoint(good, model=model, restore_rng=False)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e30)
        save_checkpoint(out, cfg=cfg, model=model, iteration=3, kind="extracted")
    return out


def test_eval_of_non_finite_weights_is_an_error_not_nan(run_dir, tmp_path, capsys):
    ckpt = _checkpoint_with_huge_weights(run_dir, tmp_path / "huge")
    rc, lines = run_cli(["eval", "--ckpt", str(ckpt), "--json", "--no-progress"], capsys)
    assert_one_line_error(rc, lines, f"checkpoint '{ckpt}': validation loss is nan",
                          "evaluate an earlier checkpoint")


def test_eval_json_and_out_file_are_strict_json(run_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc, lines = run_cli(["eval", "--ckpt", str(run_dir), "--json", "--no-progress",
                         "--out", str(out)], capsys)
    assert rc == 0 and not lines
    json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in eval JSON"))
    rc, lines = run_cli(["eval", "--ckpt", str(run_dir), "--out", str(tmp_path)], capsys)
    assert_one_line_error(rc, lines, f"--out='{tmp_path}' is a directory; pass a file name")


# ------------------------------------------------------------------ 3. nothing accepted silently

@pytest.mark.parametrize("override,fragment", [
    ("elastic.axes=[hidden,hidden,ffn]", "elastic.axes=['hidden', 'hidden', 'ffn']: 'hidden' is "
                                         "given twice"),
    ("elastic.width_fractions=[1.0,0.5,0.5]", "elastic.width_fractions=[1.0, 0.5, 0.5]: 0.5 is "
                                              "given twice"),
    ("elastic.heterogeneous=[ffn,ffn]", "elastic.heterogeneous=['ffn', 'ffn']: 'ffn' is given"),
    ("elastic.budgets=[]", "elastic.budgets takes a mapping, not a list"),
    ("train.eval_accuracy_samples=-5", "train.eval_accuracy_samples=-5: must be an integer >= 0"),
])
def test_repeated_or_wrong_kind_elastic_settings_are_refused(override, fragment, tmp_path,
                                                             capsys):
    rc, lines = run_cli(["train", "--no-progress", f"output_dir={tmp_path / 'e'}", override],
                        capsys)
    assert_one_line_error(rc, lines, fragment)


def test_extract_with_the_parents_own_sizes_is_refused_as_a_copy(run_dir, tmp_path, capsys):
    rc, lines = run_cli(["extract", "--ckpt", str(run_dir), "--out", str(tmp_path / "e"),
                         "--hidden-size", "64"], capsys)
    assert_one_line_error(rc, lines, "--hidden-size 64 keeps every size of the parent",
                          "would be a copy")
    assert not (tmp_path / "e").exists()


def test_capped_evaluation_settings_warn_with_the_asked_and_used_values(run_dir, tmp_path,
                                                                        caplog):
    """40 synthetic validation documents: 28 windows = 4 micro-batches of 8, a few problems."""
    import logging

    from nemo_elastic.training.evaluate_checkpoint import evaluate_checkpoint
    from nemo_elastic.training import evaluation

    evaluation._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="nemo_elastic"):
        result = evaluate_checkpoint(run_dir, overrides=["train.eval_iters=50",
                                                         "train.eval_accuracy_samples=100000"],
                                     progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("train.eval_iters=50 asks for 50 validation micro-batches" in w
               and "using 4" in w for w in warnings), warnings
    assert any("train.eval_accuracy_samples=100000 is more than the" in w for w in warnings), \
        warnings
    assert result["val_loss"] > 0


# ------------------------------------------------------------------ 4. the right message

def test_prepare_with_a_model_override_says_it_does_not_match(run_dir, tmp_path, capsys):
    """Was reported as a damaged checkpoint (Global shape mismatch)."""
    rc, lines = run_cli(["prepare", "--ckpt", str(run_dir), "--out", str(tmp_path / "p"),
                         "--no-progress", "model.hidden_size=32"], capsys)
    assert_one_line_error(rc, lines, "model.hidden_size=32 does not match checkpoint",
                          "model.hidden_size=64")
    assert not (tmp_path / "p").exists()


def test_output_paths_are_named_by_their_flag_before_any_work(run_dir, tmp_path, capsys):
    """--out on a file, under a file, or where no folder can be made: one line naming --out,
    (not a temporary path, not 'checkpoint='), and no --overwrite advice where it would not
    help; refused before the parent is loaded (prepare used to calibrate for minutes first)."""
    a_file = tmp_path / "afile"
    a_file.write_text("x\n")
    ckpt = str(run_dir)
    cases = [
        (["extract", "--ckpt", ckpt, "--out", "/sys/nope/p", "--hidden-size", "32"],
         ["--out='/sys/nope/p'", "choose a --out"]),
        (["prepare", "--ckpt", ckpt, "--out", "/sys/nope/p", "--no-progress"],
         ["--out='/sys/nope/p'", "choose a --out"]),
        (["extract", "--ckpt", ckpt, "--out", str(a_file), "--hidden-size", "32"],
         [f"--out='{a_file}': an existing file is in the way", "choose another --out"]),
        (["extract", "--ckpt", ckpt, "--out", str(a_file), "--hidden-size", "32",
          "--overwrite"], [f"--out='{a_file}': an existing file is in the way"]),
        (["export", "--ckpt", ckpt, "--out", str(a_file)],
         [f"--out='{a_file}': an existing file is in the way"]),
        (["export", "--ckpt", ckpt, "--out", str(a_file / "x")],
         [f"--out='{a_file / 'x'}'", "existing file", "choose another --out"]),
        (["export", "--ckpt", ckpt, "--out", "/sys/nope/x"], ["--out='/sys/nope/x'"]),
    ]
    for argv, fragments in cases:
        rc, lines = run_cli(argv, capsys)
        line = assert_one_line_error(rc, lines, *fragments)
        assert ".tmp" not in line and "checkpoint=" not in line, line
        if "existing file" in line:
            assert "add --overwrite" not in line, line


def test_preprocess_input_that_is_a_directory_says_so(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(["a b c d"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = tmp_path / "tokenizer.json"
    tk.save(str(tok))
    rc, lines = run_cli(["preprocess", "--input", str(tmp_path), "--tokenizer", str(tok),
                         "--eod-token", "</s>", "--out", str(tmp_path / "c"), "--no-progress"],
                        capsys)
    assert_one_line_error(rc, lines, f"--input='{tmp_path}' is a directory; pass one .txt")


def test_top_k_above_the_vocabulary_warns_with_the_used_value(run_dir, caplog):
    import logging

    from nemo_elastic.checkpoint import config_from_checkpoint, load_checkpoint
    from nemo_elastic.data.loaders import build_tokenizer
    from nemo_elastic.export.common import build_tp1_model, tp1_runtime
    from nemo_elastic.serve import ElasticGenerator

    ckpt = latest_checkpoint(run_dir / "checkpoints")
    cfg = config_from_checkpoint(ckpt).single_process()
    tokenizer = build_tokenizer(cfg)
    with tp1_runtime():
        model = build_tp1_model(cfg)
        load_checkpoint(ckpt, model=model, restore_rng=False)
        gen = ElasticGenerator(ckpt, cfg, model, tokenizer, {}, contextlib.ExitStack())
        with caplog.at_level(logging.WARNING, logger="nemo_elastic"):
            out = gen.generate("Q:", None, max_new_tokens=2, temperature=1.0, top_k=10 ** 6,
                               seed=0)
    assert len(out.tokens) <= 2
    assert any(f"top_k=1000000 is larger than the vocabulary: using top_k="
               f"{tokenizer.vocab_size}" in r.getMessage() for r in caplog.records), caplog.text


def test_elastic_train_does_not_save_weights_whose_loss_is_not_finite(tmp_path, capsys):
    """elastic.lr=1e30: the first step leaves finite weights with a NaN loss; the check before
    the iteration-1 save stops the run (it used to save them and stop one iteration later)."""
    from tests.test_train import _cfg, _parent

    _parent(tmp_path)
    cfg = _cfg(tmp_path, "elastic.lr=1e30", "elastic.min_lr=0", "elastic.warmup_iters=0",
               "elastic.save_interval=1")
    from nemo_elastic.config import to_dict

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(to_dict(cfg)))
    rc, lines = run_cli(["train", "--config", str(recipe), "--no-progress"], capsys)
    assert_one_line_error(rc, lines, "the weights after iteration 1 (stage 'stage1')",
                          "no checkpoint was written",
                          "lower elastic.lr")
    assert latest_checkpoint(tmp_path / "run" / "elastic" / "checkpoints") is None


# ------------------------------------------------------------------ 5. durable renames

def _record_fsyncs(monkeypatch) -> list[str]:
    import os

    synced, real = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_pipeline_json_and_published_folders_are_fsynced(tmp_path, monkeypatch):
    from nemo_elastic.checkpoint import replace_durably
    from nemo_elastic.main_job import write_json as _write_json

    synced = _record_fsyncs(monkeypatch)
    _write_json(tmp_path / "pipeline.json", {"stages": {}})
    assert str(tmp_path / ".pipeline.json.tmp") in synced and str(tmp_path) in synced
    assert json.loads((tmp_path / "pipeline.json").read_text()) == {"stages": {}}
    _write_json(tmp_path / "evaluation.json", {"val_loss": float("nan")})  # a diverged budget
    assert json.loads((tmp_path / "evaluation.json").read_text()) == {"val_loss": None}

    staged = tmp_path / ".staging" / "budget"
    staged.mkdir(parents=True)
    (staged / "model.safetensors").write_bytes(b"x" * 10)
    synced.clear()
    replace_durably(staged, tmp_path / "out")
    assert str(staged / "model.safetensors") in synced  # the contents, before the rename
    assert str(tmp_path) in synced  # the rename itself
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"x" * 10
