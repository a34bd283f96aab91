"""`nemo-elastic generate` / `serve.ElasticGenerator`: one loaded elastic checkpoint generates at
any trained budget on the sliced weights, token for token what the extracted checkpoint and the
masked nested model generate.

The checkpoint is hand-made (no training), as in test_export_budget: a perturbed elastic model
with a `family` in `nemo_elastic.json`; the synthetic corpus's char tokenizer (vocab 54 <= 64).
"""

import logging
import shutil

import pytest
import torch

from nemo_elastic import cli, runtime
from nemo_elastic.checkpoint import config_from_checkpoint, load_checkpoint
from nemo_elastic.config import ConfigError, ParallelConfig
from nemo_elastic.data.protocol import document_ids
from nemo_elastic.elastic.specs import build_elastic_model
from nemo_elastic.model import build_hybrid_model
from nemo_elastic.serve import ElasticGenerator, decode, model_logits_fn
from tests.test_export_budget import save_hand_made_family

PROMPT = "Q:12+7*3=?\nS:"
NEW = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Token-by-token decoding of a tiny model is thousands of microsecond-sized ops: with two
    intra-op threads on a busy 2-core machine each op waits on OpenMP hand-offs (~100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """An elastic checkpoint whose family is the whole model plus three smaller budgets."""
    return save_hand_made_family(tmp_path_factory.mktemp("generate") / "ckpt")


def _greedy(model, gen, subnetwork=None):
    """The generator's decoding loop on another model (same prompt ids, same stop rule)."""
    ids = document_ids(gen.tokenizer, PROMPT, append_eod=False)
    return decode(model_logits_fn(model, subnetwork), ids, max_new_tokens=NEW,
                  eod_id=gen.tokenizer.eod_id, vocab_size=gen.tokenizer.vocab_size)


def test_budget_generation_equals_extracted_and_masked_models(ckpt, tmp_path):
    cfg = config_from_checkpoint(ckpt)
    with runtime.distributed(ParallelConfig()), ElasticGenerator.load(ckpt) as gen:
        masked = build_elastic_model(cfg).eval()
        load_checkpoint(ckpt, model=masked, restore_rng=False)
        full = sum(p.numel() for p in gen.parent.parameters())
        outputs = {}
        for name in ("uniform", "hetero", "shallow"):
            result = gen.generate(PROMPT, name, max_new_tokens=NEW)
            outputs[name] = result.tokens
            assert result.text == gen.tokenizer.decode(result.tokens)
            assert result.tokens_per_s > 0 and result.seconds > 0
            sliced = gen.model(name)
            assert sliced is not gen.parent and gen.model(name) is sliced  # sliced once, cached
            assert sum(p.numel() for p in sliced.parameters()) < full  # really smaller
            # the extracted checkpoint of that budget, loaded as a plain model
            out = tmp_path / name
            assert cli.main(["extract", "--ckpt", str(ckpt), "--budget", name,
                             "--out", str(out)]) == 0
            plain = build_hybrid_model(config_from_checkpoint(out), spec_backend="local").eval()
            load_checkpoint(out, model=plain, restore_rng=False)
            assert _greedy(plain, gen) == result.tokens, name
            assert _greedy(masked, gen, gen.family[name]) == result.tokens, name
        # the whole model: None and the full budget run the parent, as data.evaluate decodes
        assert gen.model(None) is gen.parent and gen.model("full") is gen.parent
        parent_ids = gen.generate(PROMPT, None, max_new_tokens=NEW).tokens
        assert gen.generate(PROMPT, "full", max_new_tokens=NEW).tokens == parent_ids
        # the parent's cached tokens are the full-forward-per-token reference's
        assert _greedy(gen.parent, gen) == parent_ids
    # the budgets decode differently (else the comparisons above prove little)
    assert len({tuple(t) for t in [*outputs.values(), parent_ids]}) >= 3
    assert all(len(t) >= 5 for t in outputs.values())


def test_switching_budgets_equals_fresh_loads(ckpt):
    kwargs = dict(max_new_tokens=12, temperature=0.9, top_k=8, seed=5)
    fresh = {}
    for name in ("uniform", "shallow"):
        with ElasticGenerator.load(ckpt) as gen:
            fresh[name] = (gen.generate(PROMPT, name, max_new_tokens=NEW).tokens,
                           gen.generate(PROMPT, name, **kwargs).tokens)
    with ElasticGenerator.load(ckpt) as gen:
        for name in ("uniform", "shallow", "uniform"):
            got = (gen.generate(PROMPT, name, max_new_tokens=NEW).tokens,
                   gen.generate(PROMPT, name, **kwargs).tokens)
            assert got == fresh[name], name
        assert set(gen._models) == {"uniform", "shallow"}


def test_sampling_with_a_seed_is_reproducible(ckpt):
    with ElasticGenerator.load(ckpt) as gen:
        def sample(seed, **kw):
            return gen.generate(PROMPT, "hetero", max_new_tokens=16, temperature=1.5,
                                seed=seed, **kw).tokens
        assert sample(0) == sample(0) and sample(0, top_k=4) == sample(0, top_k=4)
        assert sample(0) != sample(1)  # the seed matters
        # top_k=1 is greedy whatever the temperature
        assert sample(1, top_k=1) == gen.generate(PROMPT, "hetero", max_new_tokens=16).tokens
        assert all(t < gen.tokenizer.vocab_size for t in sample(2))  # never a padded id
        with pytest.raises(ConfigError, match="trained budgets: full, uniform, hetero, shallow"):
            gen.generate(PROMPT, "nope")
        with pytest.raises(ConfigError, match="not in the alphabet"):
            gen.generate("hello", "uniform")  # lower case is outside the char tokenizer


def test_cli_generate_prints_each_budget(ckpt, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="nemo_elastic")
    run = tmp_path / "run"  # a run's output dir means its latest checkpoint
    shutil.copytree(ckpt, run / "checkpoints" / "iter_0000004")
    (run / "checkpoints" / "latest").write_text("iter_0000004\n")
    sampling = dict(temperature=0.8, top_k=5, seed=3)
    with ElasticGenerator.load(ckpt) as gen:
        expected = {n: gen.generate(PROMPT, n, max_new_tokens=NEW).text
                    for n in ("shallow", "full")}
        sampled = gen.generate(PROMPT, "shallow", max_new_tokens=NEW, **sampling).text
    capsys.readouterr()
    assert cli.main(["generate", "--ckpt", str(run), "--budget", "shallow", "--budget", "full",
                     "--prompt", PROMPT, "--max-new-tokens", str(NEW)]) == 0
    assert capsys.readouterr().out == "".join(f"[{n}] {t}\n" for n, t in expected.items())
    assert "tokens/s" in caplog.text
    assert cli.main(["generate", "--ckpt", str(ckpt), "--budget", "shallow", "--prompt", PROMPT,
                     "--max-new-tokens", str(NEW), "--temperature", "0.8", "--top-k", "5",
                     "--seed", "3"]) == 0
    assert capsys.readouterr().out == sampled + "\n"  # one budget: the bare completion


def test_cli_generate_unknown_budget_exits_2(ckpt, capsys, caplog):
    assert cli.main(["generate", "--ckpt", str(ckpt), "--budget", "uniform", "--budget", "nope",
                     "--prompt", PROMPT]) == 2
    assert "--budget 'nope': no such trained budget" in caplog.text
    assert "trained budgets: full, uniform, hetero, shallow" in caplog.text
    assert capsys.readouterr().out == ""  # nothing generated before the refusal


def test_cli_generate_too_many_new_tokens_names_the_flag_and_the_most_it_allows(ckpt, caplog):
    """A prompt + --max-new-tokens past the model's context: one line naming the flag and the
    largest value that fits (before: 'prompt (N tokens) + max_new_tokens=...', no flag, no
    fix); that value then works."""
    from nemo_elastic.data.loaders import build_tokenizer

    cfg = config_from_checkpoint(ckpt)
    limit = cfg.model.max_sequence_length
    assert cli.main(["generate", "--ckpt", str(ckpt), "--budget", "uniform", "--prompt", PROMPT,
                     "--max-new-tokens", str(limit)]) == 2
    fits = limit - len(document_ids(build_tokenizer(cfg), PROMPT, append_eod=False))
    assert f"--max-new-tokens={limit}: " in caplog.text and \
        f"pass --max-new-tokens {fits} or less" in caplog.text, caplog.text
    assert cli.main(["generate", "--ckpt", str(ckpt), "--budget", "uniform", "--prompt", PROMPT,
                     "--max-new-tokens", str(fits)]) == 0
