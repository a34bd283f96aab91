"""Property-based: generated recipes, overrides and flags for every `nemo-elastic` command either
run or stop with exactly one line (exit 2, no traceback).

Wrong types, unknown keys, impossible sizes and budgets, NaN, infinities, negative numbers,
empty lists, malformed brackets and broken files are drawn by hypothesis and handed to the CLI's
`main()` in this process.  Whatever passes validation reaches `runtime.initialize` (the start
of real work), which here raises `WouldRun`: the property is about the validation layer, and
the work itself is tested elsewhere.  The number of inputs tried per command is logged at the
end (`-s -o log_cli=true` shows it) and kept in `TRIED`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from pathlib import Path
from unittest import mock

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from nemo_elastic import cli  # noqa: E402
from nemo_elastic.config import load_config  # noqa: E402
from tests.test_reliability import FAST, TINY  # noqa: E402

logger = logging.getLogger(__name__)
EXAMPLES = 30
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TRIED: dict[str, int] = {}
OUTCOMES: dict[str, dict[str, int]] = {}


class WouldRun(Exception):
    """Validation passed: the command reached the start of real work."""


def _refuse_work(*args, **kwargs):
    raise WouldRun


def outcome_of(command: str, argv: list[str]) -> str:
    """Run `nemo-elastic ARGV`; 'ran', 'ok' (exit 0) or 'refused' (exit 2 with one clean line).
    Anything else fails the test with what was printed."""
    TRIED[command] = TRIED.get(command, 0) + 1
    errors: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.ERROR:
                errors.append(record.getMessage())

    handler = Collect()
    log = logging.getLogger("nemo_elastic")
    log.addHandler(handler)
    stderr = io.StringIO()
    try:
        with mock.patch("nemo_elastic.runtime.initialize", _refuse_work), \
                mock.patch("nemo_elastic.runtime.distributed", _refuse_work), \
                contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = cli.main(argv)
            except SystemExit as exc:  # argparse usage errors
                rc = exc.code
    except WouldRun:
        result = "ran"
    else:
        lines = errors + [l for l in stderr.getvalue().splitlines() if "error:" in l]
        if rc == 0 and not errors:
            result = "ok"
        else:
            assert rc == 2, (argv, rc, lines)
            assert len(lines) == 1, (argv, lines)
            assert "Traceback" not in lines[0] and 'File "' not in lines[0], (argv, lines)
            result = "refused"
    finally:
        log.removeHandler(handler)
    counts = OUTCOMES.setdefault(command, {})
    counts[result] = counts.get(result, 0) + 1
    return result


def assert_some_accepted(command: str) -> None:
    """Inputs that only ever get refused would not show that valid ones pass validation."""
    counts = OUTCOMES[command]
    assert counts.get("ran", 0) + counts.get("ok", 0) > 0, (command, counts)


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    for command in sorted(TRIED):
        logger.warning("generated inputs for %-10s: %d tried %s", command, TRIED[command],
                       OUTCOMES.get(command))


# ------------------------------------------------------------------------------ value strategies

def _render(value) -> str:
    """A Python value as the user would type it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(_render(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}: {_render(v)}" for k, v in value.items()) + "}"
    return str(value)


NASTY_TEXT = st.sampled_from(["", "abc", "[1", "{a:", "1,2", "-", "nan", "1e400", "0x10", "${x}",
                              "'", "[]", "{}", "~", "M-M", "1.5", "-0", "3,x"])
VALUES = st.one_of(
    st.integers(-10, 10), st.integers(-2**40, 2**40), st.sampled_from([0, 1, 2, 3, 64, 4096]),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, -1.0, 0.5, 1.0, 1.5, 1e-9, 1e9]),
    st.none(), st.booleans(), NASTY_TEXT, st.text(max_size=6),
    st.lists(st.integers(-3, 300), max_size=3), st.just([]),
    st.dictionaries(st.sampled_from(["a", "full", "iters", "x"]), st.integers(-2, 5), max_size=2))


def _leaf_keys(data, prefix="") -> list[str]:
    keys = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            keys += _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _recipe_keys() -> list[str]:
    from nemo_elastic.config import to_dict

    keys = _leaf_keys(to_dict(load_config(TINY)))
    return sorted(set(keys) | {"elastic.curriculum.0.iters", "elastic.curriculum.1.budget_probs",
                               "elastic.budgets.full", "elastic.budgets.extra",
                               "elastic.curriculum.5.iters", "model.per_layer", "train.iterz",
                               "model.hidden", "elastic.router.nope", "nothing", "data"})


