"""Synthetic corpus, char tokenizer, packing, resumable/DP batch iteration and the evaluator."""

from __future__ import annotations

import re

import pytest
import torch

from nemo_elastic.data.dataset import PackedDataset
from nemo_elastic.data.evaluate import answer_accuracy, parse_answer
from nemo_elastic.data.iterator import BatchIterator, iterate_once
from nemo_elastic.data.protocol import TokenizerProtocol, document_ids
from nemo_elastic.data.synthetic import SyntheticReasoningConfig, generate_corpus
from nemo_elastic.data.tokenizer import CharTokenizer

SMALL = dict(num_train=600, num_val=100)


@pytest.fixture(scope="module")
def corpus():
    return generate_corpus(SyntheticReasoningConfig(seed=7, **SMALL))


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer()


@pytest.fixture(scope="module")
def packed(corpus, tok):
    docs = [document_ids(tok, p.text) for p in corpus.train]
    return PackedDataset(docs, seq_length=64, pad_id=tok.pad_id)


# ---------------------------------------------------------------- synthetic corpus

def test_generator_is_deterministic_and_seed_dependent(corpus):
    again = generate_corpus(SyntheticReasoningConfig(seed=7, **SMALL))
    assert [p.text for p in again.train] == [p.text for p in corpus.train]
    assert [p.text for p in again.val] == [p.text for p in corpus.val]
    other = generate_corpus(SyntheticReasoningConfig(seed=8, **SMALL))
    assert [p.text for p in other.train] != [p.text for p in corpus.train]
    # the validation split does not depend on num_train
    bigger = generate_corpus(SyntheticReasoningConfig(seed=7, num_train=900, num_val=100))
    assert [p.text for p in bigger.val] == [p.text for p in corpus.val]


def test_splits_sizes_disjoint_and_unique(corpus):
    assert len(corpus.train) == 600 and len(corpus.val) == 100
    train_q = [p.question for p in corpus.train]
    val_q = [p.question for p in corpus.val]
    assert len(set(train_q)) == len(train_q) and len(set(val_q)) == len(val_q)
    assert not set(train_q) & set(val_q)


_STEP = re.compile(r"^(-?\d+)([+\-*])(\d+)=(-?\d+)$")
_DOC = re.compile(r"^Q:([0-9()+\-*]+)=\?\nS:([^\n]+)\nA:(-?\d+)$")


def test_worked_solutions_are_arithmetically_correct(corpus):
    cfg = corpus.config
    for p in corpus.train + corpus.val:
        m = _DOC.match(p.text)
        assert m, p.text
        question, steps, answer = m.group(1), m.group(2).split(";"), int(m.group(3))
        assert cfg.min_steps <= len(steps) <= cfg.max_steps
        # standard-precedence evaluation of the question text gives the answer
        assert eval(question, {"__builtins__": {}}) == answer, p.text  # noqa: S307 digits/ops
        literals = [int(x) for x in re.findall(r"\d+", question)]
        value = literals[0]
        for k, step in enumerate(steps):
            sm = _STEP.match(step)
            assert sm, step
            left, op, right, result = int(sm[1]), sm[2], int(sm[3]), int(sm[4])
            assert left == value and right == literals[k + 1], p.text  # chain, left to right
            assert result == {"+": left + right, "-": left - right, "*": left * right}[op], p.text
            assert cfg.min_value <= result <= cfg.max_value
            value = result
        assert value == answer == p.answer
        assert p.text == p.prompt + p.completion and p.prompt.endswith("\nS:")


def test_samples_are_short(corpus):
    lengths = [len(p.text) for p in corpus.train]
    assert max(lengths) <= 52 and sum(lengths) / len(lengths) <= 44


@pytest.mark.parametrize("field,value", [("min_steps", 0), ("operations", ("/",)),
                                         ("max_operand", 500), ("num_train", -1)])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SyntheticReasoningConfig(**{field: value})


def test_too_small_question_space_is_an_error():
    with pytest.raises(ValueError, match="question space is too small"):
        generate_corpus(SyntheticReasoningConfig(num_train=500, num_val=0, max_steps=1,
                                                 max_operand=3, max_attempts_factor=5))


# ---------------------------------------------------------------- tokenizer

