"""Stateful decoding (`nemo_elastic.inference`, the Mamba step ops, Megatron's static context).

Oracles: the float64 chunked scan over the whole sequence (for the step ops), the model's own
full-sequence forward (step logits at every position), and the full forward per token on the
masked nested model (cached greedy / seeded sampling of every budget's sliced model).
"""

import dataclasses
import json

import pytest
import torch

from nemo_elastic import runtime
from nemo_elastic.checkpoint import config_from_checkpoint, load_checkpoint, save_checkpoint
from nemo_elastic.config import ParallelConfig
from nemo_elastic.elastic import SubNetwork
from nemo_elastic.elastic.specs import build_elastic_model
from nemo_elastic.export.slicing import slice_model
from nemo_elastic.inference import cached, decode_batch, uncached
from nemo_elastic.inference.decoder import _Cached
from nemo_elastic.model import build_hybrid_model
from nemo_elastic.ops import causal_conv1d_step, causal_depthwise_conv1d, conv_state_of, \
    ssd_chunk_scan, ssd_step
from nemo_elastic.training.evaluation import greedy_logits_fn
from tests.conftest import perturb, tiny_config
from tests.multiproc import run_multiprocess

PATTERN = "M-*M-*"  # every layer type, attention twice
EOD, VOCAB = 0, 60  # vocab < the model's 64: padded ids must never be produced
PROMPTS = [[1, 5, 6, 7, 8], [1, 9], [1, 3, 3, 3, 3, 3, 2, 4], [1, 9]]  # different lengths
NEW = 10


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # token-by-token decoding of a tiny model: see test_generate
    yield
    torch.set_num_threads(threads)


def _budgets(m):
    """hidden, Mamba heads / head dim, attention heads, FFN, dropped layers, heterogeneous."""
    return {
        "uniform": SubNetwork.uniform(m, hidden_size=24, mamba_num_heads=2,
                                      num_attention_heads=2, ffn_hidden_size=32),
        "hetero": SubNetwork.uniform(m, hidden_size=24, ffn_hidden_size=48)
        .replace_layer(4, ffn_hidden_size=16).replace_layer(2, num_attention_heads=2)
        .replace_layer(0, mamba_num_heads=2),
        "shallow": SubNetwork.uniform(m, mamba_head_dim=4, drop_layers=[2, 4]),
    }


@pytest.fixture(scope="module")
def family():
    """(cfg, masked elastic parent, {budget: (subnet, sliced plain model)}) at TP=1."""
    cfg = tiny_config({"hybrid_layer_pattern": PATTERN})
    with runtime.distributed(ParallelConfig(), seed=1234):
        parent = perturb(build_elastic_model(cfg), seed=3).eval()
        sliced = {name: (s, slice_model(parent, cfg, s)[1].eval())
                  for name, s in _budgets(cfg.model).items()}
        yield cfg, parent, sliced


# --------------------------------------------------------------------------- step ops

