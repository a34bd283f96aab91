"""Issue 20, class 1: a resume with a changed recipe can never continue (or damage) a run.

Every field of the family/training fingerprint (`nemo_elastic.checkpoint.fingerprint`) is changed in turn
on a real trained run: each refusal is one line naming the field, the old and the new value and
the way out, and leaves every byte of the run's checkpoints untouched; the safe changes (a new
order of the same budgets, a longer last stage) are accepted, and the router's rows follow the
budget names (the family by name is the same whatever the order)."""

import copy
import hashlib
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from nemo_elastic.config import ConfigError, load_config, to_dict
from nemo_elastic.checkpoint.fingerprint import REFUSED_FIELDS, check_resume
from tests.test_train import _cfg, _parent


def _tree_digest(root):
    """Every file of the run but its `.lock` (the refused run held the lock a moment)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def _with_elastic(cfg, **changes):
    """`cfg` with its elastic section's keys replaced (the order of a dict kept as given)."""
    data = to_dict(cfg)
    data["elastic"].update(changes)
    if "budgets" in changes:  # stage probabilities name budgets: keep them loadable
        for stage in data["elastic"]["curriculum"]:
            stage["budget_probs"] = {n: p for n, p in (stage["budget_probs"] or {}).items()
                                     if n in changes["budgets"]} or None
    return load_config(base=data)