def test_char_tokenizer_round_trip_and_specials(corpus, tok):
    assert isinstance(tok, TokenizerProtocol)
    assert tok.vocab_size <= 64 and len({tok.pad_id, tok.bos_id, tok.eod_id}) == 3
    for p in corpus.val:
        ids = tok.encode(p.text)
        assert tok.decode(ids) == p.text
        assert all(3 <= i < tok.vocab_size for i in ids)
    doc = document_ids(tok, "A:1")
    assert doc[0] == tok.bos_id and doc[-1] == tok.eod_id and tok.decode(doc) == "A:1"
    with pytest.raises(ValueError, match="'a' at position 2"):
        tok.encode("Q:a")


# ---------------------------------------------------------------- packing

def test_packing_shapes_shift_and_mask(packed, corpus, tok):
    s = 64
    item = packed[0]
    assert set(item) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert item["tokens"].shape == (s,) and item["tokens"].dtype == torch.int64
    assert item["loss_mask"].dtype == torch.float32
    assert torch.equal(item["position_ids"], torch.arange(s))
    docs = []
    for i in range(len(packed)):
        it = packed[i]
        # labels are the tokens shifted by one
        assert torch.equal(it["labels"][:-1], it["tokens"][1:])
        real = int(it["loss_mask"].sum().item())
        assert torch.all(it["labels"][:real] != tok.pad_id)
        assert torch.all(it["labels"][real:] == tok.pad_id)
        assert torch.all(it["loss_mask"][:real] == 1) and torch.all(it["loss_mask"][real:] == 0)
        assert it["tokens"][0] == tok.bos_id  # every window starts at a document start
        window = it["tokens"].tolist()[:real + 1]
        # windows are whole documents bos ... eod, in order
        text = tok.decode(window, skip_special=False)
        docs += [d for d in text.replace("<bos>", "").split("<eod>") if d]
    assert docs == [p.text for p in corpus.train]


def test_packing_rejects_too_long_document(tok):
    with pytest.raises(ValueError, match="raise seq_length"):
        PackedDataset([[1] * 20], seq_length=8, pad_id=tok.pad_id)


# ---------------------------------------------------------------- batch iterator

def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x) and len(a) == len(b)


