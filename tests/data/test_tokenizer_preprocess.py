import numpy as np
import pytest

from megatron_shaping.data import SentencePieceTokenizer, train_tokenizer


def test_round_trip_through_indexed_dataset(tiny_corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    tok = SentencePieceTokenizer(tiny_corpus["model"])
    assert tok.vocab_size == 600 and tok.eod == 2
    ds = IndexedDataset(str(tiny_corpus["prefix"]))
    assert len(ds) == len(tiny_corpus["texts"])            # one sequence per document
    assert ds.index.dtype == np.uint16                      # small vocabulary: 2-byte tokens
    for seq, text in zip(ds, tiny_corpus["texts"]):
        assert seq[-1] == tok.eod and tok.eod not in seq[:-1]
        assert tok.detokenize(seq[:-1]) == text             # exact, whitespace included


def test_llama_like_settings(tiny_corpus):
    tok = SentencePieceTokenizer(tiny_corpus["model"])
    # split_digits: every digit is its own piece
    pieces = tok.sp.encode("x = 12345", out_type=str)
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("12345")
    # byte_fallback: unseen characters become byte pieces, and decode back exactly
    text = "Ωμέγα ☃"
    ids = tok.tokenize(text)
    assert tok.sp.unk_id() not in ids
    assert tok.detokenize(ids) == text


def test_training_is_deterministic(tmp_path, small_texts):
    a = train_tokenizer(small_texts, tmp_path / "a.model", 500)
    b = train_tokenizer(small_texts, tmp_path / "b.model", 500)
    assert a.read_bytes() == b.read_bytes()


def test_vocab_too_large_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="could not train a 5000-piece tokenizer"):
        train_tokenizer(["just a few words"] * 3, tmp_path / "t.model", 5000)


def test_one_line_documents_are_learned_not_dropped(tmp_path, small_texts):
    # jsonl documents of one long line each: sentencepiece dropped every line over 4192 bytes,
    # and training failed with a misleading "Vocabulary size too high"
    from megatron_shaping.data.tokenizer import sentences, train_tokenizer
    one_line = [t.replace("\n", " ") for t in small_texts if len(t.encode()) > 4192]
    assert len(one_line) >= 4
    mid = "x" * 2000                      # over LONG_LINE_CHARS, within sentencepiece's limit: whole
    assert list(sentences([mid])) == [mid]
    pieces = list(sentences(one_line))
    assert max(len(p.encode()) for p in pieces) <= 4192 and "".join(pieces) == "".join(one_line)
    tok = SentencePieceTokenizer(train_tokenizer(one_line, tmp_path / "long.model", vocab_size=600))
    assert tok.vocab_size == 600 and tok.detokenize(tok.tokenize(one_line[0][:500])) == one_line[0][:500]