def test_steps_continue_the_scan_exactly():
    """prefill k tokens with the scan (final SSM state, conv state), then step: the outputs of
    the steps equal the float64 scan over the whole sequence."""
    g = torch.Generator().manual_seed(0)
    b, l, h, p, gr, n, c, w, k = 2, 11, 4, 3, 2, 5, 7, 4, 5
    x, dt = torch.randn(b, l, h, p, generator=g), torch.randn(b, l, h, generator=g)
    B, C = torch.randn(b, l, gr, n, generator=g), torch.randn(b, l, gr, n, generator=g)
    A, D, bias = -torch.rand(h, generator=g) - 0.1, torch.randn(h, generator=g), torch.randn(h)
    full = ssd_chunk_scan(x.double(), dt, A, B, C, chunk_size=4, D=D, dt_bias=bias)
    _, state = ssd_chunk_scan(x[:, :k], dt[:, :k], A, B[:, :k], C[:, :k], chunk_size=4, D=D,
                              dt_bias=bias, return_final_state=True)
    for t in range(k, l):
        y = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D=D, dt_bias=bias)
        torch.testing.assert_close(y.double(), full[:, t], atol=1e-5, rtol=1e-5)
    # conv: state after a prefill shorter and longer than the kernel
    xs, weight, cb = torch.randn(b, l, c, generator=g), torch.randn(c, w), torch.randn(c)
    ref = causal_depthwise_conv1d(xs.double(), weight, cb, activation="silu")
    for start in (2, k):
        conv_state = conv_state_of(xs[:, :start], w).clone()
        for t in range(start, l):
            out = causal_conv1d_step(xs[:, t], conv_state, weight, cb, activation="silu")
            torch.testing.assert_close(out.double(), ref[:, t], atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- model

def _step_logits(model, tokens, prefill):
    stepper = _Cached(model, tokens.shape[0], tokens.shape[1])
    out = [stepper.prefill(tokens[:, :prefill])]
    out += [stepper.step(tokens[:, t]) for t in range(prefill, tokens.shape[1] - 1)]
    return torch.stack(out, dim=1)  # logits after positions prefill-1 .. s-2


def test_step_logits_equal_full_forward_at_every_position(family):
    cfg, parent, sliced = family
    tokens = torch.randint(0, 64, (2, 37), generator=torch.Generator().manual_seed(1))
    models = {"parent": parent, **{name: m for name, (_, m) in sliced.items()}}
    for name, model in models.items():
        with torch.no_grad():
            full = greedy_logits_fn(model)(tokens)  # [b, s, v]
        for prefill in (1, 20):  # prefill shorter than a Mamba chunk (16) / over two chunks
            got = _step_logits(model, tokens, prefill)
            torch.testing.assert_close(got, full[:, prefill - 1:-1], atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{name}, prefill {prefill}: {m}")


def _decode(steppers, **kw):
    return decode_batch(steppers, PROMPTS, max_new_tokens=NEW, eod_id=EOD, vocab_size=VOCAB, **kw)


def test_cached_greedy_equals_uncached_for_every_budget_batched(family):
    cfg, parent, sliced = family
    outputs = {}
    runs = {"parent": (parent, None), **{n: (m, s) for n, (s, m) in sliced.items()}}
    for name, (model, subnet) in runs.items():
        got = _decode(cached(model))
        # the oracle: the masked nested model, a full forward over the prefix per token
        assert got == _decode(uncached(greedy_logits_fn(parent, subnet))), name
        # a batch of mixed lengths decodes each row as it decodes alone
        alone = [decode_batch(cached(model), [p], max_new_tokens=NEW, eod_id=EOD,
                              vocab_size=VOCAB)[0] for p in PROMPTS]
        assert got == alone, name
        assert got[1] == got[3]  # the same prompt twice
        assert all(len(c.tokens) == NEW or c.terminated for c in got)
        assert all(t < VOCAB for c in got for t in c.tokens)
        outputs[name] = [tuple(c.tokens) for c in got]
    assert len(set(map(tuple, outputs.values()))) == len(outputs)  # the budgets really differ


def test_seeded_sampling_equals_uncached_and_stops_per_row(family):
    cfg, parent, sliced = family
    subnet, model = sliced["hetero"]

    def sample(steppers, seed, eod=EOD):
        return decode_batch(steppers, PROMPTS, max_new_tokens=NEW, eod_id=eod, vocab_size=VOCAB,
                            temperature=1.3, top_k=6,
                            generator=torch.Generator().manual_seed(seed))

    got = sample(cached(model), 0)
    assert got == sample(uncached(greedy_logits_fn(parent, subnet)), 0)
    assert got != sample(cached(model), 1)
    # a frequent token as eod: rows stop at their own first eod, the others go on
    common = max(range(VOCAB), key=lambda t: sum(c.tokens.count(t) for c in got))
    stopped = sample(cached(model), 0, eod=common)
    assert any(c.terminated for c in stopped)
    for c, ref in zip(stopped, got):
        if c.terminated:
            assert common not in c.tokens and ref.tokens[:len(c.tokens)] == c.tokens
        else:
            assert c.tokens == ref.tokens


# --------------------------------------------------------------------------- TP=2

def _tp2_decode(rank, world_size, root):
    """Each TP=1 checkpoint (parent, sliced budgets) loaded at TP=2, decoded cached and
    uncached; the tokens go to a JSON file per rank."""
    out = {}
    parallel = ParallelConfig(tensor_model_parallel_size=2)
    with runtime.distributed(parallel, seed=1234):  # one process group for every model
        for ckpt in sorted(p for p in root.iterdir() if p.is_dir()):
            cfg = dataclasses.replace(config_from_checkpoint(ckpt), parallel=parallel)
            model = build_hybrid_model(cfg, spec_backend="local")
            load_checkpoint(ckpt, model=model, restore_rng=False)
            model.eval()
            out[ckpt.name] = [[c.tokens for c in _decode(cached(model))],
                              [c.tokens for c in _decode(uncached(greedy_logits_fn(model)))]]
    (root / f"tp2_{rank}.json").write_text(json.dumps(out))


@pytest.mark.slow
def test_tp2_cached_equals_uncached_and_tp1(family, tmp_path):
    """TP=2 (two gloo processes, tensor-parallel KV cache and Mamba state shards): the parent's
    and every budget's cached tokens equal their uncached tokens and their TP=1 tokens."""
    cfg, parent, sliced = family
    models = {"parent": (cfg, parent), **{n: (slice_model(parent, cfg, s)[0], m)
                                          for n, (s, m) in sliced.items()}}
    tp1 = {}
    for name, (model_cfg, model) in models.items():  # in the fixture's TP=1 runtime
        save_checkpoint(tmp_path / name, cfg=model_cfg, model=model, kind="test")
        tp1[name] = [c.tokens for c in _decode(cached(model))]
    run_multiprocess(_tp2_decode, 2, tmp_path)
    for rank in range(2):
        got = json.loads((tmp_path / f"tp2_{rank}.json").read_text())
        assert set(got) == set(tp1)
        for name, (cached_tokens, uncached_tokens) in got.items():
            assert cached_tokens == uncached_tokens == tp1[name], (rank, name)


# --------------------------------------------------------------------------- HF exports

def test_hf_per_layer_export_generates_with_a_cache(family, tmp_path):
    """A heterogeneous budget (per-layer Mamba heads, attention heads, FFN) exported with
    --hf-per-layer: transformers' own cached `generate` on our loader's model gives our cached
    tokens (and its uncached generate the same): each layer's cache is sized from that layer."""
    pytest.importorskip("transformers")
    from nemo_elastic.export import load_hf_per_layer
    from nemo_elastic.export.budgets import export_budget_hf
    from tests.test_export_budget import _save_family

    cfg, parent, sliced = family
    subnet, model = sliced["hetero"]
    _save_family(tmp_path / "ckpt", cfg, parent, {"hetero": subnet})
    folder = export_budget_hf(tmp_path / "ckpt", "hetero", tmp_path / "hf", per_layer=True)
    hf = load_hf_per_layer(folder)
    ours = decode_batch(cached(model), PROMPTS[:1], max_new_tokens=NEW, eod_id=-1,
                        vocab_size=cfg.model.vocab_size)[0].tokens
    prompt = torch.tensor(PROMPTS[:1])
    for use_cache in (True, False):
        with torch.no_grad():
            ids = hf.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                              use_cache=use_cache, suppress_tokens=None)
        assert ids[0, prompt.shape[1]:].tolist() == ours, use_cache


def test_training_curve_switch_is_validated():
    from nemo_elastic.config import ConfigError, load_config

    assert load_config("conf/tiny.yaml", ["elastic.training_curve=false"]).elastic \
        .training_curve is False
    with pytest.raises(ConfigError, match=r"elastic.training_curve='sometimes': must be true or"):
        load_config("conf/tiny.yaml", ["elastic.training_curve=sometimes"])
