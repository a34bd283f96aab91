"""The main job on a MoE parent (`conf/tiny_moe.yaml`, smoke size, budgets in *active*
parameters): pretrain -> prepare (REAP expert order) -> zero-shot -> elastic family -> export
(Megatron and Hugging Face) -> evaluation -> report; then every command a user runs on the
family: stock transformers loads each HF budget (logits equal the exported Megatron model's,
greedy `generate` equals `nemo-elastic generate` at that budget), `info`, `eval`."""

from __future__ import annotations

import json

import pytest
import torch

from nemo_elastic import cli
from nemo_elastic.config import load_config
from tests.test_pipeline import SMOKE, _md_table
from tests.test_pretrain import FAST

ACTIVE = ["elastic.budget_type=active", "elastic.loss.tolerance=0.1"]
PROMPT = "Q:12+7*3=?\nS:"


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.slow
def test_moe_main_job_and_every_command(tmp_path, capsys):
    from transformers import AutoTokenizer, NemotronHForCausalLM

    from nemo_elastic import runtime
    from nemo_elastic.cost_model import count_active_parameters, subnetwork_active_parameters
    from nemo_elastic.checkpoint import config_from_checkpoint, load_checkpoint
    from nemo_elastic.config import ParallelConfig
    from nemo_elastic.elastic.subnet import SubNetwork
    from nemo_elastic.model import build_hybrid_model
    from nemo_elastic.main_job import run
    from nemo_elastic.serve import ElasticGenerator

    cfg = load_config("conf/tiny_moe.yaml", [*SMOKE, *ACTIVE, f"output_dir={tmp_path}"])
    table = run(cfg, progress=False)
    parent = config_from_checkpoint(tmp_path / "prepared").model
    family = json.loads((tmp_path / "elastic/family.json").read_text())
    assert [r["name"] for r in family] == ["full", "75pct", "50pct"] == \
        [r["name"] for r in table["family"]]
    full_active = count_active_parameters(parent)
    for row in family:  # total and active of each budget, the band judged on active
        subnet = SubNetwork.from_dict(row["subnetwork"])
        assert row["budget_type"] == "active"
        assert row["active_parameters"] == subnetwork_active_parameters(parent, subnet)
        assert row["active_fraction"] == row["active_parameters"] / full_active
    report = (tmp_path / "report.md").read_text()
    cells = {r[0]: r for r in _md_table(report, "budget")}
    for row in family:
        assert f"active {row['active_parameters']:,}" in cells[row["name"]][3]
    assert f"active {full_active:,} (100.0%)" in cells["teacher (parent)"][3]

    # every budget: the HF folder in stock transformers == the exported Megatron checkpoint,
    # and its greedy generate == `nemo-elastic generate` at that budget
    models = {m["name"]: m for m in json.loads((tmp_path / "evaluation.json").read_text())
              ["models"]}
    tokens = torch.randint(0, 54, (2, 32), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(32).expand(2, 32)
    with ElasticGenerator.load(tmp_path / "elastic") as gen:
        expected = {r["name"]: gen.generate(PROMPT, r["name"], max_new_tokens=10).text
                    for r in family}
    with runtime.distributed(ParallelConfig()):
        for row in family:
            name = row["name"]
            meg = tmp_path / "family" / name
            plain = build_hybrid_model(config_from_checkpoint(meg), spec_backend="local").eval()
            load_checkpoint(meg, model=plain, restore_rng=False)
            hf = NemotronHForCausalLM.from_pretrained(str(tmp_path / "hf" / name)).eval()
            assert sum(p.numel() for p in hf.parameters()) == row["parameters"] == \
                models[name]["parameters"]
            with torch.no_grad():
                assert _rel(hf(input_ids=tokens, use_cache=False).logits,
                            plain(tokens, pos, None)) <= 1e-4, name
            tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf" / name))
            inputs = tok(PROMPT, return_tensors="pt")
            with torch.no_grad():
                ids = hf.generate(**inputs, max_new_tokens=10, do_sample=False)
            text = tok.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            assert text == expected[name], name

    # `generate` at every budget, `info` (total and active), `eval` of an exported budget
    capsys.readouterr()
    argv = ["generate", "--ckpt", str(tmp_path / "elastic"), "--prompt", PROMPT,
            "--max-new-tokens", "10"]
    assert cli.main([*argv, *[a for r in family for a in ("--budget", r["name"])]]) == 0
    printed = capsys.readouterr().out
    for row in family:
        assert f"[{row['name']}] {expected[row['name']]}" in printed
    assert cli.main(["info", "--json", str(tmp_path / "elastic")]) == 0
    info = json.loads(capsys.readouterr().out)
    rows = info["budgets"] if isinstance(info, dict) else info
    assert [(r["name"], r["active_parameters"]) for r in rows] == \
        [(r["name"], r["active_parameters"]) for r in family]
    # one protocol: the job and `eval` both read `train.eval_iters` global batches (here two
    # micro-batches each: micro 8, global 16)
    assert cli.main(["eval", "--ckpt", str(tmp_path / "family" / "50pct"), "--json",
                     *FAST]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert abs(evaluated["val_loss"] - models["50pct"]["val_loss"]) <= \
        1e-4 * models["50pct"]["val_loss"]
