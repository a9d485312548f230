"""What the full evaluation reads and what it is called: the eval set's name (`eval_set_name`), the cap on a short
run's full evaluation (`eval_scope`, `config.eval.max_examples`), the images read from the eval sources for it
(`EvalScope.read_limit`: a capped run decodes only what it scores) and the batch it embeds them in
(`eval_batch_size`)."""

import dataclasses
import glob
import math
import re

import jax
import ml_collections
from absl import logging
from etils import epath

from vlp_jax import parallel
from vlp_jax.data import sources
from vlp_jax.data.dataset import PairDataset

WORLD_SET = "embedded"  # the name of the embedded world's eval set
SMOKE_EVAL_MIN = 64  # images a capped full evaluation reads at the least (config.eval.max_examples=-1)
_GENERIC_FOLDERS = ("shards", "records", "data", "array_record")  # named after their parent folder instead


@dataclasses.dataclass(frozen=True)
class EvalScope:
    """What the full evaluation reads: the eval set's name, at most `limit` examples per set and zero-shot task
    (0 = all), and why it is capped (for the log line)."""

    name: str
    limit: int
    why: str = ""

    def read_limit(self, subset_size: int) -> int:
        """Eval images to read from the sources: all (0) unless the full evaluation is capped, else the cap, or
        the subset scored during training (`config.eval.subset_size`, 0 = all) when that is larger."""
        return 0 if not self.limit or subset_size <= 0 else max(self.limit, subset_size)


def eval_scope(config: ml_collections.ConfigDict) -> EvalScope:
    """The eval set's name and the full evaluation's cap, from `config.eval.max_examples`: N > 0 caps at N, 0 reads
    everything, -1 (auto) caps at the images the run trained on (train.steps × batch_size, at least
    SMOKE_EVAL_MIN), so a smoke run's evaluation costs no more than its training."""
    name = eval_set_name(config.data.eval_sources)
    requested = config.eval.max_examples
    if requested >= 0:
        return EvalScope(name, requested, f"config.eval.max_examples={requested}")
    trained = config.train.steps * config.train.batch_size
    why = (f"config.eval.max_examples=-1 caps the full evaluation of a run of {config.train.steps} steps × "
           f"{config.train.batch_size} at the images it trained on, at least {SMOKE_EVAL_MIN}")
    return EvalScope(name, max(SMOKE_EVAL_MIN, trained), why)


def eval_batch_size(config: ml_collections.ConfigDict, mesh) -> int:
    """`config.eval.batch_size`, lowered for a capped evaluation to the cap rounded up to whole device and process
    shares: a smoke run's 64 images are not padded to a batch of 1024 (at 224 px on a CPU, that one batch's
    activations alone overflow 24 GB)."""
    limit = eval_scope(config).limit
    if limit <= 0 or limit >= config.eval.batch_size:
        return config.eval.batch_size
    step = math.lcm(parallel.batch_parallelism(mesh), jax.process_count())
    return min(config.eval.batch_size, math.ceil(limit / step) * step)


def records_available(dataset: PairDataset) -> int:
    """The records of the sources `dataset` was read from, or its images when more (or not read from sources)."""
    return max(len(dataset), getattr(dataset, "source_records", 0))


def capped(dataset: PairDataset, scope: EvalScope) -> PairDataset:
    """The first `scope.limit` images of `dataset` (all when it holds no more), saying so in the log when its
    sources hold more."""
    records = records_available(dataset)
    if not scope.limit or records <= scope.limit:
        return dataset
    logging.warning("the full evaluation reads the first %d of the %d %s eval records (%s); pass "
                    "--config.eval.max_examples=0 for the whole set", scope.limit, records, scope.name, scope.why)
    return dataset.first_images(scope.limit)


def eval_set_name(eval_sources: str) -> str:
    """A metrics-key-safe name for `config.data.eval_sources`: "embedded" for the world, a tfds dataset's name, a
    dataset directory's (or a glob's folder's) name, its parent's for a generic one like "shards"; a split other
    than "eval" is appended, and several sources are joined by "+"."""
    names = []
    for spec in sources.parse_specs(eval_sources, "eval", "config.data.eval_sources"):
        if spec.location == sources.SYNTHETIC:
            names.append(WORLD_SET)
            continue
        if spec.location.startswith(sources.TFDS_PREFIX):
            name = spec.location[len(sources.TFDS_PREFIX):]
        else:
            path = epath.Path(spec.location.rstrip("/"))
            while path.parent != path and (glob.has_magic(str(path)) or not path.is_dir()):
                path = path.parent  # a glob or a shard file: named by its folder
            if path.name in _GENERIC_FOLDERS and path.parent.name:
                path = path.parent
            name = path.name or "eval"
        if spec.split != "eval":
            name = f"{name}_{spec.split}"
        names.append(re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_"))
    return "+".join(dict.fromkeys(names))
