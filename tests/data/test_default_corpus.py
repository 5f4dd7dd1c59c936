from megatron_shaping.data import SentencePieceTokenizer, prepare_stdlib_corpus
from megatron_shaping.data.corpus import stdlib_files


def _small(cache):
    return prepare_stdlib_corpus(cache, vocab_size=512, corpus_bytes=200_000, tokenizer_bytes=100_000,
                                 log=lambda *a: None)


def test_prepared_once_cached_and_deterministic(tmp_path):
    a = _small(tmp_path / "a")
    bin_a = open(a.data_prefix + ".bin", "rb").read()
    mtime = (a.directory / "manifest.json").stat().st_mtime_ns
    again = _small(tmp_path / "a")                      # reuses the cache entry
    assert again.data_prefix == a.data_prefix
    assert (a.directory / "manifest.json").stat().st_mtime_ns == mtime
    b = _small(tmp_path / "b")                          # fresh: identical bytes
    assert open(b.data_prefix + ".bin", "rb").read() == bin_a
    assert open(b.tokenizer_model, "rb").read() == open(a.tokenizer_model, "rb").read()
    assert a.manifest["tokens"] > 50_000 and a.manifest["documents"] == a.manifest["files"]
    assert SentencePieceTokenizer(a.tokenizer_model).vocab_size == 512


def test_stdlib_selection_excludes_tests():
    files = stdlib_files()
    assert len(files) > 100
    assert not any(r.startswith("test/") or "/tests/" in r or "site-packages" in r for r, _ in files)
