"""Every sub-network the router can produce is usable: any mix of elastic axes, heterogeneous
axes, dropped layers (depth_choices), parameter or memory budgets.

Families are drawn the way `nemo-elastic train` makes them: an `ElasticRouter` built from a
drawn `elastic:` section (random init, random layer ranking) gives each budget its argmax
sub-network, and the checkpoint stores the recipe's elastic section next to the family, as
training does.  (A family trained with `depth_choices` could not be used at all: every child
was validated against the parent's elastic section.)

* fast: for every budget the child config builds and the physically sliced model computes what
  the masked nested model computes (oracle: the masked model);
* slow: every family command on every budget: `export --all` in both formats (each budget
  reloaded from disk and checked against the masked model by the export itself), `extract
  --all`, `generate` at every budget, `eval --all-budgets`.
"""

import json

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st

from nemo_elastic import cli, runtime
from nemo_elastic.cost_model import GB, MemorySpec, smallest_fraction, \
    smallest_memory
from nemo_elastic.checkpoint import read_meta, save_checkpoint
from nemo_elastic.config import ParallelConfig
from nemo_elastic.elastic.specs import build_elastic_model
from nemo_elastic.export.slicing import child_config, slice_model
from nemo_elastic.router import ElasticRouter
from tests.conftest import perturb, tiny_config

PATTERN = "M-*M-"  # 5 layers: Mamba, MLP, attention, Mamba, MLP
AXES = ["hidden", "mamba_heads", "mamba_head_dim", "attention_heads", "ffn"]
MEMORY = {"batch_size": 1, "seq_length": 64, "bytes_per_param": 2, "bytes_per_cache": 2}
SEQ = 21


@st.composite
def elastic_sections(draw):
    """An `elastic:` section over any combination of axes (at least one axis or depth)."""
    axes = draw(st.lists(st.sampled_from(AXES), unique=True, max_size=len(AXES)))
    depth = draw(st.sampled_from([[], [5, 4], [5, 3], [4, 3, 2]]))
    if not axes and not depth:
        depth = [5, 4]
    hetero = draw(st.lists(st.sampled_from([a for a in axes if a != "hidden"] or ["ffn"]),
                           unique=True)) if len(axes) > 1 else []
    hetero = [a for a in hetero if a in axes]
    memory = draw(st.booleans())
    return dict(axes=axes, heterogeneous=hetero, depth_choices=depth,
                budget_type="memory" if memory else "params",
                width_fractions=[1.0, 0.75, 0.5], seed=draw(st.integers(0, 2**16)),
                ranking_seed=draw(st.integers(0, 2**16)))


def _family(section: dict):
    """(cfg with the elastic section, family rows) as training would store them."""
    section = dict(section)
    ranking_seed = section.pop("ranking_seed")
    fractions = [1.0, 0.75, 0.5]
    el = dict(iters=4, warmup_iters=0, router={"warmup_iters": 0}, **section)
    # targets between the smallest and the largest size the axes can reach (a target outside
    # is refused at load): the same shares of the reachable range
    from nemo_elastic.config_elastic import ElasticConfig

    model = tiny_config({"hybrid_layer_pattern": PATTERN}).model
    probe = ElasticConfig(**dict(el, budget_type="params", budgets={"p": 1.0}))
    if section["budget_type"] == "memory":
        spec = MemorySpec(**MEMORY)
        low, high = (smallest_memory(model, probe, spec, largest=big) / GB
                     for big in (False, True))
        el.update(memory=MEMORY)
    else:
        low, high = (smallest_fraction(model, probe, largest=big) for big in (False, True))
    el["budgets"] = {f"{section['budget_type'][0]}{int(100 * f)}": low + f * (high - low)
                     for f in fractions}
    cfg = tiny_config({"hybrid_layer_pattern": PATTERN}, elastic=el)
    ranking = torch.randperm(cfg.model.num_layers,
                             generator=torch.Generator().manual_seed(ranking_seed)).tolist()
    router = ElasticRouter(cfg.model, cfg.elastic, total_iters=4, layer_ranking=ranking)
    return cfg, router.family(), router.family_table()


DEPTH_HETERO_MEMORY = dict(axes=["hidden", "ffn", "mamba_heads"], heterogeneous=["ffn"],
                           depth_choices=[5, 4, 3], budget_type="memory",
                           width_fractions=[1.0, 0.75, 0.5], seed=1, ranking_seed=2)


@settings(max_examples=8, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@example(section=DEPTH_HETERO_MEMORY)
@given(section=elastic_sections())
def test_every_router_subnetwork_slices_to_its_masked_model(section):
    cfg, family, _ = _family(section)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, SEQ),
                           generator=torch.Generator().manual_seed(0))
    pos = torch.arange(SEQ)[None]
    with runtime.distributed(ParallelConfig()):
        model = perturb(build_elastic_model(cfg), seed=3).eval()
        for name, subnet in family.items():
            child_cfg = child_config(cfg, subnet)  # raised for dropped layers / memory budgets
            assert child_cfg.elastic is None
            assert child_cfg.model.num_layers == len(subnet.kept_layers)
            _, child = slice_model(model, cfg, subnet, spec_backend="local")
            with torch.no_grad():
                masked = model(tokens, pos, None, subnetwork=subnet).float()
                sliced = child.eval()(tokens, pos, None).float()
            err = ((sliced - masked).norm() / masked.norm()).item()
            assert err <= 1e-5, (name, subnet, err)


def _save(tmp_path, section) -> tuple:
    cfg, family, rows = _family(section)
    ckpt = tmp_path / "ckpt"
    with runtime.distributed(ParallelConfig()):
        model = perturb(build_elastic_model(cfg), seed=3)
        save_checkpoint(ckpt, cfg=cfg, model=model, kind="elastic", extra_meta={"family": rows})
    return ckpt, family, rows


