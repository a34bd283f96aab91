"""`extract --budget/--all` and `export --budget`: a trained budget of an elastic checkpoint, by
name, is the physically sliced model that computes what the masked nested model computes.

The elastic checkpoint is hand-made (no training): a perturbed elastic model saved with a
`family` of three budgets in `nemo_elastic.json`, as `nemo-elastic train` writes it.
"""

import json
import logging

import pytest
import torch

from nemo_elastic import cli, runtime
from nemo_elastic.cost_model import (
    MemorySpec, count_parameters, subnetwork_memory, subnetwork_parameters)
from nemo_elastic.checkpoint import (
    CheckpointError, config_from_checkpoint, load_checkpoint, read_meta, save_checkpoint)
from nemo_elastic.config import ConfigError, ParallelConfig
from nemo_elastic.elastic import SubNetwork
from nemo_elastic.elastic.specs import build_elastic_model
from nemo_elastic.export import budget_subnetwork, family_of
from nemo_elastic.model import build_hybrid_model
from tests.conftest import perturb, tiny_config

SEQ = 37  # > Mamba chunk 16


def _budgets(m):
    uniform = SubNetwork.uniform(m, hidden_size=24, mamba_num_heads=2, num_attention_heads=2,
                                 ffn_hidden_size=32)
    # Different FFN widths in the two MLP layers: a per_layer child, not representable in HF.
    hetero = SubNetwork.uniform(m, hidden_size=24, ffn_hidden_size=48).replace_layer(
        4, ffn_hidden_size=16)
    return {"uniform": uniform, "hetero": hetero,
            "shallow": SubNetwork.uniform(m, mamba_head_dim=4, drop_layers=[3, 4])}


def _row(name, m, subnet):
    """One `family` entry in the format of Router.family_table()."""
    params, spec = subnetwork_parameters(m, subnet), MemorySpec()
    return {"name": name, "target": params / count_parameters(m), "budget_type": "params",
            "parameters": params, "parameter_fraction": params / count_parameters(m),
            "memory_bytes": subnetwork_memory(m, subnet, spec),
            "memory_spec": {"batch_size": spec.batch_size, "seq_length": spec.seq_length,
                            "bytes_per_param": spec.bytes_per_param},
            "summary": subnet.describe(m), "subnetwork": subnet.to_dict()}


def _save_family(path, cfg, model, budgets) -> list[dict]:
    """Save `model` as an elastic checkpoint whose family is `budgets`, as `nemo-elastic train`
    writes it (inside a runtime); returns the family rows."""
    rows = [_row(name, cfg.model, subnet) for name, subnet in budgets.items()]
    save_checkpoint(path, cfg=cfg, model=model, kind="elastic", extra_meta={"family": rows})
    return rows


def save_hand_made_family(path):
    """A tiny nested checkpoint at `path` with a family (full + the budgets above); for tests of
    the commands that read a family."""
    cfg = tiny_config({"hybrid_layer_pattern": "M-*M-"})
    with runtime.distributed(ParallelConfig()):
        model = perturb(build_elastic_model(cfg), seed=3)
        _save_family(path, cfg, model, {"full": SubNetwork.full(cfg.model), **_budgets(cfg.model)})
    return path


@pytest.fixture(scope="module")
def elastic(tmp_path_factory):
    """(checkpoint dir, tokens, {budget: masked logits}, {budget: family row})."""
    root = tmp_path_factory.mktemp("elastic")
    cfg = tiny_config({"hybrid_layer_pattern": "M-*M-"})
    budgets = _budgets(cfg.model)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, SEQ),
                           generator=torch.Generator().manual_seed(0))
    pos = torch.arange(SEQ).expand_as(tokens)
    with runtime.distributed(ParallelConfig()):
        model = perturb(build_elastic_model(cfg), seed=3).eval()
        with torch.no_grad():
            masked = {name: model(tokens, pos, None, subnetwork=s).float()
                      for name, s in budgets.items()}
        rows = _save_family(root / "ckpt", cfg, model, budgets)
        plain = build_hybrid_model(cfg)  # a checkpoint with no family
        save_checkpoint(root / "plain", cfg=cfg, model=plain, kind="test")
    return root, tokens, masked, {r["name"]: r for r in rows}


def _load(ckpt):
    """Plain HybridModel from an extracted checkpoint (its own one-process runtime)."""
    cfg = config_from_checkpoint(ckpt)
    model = build_hybrid_model(cfg, spec_backend="local").eval()
    load_checkpoint(ckpt, model=model, restore_rng=False)
    return cfg, model


def _check_extracted(ckpt, name, tokens, masked, row):
    meta = read_meta(ckpt)
    assert meta["kind"] == "extract" and meta["budget"] == name
    assert meta["subnetwork"] == row["subnetwork"]
    with runtime.distributed(ParallelConfig()):
        cfg, model = _load(ckpt)
        numel = sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            logits = model(tokens, torch.arange(SEQ).expand_as(tokens), None).float()
    assert numel == count_parameters(cfg.model) == row["parameters"]
    err = ((logits - masked[name]).norm() / masked[name].norm()).item()
    assert err <= 1e-5, (name, err)


