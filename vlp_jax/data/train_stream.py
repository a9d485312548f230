"""Endless training batches (TrainIterator): shuffled, mixed, repeated sources -> examples -> this process's
slice -> chunks -> batches, with exact resume.

    each source, shuffled globally and reseeded every epoch (grain's index_shuffle; for sources of up to
    PERMUTE_LIMIT records a stored permutation, which index_shuffle is slow for: 75 us per index at 1,024 records)
    -> mixed by weight (grain MapDataset.mix; an epoch of the mixture ends when one source is used up)
    -> repeated without end
    -> record -> example (examples.TrainExamples: the features a method declares), with a generator seeded by the
       element's position in the global stream
    -> this process's slice: elements p, p + P, p + 2P, ... of the global stream, so the P processes read disjoint
       elements that together cover every epoch once, and a global batch holds the same examples whatever P is
    -> chunks of consecutive elements, stacked where they were made (a worker process hands the main process one
       shared-memory block per array per chunk of WORKER_CHUNK elements, not one per element; without workers a
       chunk is a whole local batch, so the stacking is the batching)
    -> read threads and worker processes prefetching ahead (config.data.loader)
    -> this process's share of the global batch, assembled in the main process from the chunks' rows, where
       skipped records are counted and logged; train.py makes the global jax.Array
       (parallel.global_batch_from_local).

The iterator's state (`get_state` / `set_state`, JSON) is each process's position in its slice, the number of
batches yielded and the skip counts. A restored iterator rebuilds the stream from that position, so it yields
exactly the batches an uninterrupted one would, with any number of workers.
"""

import collections
import dataclasses
from collections.abc import Callable

import grain
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from vlp_jax.data.dataset import PairDataset
from vlp_jax.data.examples import SKIP_REASONS
from vlp_jax.data.loader import LoaderOptions
from vlp_jax.data.skips import SkipLog, Skipped

_SHUFFLE_STREAM, _EXAMPLE_STREAM = 0, 1  # independent seeds under config.seed
WORKER_CHUNK = 8  # elements a worker process stacks and hands over at once
PERMUTE_LIMIT = 1 << 20  # sources up to this many records are shuffled by a stored permutation (4 MiB)


@dataclasses.dataclass(frozen=True)
class TrainSource:
    """Random-access sources mixed by weight, and the function turning one of their items into an example."""

    parts: list  # grain random-access sources
    weights: list[float]
    prepare: Callable  # (item, np.random.Generator) -> example dict | Skipped

    def epoch(self, seed: int) -> grain.MapDataset:
        """One epoch of items: each part globally shuffled (reseeded per epoch when repeated), then mixed."""
        seeds = np.random.SeedSequence((seed, _SHUFFLE_STREAM)).generate_state(len(self.parts))
        shuffled = [shuffle(grain.MapDataset.source(part), int(s), getattr(part, "shuffle_group", 1))
                    for part, s in zip(self.parts, seeds, strict=True)]
        return shuffled[0] if len(shuffled) == 1 else grain.MapDataset.mix(shuffled, self.weights)


def shuffle(dataset: grain.MapDataset, seed: int, group: int = 1) -> grain.MapDataset:
    """``dataset`` globally shuffled, differently in every epoch (index // len): grain's index_shuffle, or for up
    to PERMUTE_LIMIT records a stored permutation (index_shuffle walks cycles over a domain of at least 2^16, so
    a small source costs up to ~0.3 ms per index). With `group` > 1, runs of `group` consecutive records (a source's
    `shuffle_group`: the world's hard-negative twins) are shuffled as units and stay adjacent (stored permutation)."""
    if group > 1 or len(dataset) <= PERMUTE_LIMIT:
        return _PermutedDataset(dataset, seed, group)
    return dataset.shuffle(seed=seed)


