"""GPT samples from megatron-core indexed datasets, and a deterministic batch schedule.

Samples come from megatron-core's ``GPTDataset`` built by ``BlendedMegatronDatasetBuilder``
(document/sample/shuffle indices, train/valid/test split by Megatron's split string, blends
of several datasets), so data behaves as in Megatron-LM. Each sample is
``{"tokens", "labels", "loss_mask", "position_ids"}`` of ``seq_length`` tokens.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .indexed import check_indexed_prefix


def parse_data_path(items: Sequence[str]) -> Tuple[List[str], Optional[List[float]]]:
    """Megatron's ``--data-path``: ``PREFIX [PREFIX ...]`` or ``W1 PREFIX1 W2 PREFIX2 ...``."""
    items = list(items)
    if not items:
        raise ValueError("--data-path is empty")

    def is_number(s):
        try:
            float(s)
            return True
        except ValueError:
            return False

    if len(items) > 1 and is_number(items[0]):
        if len(items) % 2:
            raise ValueError(f"--data-path {' '.join(items)}: expected pairs 'WEIGHT PREFIX'")
        weights = []
        for w in items[0::2]:
            if not is_number(w):
                raise ValueError(f"--data-path: expected a weight, got {w!r} (format: W1 PREFIX1 W2 PREFIX2 ...)")
            weights.append(float(w))
        return [check_indexed_prefix(p) for p in items[1::2]], weights
    return [check_indexed_prefix(p) for p in items], None


def build_gpt_datasets(data_path: Sequence[str], tokenizer, seq_length: int, seed: int,
                       train_samples: int, valid_samples: int, split: str = "98,2,0",
                       cache_dir: Optional[str] = None):
    """(train, valid) GPTDatasets with at least the requested numbers of samples (megatron
    repeats epochs as needed). Must be called on every rank: megatron builds its index cache
    on rank 0 first, behind a barrier, when torch.distributed is initialised."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    prefixes, weights = parse_data_path(data_path)
    logging.getLogger("megatron.core.datasets").setLevel(logging.WARNING)
    if cache_dir is not None:
        cache_dir = str(Path(cache_dir) / _files_fingerprint(prefixes))
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights), split=split,
        path_to_cache=cache_dir, tokenizer=tokenizer, reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
    _check_splits(prefixes, config.split_matrix, (train_samples, valid_samples), split)
    # the test split's size 0, not None: megatron-core refuses None with blend weights
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, 0], lambda: True, config).build()
    if train is None or valid is None:
        raise ValueError(f"split {split!r} leaves no {'training' if train is None else 'validation'} "
                         f"data; give both a positive weight (e.g. '98,2,0')")
    return train, valid


def _files_fingerprint(prefixes: Sequence[str]) -> str:
    """A name for the index cache of these datasets as they are on disk: megatron-core keys its
    cache by the path, so a prefix preprocessed again (other documents) reused the old indices
    (reads past the data, or silently other samples)."""
    import hashlib
    h = hashlib.sha256()
    for prefix in prefixes:
        for ext in (".idx", ".bin"):
            st = os.stat(prefix + ext)
            h.update(f"{os.path.abspath(prefix)}{ext}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return "data-" + h.hexdigest()[:16]


def _check_splits(prefixes: Sequence[str], split_matrix, sizes: Sequence[int], split: str) -> None:
    """Every split that must give samples holds tokens in every dataset, with the document
    ranges megatron-core takes (``round(bound * documents)``): on an empty range its epoch
    count loops for ever (rank 0 spins, the others wait at its barrier)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    for prefix in prefixes:
        index = IndexedDataset(prefix)      # kept alive: sequence_lengths is a view of its mmap
        lengths = index.sequence_lengths
        n = len(lengths)
        for name, bounds, size in zip(("training", "validation"), split_matrix, sizes):
            if bounds is None or not size:
                continue
            beg, end = int(round(bounds[0] * n)), int(round(bounds[1] * n))
            if int(lengths[beg:end].sum()) == 0:
                raise ValueError(f"{prefix}: split {split!r} gives the {name} data documents [{beg}, {end}) of "
                                 f"the {n} in this dataset: no tokens; use more documents or a split with a "
                                 f"larger {name} share (e.g. '90,10,0')")


def collate(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask")}


@dataclass
class BatchSchedule:
    """Which samples each rank reads: iteration ``i`` consumes dataset samples
    ``[i * global_batch, (i + 1) * global_batch)``; data-parallel rank ``r`` takes the ``r``-th
    contiguous ``global_batch / dp`` of them, in micro-batches. Depends only on the iteration,
    so a resumed run reads exactly what the uninterrupted run would have read, and all TP/PP
    ranks of one data-parallel rank read the same samples."""
    global_batch: int
    micro_batch: int
    dp_rank: int
    dp_size: int
    #: the tokenizer's vocabulary: every batch's token ids are checked against it (data
    #: tokenized with another tokenizer would index past the embedding, or silently train on
    #: the wrong pieces); ``source`` names the data in that error
    vocab_size: Optional[int] = None
    source: str = "the data"

    def __post_init__(self):
        per_rank = self.micro_batch * self.dp_size
        if self.global_batch % per_rank:
            raise ValueError(f"--global-batch-size {self.global_batch} is not divisible by "
                             f"--micro-batch-size {self.micro_batch} x data-parallel size {self.dp_size}")

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp_size)

    def micro_batches(self, dataset, iteration: int, what: str = "global batch") -> List[Dict[str, torch.Tensor]]:
        """This rank's micro-batches of ``iteration``; ``what`` names it in the vocabulary error
        (e.g. "validation batch")."""
        per_rank = self.global_batch // self.dp_size
        start = iteration * self.global_batch + self.dp_rank * per_rank
        n = len(dataset)
        out = []
        for k in range(self.accumulation_steps):
            idx = [(start + k * self.micro_batch + j) % n for j in range(self.micro_batch)]
            out.append(collate([dataset[i] for i in idx]))
            if self.vocab_size is not None:
                self._check_ids(out[-1], f"{what} {iteration}")
        return out

    def _check_ids(self, batch: Dict[str, torch.Tensor], where: str) -> None:
        # tokens and labels: each sample's last id is in its labels only
        for key in ("tokens", "labels"):
            lo, hi = int(batch[key].min()), int(batch[key].max())
            if lo < 0 or hi >= self.vocab_size:
                bad = hi if hi >= self.vocab_size else lo
                # raised on this rank only: the launcher (deepspeed, torchrun) stops the others
                raise ValueError(f"{self.source}: token id {bad} in {where} is outside the tokenizer's vocabulary "
                                 f"[0, {self.vocab_size}): the data was tokenized with another tokenizer; pass the "
                                 "--tokenizer-model it was preprocessed with (or preprocess it again)")
