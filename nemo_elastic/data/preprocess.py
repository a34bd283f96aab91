"""Tokenize a text or jsonl corpus into a Megatron-Core indexed dataset (``<prefix>.bin/.idx``).

Input formats (chosen by file suffix):

* ``.jsonl`` / ``.json``: one JSON object per line, the document is the string field
  ``json_key``; blank lines are skipped.  A bad line is a ValueError naming the line number.
* anything else is plain UTF-8 text; ``text_mode="paragraphs"`` (default): documents are separated
  by one or more blank lines and keep their inner newlines (the format of
  ``synthetic.write_text_corpus``); ``text_mode="lines"``: one document per non-blank line.

Each document becomes one sequence ``[bos] + tokenizer.encode(text) + [eod]`` (bos only if the
tokenizer defines ``bos_id``, eod only if ``append_eod``), i.e. ``protocol.document_ids``.  The
token dtype is the smallest that holds the vocabulary: uint8 (<= 256), uint16 (<= 65536), else
int32.  Megatron's reader takes the dtype from the ``.idx`` header, so any of these is readable.

Atomicity: both files are written under temporary names in the output directory and fsynced;
then the old ``.idx`` (if any) is removed, the ``.bin`` renamed into place and the ``.idx``
renamed last.  Readers need both files (``IndexedDataset.exists``), so a crash at any point
leaves either the old dataset, the new one, or no ``.idx`` (no dataset); never a mismatched pair.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path
from tqdm import tqdm

from nemo_elastic.checkpoint.durable import fsync_path
from nemo_elastic.errors import DataError, ensure_output_dir
from nemo_elastic.data.protocol import TokenizerProtocol, document_ids

logger = logging.getLogger(__name__)

JSON_SUFFIXES = (".jsonl", ".json")


def smallest_token_dtype(vocab_size: int) -> type[np.number]:
    """The smallest numpy dtype Megatron's IndexedDataset supports that holds ids < vocab_size."""
    if vocab_size <= 1 << 8:
        return np.uint8
    if vocab_size <= 1 << 16:
        return np.uint16
    return np.int32


def _iter_jsonl(path: Path, json_key: str, bar: tqdm) -> Iterator[str]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            bar.update(len(raw))
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {line_no}: not valid JSON ({err.msg}); each line "
                                 "must be one JSON object") from err
            if not isinstance(record, dict) or json_key not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{path} line {line_no}: missing key json_key={json_key!r} (line "
                                 f"has {keys}); pass json_key= the field that holds the text")
            text = record[json_key]
            if not isinstance(text, str):
                raise DataError(f"{path} line {line_no}: key {json_key!r} holds a "
                                 f"{type(text).__name__}, expected a string")
            yield text


def _iter_text(path: Path, text_mode: str, bar: tqdm) -> Iterator[str]:
    paragraph: list[str] = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            bar.update(len(raw))
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                raise DataError(f"{path} line {line_no}: not valid UTF-8 ({err.reason})") from err
            if text_mode == "lines":
                if line.strip():
                    yield line
            elif line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "\n".join(paragraph)
                paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


INDEX_MAGIC = b"MMIDIDX\x00\x00"  # the first bytes of a Megatron indexed dataset's .idx


def check_preprocess_output(prefix: str | Path, overwrite: bool = False) -> None:
    """`nemo-elastic preprocess --out PREFIX`: refuse to replace an existing PREFIX.bin/.idx
    without `overwrite`, and even with it, anything that is not an indexed dataset (a .idx
    without Megatron's header, or a .bin without its .idx): DataError naming the file and the
    fix.  (The Python function `preprocess_to_indexed` replaces its output, as documented.)"""
    prefix = str(prefix)
    bin_path, idx_path = Path(get_bin_path(prefix)), Path(get_idx_path(prefix))
    present = [p for p in (bin_path, idx_path) if p.exists()]
    if not present:
        return
    if not overwrite:
        raise DataError(f"--out={prefix!r}: {present[0]} already exists; add --overwrite to "
                        "replace the dataset, or choose another --out")
    if idx_path.is_file():
        with open(idx_path, "rb") as f:
            is_index = f.read(len(INDEX_MAGIC)) == INDEX_MAGIC
    else:
        is_index = False
    if not is_index or (bin_path.exists() and not bin_path.is_file()):
        stranger = idx_path if idx_path.exists() else bin_path
        raise DataError(f"--out={prefix!r}: {stranger} is not an indexed dataset that preprocess "
                        "wrote, and --overwrite replaces only such a dataset; choose another "
                        "--out, or move that file")


