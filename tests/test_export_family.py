"""`nemo-elastic export --budget NAME ... | --all --format megatron|hf`: every trained budget of a
nested checkpoint as a standalone folder that its usual tool loads, computing what the masked
nested model computes.

Oracles: the masked nested (elastic) model's logits, computed in the fixture before anything is
exported; megatron-core's own classes (`load_plain_hybrid_model` builds megatron-core's hybrid
spec, the only stand-ins being torch kernels where mamba-ssm / Transformer Engine are missing);
transformers' `NemotronHForCausalLM` + `AutoTokenizer`; the closed-form cost model and the
family table.  The checkpoint is the hand-made family of test_export_budget (uniform,
heterogeneous, shallow).
"""

import json
import logging
import os
import signal

import pytest
import torch

from nemo_elastic import cli, runtime
from nemo_elastic.cost_model import count_parameters
from nemo_elastic.checkpoint import config_from_checkpoint, load_checkpoint
from nemo_elastic.config import ParallelConfig
from nemo_elastic.export import budgets as budgets_mod
from nemo_elastic.export import (
    export_budgets, load_exported_model, load_hf_per_layer, load_plain_hybrid_model)
from nemo_elastic.export.megatron_format import read_megatron_config
from tests.multiproc import run_multiprocess
from tests.test_export_budget import elastic  # noqa: F401  (module fixture)

NAMES = ("uniform", "hetero", "shallow")
HOMOGENEOUS = ("uniform", "shallow")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _pos(tokens):
    return torch.arange(tokens.shape[1]).expand_as(tokens)


def _megatron_core_only(model):
    """Module classes outside megatron.core / torch (kernel stand-ins only are allowed)."""
    return sorted({f"{type(m).__module__}.{type(m).__name__}" for m in model.modules()
                   if not type(m).__module__.startswith(("megatron.core", "torch."))})


