"""Image-text batches for training and evaluation, on grain.

Training reads an endless stream built from `config.data.train_sources` (sources.py):

    each source, shuffled globally and reseeded every epoch (grain's index_shuffle; for sources of up to
    PERMUTE_LIMIT records a stored permutation, which index_shuffle is slow for: 75 us per index at 1,024 records)
    -> mixed by weight (grain MapDataset.mix; an epoch of the mixture ends when one source is used up)
    -> repeated without end
    -> record -> example (examples.TrainExamples: decode, random resized crop, one random caption, tokens), with a
       generator seeded by the element's position in the global stream
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

Evaluation data is small and read once into memory as a PairDataset: every image once (centre crop), every caption.
"""

import collections
import dataclasses
import os
from collections.abc import Callable

import grain
import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from vlp_jax.data import examples, sources, synthetic, transforms
from vlp_jax.data.sources import Skipped
from vlp_jax.data.tokenizer import Tokenizer, train_tokenizer

TOKENIZER_FILE = "tokenizer.model"  # in the workdir, when config.data.tokenizer.path is empty
WORLD_DIR = "data"  # the embedded world's shards go to <workdir>/data unless config.data.world_dir is set
_SHUFFLE_STREAM, _EXAMPLE_STREAM = 0, 1  # independent seeds under config.seed
WORKER_CHUNK = 8  # elements a worker process stacks and hands over at once
PERMUTE_LIMIT = 1 << 20  # sources up to this many records are shuffled by a stored permutation (4 MiB)