def test_iterator_resume_is_exact(packed):
    n_batches = packed.__len__() // 8 * 2 + 5  # crosses two epoch boundaries
    reference = _take(BatchIterator(packed, 8, seed=3), n_batches)
    for k in (0, 1, 7, len(packed) // 8, len(packed) // 8 + 3):
        first = BatchIterator(packed, 8, seed=3)
        _take(first, k)
        state = first.state_dict()
        assert set(state) == {"epoch", "index"}
        resumed = BatchIterator(packed, 8, seed=3)
        resumed.load_state_dict(dict(state))
        assert _same(_take(resumed, n_batches - k), reference[k:])


def test_iterator_epochs_reshuffle_and_cover(packed):
    it = BatchIterator(packed, 4, seed=0)
    per_epoch = it.batches_per_epoch
    order0 = it.order(0).tolist()
    assert sorted(order0) == list(range(len(packed)))
    assert it.order(1).tolist() != order0
    assert BatchIterator(packed, 4, seed=1).order(0).tolist() != order0
    _take(it, per_epoch)
    assert it.state_dict() == {"epoch": 0, "index": per_epoch * 4}
    next(it)
    assert it.state_dict() == {"epoch": 1, "index": 4}
    plain = BatchIterator(packed, 4, seed=0, shuffle=False)
    assert torch.equal(next(plain)["tokens"], torch.stack([packed[i]["tokens"] for i in range(4)]))


def test_dp_shards_are_disjoint_and_cover_the_global_batch(packed):
    mbs, dp = 3, 4
    single = BatchIterator(packed, mbs * dp, seed=5)
    ranks = [BatchIterator(packed, mbs, seed=5, dp_rank=r, dp_size=dp) for r in range(dp)]
    for _ in range(len(packed) // (mbs * dp) + 3):
        whole = next(single)
        parts = [next(r) for r in ranks]
        assert all(p["tokens"].shape == (mbs, 64) for p in parts)
        for key in whole:
            assert torch.equal(torch.cat([p[key] for p in parts]), whole[key])
        ids = ranks[0].order(ranks[0].epoch)[ranks[0].index - mbs * dp:ranks[0].index]
        assert len(set(ids.tolist())) == mbs * dp  # disjoint sample ids
    assert len({str(r.state_dict()) for r in ranks}) == 1  # identical state on every rank


def test_iterator_rejects_bad_arguments(packed):
    with pytest.raises(ValueError, match="dp_rank"):
        BatchIterator(packed, 2, seed=0, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="lower micro_batch_size"):
        BatchIterator(packed, len(packed) + 1, seed=0)
    with pytest.raises(KeyError, match="index"):
        BatchIterator(packed, 2, seed=0).load_state_dict({"epoch": 0})


def test_iterate_once_covers_everything_with_masked_filler(packed):
    mbs, dp = 5, 3
    per_rank = [list(iterate_once(packed, mbs, dp_rank=r, dp_size=dp)) for r in range(dp)]
    assert len({len(b) for b in per_rank}) == 1
    real_rows = []
    for step in zip(*per_rank):
        for batch in step:
            for row in range(mbs):
                if batch["loss_mask"][row].sum() > 0:
                    real_rows.append(batch["tokens"][row])
    assert len(real_rows) == len(packed)
    assert all(torch.equal(real_rows[i], packed[i]["tokens"]) for i in range(len(packed)))


# ---------------------------------------------------------------- evaluator

def _oracle(problems, tok, wrong=False):
    """logits_fn that puts all mass on the true next token (or eod after the document)."""
    docs = [document_ids(tok, p.text) for p in problems]
    prompts = [document_ids(tok, p.prompt, append_eod=False) for p in problems]

    def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
        b, s = tokens.shape
        logits = torch.zeros(b, s, tok.vocab_size + 6)  # padded vocab: extra ids must be ignored
        logits[:, :, tok.vocab_size:] = -1.0
        for row in range(b):
            prefix = tokens[row].tolist()
            # identify the problem by its prompt (no prompt is a prefix of another); a row of
            # a batch may still be reading its prompt (longer than the batch's shortest)
            doc = next((d for d, q in zip(docs, prompts) if prefix[:len(q)] == q), None)
            if doc is None:
                continue
            nxt = doc[s] if s < len(doc) else tok.eod_id
            if wrong and s == len(doc) - 2:  # last answer digit off by one
                nxt = tok.encode(str((int(tok.decode([nxt])) + 1) % 10))[0]
            logits[row, -1, nxt] = 10.0
        return logits

    return logits_fn


def test_oracle_scores_one_and_constant_model_scores_zero(corpus, tok):
    problems = list(corpus.val[:40])
    result = answer_accuracy(_oracle(problems, tok), tok, problems, max_new_tokens=40, batch_size=7)
    assert result["accuracy"] == 1.0 and result["n"] == 40
    ex = result["examples"][0]
    assert ex["correct"] and ex["predicted"] == problems[0].answer
    assert ex["completion"] == problems[0].completion
    # default max_new_tokens is enough, too
    assert answer_accuracy(_oracle(problems, tok), tok, problems, batch_size=64)["accuracy"] == 1.0

    def constant(tokens):
        return torch.zeros(*tokens.shape, tok.vocab_size)

    assert answer_accuracy(constant, tok, problems, max_new_tokens=40)["accuracy"] == 0.0

    def always_seven(tokens):
        logits = torch.zeros(*tokens.shape, tok.vocab_size)
        logits[..., tok.encode("7")[0]] = 1.0
        return logits

    assert answer_accuracy(always_seven, tok, problems, max_new_tokens=40)["accuracy"] == 0.0


def test_evaluator_rejects_wrong_and_truncated_answers(corpus, tok):
    problems = list(corpus.val[:20])
    wrong = answer_accuracy(_oracle(problems, tok, wrong=True), tok, problems, max_new_tokens=40)
    assert wrong["accuracy"] == 0.0
    # cut off before the answer is terminated: never counted as correct
    short = min(len(tok.encode(p.completion)) for p in problems)
    cut = answer_accuracy(_oracle(problems, tok), tok, problems, max_new_tokens=short)
    assert cut["accuracy"] == 0.0


def test_parse_answer():
    assert parse_answer("3+4=7\nA:7", terminated=True) == 7
    assert parse_answer("3+4=7\nA:7", terminated=False) is None
    assert parse_answer("A:12\nQ:1", terminated=False) == 12
    assert parse_answer("A:-3", terminated=True) == -3
    assert parse_answer("no answer", terminated=True) is None