KEYS = st.sampled_from(_recipe_keys())
OVERRIDE = st.one_of(
    st.builds(lambda k, v: f"{k}={_render(v)}", KEYS, VALUES),
    st.builds(lambda k: k, KEYS),  # no '='
    st.builds(lambda k, t: f"{k}={t}", KEYS, NASTY_TEXT))
# Small and fast: whatever is valid would train a few iterations.
BASE = [*FAST, "train.iters=2"]


# ------------------------------------------------------------------------------ training commands

@pytest.mark.parametrize("command", ["pretrain", "train", "run"])
def test_generated_recipe_overrides(command, ckpt, tmp_path):
    # `train` starts from a parent that exists, so valid overrides get past the parent check and
    # the elastic section's own validation is what refuses or accepts them.
    start = [f"elastic.init_checkpoint={ckpt}"] if command == "train" else []

    @SETTINGS
    @given(overrides=st.lists(OVERRIDE, min_size=1, max_size=3))
    def check(overrides):
        outcome_of(command, [command, "--config", TINY, "--no-progress", *BASE, *start,
                             f"output_dir={tmp_path / 'run'}", *overrides])

    check()
    assert_some_accepted(command)


def _mutated_recipe(changes, garbage) -> str:
    """tiny.yaml with some keys set to generated values (or deleted), as YAML; or garbage."""
    import yaml

    if garbage is not None:
        return garbage
    recipe = yaml.safe_load(Path(TINY).read_text())
    for key, value, delete in changes:
        node = recipe
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node, dict):
                break
            node = node.setdefault(part, {})
        if isinstance(node, dict):
            if delete:
                node.pop(parts[-1], None)
            else:
                node[parts[-1]] = value
    return yaml.safe_dump(recipe)


@SETTINGS
@given(changes=st.lists(st.tuples(KEYS, VALUES, st.booleans()), min_size=1, max_size=3),
       garbage=st.none() | st.sampled_from(["", "model: [", "- a\n- b", "a: b: c", "\t",
                                           "model:\n  x: 1", "{", "null"]))
