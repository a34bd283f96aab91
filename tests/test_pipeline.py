"""`nemo-elastic run`: pretrain -> prepare -> zero-shot budgets -> elastic training, end to end."""

import json

from nemo_elastic.config import load_config
from nemo_elastic.pipeline import run
from tests.test_pretrain import FAST


def test_main_job_end_to_end(tmp_path):
    cfg = load_config("conf/tiny.yaml", [*FAST, f"output_dir={tmp_path}", "train.iters=30",
                                         "train.warmup_iters=3", "train.eval_interval=30",
                                         "train.save_interval=30", "elastic.curriculum.0.iters=4",
                                         "elastic.curriculum.1.iters=2", "elastic.warmup_iters=1",
                                         "elastic.eval_interval=3", "elastic.save_interval=3"])
    table = run(cfg, progress=False)
    assert (tmp_path / "prepared" / "ranking.json").is_file()
    assert (tmp_path / "prepared" / "layer_importance.png").is_file()
    assert json.loads((tmp_path / "zero_shot.json").read_text()) == {"budgets": table["budgets"]}
    # the elastic stage trained the recipe's family from the prepared parent
    assert [r["name"] for r in table["family"]] == ["full", "75pct", "50pct"]
    assert (tmp_path / "elastic" / "family.json").is_file()
    assert json.loads((tmp_path / "elastic/config.json").read_text())["elastic"]["init_checkpoint"] \
        == str(tmp_path / "prepared")
    assert (tmp_path / "zero_shot.png").stat().st_size > 0
    rows = {(r["weights"], r["fraction"]): r for r in table["budgets"]}
    assert len(rows) == 6
    # reordering preserves the function: the full-width model scores the same either way
    full_a, full_b = rows[("original order", 1.0)], rows[("importance order", 1.0)]
    assert abs(full_a["val_loss"] - full_b["val_loss"]) <= 1e-5 * full_a["val_loss"]
    assert full_a["answer_accuracy"] == full_b["answer_accuracy"]
    # smaller budgets have fewer parameters
    params = [rows[("importance order", f)]["parameters"] for f in (1.0, 0.75, 0.5)]
    assert params[0] > params[1] > params[2]