@pytest.mark.slow
@settings(max_examples=2, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@example(section=DEPTH_HETERO_MEMORY)
@example(section=dict(DEPTH_HETERO_MEMORY, axes=["attention_heads", "mamba_head_dim"],
                      heterogeneous=["attention_heads"], depth_choices=[4, 2],
                      budget_type="params"))
@given(section=elastic_sections())
def test_every_family_command_on_every_budget(tmp_path_factory, capsys, section):
    tmp = tmp_path_factory.mktemp("family")
    ckpt, family, rows = _save(tmp, section)
    names = list(family)
    for fmt, extra in (("megatron", []), ("hf", ["--hf-per-layer"])):
        out = tmp / fmt
        assert cli.main(["export", "--ckpt", str(ckpt), "--all", "--format", fmt, "--out",
                         str(out), "--allow-unordered", *extra]) == 0, (fmt, section)
        for name in names:  # the export verified each reloaded budget against the masked model
            assert json.loads((out / name / "export.json").read_text())["parameters"] == \
                next(r["parameters"] for r in rows if r["name"] == name)
    assert cli.main(["extract", "--ckpt", str(ckpt), "--all", "--out", str(tmp / "x")]) == 0
    for name, subnet in family.items():
        assert read_meta(tmp / "x" / name)["subnetwork"] == subnet.to_dict()
    capsys.readouterr()
    argv = ["generate", "--ckpt", str(ckpt), "--prompt", "1+2", "--max-new-tokens", "2"]
    for name in names:
        argv += ["--budget", name]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert all(f"[{name}]" in printed for name in names), printed
    assert cli.main(["eval", "--ckpt", str(ckpt), "--all-budgets", "--json", "--no-progress",
                     "train.eval_iters=1", "train.eval_accuracy_samples=0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [b["name"] for b in result["budgets"]] == names
    for b, row in zip(result["budgets"], rows):
        assert b["parameters"] == row["parameters"] and b["val_loss"] > 0


def test_a_memory_family_is_shown_in_bytes_wherever_a_budget_is_named(tmp_path, capsys, caplog):
    """Memory budgets through the commands a user reads them in: every budget's target and
    its memory in bytes units (the oracle: the family rows `train` stores, as `readable_bytes`)
    in `info`, `eval --all-budgets`, the `extract` / `export` log line, `export.json`, the main
    job's report rows and header, and the family check's order text.  Before, `eval
    --all-budgets` and the main job's report printed a 210 kB target as '0.00021' (no unit) and
    no memory at all, the order check '0.0002103 GB', and extract / export only parameters."""
    import logging

    from nemo_elastic.family_check import check_family
    from nemo_elastic.report.main_job import family_rows
    from nemo_elastic.units import readable_bytes

    ckpt, family, rows = _save(tmp_path, dict(DEPTH_HETERO_MEMORY))
    shown = {r["name"]: (readable_bytes(r["target"] * GB), readable_bytes(r["memory_bytes"]))
             for r in rows}
    capsys.readouterr()
    assert cli.main(["info", str(ckpt)]) == 0
    table = capsys.readouterr().out
    assert cli.main(["eval", "--ckpt", str(ckpt), "--all-budgets", "--no-progress",
                     "train.eval_iters=1", "train.eval_accuracy_samples=0"]) == 0
    evaluated = capsys.readouterr().out
    for name, (target, memory) in shown.items():
        for out in (table, evaluated):
            line = next(li for li in out.splitlines() if li.strip().startswith(name))
            assert f"{target} (memory)" in line and memory in line, (name, out)
    name = rows[-1]["name"]
    with caplog.at_level(logging.INFO, logger="nemo_elastic"):
        assert cli.main(["extract", "--ckpt", str(ckpt), "--budget", name, "--out",
                         str(tmp_path / "x")]) == 0
        assert cli.main(["export", "--ckpt", str(ckpt), "--budget", name, "--format",
                         "megatron", "--out", str(tmp_path / "e"), "--allow-unordered"]) == 0
    said = f"memory {shown[name][1]} of target {shown[name][0]} (memory)"
    assert caplog.text.count(said) == 2, caplog.text
    record = json.loads((tmp_path / "e" / name / "export.json").read_text())
    assert (record["budget_type"], record["target"], record["memory_bytes"]) == \
        ("memory", rows[-1]["target"], rows[-1]["memory_bytes"])
    # the main job's report: a row per budget (+ the teacher) from its evaluation
    evaluation = {"models": [{"name": r["name"], "parameters": r["parameters"], "val_loss": 1.0,
                              "answer_accuracy": None, "tokens_per_s": None} for r in rows]
                  + [{"name": "teacher", "parameters": max(r["parameters"] for r in rows),
                      "val_loss": 1.0, "answer_accuracy": None, "tokens_per_s": None}]}
    for row in family_rows(evaluation, rows, {})[:-1]:
        target, memory = shown[row[0]]
        assert f"{target} (memory)" == row[1] and f"memory {memory}" in row[3], row
    # the order check names targets and sizes in bytes units too
    small, big = sorted(rows, key=lambda r: r["target"])[:2]
    swapped = [dict(r, memory_bytes=big["memory_bytes"] * 1.5) if r is small else r
               for r in rows]
    order = check_family(swapped).order_text()
    assert f"target {shown[small['name']][0]}, {readable_bytes(big['memory_bytes'] * 1.5)})" \
        in order and f"target {shown[big['name']][0]}, {shown[big['name']][1]})" in order, order
