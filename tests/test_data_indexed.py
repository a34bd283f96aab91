"""The real path: tokenizer.json wrapper, preprocessing to .bin/.idx, Megatron GPTDataset."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nemo_elastic.data.hf_tokenizer import HFTokenizer
from nemo_elastic.data.indexed import IndexedDatasetsConfig, build_indexed_datasets
from nemo_elastic.data.iterator import BatchIterator
from nemo_elastic.data.preprocess import preprocess_to_indexed, smallest_token_dtype
from nemo_elastic.data.protocol import TokenizerProtocol
from nemo_elastic.data.protocol import document_ids
from nemo_elastic.data.synthetic import SyntheticReasoningConfig, generate_corpus, write_text_corpus
from nemo_elastic.data.tokenizer import CharTokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _documents(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    docs = []
    for i in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(3, 25))).tolist()
        if i % 7 == 3:  # some documents span several lines
            words.insert(len(words) // 2, "\n")
        docs.append(" ".join(words).replace(" \n ", "\n") + f" {i}.")
    return docs


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    """A tiny byte-level BPE trained here and saved as tokenizer.json (vocab > 256: uint16)."""
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(_documents(200), trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tk.save(str(path))
    return HFTokenizer(path, eod_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def docs():
    return _documents(120)


def _read_back(prefix: str) -> tuple[IndexedDataset, list[list[int]]]:
    ds = IndexedDataset(prefix)
    return ds, [ds[i].tolist() for i in range(len(ds))]


def test_hf_tokenizer_protocol_and_errors(hf_tok, docs):
    assert isinstance(hf_tok, TokenizerProtocol)
    assert hf_tok.eod_id == 2 and hf_tok.pad_id == 1 and hf_tok.bos_id is None
    assert hf_tok.vocab_size > 256
    assert hf_tok.decode(hf_tok.encode(docs[3])) == docs[3]
    with pytest.raises(ValueError, match=r"eod_token='<\|endoftext\|>'.*not in the vocabulary"):
        HFTokenizer(hf_tok.path, eod_token="<|endoftext|>")
    assert HFTokenizer(hf_tok.path).eod_id == 2  # default picks '</s>'


def test_preprocess_text_paragraphs(hf_tok, docs, tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n\n".join(docs) + "\n\n", encoding="utf-8")  # extra blank lines are fine
    stats = preprocess_to_indexed(src, hf_tok, str(tmp_path / "out" / "corpus"),
                                  show_progress=False)
    expected = [hf_tok.encode(d) + [hf_tok.eod_id] for d in docs]
    assert stats["num_documents"] == len(docs)
    assert stats["num_tokens"] == sum(map(len, expected))
    assert stats["dtype"] == "uint16"
    ds, got = _read_back(str(tmp_path / "out" / "corpus"))
    assert ds.index.dtype == np.uint16
    assert got == expected
    assert sorted(os.listdir(tmp_path / "out")) == ["corpus.bin", "corpus.idx"]  # no temp files


def test_preprocess_text_lines_without_eod(hf_tok, docs, tmp_path):
    single = [d.replace("\n", " ") for d in docs[:30]]
    src = tmp_path / "lines.txt"
    src.write_text("\n".join(single) + "\n\n", encoding="utf-8")
    preprocess_to_indexed(src, hf_tok, str(tmp_path / "lines"), append_eod=False,
                          text_mode="lines", show_progress=False)
    assert _read_back(str(tmp_path / "lines"))[1] == [hf_tok.encode(d) for d in single]


def test_preprocess_jsonl(hf_tok, docs, tmp_path):
    src = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"id": i, "body": d}) for i, d in enumerate(docs[:50])]
    lines.insert(10, "")  # blank lines are skipped
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    stats = preprocess_to_indexed(src, hf_tok, str(tmp_path / "j"), json_key="body",
                                  show_progress=False)
    assert stats["num_documents"] == 50
    assert _read_back(str(tmp_path / "j"))[1] == [hf_tok.encode(d) + [2] for d in docs[:50]]


def test_bad_jsonl_names_line_and_key_and_keeps_old_dataset(hf_tok, docs, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"text": d}) for d in docs[:5]) + "\n")
    prefix = str(tmp_path / "ds")
    preprocess_to_indexed(good, hf_tok, prefix, show_progress=False)
    before = _read_back(prefix)[1]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": "fine"}) + "\n"
                   + json.dumps({"txt": "oops"}) + "\n")
    with pytest.raises(ValueError, match=r"line 3: missing key json_key='text'.*\['txt'\]"):
        preprocess_to_indexed(bad, hf_tok, prefix, show_progress=False)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        preprocess_to_indexed(broken, hf_tok, prefix, show_progress=False)
    # the failed runs left the previous dataset untouched and no temporary files
    assert _read_back(prefix)[1] == before
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_smallest_token_dtype():
    assert smallest_token_dtype(54) is np.uint8 and smallest_token_dtype(256) is np.uint8
    assert smallest_token_dtype(257) is np.uint16 and smallest_token_dtype(65536) is np.uint16
    assert smallest_token_dtype(65537) is np.int32


def test_gpt_dataset_samples_are_the_expected_windows(hf_tok, docs, tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    prefix = str(tmp_path / "corpus")
    preprocess_to_indexed(src, hf_tok, prefix, show_progress=False)
    seq = 16
    cfg = IndexedDatasetsConfig(prefixes=[prefix], seq_length=seq, seed=11, split="80,20,0")
    train, valid = build_indexed_datasets(cfg, hf_tok)
    assert cfg.cache_dir == str(tmp_path / "megatron_cache") and os.listdir(cfg.cache_dir)

    encoded = [hf_tok.encode(d) + [hf_tok.eod_id] for d in docs]
    for split, (begin, end) in ((train, (0, 96)), (valid, (96, 120))):
        gpt = split.megatron_dataset
        # Megatron's split: contiguous document ranges, then shuffled into one token stream
        assert sorted(gpt.document_index.tolist()) == list(range(begin, end))
        stream = np.concatenate([encoded[d] for d in gpt.document_index])
        assert len(split) == (len(stream) - 1) // seq
        for i in range(len(split)):
            j = int(gpt.shuffle_index[i])  # sample i is window j of the stream
            window = torch.from_numpy(stream[j * seq:j * seq + seq + 1]).long()
            item = split[i]
            assert item["tokens"].dtype == torch.int64 and item["loss_mask"].dtype == torch.float32
            assert torch.equal(item["tokens"], window[:-1])
            assert torch.equal(item["labels"], window[1:])
            assert torch.equal(item["loss_mask"], torch.ones(seq))
            assert torch.equal(item["position_ids"], torch.arange(seq))
            assert set(item) == {"tokens", "labels", "loss_mask", "position_ids"}

    # same config again: cache hit, identical samples
    n_files = len(os.listdir(cfg.cache_dir))
    train2, _ = build_indexed_datasets(
        IndexedDatasetsConfig(prefixes=[prefix], seq_length=seq, seed=11, split="80,20,0"), hf_tok)
    assert len(os.listdir(cfg.cache_dir)) == n_files
    assert all(torch.equal(train[i]["tokens"], train2[i]["tokens"]) for i in range(len(train)))


def test_indexed_config_errors(hf_tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="no .*bin.*idx pair"):
        IndexedDatasetsConfig(prefixes=[str(tmp_path / "missing")], seq_length=8)


def test_synthetic_corpus_through_the_indexed_path(tmp_path):
    """Char tokenizer (uint8) end to end: text export -> .bin/.idx -> GPTDataset -> batches."""
    tok = CharTokenizer()
    corpus = generate_corpus(SyntheticReasoningConfig(seed=3, num_train=300, num_val=0))
    src = tmp_path / "reasoning.txt"
    assert write_text_corpus(corpus.train, src) == 300
    prefix = str(tmp_path / "reasoning")
    stats = preprocess_to_indexed(src, tok, prefix, show_progress=False)
    assert stats["dtype"] == "uint8"
    ds, got = _read_back(prefix)
    assert ds.index.dtype == np.uint8
    assert got == [document_ids(tok, p.text) for p in corpus.train]

    train, valid = build_indexed_datasets(
        IndexedDatasetsConfig(prefixes=[prefix], seq_length=32, split="90,10,0",
                              cache_dir=str(tmp_path / "cache")), tok)
    batch = next(BatchIterator(train, 4, seed=0, shuffle=False))
    assert batch["tokens"].shape == (4, 32) and batch["tokens"].dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.float32
    assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
    assert int(batch["tokens"].max()) < tok.vocab_size
    assert valid is not None and len(valid) > 0


def test_weighted_blend_of_two_prefixes(hf_tok, docs, tmp_path):
    prefixes = []
    for name, part in (("a", docs[:60]), ("b", docs[60:])):
        src = tmp_path / f"{name}.txt"
        src.write_text("\n\n".join(part) + "\n", encoding="utf-8")
        preprocess_to_indexed(src, hf_tok, str(tmp_path / name), show_progress=False)
        prefixes.append(str(tmp_path / name))
    with pytest.raises(ValueError, match="train_samples and valid_samples"):
        IndexedDatasetsConfig(prefixes=prefixes, weights=[0.3, 0.7], seq_length=16)
    train, valid = build_indexed_datasets(
        IndexedDatasetsConfig(prefixes=prefixes, weights=[0.3, 0.7], seq_length=16,
                              train_samples=200, valid_samples=20, split="80,10,10"), hf_tok)
    assert (len(train), len(valid)) == (200, 20)
    item = train[5]
    assert set(item) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert torch.equal(item["labels"][:-1], item["tokens"][1:])


def test_rewritten_data_does_not_reuse_stale_indices(hf_tok, docs, tmp_path):
    prefix, seq = str(tmp_path / "d"), 8
    src = tmp_path / "d.txt"
    results = []
    for part in (docs[:40], docs[40:100]):
        src.write_text("\n\n".join(part) + "\n", encoding="utf-8")
        preprocess_to_indexed(src, hf_tok, prefix, show_progress=False)
        train, _ = build_indexed_datasets(
            IndexedDatasetsConfig(prefixes=[prefix], seq_length=seq, split="100,0,0"), hf_tok)
        stream = sum((hf_tok.encode(part[d]) + [2] for d in train.megatron_dataset.document_index),
                     [])
        assert len(train) == (len(stream) - 1) // seq
        results.append(len(train))
    assert results[0] != results[1]