def test_generated_recipe_files(changes, garbage, tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    path.write_text(_mutated_recipe(changes, garbage))
    outcome_of("recipe", ["pretrain", "--config", str(path), "--no-progress", *BASE,
                          f"output_dir={path.parent / 'run'}"])


# ------------------------------------------------------------------------------ checkpoint commands

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny finished pretrain run (1 iteration)."""
    from nemo_elastic.training.pretrain import pretrain

    out = tmp_path_factory.mktemp("run")
    pretrain(load_config(TINY, [*FAST, "train.iters=1", "train.warmup_iters=0",
                                f"output_dir={out}"]), progress=False)
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    """A nested checkpoint with a trained family (budgets full, uniform, hetero, shallow), so
    that generated flags of the family commands (export, generate, extract --budget) can pass
    validation too."""
    from tests.test_export_budget import save_hand_made_family

    return save_hand_made_family(tmp_path_factory.mktemp("family") / "ckpt")


INT_TEXT = st.one_of(st.integers(-5, 5000).map(str), NASTY_TEXT)
NUM_TEXT = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), INT_TEXT)


def _flags(options: dict) -> st.SearchStrategy:
    """A random subset of `options` (flag -> value strategy, None for a switch) as argv."""
    def build(chosen):
        argv = []
        for flag, value in chosen:
            argv += [flag] if value is None else [f"{flag}={value}"]
        return argv

    pairs = [st.tuples(st.just(f), st.just(None) if v is None else v) for f, v in options.items()]
    return st.lists(st.one_of(*pairs), max_size=4).map(build)


def test_generated_flags_of_the_checkpoint_commands(ckpt, family, tmp_path):
    out = str(tmp_path / "out")
    # hypothesis starts from the first choices: the family checkpoint first, so that the family
    # commands see flags that pass validation, not only refusals of the wrong checkpoint.
    paths = st.sampled_from([str(family)] * 3 + [str(ckpt)] * 3 +
                            [str(ckpt / "checkpoints"), str(tmp_path), "/nonexistent",
                             str(Path(TINY)), ""])
    budgets = st.sampled_from(["full", "uniform", "hetero", "shallow"]) | NASTY_TEXT
    commands = {
        "eval": st.builds(lambda p, o: ["eval", "--ckpt", p, *o], paths,
                          st.lists(OVERRIDE, max_size=2)),
        "info": st.builds(lambda p, f: ["info", p, *f], paths, _flags({"--json": None})),
        # extract: a budget by name, --all, or nothing, then any size flags (which conflict
        # with the first two)
        "extract": st.builds(lambda p, c, f: ["extract", "--ckpt", p, "--out", out, *c, *f],
                             paths, st.one_of(budgets.map(lambda b: [f"--budget={b}"]),
                                              st.just(["--all"]), st.just([])),
                             _flags({"--hidden-size": INT_TEXT, "--mamba-num-heads": INT_TEXT,
                                     "--mamba-head-dim": INT_TEXT, "--ffn-hidden-size": INT_TEXT,
                                     "--num-attention-heads": INT_TEXT, "--drop-layers": NASTY_TEXT
                                     | st.lists(st.integers(-2, 9), max_size=4).map(
                                         lambda v: ",".join(map(str, v))),
                                     "--subnet": st.sampled_from([TINY, "/nonexistent", out])})),
        "prepare": st.builds(lambda p, f: ["prepare", "--ckpt", p, "--out", out, "--no-progress",
                                           *f], paths,
                             _flags({"--num-batches": INT_TEXT, "--depth-batches": INT_TEXT,
                                     "--aggregation": st.sampled_from(
                                         ["sum", "mean/l2", "l2/l2/l2", "max", "", "/"]),
                                     "--depth-method": NASTY_TEXT, "--mamba-signal": NASTY_TEXT,
                                     "--mamba-channel-order": NASTY_TEXT,
                                     "--config": st.sampled_from([TINY, "/nonexistent"])})),
        "export": st.builds(lambda p, f: ["export", "--ckpt", p, "--out", out, *f], paths,
                            _flags({"--format": st.sampled_from(["hf", "megatron", "onnx", ""]),
                                    "--budget": budgets, "--all": None})),
        "generate": st.builds(lambda p, b, f: ["generate", "--ckpt", p, "--prompt", "Q:1+2=?",
                                               f"--budget={b}", *f],
                              paths, budgets,
                              _flags({"--budget": budgets, "--max-new-tokens": INT_TEXT,
                                             "--temperature": NUM_TEXT, "--top-k": INT_TEXT,
                                             "--seed": INT_TEXT})),
    }
    for name, strategy in commands.items():
        @settings(SETTINGS, max_examples=2 * EXAMPLES)  # cheap: nothing here trains
        @given(argv=strategy)
        def check(argv):
            outcome_of(name, argv)

        check()
    for name in commands:
        assert_some_accepted(name)


def test_generated_inputs_of_the_file_commands(tmp_path):
    from tests.test_cli import _write_corpus_and_tokenizer

    corpus, tokenizer, _ = _write_corpus_and_tokenizer(tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text('{"model": ')
    inputs = st.sampled_from([str(corpus), str(tmp_path), "/nonexistent", str(broken)])
    tokenizers = st.sampled_from([str(tokenizer), str(broken), str(tmp_path), "/nonexistent"])

    @SETTINGS
    @given(inp=inputs, tok=tokenizers, key=st.just("text") | NASTY_TEXT, eod=st.none() | NASTY_TEXT,
           out=st.sampled_from([str(tmp_path / "pre" / "corpus"), str(tmp_path), str(corpus),
                                str(corpus) + "/x", "/proc/nope/x"]))
    def preprocess(inp, tok, key, eod, out):
        argv = ["preprocess", "--input", inp, "--tokenizer", tok, "--out", out,
                f"--json-key={key}", "--no-progress"]
        outcome_of("preprocess", argv + ([] if eod is None else [f"--eod-token={eod}"]))

    preprocess()

    @SETTINGS
    @given(src=st.sampled_from([str(tmp_path), "/nonexistent", str(corpus), str(broken)]),
           out=st.sampled_from([str(tmp_path / "imported"), str(corpus)]))
    def import_hf(src, out):
        outcome_of("import-hf", ["import-hf", src, "--out", out])

    import_hf()