def test_extract_budget_by_name_equals_masked_model(elastic, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="nemo_elastic")
    root, tokens, masked, rows = elastic
    out = tmp_path / "hetero"
    assert cli.main(["extract", "--ckpt", str(root / "ckpt"), "--budget", "hetero",
                     "--out", str(out)]) == 0
    assert config_from_checkpoint(out).model.per_layer  # heterogeneous child
    _check_extracted(out, "hetero", tokens, masked, rows["hetero"])
    fraction = f"{100 * rows['hetero']['parameter_fraction']:.1f}%"
    assert f"{rows['hetero']['parameters']:,} parameters ({fraction}" in caplog.text
    # never overwrites without --overwrite
    assert cli.main(["extract", "--ckpt", str(root / "ckpt"), "--budget", "hetero",
                     "--out", str(out)]) == 2
    assert "already exists" in caplog.text


def test_extract_all_writes_every_budget(elastic, tmp_path):
    root, tokens, masked, rows = elastic
    assert cli.main(["extract", "--ckpt", str(root / "ckpt"), "--all",
                     "--out", str(tmp_path / "family")]) == 0
    assert sorted(p.name for p in (tmp_path / "family").iterdir()) == sorted(rows)
    for name, row in rows.items():
        _check_extracted(tmp_path / "family" / name, name, tokens, masked, row)


@pytest.mark.parametrize("argv, message", [
    (["--budget", "nope"], "--budget 'nope': no such trained budget"),
    (["--budget", "uniform", "--hidden-size", "16"],
     "--budget and --hidden-size cannot be combined"),
    (["--budget", "uniform", "--subnet", "x.json"], "--budget and --subnet cannot be combined"),
    (["--all", "--budget", "uniform"], "--budget and --all cannot be combined"),
])
def test_extract_budget_user_errors(elastic, tmp_path, caplog, argv, message):
    root = elastic[0]
    out = tmp_path / "x"
    assert cli.main(["extract", "--ckpt", str(root / "ckpt"), "--out", str(out), *argv]) == 2
    assert message in caplog.text
    if argv[1] == "nope":
        assert "trained budgets: uniform, hetero, shallow" in caplog.text
    assert not out.exists()


def test_checkpoint_without_family_is_refused(elastic, tmp_path, caplog):
    root = elastic[0]
    for argv in (["extract", "--budget", "uniform"], ["extract", "--all"],
                 ["export", "--budget", "uniform"]):
        assert cli.main([*argv, "--ckpt", str(root / "plain"), "--out", str(tmp_path / "x")]) == 2
        assert "holds no trained budget family" in caplog.text
        assert "not written by `nemo-elastic train`" in caplog.text
        caplog.clear()
    assert not (tmp_path / "x").exists()
    with pytest.raises(CheckpointError, match="not written by `nemo-elastic train`"):
        family_of(root / "plain")
    with pytest.raises(ConfigError, match="trained budgets: uniform, hetero, shallow"):
        budget_subnetwork(root / "ckpt", "nope")
    assert budget_subnetwork(root / "ckpt", "shallow") == _budgets(
        config_from_checkpoint(root / "ckpt").model)["shallow"]


def test_export_budget_to_hf_equals_masked_model(elastic, tmp_path, caplog):
    pytest.importorskip("transformers")
    from transformers import NemotronHForCausalLM

    caplog.set_level(logging.INFO, logger="nemo_elastic")
    root, tokens, masked, rows = elastic
    assert cli.main(["export", "--ckpt", str(root / "ckpt"), "--budget", "uniform",
                     "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # staging removed
    out = tmp_path / "hf" / "uniform"  # one sub-folder per budget
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 24
    hf = NemotronHForCausalLM.from_pretrained(str(out)).eval()
    assert sum(p.numel() for p in hf.parameters()) == rows["uniform"]["parameters"]
    with torch.no_grad():
        logits = hf(input_ids=tokens, use_cache=False).logits.float()
    ref = masked["uniform"]
    assert ((logits - ref).norm() / ref.norm()).item() <= 1e-4
    assert f"{rows['uniform']['parameters']:,} parameters" in caplog.text


def test_export_heterogeneous_budget_is_refused_with_the_reason(elastic, tmp_path, caplog):
    root = elastic[0]
    assert cli.main(["export", "--ckpt", str(root / "ckpt"), "--budget", "hetero",
                     "--out", str(tmp_path / "hf")]) == 2
    assert "'hetero' cannot be exported for stock transformers" in caplog.text
    assert "one size per layer type" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_extract_and_export_accept_a_run_directory(elastic, tmp_path):
    """`--ckpt RUN_DIR` means the run's latest checkpoint, for extract and export alike."""
    import shutil

    root, *_ = elastic
    run = tmp_path / "run"
    shutil.copytree(root / "ckpt", run / "checkpoints" / "iter_0000006")
    (run / "checkpoints" / "latest").write_text("iter_0000006\n")
    assert cli.main(["extract", "--ckpt", str(run), "--budget", "uniform",
                     "--out", str(tmp_path / "x")]) == 0
    assert cli.main(["export", "--ckpt", str(run), "--budget", "uniform", "--format", "hf",
                     "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "uniform" / "config.json").is_file()