class _PermutedDataset(grain.MapDataset):
    """Element i of epoch e is parent[e * n + permutation_e[i]], permutation_e drawn from (seed, e); with `group` > 1
    it permutes runs of `group` consecutive indices (the last run may be shorter) and keeps each run in order."""

    _EPOCHS_KEPT = 2  # read-ahead crosses epoch boundaries: the current and the next permutation are kept

    def __init__(self, parent: grain.MapDataset, seed: int, group: int = 1):
        super().__init__(parent)
        self._seed = seed
        self._group = group
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"_PermutedDataset(seed={self._seed}, group={self._group})"

    def _order(self, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:  # threads may both compute it: the same array, and dict assignment is atomic
            size, group = len(self._parent), self._group
            order = np.random.default_rng((self._seed, epoch)).permutation(-(-size // group))
            if group > 1:
                order = (order[:, None] * group + np.arange(group)).reshape(-1)
                order = order[order < size]
            order = order.astype(np.int32)
            self._orders = {e: o for e, o in self._orders.items() if e > epoch - self._EPOCHS_KEPT} | {epoch: order}
        return order

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(index, len(self._parent))
        return self._parent[epoch * len(self._parent) + int(self._order(epoch)[position])]


class _ImageIndices:
    """The images of an in-memory PairDataset as a grain source (items are image indices)."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> int:
        return index


class _PickCaption:
    """In-memory examples: the image as it is and one uniformly chosen caption."""

    def __init__(self, dataset: PairDataset):
        self.dataset = dataset

    def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        ids = np.array([index])
        return {"image": self.dataset.images[index], "text": self.dataset.pick_captions(ids, rng)[0]}


def in_memory_source(dataset: PairDataset) -> TrainSource:
    """Training examples from a PairDataset already in memory (notebooks, tests): no decoding, no augmentation."""
    return TrainSource([_ImageIndices(len(dataset))], [1.0], _PickCaption(dataset))


class TrainIterator:
    """Endless batches of this process's share of each global batch; `get_state` / `set_state` resume exactly.

    ``examples`` is a TrainSource (see `pipeline.load`) or a PairDataset in memory. Batches are dicts of numpy
    arrays: the declared features (examples.FEATURES: image uint8 [b, H, W, 3], text int32 [b, L], ...), and
    noisy bool [b] when the sources carry that flag.
    """

    def __init__(
        self, examples: "TrainSource | PairDataset", global_batch: int, seed: int,
        process_index: int | None = None, process_count: int | None = None, options: LoaderOptions | None = None,
    ):
        self.source = in_memory_source(examples) if isinstance(examples, PairDataset) else examples
        self.global_batch = global_batch
        self.seed = seed
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.options = options or LoaderOptions()
        self.epoch_length = len(self.source.epoch(seed))
        if global_batch % self.process_count:
            raise ValueError(
                f"config.train.batch_size={global_batch} is not divisible by the {self.process_count} processes"
            )
        if global_batch > self.epoch_length:
            raise ValueError(
                f"config.train.batch_size={global_batch} exceeds the {self.epoch_length} training images; "
                "use a smaller batch or more data (config.data.train_size)"
            )
        self.local_batch = global_batch // self.process_count
        self.batches_per_epoch = self.epoch_length // global_batch  # nominal: skipped records stretch an epoch
        self.skips = SkipLog(self.options.skip_log_limit)
        self._next_index = 0  # elements of this process's slice consumed so far
        self._batches = 0  # batches yielded so far
        self._skipped_in_a_row = 0
        self._iterator = None  # grain iterator of chunks, built on first use from _next_index
        self._chunk = None  # the chunk being consumed (see stack_chunk), its next element and next example row
        self._offset = self._row = 0

    @property
    def chunk_size(self) -> int:
        """Elements per chunk: WORKER_CHUNK with worker processes, else the local batch."""
        return WORKER_CHUNK if self.options.worker_count else self.local_batch

    @property
    def epoch(self) -> int:
        """Nominal epochs of batches yielded so far (batches_per_epoch batches each)."""
        return self._batches // self.batches_per_epoch

    @property
    def index(self) -> int:
        """Batches yielded in the current nominal epoch."""
        return self._batches % self.batches_per_epoch

    def _stream(self, start: int) -> grain.IterDataset:
        """This process's elements from position ``start`` of its slice on."""
        example_seed = int(np.random.SeedSequence((self.seed, _EXAMPLE_STREAM)).generate_state(1)[0])
        stream = self.source.epoch(self.seed).repeat()  # endless; each epoch reshuffled
        stream = stream.random_map(self.source.prepare, seed=example_seed)  # generator keyed by global position
        stream = stream[self.process_index :: self.process_count][start:]
        chunk = self.chunk_size
        stream = stream.batch(chunk, batch_fn=stack_chunk)
        options = self.options
        stream = stream.to_iter_dataset(
            grain.ReadOptions(num_threads=options.read_threads, prefetch_buffer_size=-(-options.prefetch // chunk))
        )
        if options.worker_count:
            stream = stream.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=options.worker_count,
                                             per_worker_buffer_size=-(-options.worker_buffer // chunk))
            )
        return stream

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = iter(self._stream(self._next_index))
        pieces, wanted = [], self.local_batch
        while wanted:
            if self._chunk is None or self._offset == len(self._chunk["skipped"]):
                self._chunk, self._offset, self._row = next(self._iterator), 0, 0
            markers, first = self._chunk["skipped"], self._row
            while wanted and self._offset < len(markers):  # the chunk's examples used here are rows first..row
                marker = markers[self._offset]
                self._offset += 1
                self._next_index += 1
                if marker is None:
                    self._row += 1
                    wanted -= 1
                    self._skipped_in_a_row = 0
                else:
                    self._skip(marker)
            if self._row > first:
                pieces.append((self._chunk["examples"], first, self._row))
        self._batches += 1
        return _rows(pieces)

    def _skip(self, skipped: Skipped) -> None:
        self.skips.add(skipped)
        self._skipped_in_a_row += 1
        if self._skipped_in_a_row * self.process_count >= self.epoch_length:
            raise RuntimeError(
                f"every record of a whole epoch was skipped ({dict(self.skips.counts)}); the training "
                "sources hold no usable record: check config.data.train_sources and the log lines above"
            )

    def _gathered(self) -> tuple[dict[str, int], dict[str, int]]:
        """(positions by process index, skip counts summed over processes); a collective on multi-host runs."""
        local = np.array([self._next_index, *(self.skips.counts[r] for r in SKIP_REASONS)], np.int64)
        if jax.process_count() == 1 or self.process_count != jax.process_count():
            rows = {self.process_index: local}  # one real process (or one simulated in a test)
        else:
            rows = dict(enumerate(np.asarray(multihost_utils.process_allgather(local))))
        positions = {str(p): int(row[0]) for p, row in rows.items()}
        totals = np.sum(list(rows.values()), axis=0)[1:]
        return positions, {reason: int(n) for reason, n in zip(SKIP_REASONS, totals, strict=True) if n}

    def get_state(self) -> dict:
        """JSON-able position of every process, batches yielded and skip counts (multi-host: a collective)."""
        positions, skipped = self._gathered()
        return {"next_index": positions, "batches": self._batches, "skipped": skipped}

    def set_state(self, state: dict) -> None:
        """Continues from a `get_state` result; the next batch is the one an uninterrupted iterator would yield."""
        if not {"next_index", "batches", "skipped"} <= set(state):
            raise ValueError(f"data iterator state {state} was not saved by vlp_jax.data.pipeline.TrainIterator")
        positions = state["next_index"]
        key = str(self.process_index)
        if key in positions:
            self._next_index = int(positions[key])
        else:  # saved with another process count: the slices differ, so resume at the same global position
            self._next_index = sum(int(p) for p in positions.values()) // self.process_count
            logging.warning("data state saved by %d processes, restored on %d: the data order is resumed "
                            "approximately", len(positions), self.process_count)
        # Counts were summed over the saving processes; one process carries them on so sums stay right.
        mine = len(positions) == 1 or self.process_index == 0
        self.skips.counts = collections.Counter(state["skipped"] if mine else {})
        self._batches = int(state["batches"])
        self._skipped_in_a_row = 0
        self.close()

    def skip_metrics(self) -> dict[str, int]:
        """`data/skipped/<reason>`: records skipped so far by all processes (multi-host: a collective)."""
        return {f"data/skipped/{reason}": count for reason, count in self._gathered()[1].items()}

    def close(self) -> None:
        """Stops the reading threads and worker processes (a later batch restarts them)."""
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = self._chunk = None  # a later batch resumes at _next_index, past the elements used


def stack_chunk(items: list) -> dict:
    """Consecutive stream elements as one structure of few arrays: "examples", the examples among them stacked
    (dict of [k, ...] arrays, k = the number of examples, in stream order) and "skipped", per element its Skipped
    marker or None for the next row of "examples"."""
    good = [item for item in items if not isinstance(item, Skipped)]
    stacked = {key: np.stack([example[key] for example in good]) for key in good[0]} if good else {}
    return {"examples": stacked, "skipped": [item if isinstance(item, Skipped) else None for item in items]}


def _rows(pieces: list[tuple[dict, int, int]]) -> dict[str, np.ndarray]:
    """A batch from (examples, first row, end row) pieces of chunks; one whole chunk is used as it is."""
    (stacked, first, end), *more = pieces
    if not more and first == 0 and end == len(next(iter(stacked.values()))):
        return {key: np.asarray(value) for key, value in stacked.items()}
    return {key: np.concatenate([piece[key][a:b] for piece, a, b in pieces]) for key in stacked}
