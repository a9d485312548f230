"""The embedded world (synthetic.py) as a data source (`open_world`), in one of two storages
(`config.data.world_storage`):

- "lazy" (the default): a random-access source rendering scene i when record i is read (WorldSource). Nothing is
  written and nothing rendered up front: a run renders the scenes it reads, in its data workers, and a signal or a
  kill never leaves anything half-written. A 224 px scene costs about 9 ms of one core.
- "shards": the splits written once as ArrayRecord shards in a directory keyed by the world config and split sizes,
  then read like converted data (`cached_shards`); a progress line with an ETA is logged while they are written
  (the 224 px presets hold 200k scenes: about 33 minutes on one core, 9 GB).

The sizes are the config's (`config.data.train_size`, `eval_size`) and nothing else, so a resumed run that changes
`train.steps` reads the same training set. Both storages hold the same records, byte for byte.
"""

import hashlib
import json
import os
import uuid

import ml_collections
from etils import epath

from vlp_jax import progress
from vlp_jax.data import records, sources, synthetic
from vlp_jax.data.records import Located

STORAGES = ("lazy", "shards")  # config.data.world_storage


class WorldSource:
    """grain random-access source of one split of the embedded world, rendered on demand: items are Located
    records, as a ShardSource's are. `captions_at` reads a record's captions without rendering (tokenizer
    training reads every caption)."""

    def __init__(self, world: ml_collections.ConfigDict, split: str, num: int):
        self.scenes = synthetic.SceneRecords(world, split, num)
        self.name = f"embedded world ({split}, {num} scenes)"
        self.shuffle_group = shuffle_group(world)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> Located:
        return Located(self.scenes[index], f"{self.name} #{index}")

    def captions_at(self, index: int) -> list[str]:
        return self.scenes.captions(index)

    def __repr__(self) -> str:
        return f"WorldSource({self.name!r})"


def shuffle_group(world: ml_collections.ConfigDict) -> int:
    """Consecutive records a training shuffle keeps together (train_stream.shuffle): a scene and its hard-negative
    twin (synthetic.TWIN_GROUP) when the world makes twins, so they meet in one batch; else 1."""
    return synthetic.TWIN_GROUP if world.get("hard_negative_fraction", 0.0) > 0 else 1


def open_world(data: ml_collections.ConfigDict, split: str, root: epath.PathLike):
    """The `split` ("train" or "eval") of the world of `config.data` in its configured storage; the shards, when
    asked for, are cached under `root`."""
    sizes = {"train": data.train_size, "eval": data.eval_size}
    if split not in sizes:
        raise ValueError(f"the embedded world has splits {', '.join(sizes)}, not {split!r}")
    if data.world_storage == "lazy":
        return WorldSource(data.world, split, sizes[split])
    if data.world_storage == "shards":
        directory = cached_shards(data.world, sizes, root)
        source = sources.ShardSource(records.shard_paths(directory, split), f"{directory}:{split}")
        source.shuffle_group = shuffle_group(data.world)
        return source
    raise ValueError(f"config.data.world_storage={data.world_storage!r}; use one of {', '.join(STORAGES)}")


def cached_shards(world: ml_collections.ConfigDict, sizes: dict[str, int], root: epath.PathLike) -> epath.Path:
    """The dataset directory holding these splits of the world, written on first use and reused afterwards.

    The directory name is a hash of the world config and the split sizes, so a changed world never reuses stale
    shards. Shards are written into a private staging directory renamed into place when complete, and deleted if
    writing fails or is interrupted: concurrent writers (several hosts, or an interrupted run) never see a
    half-written dataset.
    """
    key = json.dumps({"world": world.to_dict(), "sizes": sizes, "schema": records.SCHEMA_VERSION}, sort_keys=True)
    final = epath.Path(root) / f"world-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (final / records.MANIFEST_NAME).exists():
        return final
    staging = epath.Path(root) / f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
    try:
        for split, num in sizes.items():
            rendered = progress.logged(synthetic.split_records(world, split, num),
                                       f"embedded world: {split} scenes written", num)
            records.write_records(rendered, staging, split, world.records_per_shard)
        (staging / "world.json").write_text(key + "\n", encoding="utf-8")
        try:
            staging.rename(final)
        except OSError:  # another process finished first: use its copy
            if not (final / records.MANIFEST_NAME).exists():
                raise
    finally:
        if staging.exists():
            staging.rmtree()
    return final
