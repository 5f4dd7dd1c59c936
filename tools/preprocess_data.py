#!/usr/bin/env python
"""Tokenise .txt / .jsonl files into a megatron-core indexed dataset (PREFIX.bin + PREFIX.idx).

    python tools/preprocess_data.py --input corpus.jsonl --tokenizer-model tok.model \\
        --output-prefix data/corpus_text_document

Argument names like Megatron-LM's tools/preprocess_data.py (--input, --output-prefix,
--json-keys, here one key, --tokenizer-model, --workers); unlike it, EOD is appended by default.
Each document (a .jsonl line's --json-keys field, or a .txt file, or a .txt line with
--txt-mode line) gets an EOD token appended unless --no-append-eod. Train with ``--data-path data/corpus_text_document``.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from megatron_shaping.data import SentencePieceTokenizer, read_documents, write_indexed_dataset  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help=".txt or .jsonl files")
    p.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin and .idx")
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece .model (tools/train_tokenizer.py)")
    p.add_argument("--json-keys", default="text", help="text field of .jsonl lines (default: text)")
    p.add_argument("--txt-mode", choices=["file", "line"], default="file",
                   help="a .txt file is one document (file) or one per line (line)")
    p.add_argument("--no-append-eod", dest="append_eod", action="store_false")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer threads")
    args = p.parse_args(argv)

    tok = SentencePieceTokenizer(args.tokenizer_model)
    t0 = time.time()
    n_docs, n_tokens = write_indexed_dataset(read_documents(args.input, args.json_keys, args.txt_mode), tok,
                                             args.output_prefix, append_eod=args.append_eod,
                                             num_threads=args.workers)
    print(f"wrote {args.output_prefix}.bin/.idx: {n_docs} documents, {n_tokens} tokens, "
          f"{time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
