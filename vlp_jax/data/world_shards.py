"""The embedded world (synthetic.py) as a dataset directory: written once per world config and split sizes, reused.

The sizes are the config's (`config.data.train_size`, `eval_size`) and nothing else, so a resumed run that changes
`train.steps` reads the same training set. Scenes are rendered in bounded chunks (synthetic.split_records) and a
progress line with an ETA is logged while a large world is written: the 224 px presets render 200k scenes once.
"""

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterable, Iterator

import ml_collections
from absl import logging
from etils import epath

from vlp_jax.data import records, synthetic

PROGRESS_EVERY_S = 30.0  # seconds between progress lines while a split is rendered


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
            rendered = _with_progress(synthetic.split_records(world, split, num), num, f"{split} scenes")
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


def _with_progress(items: Iterable, total: int, what: str) -> Iterator:
    """``items``, logging 'n/total <what> written (p%), ETA' every PROGRESS_EVERY_S seconds and at the end."""
    start = last = time.monotonic()
    for done, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY_S or done == total:
            last = now
            eta = (now - start) / done * (total - done)
            logging.info("embedded world: %d/%d %s written (%.0f%%), %.0f s elapsed, ETA %.0f s",
                         done, total, what, 100 * done / total, now - start, eta)