def _build(cfg):
    """(trainer, cfg, init, teacher) inside an initialized runtime (caller's `with`)."""
    from nemo_elastic.training.elastic.trainer import parent_config
    from nemo_elastic.training.train import build_trainer

    cfg, init, teacher = parent_config(cfg)
    return cfg, init, teacher, lambda info: build_trainer(cfg, init, teacher, info)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real elastic run of 2 iterations (no closing report): RUN/elastic/checkpoints."""
    import shutil

    from nemo_elastic import runtime
    from nemo_elastic.training.loop import StopRequest

    tmp = tmp_path_factory.mktemp("guard")
    _parent(tmp)
    shutil.copytree(tmp / "parent", tmp / "parent_copy")
    cfg, init, teacher, build = _build(_cfg(tmp, stage1=1, stage2=1))
    with runtime.distributed(cfg.parallel) as info:
        trainer = build(info)
        with StopRequest() as stop:
            trainer.run(stop, resume=False)
        router = {k: v.clone() for k, v in trainer.router.state_dict().items()}
    return tmp, router


REFUSALS = [  # (recipe change, the field the one line must name)
    (dict(budgets={"full": 1.0, "75pct": 0.75, "demi": 0.5}), "elastic.budgets"),
    (dict(budgets={"full": 1.0, "75pct": 0.75}), "elastic.budgets"),
    (dict(budgets={"full": 1.0, "75pct": 0.75, "50pct": 0.45}), "elastic.budgets"),
    (dict(axes=["hidden", "ffn"]), "elastic.axes"),
    (dict(width_fractions=[1.0, 0.5]), "elastic.width_fractions"),
    (dict(router={"hidden_dim": 8}), "elastic.router.hidden_dim"),
    (dict(router={"hidden_dim": 16, "mode": "soft"}), "elastic.router.mode"),
    (dict(router={"hidden_dim": 16, "init": "random"}),  # conf/tiny.yaml starts at zero_shot
     "elastic.router (init, init_margin, init_batches)"),
    (dict(router={"hidden_dim": 16, "init_margin": 2.0}),
     "elastic.router (init, init_margin, init_batches)"),
    (dict(seed=99), "elastic.seed"),
    (dict(budget_sampling="all"), "elastic.budget_sampling"),
    (dict(heterogeneous=["ffn"]), "elastic.heterogeneous"),
    (dict(budget_type="memory", budgets={"full": 0.0084, "75pct": 0.00842, "50pct": 0.00843}),
     "elastic.budget_type"),
]


@pytest.mark.slow
@pytest.mark.parametrize("change, field", REFUSALS, ids=[f for _, f in REFUSALS])
def test_a_changed_family_or_training_is_refused_and_the_run_untouched(trained, change, field):
    """Through `train` itself: refused before the model is built, not one byte changed."""
    from nemo_elastic.training.train import train

    tmp, _ = trained
    run = tmp / "run/elastic"
    before = _tree_digest(run)
    cfg = _with_elastic(_cfg(tmp, stage1=1, stage2=1), **change)
    with pytest.raises(ConfigError) as err:
        train(cfg, progress=False)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"{field}=") and \
        "another elastic.output_dir" in line, line
    assert _tree_digest(run) == before


@pytest.mark.slow
@pytest.mark.parametrize("change", ["data.seed=7", "data.synthetic.max_operand=9",
                                    "data.synthetic.num_train=3"])
def test_a_changed_data_stream_is_refused_and_the_run_untouched(trained, change):
    """The checkpoint's data position counts samples of the stream it trained on: another seed
    or corpus was silently continued (and a smaller corpus failed with a ValueError traceback
    from the iterator's state).  Refused in one line naming the field, both values and the way
    out, not one byte of the run changed; pretraining resumes through the same check."""
    from nemo_elastic.training.train import train

    tmp, _ = trained
    run = tmp / "run/elastic"
    before = _tree_digest(run)
    field, value = change.split("=")
    with pytest.raises(ConfigError) as err:
        train(_cfg(tmp, change, stage1=1, stage2=1), progress=False)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"{field}={value}") and \
        "which was trained on " + field in line and "another elastic.output_dir" in line, line
    assert _tree_digest(run) == before


@pytest.mark.slow
def test_teacher_init_and_curriculum_changes(trained, caplog):
    import logging

    from nemo_elastic.checkpoint.fingerprint import guard_run_folder, run_fingerprint
    from nemo_elastic.training.elastic.trainer import parent_config
    from nemo_elastic.training.train import train

    tmp, _ = trained
    run = tmp / "run/elastic"
    before = _tree_digest(run)
    import shutil

    other = tmp / "other_teacher"  # a checkpoint with other contents (the run's, copied)
    if not other.exists():
        shutil.copytree(run / "checkpoints/iter_0000002", other)
    cases = [  # another teacher; stages already run changed
        ([f"elastic.distill.teacher={other}"], "elastic.distill.teacher"),
        ([f"elastic.distill.teacher={run / 'checkpoints'}"], "elastic.output_dir"),
        (["elastic.curriculum.0.seq_length=32"], "elastic.curriculum[0].seq_length"),
        (["elastic.curriculum.1.budget_probs.full=5"], "elastic.curriculum[1].budget_probs"),
    ]
    for extra, field in cases:
        with pytest.raises(ConfigError, match=rf"^{re.escape(field)}="):
            train(_cfg(tmp, *extra, stage1=1, stage2=1), progress=False)
        assert _tree_digest(run) == before, field
    caplog.set_level(logging.INFO, logger="nemo_elastic.checkpoint.fingerprint")
    # --no-resume is a deliberate fresh start: the difference is a warning, not a refusal
    cfg, init, teacher = parent_config(_cfg(tmp, "elastic.seed=5", stage1=1, stage2=1))
    guard_run_folder(run / "checkpoints", run_fingerprint(cfg, init, teacher), False)
    assert "--no-resume in" in caplog.text and "elastic.seed=5 differs" in caplog.text
    # the same init contents elsewhere, and a longer last stage: accepted and logged
    cfg, init, teacher = parent_config(_cfg(tmp, stage1=1, stage2=3, init="parent_copy"))
    guard_run_folder(run / "checkpoints", run_fingerprint(cfg, init, teacher), True)
    assert "moved from" in caplog.text and "now ends at iteration 4 (was 2)" in caplog.text


@pytest.mark.slow
def test_router_rows_are_bound_to_budget_names(trained):
    """The same budgets listed in another order: the resumed router's column of each budget is
    the one that budget trained (not the one at its old position)."""
    from nemo_elastic import runtime

    tmp, saved = trained
    order = ["50pct", "full", "75pct"]
    cfg = _with_elastic(_cfg(tmp, stage1=1, stage2=1),
                        budgets={"50pct": 0.5, "full": 1.0, "75pct": 0.75})
    cfg, _, _, build = _build(cfg)
    with runtime.distributed(cfg.parallel) as info:
        trainer = build(info)
        assert trainer.resume(True) == 2
        loaded = trainer.router.state_dict()
    old = ["full", "75pct", "50pct"]
    for key, value in saved.items():
        if key.endswith("net.0.weight"):
            for j, name in enumerate(order):
                assert torch.equal(loaded[key][:, j], value[:, old.index(name)]), (key, name)
        elif key.startswith("prior_"):  # router.init=zero_shot offsets: one row per budget
            for j, name in enumerate(order):
                assert torch.equal(loaded[key][j], value[old.index(name)]), (key, name)
        else:
            assert torch.equal(loaded[key], value), key
    assert any(k.startswith("prior_") for k in saved)  # conf/tiny.yaml: router.init=zero_shot


# ------------------------------------------------------------- the comparison itself (no torch)

def test_every_router_field_is_in_the_fingerprint():
    """A RouterConfig field missing from the fingerprint would let a resume change it silently
    (hard_scale and family_choice once were)."""
    import dataclasses

    from nemo_elastic.checkpoint import fingerprint as fp
    from nemo_elastic.config_elastic import RouterConfig

    recorded = {"hidden_dim", "mode"} | set(fp.ROUTER_SCHEDULE_KEYS) | set(fp.ROUTER_OPTION_KEYS) \
        | set(fp.ROUTER_INIT_KEYS)
    assert {f.name for f in dataclasses.fields(RouterConfig)} == recorded


def test_a_changed_router_option_is_logged_on_resume(caplog):
    from pathlib import Path

    old, new = _fingerprint(), _fingerprint()
    old["router_options"] = {"family_choice": "argmax", "hard_scale": "probability"}
    new["router_options"] = {"family_choice": "in_band", "hard_scale": "probability"}
    with caplog.at_level("WARNING"):
        check_resume(Path("/runs/x/checkpoints/iter_0000004"), {"fingerprint": old}, new, 4)
    assert any("family_choice" in r.getMessage() and "in_band" in r.getMessage()
               for r in caplog.records)

def test_a_run_recorded_before_router_init_existed_started_at_random():
    """A fingerprint without `router_init` (every run before the option: a random start) under
    a zero_shot recipe is refused by the guard naming the option (before: accepted, then the
    router's load failed with 'Missing key(s) prior_hidden' blamed on the budgets); the same
    recipe with init random resumes."""
    from pathlib import Path

    old, new = _fingerprint(), _fingerprint()
    del old["router_init"]
    new["router_init"] = {"init": "zero_shot", "init_margin": 8.0, "init_batches": 8}
    ckpt = Path("/runs/x/checkpoints/iter_0000004")
    with pytest.raises(ConfigError, match=re.escape(
            "elastic.router (init, init_margin, init_batches)={'init': 'zero_shot'} differs "
            "from the run in '/runs/x', whose checkpoint iter_0000004 was trained with "
            "elastic.router (init, init_margin, init_batches)={'init': 'random'} (the run was "
            "written before this option was recorded")):
        check_resume(ckpt, {"fingerprint": old}, new, 4)
    new["router_init"]["init"] = "random"
    check_resume(ckpt, {"fingerprint": old}, new, 4)


def _fingerprint():
    return {"version": 1, "budgets": {"full": 1.0, "half": 0.5}, "budget_type": "params",
            "memory_spec": None, "axes": ["hidden", "ffn"], "width_fractions": [1.0, 0.5],
            "choices": {"hidden": [64, 32], "ffn": [128, 64]}, "heterogeneous": [],
            "depth_choices": [], "router_hidden_dim": 16, "router_mode": "hard",
            "router_init": {"init": "random", "init_margin": 2.0, "init_batches": 8},
            "teacher_mode": "frozen", "budget_sampling": "one", "seed": 1,
            "init_checkpoint": {"path": "/a", "sha256": "aa"},
            "teacher": {"path": "/a", "sha256": "aa"}, "execution": "sliced",
            "loss": {"weight": 1.0}, "distill_temperature": 1.0, "distill_ce_weight": 0.0,
            "router_schedule": {"lr": 0.01},
            "curriculum": [{"name": "s1", "iters": 4, "budget_probs": {"full": .5, "half": .5},
                            "seq_length": 8, "global_batch_size": 2, "micro_batch_size": 1},
                           {"name": "s2", "iters": 4, "budget_probs": {"full": .5, "half": .5},
                            "seq_length": 8, "global_batch_size": 2, "micro_batch_size": 1}]}


_OTHER = {"budgets": {"full": 1.0, "demi": 0.5}, "budget_type": "memory",
          "memory_spec": {"batch_size": 1}, "axes": ["hidden"], "width_fractions": [1.0],
          "choices": {"hidden": [64]}, "heterogeneous": ["ffn"], "depth_choices": [2],
          "router_hidden_dim": 8, "router_mode": "soft", "teacher_mode": "trainable",
          "budget_sampling": "all", "seed": 2,
          "router_init": {"init": "zero_shot", "init_margin": 2.0, "init_batches": 8}}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(sorted(REFUSED_FIELDS) + ["init_checkpoint", "teacher"]),
       iteration=st.integers(1, 8))
def test_every_fingerprint_field_is_refused_by_name(tmp_path_factory, key, iteration):
    from pathlib import Path

    old, new = _fingerprint(), _fingerprint()
    new[key] = {"path": "/a", "sha256": "bb"} if key in ("init_checkpoint", "teacher") \
        else _OTHER[key]
    ckpt = Path("/runs/x/checkpoints/iter_0000004")
    with pytest.raises(ConfigError) as err:
        check_resume(ckpt, {"fingerprint": old}, new, iteration)
    field = REFUSED_FIELDS.get(key) or {"init_checkpoint": "elastic.init_checkpoint",
                                        "teacher": "elastic.distill.teacher"}[key]
    assert str(err.value).startswith(f"{field}=") and "another elastic.output_dir" in str(err.value)


@settings(max_examples=40, deadline=None)
@given(iteration=st.integers(1, 8), grow=st.integers(-3, 6), stage=st.sampled_from([0, 1]))
def test_curriculum_lengths_may_change_only_where_safe(iteration, grow, stage):
    from pathlib import Path

    old, new = _fingerprint(), copy.deepcopy(_fingerprint())
    new["curriculum"][stage]["iters"] = max(1, 4 + grow)
    begin = 4 * stage
    old_end, new_end = begin + 4, begin + new["curriculum"][stage]["iters"]
    started = begin < iteration
    safe = not started or old_end == new_end or (old_end >= iteration and new_end >= iteration)
    ckpt = Path("/runs/x/checkpoints/iter_0000004")
    if safe:
        check_resume(ckpt, {"fingerprint": old}, new, iteration)
    else:
        with pytest.raises(ConfigError, match=rf"^elastic.curriculum\[{stage}\].iters="):
            check_resume(ckpt, {"fingerprint": old}, new, iteration)


def test_a_checkpoint_without_fingerprint_still_compares_its_budgets(caplog):
    from pathlib import Path

    meta = {"family": [{"name": "full", "target": 1.0, "budget_type": "params"},
                       {"name": "half", "target": 0.5, "budget_type": "params"}]}
    new = _fingerprint()
    check_resume(Path("/r/checkpoints/iter_1"), meta, new, 1)  # same budgets: accepted
    assert "predates the training fingerprint" in caplog.text
    new["budgets"] = {"full": 1.0, "demi": 0.5}
    with pytest.raises(ConfigError, match=r"^elastic.budgets="):
        check_resume(Path("/r/checkpoints/iter_1"), meta, new, 1)


# ------------------------------------------------------------- class 6: refused when loaded

@pytest.mark.parametrize("name, problem", [
    ("../../escape", "starts with '.'"), ("", "is empty"), ("/abs/path", "path separator"),
    ("a\nb", "control character"), ("x" * 300, "longer than 100 bytes"),
    ("a/b", "path separator"), (" pad", "space"),
])
def test_budget_names_that_cannot_be_folders_are_refused_at_load(tmp_path, name, problem):
    cfg = _cfg(tmp_path)
    with pytest.raises(ConfigError, match=rf"^elastic.budgets=.*a budget name .*{problem}"):
        _with_elastic(cfg, budgets={"full": 1.0, name: 0.5})


def test_never_drawn_and_unreachable_budgets_are_refused_at_load(tmp_path, caplog):
    from nemo_elastic.cost_model import GB, MemorySpec, count_memory

    cfg = _cfg(tmp_path)
    with pytest.raises(ConfigError, match=r"^elastic.budgets.75pct=0.75: is never trained"):
        _cfg(tmp_path, "elastic.curriculum.0.budget_probs={full: 1, 50pct: 1}",
             "elastic.curriculum.1.budget_probs={full: 1, 75pct: 0, 50pct: 1}")
    _cfg(tmp_path, "elastic.curriculum.0.budget_probs={full: 1, 50pct: 1}")  # only a warning
    assert "budget_probs leaves out ['75pct']" in caplog.text
    full_gb = count_memory(cfg.model, MemorySpec()) / GB
    with pytest.raises(ConfigError, match=r"elastic.budgets.50pct=0.0001: \(100.00 kB\) is below "
                       r"the smallest memory the elastic axes can reach, [0-9.]+ [kMG]B"):
        _cfg(tmp_path, "elastic.budget_type=memory", f"elastic.budgets.full={full_gb}",
             f"elastic.budgets.75pct={0.999 * full_gb}", "elastic.budgets.50pct=0.0001")


def test_no_command_writes_over_the_parent_of_the_run_it_reads(trained, caplog):
    """The run's init checkpoint (= its teacher) is an input of every command that reads the
    run: `extract --budget 50pct --out PARENT --overwrite` replaced the teacher with a 50 %
    model, after which the run's resume was refused for 'elastic.choices' (the recipe was
    blamed).  Each writer refuses in one line naming the recorded field; the parent and the run
    stay byte for byte."""
    from nemo_elastic.cli import main

    tmp, _ = trained
    run, parent = tmp / "run/elastic", tmp / "parent"
    before = _tree_digest(parent), _tree_digest(run)
    for argv in (["extract", "--budget", "full"], ["extract", "--hidden-size", "16"],
                 ["export", "--format", "hf"], ["prepare"]):
        caplog.clear()
        assert main([*argv, "--ckpt", str(run), "--out", str(parent), "--overwrite"]) == 2, argv
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and f"is the input --ckpt's elastic.init_checkpoint=" \
            f"'{parent.resolve()}' itself" in errors[0], (argv, errors)
    caplog.clear()
    assert main(["export", "--ckpt", str(run), "--all", "--format", "megatron", "--out",
                 str(parent / "family")]) == 2
    assert "inside the input --ckpt's elastic.init_checkpoint" in caplog.text or \
        "inside the checkpoint" in caplog.text
    assert (_tree_digest(parent), _tree_digest(run)) == before


def test_a_resume_reports_an_accepted_change_once(trained, tmp_path, caplog):
    """`train` guards the run folder before building and handed the trainer the same
    fingerprint, which guarded it again: every accepted change ('stage ... now ends at
    iteration 3') was logged twice, as if two stages had changed.  Once now; the resumed run
    trains the added iteration."""
    import logging
    import shutil

    from nemo_elastic.training.train import train

    tmp, _ = trained
    shutil.copytree(tmp / "run", tmp_path / "run")
    caplog.set_level(logging.INFO, logger="nemo_elastic")
    result = train(_cfg(tmp, f"output_dir={tmp_path / 'run'}", stage1=1, stage2=2),
                   progress=False)
    said = [r for r in caplog.records if "now ends at iteration 3 (was 2)" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]
    assert [h["iteration"] for h in result.history] == [3]
