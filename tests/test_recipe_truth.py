"""A recipe, its overrides and a trained family tell the truth about themselves (cheap: no
training).

* defaults fit any run length: unset warmups are a share of the run; a warmup that eats the
  run is warned about; an unset elastic.lr says it is the paper's 12B value;
* overrides: a mapping replaces (and says what it dropped), `{a:1}` without a space is refused,
  a second --config is refused;
* memory budgets take units and are shown with them;
* band and order of a family (`family_check`) against an independent recount of the rows, and
  `export` refuses an out-of-order family unless --allow-unordered.
"""

import logging
import math

import pytest
from hypothesis import given, settings, strategies as st

from nemo_elastic import cli
from nemo_elastic.config import ConfigError, load_config
from nemo_elastic.config_elastic import PAPER_LR, WARMUP_FRACTION
from nemo_elastic.family_check import check_family

TINY = "conf/tiny.yaml"


def _hand_written(tmp_path, stages: str = "[{name: s, iters: 80}]", extra: str = ""):
    """conf/tiny.yaml with an elastic section a user would write: no lr, no warmups."""
    import yaml

    data = yaml.safe_load(open(TINY))
    data["elastic"] = yaml.safe_load(
        "{init_checkpoint: x, budgets: {full: 1.0, half: 0.5}, curriculum: " + stages + extra
        + "}")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("stages,total", [("[{name: s, iters: 80}]", 80),
                                          ("[{name: a, iters: 300}, {name: b, tokens: 15360}]",
                                           300 + 15360 // (16 * 96))])
def test_unset_warmups_are_a_share_of_the_run(tmp_path, caplog, stages, total):
    caplog.set_level(logging.WARNING)
    e = load_config(_hand_written(tmp_path, stages)).elastic
    assert e.total_iters == total
    assert e.warmup_iters == e.router.warmup_iters == int(WARMUP_FRACTION * total)
    assert e.lr == PAPER_LR and e.min_lr == pytest.approx(PAPER_LR / 10)
    assert any("elastic.lr is not set" in r.getMessage() for r in caplog.records)
    assert not e.warmup_warnings()


def test_a_warmup_that_eats_the_run_is_warned(tmp_path):
    e = load_config(_hand_written(tmp_path), ["elastic.warmup_iters=60",
                                              "elastic.router.warmup_iters=60"]).elastic
    warnings = e.warmup_warnings()
    assert len(warnings) == 2 and all("75% of the run's 80" in w for w in warnings)


def test_a_mapping_override_replaces_and_says_so(caplog):
    caplog.set_level(logging.INFO, logger="nemo_elastic")
    cfg = load_config(TINY, ["elastic.budgets={full: 1.0, half: 0.5}",
                             "elastic.curriculum=[{name: s, iters: 20}]"])
    assert cfg.elastic.budgets == {"full": 1.0, "half": 0.5}
    assert any("dropped: 75pct, 50pct" in r.getMessage() for r in caplog.records)
    one = load_config(TINY, ["elastic.budgets.half=0.55"]).elastic.budgets  # a key: merged
    assert one == {"full": 1.0, "75pct": 0.75, "50pct": 0.5, "half": 0.55}


def test_a_glued_mapping_is_refused_with_the_spaced_form():
    with pytest.raises(ConfigError, match=r"'full:0.5' reads as one key.*"
                                          r"elastic.budgets=\{full: 0.5\}"):
        load_config(TINY, ["elastic.budgets={full:0.5}"])


def test_a_second_config_is_refused(capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["train", "--config", TINY, "--config", "conf/nemotron_nano_12b.yaml"])
    assert err.value.code == 2
    assert "--config is given twice" in capsys.readouterr().err


@pytest.mark.parametrize("text,gb", [("400 kB", 4e-4), ("0.3MB", 3e-4), ("256KiB", 2**18 / 1e9),
                                     ("0.0002", 2e-4)])
def test_memory_budgets_take_units(text, gb):
    cfg = load_config(TINY, ["elastic.budget_type=memory", "elastic.memory={seq_length: 256}",
                             f"elastic.budgets={{full: 0.00041, b: {text}}}",
                             "elastic.curriculum=[{name: s, iters: 20}]"])
    assert cfg.elastic.budgets["b"] == pytest.approx(gb)


def test_bad_units_name_the_field():
    with pytest.raises(ConfigError, match=r"elastic.budgets.full='1 parsec'"):
        load_config(TINY, ["elastic.budgets={full: 1 parsec}"])


def _row(name, target, fraction, kind="params", tol=0.05, band="symmetric"):
    return {"name": name, "target": target, "budget_type": kind, "parameter_fraction": fraction,
            "memory_bytes": fraction * 1e9 * 0.01, "tolerance": tol, "band": band}


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.floats(0.05, 1.0), st.floats(0.01, 1.0)), min_size=1, max_size=5,
                unique_by=lambda t: t[0]),
       st.sampled_from(["symmetric", "ceiling"]), st.floats(0.0, 0.2))