@pytest.fixture(scope="module")
def megatron_family(elastic, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("megatron") / "family"
    assert cli.main(["export", "--ckpt", str(elastic[0] / "ckpt"), "--all", "--format",
                     "megatron", "--out", str(out)]) == 0
    return out


def test_megatron_export_of_every_budget_equals_masked_model(elastic, megatron_family):  # noqa: F811
    _, tokens, masked, rows = elastic
    assert sorted(p.name for p in megatron_family.iterdir()) == sorted(NAMES)
    assert not [p for p in megatron_family.parent.iterdir() if p.name.startswith(".")]
    for name in NAMES:
        folder = megatron_family / name
        record = json.loads((folder / "export.json").read_text())
        assert record["verification"]["rel_logit_error"] <= 1e-5
        cfg = config_from_checkpoint(folder)
        with runtime.distributed(ParallelConfig()):
            if name in HOMOGENEOUS:
                assert read_megatron_config(folder)["plain_megatron_core"]
                model = load_plain_hybrid_model(folder)
                # megatron-core classes only; torch's gated RMSNorm stands in for mamba-ssm's
                assert _megatron_core_only(model) == ["nemo_elastic.model.mamba.ShardedGatedRMSNorm"]
            else:
                with pytest.raises(Exception, match="cannot be loaded as a plain megatron-core"):
                    load_plain_hybrid_model(folder)
                _, model = load_exported_model(folder)
            with torch.no_grad():
                logits = model(tokens, _pos(tokens), None)
            numel = sum(p.numel() for p in model.parameters())
        assert _rel(logits, masked[name]) <= 1e-5, name
        # parameters: the loaded model == the cost model == the family table == the record
        assert numel == count_parameters(cfg.model) == rows[name]["parameters"] == \
            record["parameters"], name


def _tp2_load(rank, world_size, family, tokens_path, out_path):
    tokens = torch.load(tokens_path)
    results = {}
    with runtime.distributed(ParallelConfig(tensor_model_parallel_size=2)):
        for name in NAMES:
            folder = family / name
            if name in HOMOGENEOUS:
                model = load_plain_hybrid_model(folder)  # TP=2 from a TP=1 checkpoint
            else:  # heterogeneous: our loader, resharded as well
                import dataclasses

                from nemo_elastic.model import build_hybrid_model

                cfg = config_from_checkpoint(folder)
                cfg = dataclasses.replace(cfg, parallel=ParallelConfig(tensor_model_parallel_size=2))
                model = build_hybrid_model(cfg, spec_backend="local").eval()
                load_checkpoint(folder, model=model, restore_rng=False)
            with torch.no_grad():
                results[name] = model(tokens, _pos(tokens), None, runtime_gather_output=True)
    if rank == 0:
        torch.save(results, out_path)


@pytest.mark.slow
def test_megatron_export_loads_at_tensor_parallel_2(elastic, megatron_family, tmp_path):  # noqa: F811
    _, tokens, masked, _ = elastic
    torch.save(tokens, tmp_path / "tokens.pt")
    run_multiprocess(_tp2_load, 2, megatron_family, tmp_path / "tokens.pt", tmp_path / "tp2.pt")
    tp2 = torch.load(tmp_path / "tp2.pt")
    for name in NAMES:
        assert _rel(tp2[name], masked[name]) <= 1e-5, name


def test_hf_export_runs_in_transformers_with_its_tokenizer(elastic, tmp_path):  # noqa: F811
    """Homogeneous budgets: stock transformers loads the folder; its logits equal the masked
    model's; AutoTokenizer + generate give what `nemo-elastic generate` gives at that budget."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_elastic.serve import ElasticGenerator

    root, tokens, masked, rows = elastic
    out = tmp_path / "hf"
    argv = ["export", "--ckpt", str(root / "ckpt"), "--format", "hf", "--out", str(out)]
    assert cli.main([*argv, "--budget", "uniform", "--budget", "shallow"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["shallow", "uniform"]
    prompt = "Q:12+7*3=?\nS:"
    with ElasticGenerator.load(root / "ckpt") as gen:
        expected = {n: gen.generate(prompt, n, max_new_tokens=12).text for n in HOMOGENEOUS}
    for name in HOMOGENEOUS:
        model = AutoModelForCausalLM.from_pretrained(str(out / name)).eval()
        assert type(model).__name__ == "NemotronHForCausalLM"
        assert sum(p.numel() for p in model.parameters()) == rows[name]["parameters"]
        with torch.no_grad():
            logits = model(input_ids=tokens, use_cache=False).logits
        assert _rel(logits, masked[name]) <= 1e-4, name
        tok = AutoTokenizer.from_pretrained(str(out / name))
        inputs = tok(prompt, return_tensors="pt")
        assert inputs["input_ids"][0, 0].item() == tok.bos_token_id == 1  # BOS as in training
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        text = tok.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        assert text == expected[name], name
    assert len(set(expected.values())) == 2  # the budgets answer differently


def test_heterogeneous_budget_hf_refused_for_stock_transformers(elastic, tmp_path, caplog):  # noqa: F811
    from transformers import AutoModelForCausalLM

    root, tokens, masked, rows = elastic
    argv = ["export", "--ckpt", str(root / "ckpt"), "--format", "hf", "--out", str(tmp_path / "hf")]
    for selection in (["--budget", "hetero"], ["--all"]):  # --all: the whole set is refused
        assert cli.main([*argv, *selection]) == 2
        assert "'hetero' cannot be exported for stock transformers" in caplog.text
        assert "one size per layer type" in caplog.text
        assert list(tmp_path.iterdir()) == []
        caplog.clear()
    # the documented per-layer extension + our loader
    assert cli.main([*argv, "--budget", "hetero", "--hf-per-layer"]) == 0
    folder = tmp_path / "hf" / "hetero"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "nemotron_h_per_layer"
    layers = config["nemo_elastic_per_layer"]["layers"]
    assert [layers[i].get("intermediate_size", config["intermediate_size"]) for i in (1, 4)] \
        == [48, 16]  # the two MLP layers keep their own widths
    with pytest.raises(Exception, match="nemotron_h_per_layer"):  # stock transformers refuses
        AutoModelForCausalLM.from_pretrained(str(folder))
    model = load_hf_per_layer(folder)
    assert sum(p.numel() for p in model.parameters()) == rows["hetero"]["parameters"]
    with torch.no_grad():
        logits = model(input_ids=tokens, use_cache=False).logits
    assert _rel(logits, masked["hetero"]) <= 1e-4


def test_refusals_leave_nothing_behind(elastic, tmp_path, caplog):  # noqa: F811
    ckpt = str(elastic[0] / "ckpt")
    out = tmp_path / "out"
    argv = ["export", "--ckpt", ckpt, "--format", "megatron", "--out", str(out)]
    assert cli.main([*argv, "--budget", "uniform", "--budget", "nope"]) == 2
    assert "--budget 'nope': no such trained budget" in caplog.text
    assert "trained budgets: uniform, hetero, shallow" in caplog.text
    assert not out.exists()
    assert cli.main([*argv, "--budget", "uniform", "--all"]) == 2
    assert "cannot be combined" in caplog.text
    # an existing output is never replaced without --overwrite
    (out / "shallow").mkdir(parents=True)
    (out / "shallow" / "mine.txt").write_text("keep")
    caplog.clear()
    assert cli.main([*argv, "--budget", "uniform", "--budget", "shallow"]) == 2
    assert "already exists" in caplog.text and "--overwrite" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["shallow"]
    # --overwrite replaces an earlier output, never a folder of someone else's files
    caplog.clear()
    assert cli.main([*argv, "--budget", "shallow", "--overwrite"]) == 2
    assert "holds files that no nemo-elastic command wrote (e.g. 'mine.txt')" in caplog.text
    assert (out / "shallow" / "mine.txt").read_text() == "keep"
    (out / "shallow" / "mine.txt").unlink()
    assert cli.main([*argv, "--budget", "shallow", "--overwrite"]) == 0
    assert (out / "shallow" / "megatron_config.json").is_file()
    assert cli.main([*argv, "--budget", "shallow", "--overwrite"]) == 0  # over an export
    assert sorted(p.name for p in out.iterdir()) == ["shallow"]  # no staging left


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "verification"])
def test_interrupted_or_failed_export_leaves_no_folder(elastic, tmp_path, monkeypatch, how):  # noqa: F811
    """All or none: stopping while the second budget is verified leaves no output folder, no
    staging folder and no parent folder the export created, also for budgets already complete."""
    real = budgets_mod._reload_logits
    calls = []

    def reload(folder, *args):
        calls.append(folder)
        if len(calls) == 2:
            if how == "ctrl-c":
                raise KeyboardInterrupt
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
        return real(folder, *args)

    monkeypatch.setattr(budgets_mod, "_reload_logits", reload)
    handler = signal.getsignal(signal.SIGTERM)
    if how == "verification":
        monkeypatch.setitem(budgets_mod.TOLERANCE, "float32", {"megatron": -1.0, "hf": -1.0})
    expected = {"ctrl-c": KeyboardInterrupt, "sigterm": KeyboardInterrupt,
                "verification": budgets_mod.ExportError}[how]
    with pytest.raises(expected):
        export_budgets(elastic[0] / "ckpt", tmp_path / "new" / "out", None, format="megatron")
    assert len(calls) == (1 if how == "verification" else 2)
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == handler  # the export's handler is gone


def test_export_logs_verification_and_sizes(elastic, tmp_path, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="nemo_elastic")
    rows = elastic[3]
    assert cli.main(["export", "--ckpt", str(elastic[0] / "ckpt"), "--budget", "shallow",
                     "--format", "megatron", "--out", str(tmp_path / "o")]) == 0
    assert "megatron export verified (relative logit error" in caplog.text
    assert f"{rows['shallow']['parameters']:,} parameters" in caplog.text


def test_tokenizer_json_tokenizer_is_written_as_training_encodes(tmp_path):
    """Indexed data: the user's tokenizer.json, whose post-processor would add a BOS that
    training never saw, becomes an AutoTokenizer that encodes exactly as training did."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, GenerationConfig

    from nemo_elastic.data import HFTokenizer
    from nemo_elastic.export.tokenizer_files import check_tokenizer, write_tokenizer

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["Hello world. 12 + 7 = 19"] * 20 + ["alpha beta gamma"] * 20,
                           trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                               special_tokens=["<unk>", "<s>", "</s>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tk.save(str(tmp_path / "tokenizer.json"))
    ours = HFTokenizer(tmp_path / "tokenizer.json", eod_token="</s>")
    out = tmp_path / "export"
    out.mkdir()
    sample = write_tokenizer(ours, out, model_vocab_size=ours.vocab_size + 4, max_length=64)
    check_tokenizer(ours, out, sample)
    auto = AutoTokenizer.from_pretrained(str(out))
    text = "alpha beta, Hello world."
    assert auto(text)["input_ids"] == ours.encode(text)  # no BOS: training added none
    assert auto.eos_token == "</s>" and auto.eos_token_id == ours.eod_id
    gen = GenerationConfig.from_pretrained(str(out))
    assert gen.eos_token_id == ours.eod_id
    assert gen.suppress_tokens == list(range(ours.vocab_size, ours.vocab_size + 4))
