"""Reading sources with grain: how elements are produced (LoaderOptions), in-order streams, and whole sets read
into memory (read_pairs: the evaluation set)."""

import dataclasses
import os
from collections.abc import Callable

import grain
import ml_collections
import numpy as np
from absl import logging

from vlp_jax.data.dataset import PairDataset
from vlp_jax.data.skips import SkipLog, Skipped


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


def ordered_stream(parts: list, prepare: Callable, options: LoaderOptions) -> grain.IterDataset:
    """``prepare`` mapped over every record of ``parts`` in order (no shuffle, no repeat), read ahead by threads."""
    datasets = [grain.MapDataset.source(part) for part in parts]
    dataset = datasets[0] if len(datasets) == 1 else grain.MapDataset.concatenate(datasets)
    return dataset.map(prepare).to_iter_dataset(
        grain.ReadOptions(num_threads=options.read_threads, prefetch_buffer_size=options.prefetch)
    )


def read_pairs(
    parts: list, prepare: Callable, options: LoaderOptions, what: str, skips: SkipLog | None = None, limit: int = 0,
) -> PairDataset:
    """The readable records of ``parts`` in order, materialised by ``prepare`` (examples.EvalExamples): one image
    each, all their captions; only the first ``limit`` usable ones when limit > 0 (nothing after them is read or
    decoded). Skipped records are counted in ``skips`` (a new SkipLog if None) and logged."""
    items = ordered_stream(parts, prepare, options)
    skips = SkipLog(options.skip_log_limit) if skips is None else skips
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