def test_family_check_against_a_recount(pairs, band, tol):
    rows = [_row(f"b{i}", t, a, tol=tol, band=band) for i, (t, a) in enumerate(pairs)]
    check = check_family(rows)
    for row, b in zip(rows, check.budgets):
        ratio = row["parameter_fraction"] / row["target"]
        low, high = 1 - tol, 1 + (0 if band == "ceiling" else tol)
        if not (math.isclose(ratio, low, rel_tol=1e-6) or math.isclose(ratio, high, rel_tol=1e-6)):
            assert b.inside == (low < ratio <= high)
    inverted = any(a["target"] > b["target"] and a["parameter_fraction"] < b["parameter_fraction"]
                   for a in rows for b in rows)
    assert check.in_order == (not inverted)


def test_the_reported_cases_are_flagged():
    """The issue's numbers, all outside their +-5 % (relative) band: 50pct at 47.3 %, 40pct at
    36.4 %, 45pct at 40.0 %, a heterogeneous 80pct at 89.9 %; 51 % is inside; 60pct (77.7 %)
    larger than 80pct (63.6 %)."""
    check = check_family([_row("50pct", 0.5, 0.473), _row("40pct", 0.4, 0.364),
                          _row("45pct", 0.45, 0.400), _row("80pct", 0.8, 0.899),
                          _row("51", 0.5, 0.51)])
    assert [b.inside for b in check.budgets] == [False, False, False, False, True]
    pp = check_family([_row("80pct", 0.8, 0.636), _row("60pct", 0.6, 0.777)])
    assert not pp.in_order and "60pct" in pp.order_problems[0]
    mem = check_family([_row("big", 0.002, 0.18, "memory"), _row("small", 0.001, 0.2, "memory")])
    assert not mem.in_order  # memory budgets compare memory


def test_export_refuses_an_out_of_order_family(tmp_path, caplog):
    from tests.test_export_budget import save_hand_made_family

    import json

    from nemo_elastic.checkpoint import META_FILE, META_SHA_KEY, meta_digest

    ckpt = save_hand_made_family(tmp_path / "ckpt")
    meta = json.loads((ckpt / META_FILE).read_text())
    by_name = {r["name"]: r for r in meta["family"]}
    by_name["uniform"]["target"], by_name["shallow"]["target"] = 0.2, 0.9  # swap the order
    meta[META_SHA_KEY] = meta_digest(meta)  # as training would have sealed such a family
    (ckpt / META_FILE).write_text(json.dumps(meta))
    assert cli.main(["export", "--ckpt", str(ckpt), "--budget", "uniform", "--format",
                     "megatron", "--out", str(tmp_path / "out")]) == 2
    assert "OUT OF ORDER" in caplog.text and "--allow-unordered" in caplog.text
    assert not (tmp_path / "out").exists()
    assert cli.main(["export", "--ckpt", str(ckpt), "--budget", "uniform", "--format",
                     "megatron", "--out", str(tmp_path / "out"), "--allow-unordered"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_router_lands_every_budget_inside_its_band_on_the_default_lattice(seed):
    """The cause of budgets outside their band: a choice lattice coarser than the band.  In a
    router-only run of the training schedule (bench/bench_router_band.py: budget loss + a pull
    toward larger models, 150 iterations x 4 micro-batches, six budgets 1.0 .. 0.4), every
    budget of the default 1/16-step lattice lands inside +-5 %; the former 1/8-step lattice
    missed some of them with these seeds (kept as the comparison)."""
    from bench.bench_router_band import FINE, FRACTIONS, SETUPS, run

    from nemo_elastic.config_elastic import ElasticConfig

    assert ElasticConfig(iters=10).width_fractions == FINE[:9]  # the default is the fine lattice
    fine = run(SETUPS["4 axes"], "expected", seed, 150, 4, 0.05, {}, FINE)
    assert fine.ok, fine.summary()
    coarse = run(SETUPS["4 axes"], "expected", seed, 150, 4, 0.05, {}, FRACTIONS)
    assert coarse.outside, "the comparison lost its point: the coarse lattice now lands too"


def test_a_run_that_wrote_nothing_leaves_no_lock_only_folder(tmp_path):
    from nemo_elastic.run.lock import LOCK_FILE, OutputLock

    with pytest.raises(RuntimeError):
        with OutputLock(tmp_path / "failed", "output_dir"):
            assert (tmp_path / "failed" / LOCK_FILE).is_file()
            raise RuntimeError("start-up failed")
    assert not (tmp_path / "failed").exists()
    with OutputLock(tmp_path / "ran", "output_dir"):
        (tmp_path / "ran" / "metrics.jsonl").write_text("{}\n")
    assert (tmp_path / "ran" / "metrics.jsonl").is_file()  # a run's outputs stay


def test_missing_data_files_name_the_recipe_fields(tmp_path):
    from nemo_elastic.data.loaders import build_tokenizer

    cfg = load_config(TINY, ["data.source=indexed", f"data.indexed.prefix={tmp_path / 'c'}",
                             f"data.indexed.tokenizer={tmp_path / 'tok.json'}"])
    with pytest.raises(ConfigError, match=r"^data.indexed.tokenizer='.*tok.json': no such file"):
        build_tokenizer(cfg)
