"""SentencePiece BPE tokenizer: training with LLaMA-like settings, and the adapter megatron-core's
GPT dataset expects (``eod``, ``vocab_size``, ``tokenize``, ``detokenize``).

LLaMA's tokenizer (Touvron et al. 2023) is a SentencePiece BPE with ``byte_fallback`` (no
unknown characters: unseen ones become byte pieces) and ``split_digits`` (numbers are split into
digits). Two settings differ from LLaMA because our default corpus is source code, where every
space matters: the identity normalisation with ``remove_extra_whitespaces=False`` and no dummy
prefix, so ``detokenize(tokenize(text)) == text`` exactly.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Iterable, Iterator, List, Sequence, Union

#: Special ids, as in LLaMA: <unk>=0, <s>=1, </s>=2 (</s> is the end-of-document token), no pad.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


def llama_trainer_options(vocab_size: int, num_threads: int = 2) -> dict:
    return dict(model_type="bpe", vocab_size=vocab_size, byte_fallback=True, split_digits=True,
                allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
                normalization_rule_name="identity", add_dummy_prefix=False,
                character_coverage=0.99995, max_sentencepiece_length=16,
                unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
                # Use every sentence in the given order: sampling/shuffling would make the
                # model depend on sentencepiece's RNG.
                input_sentence_size=0, shuffle_input_sentence=False,
                num_threads=num_threads, minloglevel=2)


#: sentencepiece's max_sentence_length: it drops a longer line without a word
MAX_SENTENCE_BYTES = 4192
#: characters per piece of a line over that: at most 4 UTF-8 bytes each, so below it
LONG_LINE_CHARS = 1024


def sentences(texts: Iterable[str]) -> Iterator[str]:
    """SentencePiece trains on lines; blank lines carry nothing to learn. A line longer than
    sentencepiece takes (:data:`MAX_SENTENCE_BYTES`: one-line jsonl documents, minified text) is
    cut into pieces of :data:`LONG_LINE_CHARS` characters instead of being dropped; every other
    line is passed as it is."""
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            if len(line) <= LONG_LINE_CHARS or len(line.encode("utf-8")) <= MAX_SENTENCE_BYTES:
                yield line
                continue
            for i in range(0, len(line), LONG_LINE_CHARS):
                yield line[i:i + LONG_LINE_CHARS]


def train_tokenizer(texts: Iterable[str], model_path: Union[str, Path], vocab_size: int = 4096,
                    num_threads: int = 2) -> Path:
    """Train on ``texts`` and write ``model_path`` (a ``.model`` file) atomically."""
    import sentencepiece as spm
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences(texts), model_writer=buf,
                                       **llama_trainer_options(vocab_size, num_threads))
    except RuntimeError as e:
        # Most commonly "Vocabulary size too high" for a small corpus.
        raise ValueError(f"sentencepiece could not train a {vocab_size}-piece tokenizer: {e}") from None
    tmp = model_path.with_name(model_path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, model_path)
    return model_path


class SentencePieceTokenizer:
    """What megatron-core's GPTDataset needs from a tokenizer, plus batch encoding."""

    def __init__(self, model_path: Union[str, Path]):
        import sentencepiece as spm
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {path} not found: expected a SentencePiece "
                                    f".model file (make one with tools/train_tokenizer.py)")
        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # sentencepiece raises OSError/RuntimeError on a bad file
            raise ValueError(f"tokenizer model {path} is not a SentencePiece model: {e}") from None
        if self.sp.eos_id() < 0:
            # eod -1 would be written as 65535 into a uint16 .bin (or mask real tokens)
            raise ValueError(f"tokenizer model {path} has no end-of-sequence piece (eos_id -1): documents could "
                             f"not be separated; train it with an eos piece (tools/train_tokenizer.py does)")
        # megatron-core hashes this into its dataset cache key: the content, not the path,
        # identifies the tokenizer.
        self.unique_identifiers = {"class": type(self).__name__,
                                   "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self.sp.eos_id()

    @property
    def bos(self) -> int:
        return self.sp.bos_id()

    def tokenize(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str], num_threads: int = 2) -> List[List[int]]:
        return self.sp.encode(list(texts), num_threads=num_threads)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def __repr__(self):
        return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
