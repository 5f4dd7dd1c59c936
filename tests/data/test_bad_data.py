"""Bad paths and formats fail with a message that names the file and says what was expected."""
import json
import re

import pytest

from megatron_shaping.data import (DataFormatError, SentencePieceTokenizer, check_indexed_prefix,
                                   parse_data_path, read_documents)


def test_missing_input(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.txt")) + ".*expected"):
        list(read_documents([tmp_path / "nope.txt"]))


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(DataFormatError, match=re.escape(f"{p}:2") + ".*not valid JSON.*'text'"):
        list(read_documents([p]))


def test_jsonl_missing_key(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"content": "hi"}) + "\n")
    with pytest.raises(DataFormatError, match=re.escape(f"{p}:1") + ".*'text' field.*content"):
        list(read_documents([p]))
    assert list(read_documents([p], json_key="content")) == ["hi"]


def test_unknown_extension_and_binary(tmp_path):
    p = tmp_path / "x.parquet"
    p.write_bytes(b"PAR1")
    with pytest.raises(DataFormatError, match=re.escape(str(p)) + ".*unknown extension.*jsonl"):
        list(read_documents([p]))
    b = tmp_path / "x.txt"
    b.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataFormatError, match=re.escape(str(b)) + ".*UTF-8"):
        list(read_documents([b]))


def test_data_path_errors(tmp_path, tiny_corpus):
    raw = tmp_path / "corpus.jsonl"
    raw.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(DataFormatError, match="raw text.*PREFIX.bin and PREFIX.idx.*preprocess_data.py"):
        check_indexed_prefix(raw)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing")) + r"\.bin.*indexed dataset"):
        check_indexed_prefix(tmp_path / "missing")
    (tmp_path / "bad.bin").write_bytes(b"\0" * 8)
    (tmp_path / "bad.idx").write_bytes(b"garbage!garbage!")
    with pytest.raises(DataFormatError, match=re.escape(str(tmp_path / "bad")) + r"\.idx is not a megatron-core index"):
        check_indexed_prefix(tmp_path / "bad")
    # a valid prefix, given with or without its extension
    assert check_indexed_prefix(str(tiny_corpus["prefix"]) + ".bin") == str(tiny_corpus["prefix"])
    with pytest.raises(ValueError, match="pairs"):
        parse_data_path(["0.5", str(tiny_corpus["prefix"]), "0.5"])


def test_bad_tokenizer_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="tok.model.*SentencePiece"):
        SentencePieceTokenizer(tmp_path / "tok.model")
    (tmp_path / "junk.model").write_text("not a model")
    with pytest.raises(ValueError, match="junk.model is not a SentencePiece model"):
        SentencePieceTokenizer(tmp_path / "junk.model")


def test_tokenizer_without_eos_is_refused(tmp_path, small_texts):
    # eod = -1 was written as 65535 into the uint16 .bin (an out-of-vocabulary id at training)
    import io
    import sentencepiece as spm
    from megatron_shaping.data.tokenizer import llama_trainer_options, sentences
    opts = dict(llama_trainer_options(600), eos_id=-1)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=sentences(small_texts), model_writer=model, **opts)
    (tmp_path / "noeos.model").write_bytes(model.getvalue())
    with pytest.raises(ValueError, match=r"noeos.model has no end-of-sequence piece \(eos_id -1\)"):
        SentencePieceTokenizer(tmp_path / "noeos.model")


def test_truncated_bin_is_named(tmp_path, tiny_corpus):
    import shutil
    src = str(tiny_corpus["prefix"])
    prefix = str(tmp_path / "copy")
    shutil.copy(src + ".idx", prefix + ".idx")
    data = open(src + ".bin", "rb").read()
    open(prefix + ".bin", "wb").write(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match=re.escape(prefix) + rf"\.bin has {len(data) // 2} bytes, its \.idx "
                                              rf"points to {len(data)}: truncated"):
        check_indexed_prefix(prefix)
    open(prefix + ".bin", "wb").write(data)
    assert check_indexed_prefix(prefix) == prefix
