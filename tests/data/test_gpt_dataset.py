import pytest
import torch

from megatron_shaping.data import BatchSchedule, SentencePieceTokenizer, build_gpt_datasets, parse_data_path


@pytest.fixture(scope="module")
def datasets(tiny_corpus, tmp_path_factory):
    tok = SentencePieceTokenizer(tiny_corpus["model"])
    return build_gpt_datasets([str(tiny_corpus["prefix"])], tok, seq_length=64, seed=5,
                              train_samples=200, valid_samples=10, split="70,30,0",
                              cache_dir=str(tmp_path_factory.mktemp("idxcache")))


def test_samples_and_split(datasets):
    train, valid = datasets
    assert len(train) >= 200 and len(valid) >= 10
    s = train[0]
    assert set(s) >= {"tokens", "labels", "loss_mask", "position_ids"}
    assert s["tokens"].shape == s["labels"].shape == s["loss_mask"].shape == (64,)
    assert torch.equal(s["tokens"][1:], s["labels"][:-1])      # labels are the next tokens
    # the split is by document: train and validation samples come from different documents
    tr_docs = set(train.document_index.tolist())
    va_docs = set(valid.document_index.tolist())
    assert tr_docs and va_docs and not (tr_docs & va_docs)


def test_deterministic(tiny_corpus, datasets, tmp_path):
    tok = SentencePieceTokenizer(tiny_corpus["model"])
    again, _ = build_gpt_datasets([str(tiny_corpus["prefix"])], tok, 64, 5, 200, 10, "70,30,0", str(tmp_path))
    assert all(torch.equal(again[i]["tokens"], datasets[0][i]["tokens"]) for i in range(20))


def test_blend_weights_parse(tiny_corpus):
    p = str(tiny_corpus["prefix"])
    assert parse_data_path(["0.3", p, "0.7", p]) == ([p, p], [0.3, 0.7])
    assert parse_data_path([p]) == ([p], None)


def test_weighted_blend_builds_from_both_datasets(tiny_corpus, tmp_path):
    # the documented 'W1 PREFIX1 W2 PREFIX2' form: megatron-core refused the test split's size
    # None with weights, so every weighted --data-path raised
    from tests.distributed.launch import init_world_of_one
    init_world_of_one()                 # megatron's BlendedDataset reads the rank (as in training)
    tok = SentencePieceTokenizer(tiny_corpus["model"])
    p = str(tiny_corpus["prefix"])
    train, valid = build_gpt_datasets(["0.5", p, "0.5", p], tok, 64, 5, 100, 10, "70,30,0", str(tmp_path))
    assert len(train) >= 100 and len(valid) >= 10
    assert sorted(set(train.dataset_index[:100].tolist())) == [0, 1]


def test_a_split_without_documents_is_an_error_not_a_hang(tiny_corpus, tmp_path):
    # 7 documents, the default split 98,2,0: the validation range is [7, 7), on which
    # megatron-core's epoch count loops for ever; the alarm turns a regression into a failure
    import signal

    def hung(*_):
        raise TimeoutError("build_gpt_datasets hung on an empty split")

    tok = SentencePieceTokenizer(tiny_corpus["model"])
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        with pytest.raises(ValueError, match=r"data_text_document: split '98,2,0' gives the validation data "
                                             r"documents \[7, 7\) of the 7 .*no tokens"):
            build_gpt_datasets([str(tiny_corpus["prefix"])], tok, 64, 5, 100, 10, "98,2,0", str(tmp_path))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_index_cache_follows_the_data_not_the_path(tiny_corpus, tmp_path):
    # megatron-core keys its index cache by the prefix: the same prefix preprocessed again from
    # fewer documents reused the old indices and read past the new data
    from megatron_shaping.data import write_indexed_dataset
    tok = SentencePieceTokenizer(tiny_corpus["model"])
    texts = tiny_corpus["texts"]
    prefix, cache = str(tmp_path / "data"), str(tmp_path / "cache")
    write_indexed_dataset(texts, tok, prefix)
    first, _ = build_gpt_datasets([prefix], tok, 64, 5, 100, 10, "70,30,0", cache)
    write_indexed_dataset(texts[:3], tok, prefix)
    again, _ = build_gpt_datasets([prefix], tok, 64, 5, 100, 10, "70,30,0", cache)
    assert int(again.document_index.max()) < 3 <= int(first.document_index.max())
    assert all(again[i]["tokens"].shape == (64,) for i in range(len(again)))


def test_batch_schedule(datasets):
    train, _ = datasets
    scheds = [BatchSchedule(global_batch=8, micro_batch=2, dp_rank=r, dp_size=2) for r in range(2)]
    assert scheds[0].accumulation_steps == 2
    seen = []
    for s in scheds:
        mbs = s.micro_batches(train, iteration=3)
        assert len(mbs) == 2 and mbs[0]["tokens"].shape == (2, 64)
        seen += [t for mb in mbs for t in mb["tokens"]]
    expected = [train[i]["tokens"] for i in range(24, 32)]      # iteration 3 of global batch 8
    assert all(torch.equal(a, b) for a, b in zip(seen, expected))
    with pytest.raises(ValueError, match="not divisible"):
        BatchSchedule(global_batch=6, micro_batch=4, dp_rank=0, dp_size=1)


def test_batch_schedule_refuses_token_ids_outside_the_vocabulary(datasets, tiny_corpus):
    # data tokenized with a larger tokenizer than the one given to the run: the first batch
    # with an id past the vocabulary is named (the embedding would otherwise index past its
    # end, or a padded vocabulary train silently on the wrong pieces)
    train, valid = datasets
    top = max(int(train[i]["tokens"].max()) for i in range(8))
    vocab = SentencePieceTokenizer(tiny_corpus["model"]).vocab_size
    ok = BatchSchedule(global_batch=8, micro_batch=2, dp_rank=0, dp_size=1, vocab_size=vocab, source="corpus_x")
    assert len(ok.micro_batches(train, iteration=0)) == 4           # the right tokenizer passes
    small = BatchSchedule(global_batch=8, micro_batch=2, dp_rank=0, dp_size=1, vocab_size=top, source="corpus_x")
    with pytest.raises(ValueError, match=rf"corpus_x: token id {top} in global batch 0 .* \[0, {top}\)"):
        small.micro_batches(train, iteration=0)
    with pytest.raises(ValueError, match="in validation batch 0 "):
        small.micro_batches(valid, 0, "validation batch")
    # an id past the vocabulary only in a sample's last label (the id after its last token)
    sample = {"tokens": torch.tensor([1, 2, 3]), "labels": torch.tensor([2, 3, 9]), "loss_mask": torch.ones(3)}
    one = BatchSchedule(global_batch=1, micro_batch=1, dp_rank=0, dp_size=1, vocab_size=5, source="corpus_x")
    with pytest.raises(ValueError, match="token id 9 in global batch 0 "):
        one.micro_batches([sample], iteration=0)
