"""The default corpus: the running interpreter's standard-library sources, tokenised and cached.

Every machine that runs this project has it, so a demo or test needs no download. The
selection is deterministic for a given interpreter: non-test ``.py`` files under
``sysconfig.get_paths()["stdlib"]`` ordered by a hash of their relative path (a spread over
all packages rather than the alphabetically first ones), taken until ``corpus_bytes``.
The tokenizer is trained on the first ``tokenizer_bytes`` of that order.

The cache directory (``$MEGATRON_SHAPING_CACHE`` or ``./cache``) gets one subdirectory per
(Python version, file list digest, sizes, vocab): ``tokenizer.model``, ``corpus_text_document``
``.bin/.idx`` and ``manifest.json``. Preparation holds an exclusive file lock, so concurrent
ranks (or "nodes" on one machine) build it once and the others wait and reuse it.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from .indexed import write_indexed_dataset
from .tokenizer import SentencePieceTokenizer, train_tokenizer

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
DEFAULT_CORPUS_BYTES = 8_000_000
DEFAULT_TOKENIZER_BYTES = 3_000_000
DEFAULT_VOCAB_SIZE = 4096
FORMAT = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEGATRON_SHAPING_CACHE", "cache")).resolve()


def stdlib_files(root: Optional[Path] = None) -> List[Tuple[str, int]]:
    """(relative path, size) of the candidate files, in the deterministic hash order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory {root} not found "
                                f"(sysconfig.get_paths()['stdlib']); pass --data-path instead")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for fn in filenames:
            if fn.endswith(".py"):
                full = Path(dirpath) / fn
                found.append((full.relative_to(root).as_posix(), full.stat().st_size))
    found.sort(key=lambda rs: hashlib.sha256(rs[0].encode()).hexdigest())
    return found


def _take(files, budget: int):
    out, total = [], 0
    for rel, size in files:
        if total >= budget:
            break
        out.append(rel)
        total += size
    return out


@dataclass
class Corpus:
    data_prefix: str
    tokenizer_model: str
    directory: Path
    manifest: dict


def prepare_stdlib_corpus(cache_dir: Optional[Path] = None, vocab_size: int = DEFAULT_VOCAB_SIZE,
                          corpus_bytes: int = DEFAULT_CORPUS_BYTES,
                          tokenizer_bytes: int = DEFAULT_TOKENIZER_BYTES,
                          num_threads: int = 2, log=print) -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    chosen = _take(files, corpus_bytes)
    digest = hashlib.sha256(json.dumps([files, corpus_bytes, tokenizer_bytes, vocab_size, FORMAT]).encode()).hexdigest()[:12]
    name = f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}-v{vocab_size}-{digest}"
    directory = Path(cache_dir or default_cache_dir()) / name
    directory.mkdir(parents=True, exist_ok=True)
    manifest_path = directory / "manifest.json"
    corpus = Corpus(str(directory / "corpus_text_document"), str(directory / "tokenizer.model"), directory, {})
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)     # released when the file closes
        if manifest_path.exists():
            corpus.manifest = json.loads(manifest_path.read_text())
            return corpus
        t0 = time.time()
        log(f"[data] preparing the default corpus in {directory}: {len(chosen)} stdlib files from {root}")

        def texts(rels):
            for rel in rels:
                # errors="replace": a few stdlib files carry test bytes that are not UTF-8.
                yield (root / rel).read_text(encoding="utf-8", errors="replace")

        train_tokenizer(texts(_take(files, tokenizer_bytes)), corpus.tokenizer_model, vocab_size, num_threads)
        t1 = time.time()
        tok = SentencePieceTokenizer(corpus.tokenizer_model)
        n_docs, n_tokens = write_indexed_dataset(texts(chosen), tok, corpus.data_prefix, num_threads=num_threads)
        chosen_set = set(chosen)
        corpus.manifest = {"format": FORMAT, "python": sys.version.split()[0], "stdlib": str(root),
                           "files": len(chosen), "bytes": sum(s for r, s in files if r in chosen_set),
                           "documents": n_docs, "tokens": n_tokens, "vocab_size": vocab_size,
                           "tokenizer_seconds": round(t1 - t0, 2), "tokenize_seconds": round(time.time() - t1, 2)}
        tmp = manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(corpus.manifest, indent=1))
        os.replace(tmp, manifest_path)     # the manifest marks a complete cache entry
        log(f"[data] corpus ready in {time.time() - t0:.1f}s: {n_docs} documents, {n_tokens} tokens")
    return corpus
