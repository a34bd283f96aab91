"""The training tokenizer as Hugging Face files, so that an exported folder works with
`AutoTokenizer.from_pretrained(dir)` + `model.generate` and no code of ours.

* the built-in character tokenizer (synthetic corpus): a `tokenizers` BPE model with the same
  vocabulary (pad 0, bos 1, eod 2, then one token per character) and no merges, so every
  character is one token; a post-processor prepends `<bos>` exactly as training did
  (`data.protocol.document_ids`); the decoder concatenates the characters;
* a `tokenizer.json` tokenizer (indexed data): the same file with its post-processor removed,
  because training encodes documents without special tokens (`HFTokenizer`,
  add_special_tokens=False) and prepends bos only when one is configured.

`generation_config.json` carries bos / eos (= eod) / pad ids, and `suppress_tokens` lists the ids
the model's vocabulary has beyond the tokenizer's (Megatron pads the vocabulary; those rows were
never trained), which our own decoder never samples either.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

SAMPLE_TEXT = {"char": "Q:12+7*3=?\nS:", "hf": "Hello world. 12 + 7 = 19"}


def _char_tokenizer_object(tok):
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    from nemo_elastic.data.tokenizer import SPECIAL_TOKENS

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({c: i + len(SPECIAL_TOKENS) for i, c in enumerate(tok.alphabet)})
    hf = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    hf.decoder = decoders.Fuse()
    bos = SPECIAL_TOKENS[tok.bos_id]
    hf.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_id)])
    names = {"bos_token": SPECIAL_TOKENS[tok.bos_id], "eos_token": SPECIAL_TOKENS[tok.eod_id],
             "pad_token": SPECIAL_TOKENS[tok.pad_id]}
    return hf, names


def _hf_tokenizer_object(tok):
    from tokenizers import Tokenizer

    raw = json.loads(Path(tok.path).read_text())
    raw["post_processor"] = None  # training adds no special tokens (see module doc)
    hf = Tokenizer.from_str(json.dumps(raw))
    names: dict[str, Any] = {"eos_token": tok.eod_token}
    if tok.bos_id is not None:
        names["bos_token"] = hf.id_to_token(tok.bos_id)
    if tok.pad_id is not None:
        names["pad_token"] = hf.id_to_token(tok.pad_id)
    return hf, names


def token_ids(tokenizer) -> dict[str, int]:
    """config.json / generation_config.json token ids of our tokenizer (None ones left out)."""
    ids = {"bos_token_id": getattr(tokenizer, "bos_id", None), "eos_token_id": tokenizer.eod_id,
           "pad_token_id": getattr(tokenizer, "pad_id", None)}
    return {k: v for k, v in ids.items() if v is not None}


def write_tokenizer(tokenizer, directory: Path, *, model_vocab_size: int,
                    max_length: Optional[int] = None) -> str:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and
    generation_config.json for `tokenizer` (CharTokenizer or HFTokenizer) into `directory`;
    returns the sample text `check_tokenizer` should encode."""
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from nemo_elastic.data.tokenizer import CharTokenizer

    kind = "char" if isinstance(tokenizer, CharTokenizer) else "hf"
    hf, names = (_char_tokenizer_object if kind == "char" else _hf_tokenizer_object)(tokenizer)
    fast = PreTrainedTokenizerFast(tokenizer_object=hf, clean_up_tokenization_spaces=False,
                                   model_max_length=max_length or int(1e30), **names)
    fast.save_pretrained(str(directory))
    extra = list(range(tokenizer.vocab_size, model_vocab_size))
    GenerationConfig(**token_ids(tokenizer), suppress_tokens=extra or None).save_pretrained(
        str(directory))
    return SAMPLE_TEXT[kind]


def check_tokenizer(tokenizer, directory: Path, text: str) -> None:
    """`AutoTokenizer.from_pretrained(directory)` encodes and decodes `text` as training does;
    RuntimeError (an export bug) otherwise."""
    from transformers import AutoTokenizer

    from nemo_elastic.data.protocol import document_ids

    auto = AutoTokenizer.from_pretrained(str(directory))
    want = document_ids(tokenizer, text, append_eod=False)
    got = auto(text)["input_ids"]
    if got != want:
        raise RuntimeError(f"exported tokenizer in {directory} encodes {text!r} as {got}, "
                           f"training encodes it as {want}")
    body = want[1:] if getattr(tokenizer, "bos_id", None) is not None else want
    if auto.decode(body, skip_special_tokens=True) != tokenizer.decode(body):
        raise RuntimeError(f"exported tokenizer in {directory} decodes {body} as "
                           f"{auto.decode(body)!r}, training as {tokenizer.decode(body)!r}")
