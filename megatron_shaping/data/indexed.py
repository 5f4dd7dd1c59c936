"""Raw text (``.txt``, ``.jsonl``) to megatron-core indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``).

One document per jsonl line (its ``json_key`` field, "text" by default, as Megatron's
tools/preprocess_data.py), per ``.txt`` file, or per line of a ``.txt`` file with
``txt_mode="line"``. Each document's tokens are followed by the tokenizer's EOD token, so
GPT samples that span documents see where one ends.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, List, Sequence, Tuple, Union

import numpy as np

TEXT_SUFFIXES = (".txt", ".text", ".py", ".md")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TXT_MODES = ("file", "line")
#: First bytes of a megatron-core .idx file.
IDX_MAGIC = b"MMIDIDX\x00\x00"


class DataFormatError(ValueError):
    """Input data that is not in the expected format; the message names the file."""


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not UTF-8 text ({e}); expected a UTF-8 .txt file") from None


def read_documents(paths: Sequence[Union[str, Path]], json_key: str = "text",
                   txt_mode: str = "file") -> Iterator[str]:
    """Documents from ``.txt``-like and ``.jsonl`` files, in the order given."""
    if txt_mode not in TXT_MODES:
        raise ValueError(f"txt_mode must be one of {TXT_MODES}, got {txt_mode!r}")
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise FileNotFoundError(f"input {path} does not exist (expected a .txt or .jsonl file)")
        if path.is_dir():
            raise DataFormatError(f"input {path} is a directory; pass its .txt/.jsonl files")
        suffix = path.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            yield from _read_jsonl(path, json_key)
        elif suffix in TEXT_SUFFIXES:
            text = _read_text(path)
            if txt_mode == "file":
                if text.strip():
                    yield text
            else:
                yield from (line for line in text.split("\n") if line.strip())
        else:
            raise DataFormatError(f"input {path}: unknown extension {suffix!r}; expected one of "
                                  f"{TEXT_SUFFIXES + JSONL_SUFFIXES} (.jsonl: one JSON object per line "
                                  f"with a {json_key!r} field)")


def _read_jsonl(path: Path, key: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{lineno}: not valid JSON ({e.msg}); expected one JSON "
                                      f"object per line with a {key!r} field") from None
            if not isinstance(obj, dict) or key not in obj:
                raise DataFormatError(f"{path}:{lineno}: expected a JSON object with a {key!r} field, "
                                      f"got {type(obj).__name__}"
                                      + (f" with keys {sorted(obj)[:10]}" if isinstance(obj, dict) else ""))
            if not isinstance(obj[key], str):
                raise DataFormatError(f"{path}:{lineno}: field {key!r} must be a string, "
                                      f"got {type(obj[key]).__name__}")
            if obj[key].strip():
                yield obj[key]


def _batches(docs: Iterable[str], size: int) -> Iterator[List[str]]:
    batch: List[str] = []
    for d in docs:
        batch.append(d)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def token_dtype(vocab_size: int):
    """uint16 while the vocabulary fits, as megatron's ``DType.optimal_dtype``."""
    return np.uint16 if vocab_size < 65500 else np.int32


def write_indexed_dataset(docs: Iterable[str], tokenizer, output_prefix: Union[str, Path],
                          append_eod: bool = True, num_threads: int = 2, batch_docs: int = 256) -> Tuple[int, int]:
    """Tokenise ``docs`` into ``output_prefix.bin/.idx``; returns (documents, tokens).
    Written under a temporary name and renamed, so a reader never sees half a dataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_name(prefix.name + f".tmp{os.getpid()}")
    builder = IndexedDatasetBuilder(str(tmp) + ".bin", dtype=token_dtype(tokenizer.vocab_size))
    n_docs = n_tokens = 0
    for batch in _batches(docs, batch_docs):
        for ids in tokenizer.tokenize_batch(batch, num_threads=num_threads):
            if append_eod:
                ids = ids + [tokenizer.eod]
            if not ids:
                continue
            builder.add_document(np.asarray(ids), [len(ids)])
            n_docs += 1
            n_tokens += len(ids)
    builder.finalize(str(tmp) + ".idx")
    if n_docs == 0:
        for ext in (".bin", ".idx"):
            os.remove(str(tmp) + ext)
        raise DataFormatError(f"no non-empty documents to write to {prefix}")
    for ext in (".bin", ".idx"):
        os.replace(str(tmp) + ext, str(prefix) + ext)
    return n_docs, n_tokens


def check_indexed_prefix(prefix: Union[str, Path]) -> str:
    """A clear error for a path that is not a megatron-core indexed dataset prefix."""
    prefix = str(prefix)
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext):
            prefix = prefix[: -len(ext)]
    raw = Path(prefix)
    if raw.is_file() and raw.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES:
        raise DataFormatError(f"--data-path {prefix} is raw text; expected the prefix of a megatron-core "
                              f"indexed dataset (PREFIX.bin and PREFIX.idx). Make one with: "
                              f"python tools/preprocess_data.py --input {prefix} --output-prefix PREFIX "
                              f"--tokenizer-model TOKENIZER.model")
    missing = [prefix + ext for ext in (".bin", ".idx") if not Path(prefix + ext).is_file()]
    if missing:
        raise FileNotFoundError(f"--data-path {prefix}: missing {', '.join(missing)}; expected the prefix of a "
                                f"megatron-core indexed dataset (PREFIX.bin and PREFIX.idx, made by "
                                f"tools/preprocess_data.py)")
    with open(prefix + ".idx", "rb") as f:
        head = f.read(len(IDX_MAGIC))
    if head != IDX_MAGIC:
        raise DataFormatError(f"{prefix}.idx is not a megatron-core index file (header {head!r}, "
                              f"expected {IDX_MAGIC!r})")
    _check_bin_size(prefix)
    return prefix


def _check_bin_size(prefix: str) -> None:
    """The .bin holds every token the .idx points to (a truncated copy failed later, deep in
    numpy, naming no file)."""
    from megatron.core.datasets.indexed_dataset import _IndexReader
    try:
        index = _IndexReader(prefix + ".idx", multimodal=False)
    except Exception as e:
        raise DataFormatError(f"{prefix}.idx cannot be read as a megatron-core index: {type(e).__name__}: {e}") from None
    if len(index.sequence_lengths):
        need = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
        have = Path(prefix + ".bin").stat().st_size
        if have < need:
            raise DataFormatError(f"{prefix}.bin has {have} bytes, its .idx points to {need}: truncated or from "
                                  f"another preprocessing run; preprocess again or copy it completely")
