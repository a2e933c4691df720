"""The training loader: sampler -> rank shard -> records read by offset -> tokenised `Batch`es.

An epoch's plan (which lines, in which order) depends only on (seed, epoch) and the sampler
settings, so every rank computes the same plan and takes its own disjoint part, and a resumed run
continues from the batch it stopped at without replaying the data before it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from weighted_mtp.data.collate import Batch, collate, example_from_record, pack
from weighted_mtp.data.index import SplitIndex, SplitPaths
from weighted_mtp.data.prepare import prepare_dataset, processed_dir, tokenizer_fingerprint
from weighted_mtp.data.samplers import select, shard
from weighted_mtp.data.sources import raw_dir_for
from weighted_mtp.data.templates import prompt_adds_bos, render
from weighted_mtp.errors import DataError

log = logging.getLogger(__name__)

PAIR_SAMPLERS = ("pairs", "length_balanced_pairs")


class TrainLoader:
    """Iterable of `Batch`; deterministic for (seed, epoch); resumable through state_dict.

    For pair samplers a batch of `batch_size` rows holds batch_size // 2 pairs, rows (2i, 2i+1)
    being (correct, incorrect). With world_size > 1 each epoch's selection is cut to a multiple of
    world_size first, so every rank yields the same number of batches.
    """

    def __init__(
        self,
        index: SplitIndex,
        tokenizer: Any,
        *,
        batch_size: int,
        max_length: int,
        seed: int,
        sampler: str = "correct_only",
        template: str = "alpaca",
        n_samples: int | None = None,
        max_pairs_per_problem: int = 4,
        difficulty_bins: Sequence[int] = (0,),
        difficulty_weights: Sequence[float] = (1.0,),
        length_bin_size: int = 32,
        pack: bool = False,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        num_workers: int = 0,
    ) -> None:
        self.is_pair = sampler in PAIR_SAMPLERS
        if self.is_pair and (batch_size < 2 or batch_size % 2):
            raise DataError(f"training.batch_size must be even for the {sampler!r} sampler, got {batch_size}")
        if pack and sampler not in ("correct_only", "difficulty_weighted"):
            raise DataError(f"data.pack needs a correct-only sampler (correct_only, difficulty_weighted), not {sampler!r}")
        self.index = index
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.units_per_batch = batch_size // 2 if self.is_pair else batch_size
        self.max_length = max_length
        self.seed = seed
        self.sampler = sampler
        self.template = template
        self.pack = pack
        self.rank, self.world_size = rank, world_size
        self.shuffle = shuffle
        self.num_workers = num_workers
        self._sampler_args = {
            "n_samples": n_samples,
            "max_pairs_per_problem": max_pairs_per_problem,
            "difficulty_bins": list(difficulty_bins),
            "difficulty_weights": list(difficulty_weights),
            "length_bin_size": length_bin_size,
        }
        self.epoch = 0
        self._batches_done = 0
        self._skipped = 0  # units of this epoch consumed before a resume on another number of ranks
        self._plan: tuple[int, np.ndarray] | None = None

    # ---- the epoch plan

    def _units(self) -> np.ndarray:
        """This rank's units ([n, 1] lines or [n, 2] pairs) for the current epoch, computed once per epoch."""
        if self._plan is None or self._plan[0] != self.epoch:
            selection = select(self.index, self.sampler, seed=self.seed, epoch=self.epoch, **self._sampler_args)
            if not self.shuffle:
                selection = selection[np.lexsort(selection.T[::-1])]
            selection = selection[self._skipped :]
            if self.world_size > 1:
                selection = selection[: len(selection) - len(selection) % self.world_size]
                if len(selection) == 0:
                    raise DataError(f"{self.index.paths.jsonl}: fewer samples than ranks ({self.world_size})")
            self._plan = (self.epoch, shard(selection, self.rank, self.world_size))
        return self._plan[1]

    def __len__(self) -> int:
        return -(-len(self._units()) // self.units_per_batch)

    def __iter__(self) -> Iterator[Batch]:
        units = self._units()
        starts = range(self._batches_done * self.units_per_batch, len(units), self.units_per_batch)
        chunks = (units[start : start + self.units_per_batch] for start in starts)
        batches = self._prefetched(chunks) if self.num_workers else map(self._make_batch, chunks)
        for batch in batches:
            self._batches_done += 1
            yield batch
        self.epoch += 1
        self._batches_done = self._skipped = 0

    def _prefetched(self, chunks: Iterator[np.ndarray]) -> Iterator[Batch]:
        """Build up to 2 * num_workers batches ahead in threads (reading and tokenising release the GIL)."""
        pending: deque[Future] = deque()
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="wmtp-data") as pool:
            try:
                for chunk in chunks:
                    pending.append(pool.submit(self._make_batch, chunk))
                    if len(pending) >= 2 * self.num_workers:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()

    def _make_batch(self, units: np.ndarray) -> Batch:
        records = self.index.read(units.reshape(-1))  # pairs flatten to correct, incorrect, correct, ...
        add_bos = prompt_adds_bos(self.template)
        examples = [
            example_from_record(record, *render(self.template, record, self.tokenizer), self.tokenizer,
                                self.max_length, add_bos=add_bos)
            for record in records
        ]
        if self.pack:
            return pack(examples, self.max_length, self.tokenizer.pad_id)
        return collate(examples, self.tokenizer.pad_id, is_pair=self.is_pair)

    # ---- epochs and resumption

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning, unless a restored state is partway through that epoch."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._batches_done = self._skipped = 0

    def state_dict(self) -> dict[str, Any]:
        """The position in the epoch: this rank's batches, and the units every rank together consumed
        (ranks take every world_size-th unit in lockstep, so those are the selection's first ones)."""
        return {
            "epoch": self.epoch,
            "batches_done": self._batches_done,
            "units_done": self._skipped + self._batches_done * self.units_per_batch * self.world_size,
            "seed": self.seed,
            "sampler": self.sampler,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` stopped; saved with another number of ranks, continue after the units
        all of them consumed, the rest shared among this run's ranks."""
        for key in ("seed", "sampler"):
            if state.get(key) != getattr(self, key):
                raise DataError(
                    f"loader state: {key} was {state.get(key)!r} when saved but is {getattr(self, key)!r} now; "
                    "resuming would not continue the same data order"
                )
        self.epoch = int(state["epoch"])
        self._plan = None
        if state.get("world_size") == self.world_size:
            self._batches_done = int(state["batches_done"])
            mine = self._batches_done * self.units_per_batch * self.world_size
            self._skipped = int(state.get("units_done", mine)) - mine  # a resharded resume earlier in the epoch
            return
        if "units_done" not in state:
            raise DataError(f"loader state: saved by {state.get('world_size')} rank(s) by an older version, "
                            f"without the global position; resume with {state.get('world_size')} rank(s)")
        self._batches_done, self._skipped = 0, int(state["units_done"])


def open_or_prepare(
    dataset: str, split: str, tokenizer: Any, *, raw_dir: Path, datasets_dir: Path, rank: int = 0
) -> SplitIndex:
    """Open the processed split, preparing it first (on rank 0) when it has not been prepared."""
    directory = processed_dir(datasets_dir, dataset)
    if not SplitPaths.of(directory, split).metadata.is_file():
        if rank == 0:
            log.info("%s/%s is not prepared yet; preparing it now", dataset, split)
            prepare_dataset(dataset, raw_dir=raw_dir, datasets_dir=datasets_dir, split=split, tokenizer=tokenizer)
        _barrier()
    index = SplitIndex(directory, split)
    recorded = index.metadata.get("tokenizer", {})
    if recorded and recorded != tokenizer_fingerprint(tokenizer):
        log.warning(
            "%s was prepared with another tokenizer (%s); token-length bins are approximate. "
            "Run `wmtp data prepare %s --split %s` to recompute them.",
            index.paths.metadata, recorded, dataset, split,
        )
    return index


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def build_loader(config, tokenizer: Any, *, split: str, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True) -> TrainLoader:
    """The loader a config describes: `config.data` for sampling and templates, `config.training.batch_size`."""
    data = config.data
    index = open_or_prepare(
        data.dataset, split, tokenizer, raw_dir=raw_dir_for(config.paths, data.dataset), datasets_dir=config.paths.datasets, rank=rank
    )
    return TrainLoader(
        index,
        tokenizer,
        batch_size=config.training.batch_size,
        max_length=data.max_length,
        seed=config.seed,
        sampler=data.sampler,
        template=data.prompt_template,
        n_samples=data.n_samples,
        max_pairs_per_problem=data.max_pairs_per_problem,
        difficulty_bins=data.difficulty_bins,
        difficulty_weights=data.difficulty_weights,
        length_bin_size=data.length_bin_size,
        pack=data.pack,
        rank=rank,
        world_size=world_size,
        shuffle=shuffle,
        num_workers=data.num_workers,
    )