@dataclasses.dataclass
class PairDataset:
    """Images with their tokenised captions: images uint8 [N, H, W, 3]; captions int32 [M, L] with
    caption_image int [M] naming each caption's image (several captions per image). ``image_groups`` (int [N])
    gives images showing the same content the same number (e.g. one emoji in several art styles), or is None.
    ``source_records`` is the number of records in the sources it was read from (0 when not read from sources):
    more than its images when reading stopped early or skipped records."""

    images: np.ndarray
    captions: np.ndarray
    caption_image: np.ndarray
    image_groups: np.ndarray | None = None
    source_records: int = 0

    def __post_init__(self):
        counts = np.bincount(self.caption_image, minlength=len(self.images))
        if len(counts) != len(self.images) or (counts == 0).any():
            raise ValueError("every image needs at least one caption and caption_image must index the images")
        if self.image_groups is not None and len(self.image_groups) != len(self.images):
            raise ValueError(f"image_groups has {len(self.image_groups)} entries for {len(self.images)} images")
        order = np.argsort(self.caption_image, kind="stable")
        self._by_image = order  # caption ids grouped by image
        self._first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # [N] start of each image's group
        self._count = counts  # [N]

    def __len__(self) -> int:
        return len(self.images)

    def first_images(self, num_images: int) -> "PairDataset":
        """The first `num_images` images with all their captions (and groups); the whole set when 0 or larger."""
        if num_images <= 0 or num_images >= len(self):
            return self
        keep = self.caption_image < num_images
        return dataclasses.replace(
            self,
            images=self.images[:num_images],
            captions=self.captions[keep],
            caption_image=self.caption_image[keep],
            image_groups=None if self.image_groups is None else self.image_groups[:num_images],
        )

    def pick_captions(self, image_ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One uniformly chosen caption per image: int32 [b, L]."""
        offsets = (rng.random(len(image_ids)) * self._count[image_ids]).astype(np.int64)
        return self.captions[self._by_image[self._first[image_ids] + offsets]]


@dataclasses.dataclass(frozen=True)
class LoaderOptions:
    """How elements are produced (`config.data.loader`); the defaults read synchronously in this process."""

    worker_count: int = 0  # grain worker processes; 0 = decode in this process
    read_threads: int = 0  # threads per process reading and transforming elements; 0 = synchronously
    prefetch: int = 1  # elements the read threads work ahead
    worker_buffer: int = 1  # elements each worker process keeps ready (rounded up to whole chunks)
    skip_log_limit: int = 0  # skipped records logged one by one per reason (all are counted); 0 = none

    @classmethod
    def from_config(cls, loader: ml_collections.ConfigDict) -> "LoaderOptions":
        options = cls(**loader.to_dict())
        for name, value in dataclasses.asdict(options).items():
            if value < 0:
                raise ValueError(f"config.data.loader.{name}={value} must be >= 0")
        cores = os.cpu_count() or 1
        if options.worker_count >= cores:  # more decoding processes than cores only adds copies and memory
            logging.info("config.data.loader.worker_count=%d on %d cores: using %d workers", options.worker_count,
                         cores, cores - 1)
            options = dataclasses.replace(options, worker_count=cores - 1)
        return options


class SkipLog:
    """Counts skipped records by reason and logs the first ``limit`` of each reason with its id and location."""

    def __init__(self, limit: int):
        self.limit = limit
        self.counts: collections.Counter[str] = collections.Counter()

    def add(self, skipped: Skipped) -> None:
        self.counts[skipped.reason] += 1
        count = self.counts[skipped.reason]
        if count <= self.limit:
            more = " (later records skipped for this reason are counted, not logged)" if count == self.limit else ""
            logging.warning("skipped record %s at %s: %s: %s%s", skipped.record_id or "(id unknown)", skipped.where,
                            skipped.reason, skipped.message, more)


def stack_chunk(items: list) -> dict:
    """Consecutive stream elements as one structure of few arrays: "examples", the examples among them stacked
    (dict of [k, ...] arrays, k = the number of examples, in stream order) and "skipped", per element its Skipped
    marker or None for the next row of "examples"."""
    good = [item for item in items if not isinstance(item, Skipped)]
    stacked = {key: np.stack([example[key] for example in good]) for key in good[0]} if good else {}
    return {"examples": stacked, "skipped": [item if isinstance(item, Skipped) else None for item in items]}


def _rows(pieces: list[tuple[dict, int, int]]) -> dict[str, np.ndarray]:
    """A batch from (examples, first row, end row) pieces of chunks; one whole chunk is used as it is."""
    (examples, first, end), *more = pieces
    if not more and first == 0 and end == len(next(iter(examples.values()))):
        return {key: np.asarray(value) for key, value in examples.items()}
    return {key: np.concatenate([piece[key][a:b] for piece, a, b in pieces]) for key in examples}


@dataclasses.dataclass(frozen=True)
class TrainSource:
    """Random-access sources mixed by weight, and the function turning one of their items into an example."""

    parts: list  # grain random-access sources
    weights: list[float]
    prepare: Callable  # (item, np.random.Generator) -> example dict | Skipped

    def epoch(self, seed: int) -> grain.MapDataset:
        """One epoch of items: each part globally shuffled (reseeded per epoch when repeated), then mixed."""
        seeds = np.random.SeedSequence((seed, _SHUFFLE_STREAM)).generate_state(len(self.parts))
        shuffled = [shuffle(grain.MapDataset.source(part), int(s)) for part, s in zip(self.parts, seeds, strict=True)]
        return shuffled[0] if len(shuffled) == 1 else grain.MapDataset.mix(shuffled, self.weights)


def shuffle(dataset: grain.MapDataset, seed: int) -> grain.MapDataset:
    """``dataset`` globally shuffled, differently in every epoch (index // len): grain's index_shuffle, or for up
    to PERMUTE_LIMIT records a stored permutation (index_shuffle walks cycles over a domain of at least 2^16, so
    a small source costs up to ~0.3 ms per index)."""
    return _PermutedDataset(dataset, seed) if len(dataset) <= PERMUTE_LIMIT else dataset.shuffle(seed=seed)


class _PermutedDataset(grain.MapDataset):
    """Element i of epoch e is parent[e * n + permutation_e[i]], permutation_e drawn from (seed, e)."""

    _EPOCHS_KEPT = 2  # read-ahead crosses epoch boundaries: the current and the next permutation are kept

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        self._seed = seed
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"_PermutedDataset(seed={self._seed})"

    def _order(self, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:  # threads may both compute it: the same array, and dict assignment is atomic
            order = np.random.default_rng((self._seed, epoch)).permutation(len(self._parent)).astype(np.int32)
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

    ``examples`` is a TrainSource (see `load`) or a PairDataset in memory. Batches are dicts of numpy arrays:
    image uint8 [b, H, W, 3], text int32 [b, L], and noisy bool [b] when the sources carry that flag.
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
        local = np.array([self._next_index, *(self.skips.counts[r] for r in examples.SKIP_REASONS)], np.int64)
        if jax.process_count() == 1 or self.process_count != jax.process_count():
            rows = {self.process_index: local}  # one real process (or one simulated in a test)
        else:
            rows = dict(enumerate(np.asarray(multihost_utils.process_allgather(local))))
        positions = {str(p): int(row[0]) for p, row in rows.items()}
        totals = np.sum(list(rows.values()), axis=0)[1:]
        return positions, {reason: int(n) for reason, n in zip(examples.SKIP_REASONS, totals, strict=True) if n}

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


@dataclasses.dataclass
class Data:
    """What a run reads: endless training batches, the evaluation set in memory, the tokenizer."""

    train: TrainIterator
    eval: PairDataset
    tokenizer: Tokenizer


def world_train_size(config: ml_collections.ConfigDict) -> int:
    """Training scenes the embedded world renders: `config.data.train_size`, but never more than the run can
    consume (steps × global batch), so a short run of a 224 px preset starts in seconds rather than rendering
    200k images first. Scene i is the same scene whatever the size, so a smaller world is a prefix of a larger."""
    return max(1, min(config.data.train_size, config.train.steps * config.train.batch_size))


def resolve_specs(config: ml_collections.ConfigDict, split: str, workdir: epath.PathLike) -> list[sources.SourceSpec]:
    """The parsed `config.data.<split>_sources`, with 'synthetic' replaced by the world's cached shard directory."""
    data = config.data
    flag = f"config.data.{split}_sources"
    specs = sources.parse_specs(data[f"{split}_sources"], split, flag)
    if any(spec.location == sources.SYNTHETIC for spec in specs):
        root = epath.Path(data.world_dir) if data.world_dir else epath.Path(workdir) / WORLD_DIR
        world_dir = synthetic.cached_shards(data.world, {"train": world_train_size(config), "eval": data.eval_size},
                                            root)
        specs = [dataclasses.replace(s, location=str(world_dir)) if s.location == sources.SYNTHETIC else s
                 for s in specs]
    return specs


def open_sources(config: ml_collections.ConfigDict, split: str, workdir: epath.PathLike) -> tuple[list, list[float]]:
    """The random-access sources of `config.data.<split>_sources` and their weights."""
    flag = f"config.data.{split}_sources"
    specs = resolve_specs(config, split, workdir)
    parts = [sources.open_source(spec, flag, config.data.tfds) for spec in specs]
    for spec, part in zip(specs, parts, strict=True):
        if not len(part):
            raise ValueError(f"{flag}: {spec.location} (split {spec.split}) holds no record")
    return parts, [spec.weight for spec in specs]


def load_tokenizer(config: ml_collections.ConfigDict, workdir: epath.PathLike, train_parts: list) -> Tokenizer:
    """`config.data.tokenizer.path`, or the workdir's tokenizer, trained on the training captions if missing (a
    resumed run reuses it, so it tokenises identically)."""
    settings = config.data.tokenizer
    if settings.path:
        tokenizer = Tokenizer(settings.path)
    else:
        path = epath.Path(workdir) / TOKENIZER_FILE
        if path.exists():
            tokenizer = Tokenizer(path)
        else:
            captions = sources.source_captions(train_parts, settings.max_captions)
            tokenizer = train_tokenizer(captions, path, settings.vocab_size)
    if tokenizer.vocab_size > config.model.text.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but config.model.text.vocab_size is "
            f"{config.model.text.vocab_size}; raise --config.model.text.vocab_size to at least {tokenizer.vocab_size}"
        )
    return tokenizer


def ordered_stream(parts: list, prepare, options: LoaderOptions):
    """``prepare`` mapped over every record of ``parts`` in order (no shuffle, no repeat), read ahead by threads."""
    datasets = [grain.MapDataset.source(part) for part in parts]
    dataset = datasets[0] if len(datasets) == 1 else grain.MapDataset.concatenate(datasets)
    return dataset.map(prepare).to_iter_dataset(
        grain.ReadOptions(num_threads=options.read_threads, prefetch_buffer_size=options.prefetch)
    )


def read_pairs(
    parts: list, prepare: examples.EvalExamples, options: LoaderOptions, what: str, skips: SkipLog | None = None,
    limit: int = 0,
) -> PairDataset:
    """The readable records of ``parts`` in order, materialised: one image each, all their captions; only the
    first ``limit`` usable ones when limit > 0 (nothing after them is read or decoded). Skipped records are
    counted in ``skips`` (a new SkipLog if None) and logged."""
    items = ordered_stream(parts, prepare, options)
    skips = skips or SkipLog(options.skip_log_limit)
    images, texts, groups = [], [], []
    for item in items:
        if isinstance(item, Skipped):
            skips.add(item)
            continue
        images.append(item["image"])
        texts.append(item["text"])
        groups.append(item["group"])
        if len(images) == limit:
            break
    if skips.counts:
        logging.warning("%s: skipped %d records: %s", what, sum(skips.counts.values()), dict(skips.counts))
    if not images:
        raise ValueError(f"{what} holds no usable record ({dict(skips.counts)} skipped)")
    owners = np.concatenate([np.full(len(t), i) for i, t in enumerate(texts)])
    return PairDataset(np.stack(images), np.concatenate(texts), owners, _group_ids(groups),
                       source_records=sum(len(part) for part in parts))


def _group_ids(groups: list) -> np.ndarray | None:
    """Group labels as ints numbered by first appearance; None unless every record has one."""
    if any(group is None for group in groups):
        return None
    numbers: dict = {}
    return np.array([numbers.setdefault(group, len(numbers)) for group in groups], np.int64)


def load(
    config: ml_collections.ConfigDict, workdir: epath.PathLike, features=examples.IMAGE_TEXT,
    process_index: int | None = None, process_count: int | None = None, eval_limit: int = 0,
) -> Data:
    """The training iterator with the declared `features` (examples.FEATURES), evaluation set (its first
    `eval_limit` images when > 0) and tokenizer of `config.data` (see the module docstring)."""
    train_parts, weights = open_sources(config, "train", workdir)
    tokenizer = load_tokenizer(config, workdir, train_parts)
    image = transforms.ImageOptions.from_config(config.data.image, config.model.image.image_size)
    options = LoaderOptions.from_config(config.data.loader)
    noisy = any(examples.carries_noisy_flag(part) for part in train_parts)
    prepare = examples.TrainExamples(image, tokenizer, config.model.text.max_len, noisy, features,
                                     config.data.get("max_boxes", examples.DEFAULT_MAX_BOXES))
    train = TrainIterator(TrainSource(train_parts, weights, prepare), config.train.batch_size, config.seed,
                          process_index, process_count, options)
    return Data(train, load_eval(config, workdir, tokenizer, eval_limit), tokenizer)


def load_eval(config: ml_collections.ConfigDict, workdir: epath.PathLike, tokenizer: Tokenizer | None = None,
              limit: int = 0) -> PairDataset:
    """`config.data.eval_sources` in memory (the first `limit` usable images when > 0), centre-cropped, every
    caption tokenised."""
    if tokenizer is None:
        tokenizer = load_tokenizer(config, workdir, open_sources(config, "train", workdir)[0])
    parts, _ = open_sources(config, "eval", workdir)
    image = transforms.ImageOptions.from_config(config.data.image, config.model.image.image_size)
    prepare = examples.EvalExamples(image, tokenizer, config.model.text.max_len, config.data.group_label)
    options = LoaderOptions.from_config(config.data.loader)
    return read_pairs(parts, prepare, options, f"config.data.eval_sources={config.data.eval_sources}", limit=limit)


def load_synthetic(
    config: ml_collections.ConfigDict, workdir: epath.PathLike
) -> tuple[PairDataset, PairDataset, Tokenizer]:
    """The embedded world's train and eval splits in memory (every caption, no augmentation), read from its
    cached shards, and the tokenizer; for notebooks and tests that want arrays rather than a stream."""
    world = config.copy_and_resolve_references()
    world.data.train_sources = world.data.eval_sources = sources.SYNTHETIC
    train_parts, _ = open_sources(world, "train", workdir)
    tokenizer = load_tokenizer(config, workdir, train_parts)
    image = transforms.ImageOptions.from_config(config.data.image, config.model.image.image_size)
    prepare = examples.EvalExamples(image, tokenizer, config.model.text.max_len)
    options = LoaderOptions.from_config(config.data.loader)
    train = read_pairs(train_parts, prepare, options, "the embedded world's train split")
    eval_data = read_pairs(open_sources(world, "eval", workdir)[0], prepare, options, "the embedded world's eval split")
    return train, eval_data, tokenizer
