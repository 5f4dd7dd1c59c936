"""Tokenizer, raw text to megatron-core indexed datasets, GPT samples, and the default corpus."""
from .corpus import Corpus, default_cache_dir, prepare_stdlib_corpus
from .gpt import BatchSchedule, build_gpt_datasets, parse_data_path
from .indexed import DataFormatError, check_indexed_prefix, read_documents, write_indexed_dataset
from .tokenizer import SentencePieceTokenizer, train_tokenizer

__all__ = ["BatchSchedule", "Corpus", "DataFormatError", "SentencePieceTokenizer", "build_gpt_datasets",
           "check_indexed_prefix", "default_cache_dir", "parse_data_path", "prepare_stdlib_corpus",
           "read_documents", "train_tokenizer", "write_indexed_dataset"]
