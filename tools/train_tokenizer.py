#!/usr/bin/env python
"""Train a SentencePiece BPE tokenizer with LLaMA-like settings (byte fallback, split digits).

    python tools/train_tokenizer.py --input a.txt b.jsonl --vocab-size 8000 --output tok.model

Inputs are read as tools/preprocess_data.py reads them (.txt files, .jsonl with a text field);
the model trains on all of their non-blank lines, in order, so the result is deterministic.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from megatron_shaping.data import SentencePieceTokenizer, read_documents, train_tokenizer  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help=".txt or .jsonl files")
    p.add_argument("--output", required=True, help="path of the .model file to write")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--json-key", default="text", help="text field of .jsonl lines (default: text)")
    p.add_argument("--txt-mode", choices=["file", "line"], default="file",
                   help="a .txt file is one document (file) or one per line (line)")
    p.add_argument("--max-bytes", type=int, default=0,
                   help="train on the first N bytes of documents only (0: all)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="sentencepiece threads")
    args = p.parse_args(argv)

    def docs():
        total = 0
        for d in read_documents(args.input, args.json_key, args.txt_mode):
            yield d
            total += len(d.encode())
            if args.max_bytes and total >= args.max_bytes:
                return

    t0 = time.time()
    path = train_tokenizer(docs(), args.output, args.vocab_size, args.workers)
    tok = SentencePieceTokenizer(path)
    print(f"wrote {path}: vocab {tok.vocab_size}, eod id {tok.eod}, {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
