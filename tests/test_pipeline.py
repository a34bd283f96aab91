"""`nemo-elastic run` end to end at smoke size: pretrain -> prepare -> zero-shot -> elastic
training -> export -> evaluation -> report; every artifact exists and agrees with the others."""

import json
import re

import pytest

from nemo_elastic.config import load_config
from nemo_elastic.main_job import run
from tests.test_pretrain import FAST

SMOKE = [*FAST, "train.iters=30", "train.warmup_iters=3", "train.eval_interval=30",
         "train.save_interval=30", "elastic.curriculum.0.iters=4", "elastic.curriculum.1.iters=2",
         "elastic.warmup_iters=1", "elastic.eval_interval=3", "elastic.save_interval=3"]


def _md_table(text: str, first_header: str) -> list[list[str]]:
    """Rows (cells) of the markdown table whose header starts with `first_header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _number(cell: str) -> float:
    return float(re.match(r"-?[\d,]+(\.\d+)?", cell).group(0).replace(",", ""))


@pytest.mark.slow
def test_main_job_end_to_end(tmp_path):
    from nemo_elastic.cost_model import subnetwork_parameters
    from nemo_elastic.checkpoint import config_from_checkpoint, read_meta
    from nemo_elastic.elastic.subnet import SubNetwork

    cfg = load_config("conf/tiny.yaml", [*SMOKE, f"output_dir={tmp_path}"])
    table = run(cfg, progress=False)
    for rel in ("prepared/ranking.json", "prepared/layer_importance.png", "zero_shot.png",
                "elastic/family.json", "elastic/router_choices.png", "evaluation.json",
                "training_curve.json", "pipeline.json", "report.md", "report_budgets.png",
                "report_training.png"):
        assert (tmp_path / rel).is_file() and (tmp_path / rel).stat().st_size > 0, rel
    zero_shot = json.loads((tmp_path / "zero_shot.json").read_text())
    assert zero_shot["budgets"] == table["budgets"]
    assert json.loads((tmp_path / "elastic/config.json").read_text())["elastic"]["init_checkpoint"] \
        == str(tmp_path / "prepared")
    rows = {(r["weights"], r["fraction"]): r for r in table["budgets"]}
    assert len(rows) == 6
    # reordering preserves the function: the full-width model scores the same either way
    full_a, full_b = rows[("original order", 1.0)], rows[("importance order", 1.0)]
    assert abs(full_a["val_loss"] - full_b["val_loss"]) <= 1e-5 * full_a["val_loss"]
    assert full_a["answer_accuracy"] == full_b["answer_accuracy"]
    params = [rows[("importance order", f)]["parameters"] for f in (1.0, 0.75, 0.5)]
    assert params[0] > params[1] > params[2]

    # every trained budget was exported from the final elastic checkpoint; the standalone
    # checkpoint has exactly the family table's parameters (counted on the loaded model)
    family = json.loads((tmp_path / "elastic/family.json").read_text())
    assert [r["name"] for r in family] == ["full", "75pct", "50pct"] == \
        [r["name"] for r in table["family"]]
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    models = {m["name"]: m for m in evaluation["models"]}
    assert set(models) == {"teacher", "full", "75pct", "50pct"}
    parent_model = config_from_checkpoint(tmp_path / "prepared").model
    for row in family:
        exported = tmp_path / "family" / row["name"]
        meta = read_meta(exported)
        assert meta["budget"] == row["name"]
        assert meta["subnetwork"] == row["subnetwork"]
        assert models[row["name"]]["parameters"] == row["parameters"] == subnetwork_parameters(
            parent_model, SubNetwork.from_dict(row["subnetwork"]))
        assert models[row["name"]]["tokens_per_s"] > 0
    assert models["teacher"]["parameters"] == params[0]
    # the teacher evaluated as a plain model scores as the zero-shot full prefix (one protocol)
    assert abs(models["teacher"]["val_loss"] - full_b["val_loss"]) <= 1e-5 * full_b["val_loss"]
    assert models["teacher"]["answer_accuracy"] == full_b["answer_accuracy"]

    # the training curve: iteration 0 (zero-shot) and every saved elastic checkpoint, 3 budgets
    curve = json.loads((tmp_path / "training_curve.json").read_text())
    iterations = sorted({r["iteration"] for r in curve["records"]})
    assert iterations == [0, 3, 4, 6]
    tokens = {r["iteration"]: r["tokens"] for r in curve["records"]}
    stage1 = 16 * 96  # stage 1: global batch 16 x 96 tokens; stage 2: 8 x 192
    assert tokens == {0: 0, 3: 3 * stage1, 4: 4 * stage1, 6: 4 * stage1 + 2 * 8 * 192}
    last = {r["budget"]: r for r in curve["records"] if r["iteration"] == 6}
    for name in ("full", "75pct", "50pct"):  # the masked final budget == its exported model
        assert abs(last[name]["val_loss"] - models[name]["val_loss"]) <= 1e-4 * last[name]["val_loss"]
        assert last[name]["answer_accuracy"] == models[name]["answer_accuracy"]

    # report.md shows the JSON's numbers
    report = (tmp_path / "report.md").read_text()
    cells = {r[0]: r for r in _md_table(report, "budget")}
    from nemo_elastic.family_check import check_family

    bands = check_family(table["family"]).by_name()
    for name in ("full", "75pct", "50pct", "teacher (parent)"):
        m = models["teacher" if name.startswith("teacher") else name]
        row = cells[name]
        assert _number(row[3]) == m["parameters"]
        if name in bands:  # the band column is family_check's verdict on the stored family
            assert row[4] == bands[name].band_text
        assert _number(row[5]) == round(m["val_loss"], 4)
        assert _number(row[6]) == round(100 * m["answer_accuracy"], 1)
        assert _number(row[7]) == round(m["tokens_per_s"])
    before = {r["budget"]: r for r in curve["records"] if r["iteration"] == 0}
    assert _number(cells["50pct"][8]) == round(before["50pct"]["val_loss"], 4)
    curve_rows = {int(r[1]): r for r in _md_table(report, "tokens")}
    assert sorted(curve_rows) == iterations
    assert _number(curve_rows[6][0]) == tokens[6]
    assert _number(curve_rows[6][6]) == round(last["50pct"]["val_loss"], 4)
    for rel in ("report_budgets.png", "report_training.png", "elastic/router_choices.png",
                "prepared/layer_importance.png"):
        assert f"]({rel})" in report

    # a rerun reuses every stage (nothing retrained, same numbers) and rewrites the report
    again = run(cfg, progress=False)
    stages = json.loads((tmp_path / "pipeline.json").read_text())["stages"]
    assert all(stages[s]["reused"] for s in ("pretrain", "prepare", "zero_shot", "elastic",
                                             "export", "evaluate", "training_curve")), stages
    assert again["evaluation"] == evaluation and again["family"] == table["family"]

    # elastic.training_curve: false skips that stage (the rest is reused) and the report says so
    third = run(load_config("conf/tiny.yaml", [*SMOKE, f"output_dir={tmp_path}",
                                                "elastic.training_curve=false"]), progress=False)
    assert third["training_curve"] is None and third["evaluation"] == evaluation
    assert "Not measured (`elastic.training_curve: false`)" in (tmp_path / "report.md").read_text()