def preprocess_to_indexed(input_path: str | Path, tokenizer: TokenizerProtocol,
                          output_prefix: str | Path, *, json_key: str = "text",
                          append_eod: bool = True, show_progress: bool = True,
                          text_mode: Literal["paragraphs", "lines"] = "paragraphs") -> dict:
    """Tokenize ``input_path`` into ``<output_prefix>.bin/.idx`` (see the module docstring).

    Returns stats: ``num_documents``, ``num_tokens``, ``num_empty_skipped``, ``dtype``,
    ``vocab_size``, ``bin_path``, ``idx_path``.
    """
    input_path = Path(input_path)
    if input_path.is_dir():
        raise DataError(f"--input={str(input_path)!r} is a directory; pass one .txt or .jsonl "
                        "file (concatenate the files of a folder first)")
    if not input_path.is_file():
        raise FileNotFoundError(f"--input={str(input_path)!r}: no such file; check the path")
    if text_mode not in ("paragraphs", "lines"):
        raise DataError(f"preprocess text_mode={text_mode!r}: must be 'paragraphs' (blank-line "
                         "separated documents) or 'lines' (one document per line)")
    prefix = str(output_prefix)
    if prefix.endswith(("/", os.sep)) or os.path.isdir(prefix):
        raise DataError(f"--out={prefix!r} is a directory; pass a file prefix inside it (writes "
                        "PREFIX.bin and PREFIX.idx), e.g. --out data/corpus")
    ensure_output_dir(os.path.dirname(os.path.abspath(prefix)), "--out")
    vocab_size = int(tokenizer.vocab_size)
    dtype = smallest_token_dtype(vocab_size)
    final_bin, final_idx = get_bin_path(prefix), get_idx_path(prefix)
    tmp_prefix = f"{prefix}.tmp-{os.getpid()}"
    tmp_bin, tmp_idx = get_bin_path(tmp_prefix), get_idx_path(tmp_prefix)

    num_docs = num_tokens = num_empty = 0
    bar = tqdm(total=input_path.stat().st_size, unit="B", unit_scale=True,
               desc=f"tokenizing {input_path.name}", disable=not show_progress)
    is_json = input_path.suffix.lower() in JSON_SUFFIXES
    texts = _iter_jsonl(input_path, json_key, bar) if is_json else _iter_text(input_path,
                                                                              text_mode, bar)
    builder = None
    try:
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        for text in texts:
            if not text.strip():
                num_empty += 1
                continue
            ids = document_ids(tokenizer, text, append_eod=append_eod)
            top = max(ids)
            if min(ids) < 0 or top >= vocab_size:
                raise DataError(f"{input_path}: document {num_docs} has token id {top} outside "
                                 f"[0, vocab_size={vocab_size}); the tokenizer is inconsistent")
            # one document = one sequence of len(ids) tokens
            builder.add_document(np.asarray(ids, dtype=dtype), lengths=[len(ids)])
            num_docs += 1
            num_tokens += len(ids)
        if num_docs == 0:
            raise DataError(f"{input_path}: no non-empty document found")
        builder.finalize(tmp_idx)
        fsync_path(tmp_bin)
        fsync_path(tmp_idx)
        _remove_quietly(final_idx)  # from here until the last rename, no valid pair exists
        os.replace(tmp_bin, final_bin)
        os.replace(tmp_idx, final_idx)
        fsync_path(os.path.dirname(os.path.abspath(final_idx)) or ".")
    finally:
        bar.close()
        if builder is not None and not builder.data_file.closed:
            builder.data_file.close()
        _remove_quietly(tmp_bin)
        _remove_quietly(tmp_idx)

    stats = {"num_documents": num_docs, "num_tokens": num_tokens, "num_empty_skipped": num_empty,
             "dtype": np.dtype(dtype).name, "vocab_size": vocab_size, "bin_path": final_bin,
             "idx_path": final_idx}
    logger.info("wrote %s(.bin/.idx): %d documents, %d tokens, dtype %s", prefix, num_docs,
                num_tokens, stats["dtype"])
    return stats
