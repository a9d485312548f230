"""Where records come from: ArrayRecord shards (a glob or a dataset directory) and tfds datasets.

A source spec is a string, as in ``config.data.train_sources``: comma-separated entries, each one of

    DIR[:SPLIT]        a dataset directory written by `python -m vlp_jax.datasets.convert` (its manifest.json lists
                       the split's shards); SPLIT defaults to the split being read (train / eval)
    GLOB               ArrayRecord files, e.g. /data/cc3m/train-*.array_record or gs://bucket/laion/*.array_record
    tfds:NAME[:SPLIT]  a tfds dataset prepared in the ArrayRecord format (needs the `[tfds]` extra, not TensorFlow)
    synthetic          the embedded world (vlp_jax/data/synthetic.py), written to shards on first use

optionally followed by ``@WEIGHT`` (mixing weight for training, default 1). Every source is a grain
random-access source whose items are ``Located`` records or ``Skipped`` markers: a record that cannot be read or
decoded is never an exception, so one bad record cannot stop training.

Shards are opened once when a source is built, so a glob that matches nothing or a file that is not a readable
ArrayRecord file, or a dataset directory's shard whose size differs from its manifest's, is an error naming the
path before training starts. Corruption inside a readable shard of the right size (a chunk whose checksum fails)
only shows when its records are read: those are skipped as ``corrupt_shard`` (`python -m vlp_jax.data.verify DIR`
finds it beforehand, by the manifest's sha256s).
"""

import bisect
import dataclasses
import glob
import itertools
import os
import re
from collections.abc import Iterator

import ml_collections
import msgpack
from array_record.python import array_record_module
from etils import epath
from grain import sources as grain_sources

from vlp_jax.data import records
from vlp_jax.data.records import Located
from vlp_jax.data.skips import Skipped, SkipRecord

SYNTHETIC = "synthetic"
TFDS_PREFIX = "tfds:"
READ_REASONS = ("corrupt_shard",)  # why a record's bytes could not be read at all
_WEIGHT = re.compile(r"^(?P<spec>.+)@(?P<weight>[0-9.eE+-]+)$")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One parsed entry of a source spec string."""

    location: str  # a path, a glob, 'tfds:NAME' or 'synthetic'
    split: str
    weight: float


def parse_specs(specs: str, split: str, flag: str) -> list[SourceSpec]:
    """Parses ``specs`` (see the module docstring); ``flag`` names the config key in error messages."""
    entries = [entry.strip() for entry in specs.split(",") if entry.strip()]
    if not entries:
        raise ValueError(f"{flag} is empty; name at least one source, e.g. {flag}=synthetic")
    parsed = []
    for entry in entries:
        weight = 1.0
        if match := _WEIGHT.match(entry):
            entry, weight = match["spec"], float(match["weight"])
            if weight <= 0:
                raise ValueError(f"{flag}: weight {weight} of {entry!r} must be positive")
        location, entry_split = entry, split
        if entry.startswith(TFDS_PREFIX):  # tfds:NAME[:SPLIT]; a tfds split may itself hold ':' (train[:10%])
            name, sep, tail = entry[len(TFDS_PREFIX):].partition(":")
            location, entry_split = TFDS_PREFIX + name, tail if sep else split
        else:  # DIR:SPLIT, but never the ':' of gs://...
            head, sep, tail = entry.rpartition(":")
            if sep and head and tail and "/" not in tail:
                location, entry_split = head, tail
        parsed.append(SourceSpec(location, entry_split, weight))
    return parsed


class ShardSource:
    """grain random-access source over ArrayRecord shards; items are Located records or Skipped markers.

    Picklable (worker processes get the paths and reopen the files lazily).
    """

    def __init__(self, paths: list[epath.Path], name: str):
        if not paths:
            raise FileNotFoundError(f"{name} names no shard files")
        self.name = name
        self.paths = [os.fspath(path) for path in paths]
        self.counts = [_count_records(path) for path in paths]
        self._ends = list(itertools.accumulate(self.counts))  # [num shards] exclusive end of each shard
        # 'path[start:end]' read instructions: the data source does not reopen every file to count it.
        instructions = [f"{path}[0:{count}]" for path, count in zip(self.paths, self.counts, strict=True) if count]
        self._source = grain_sources.ArrayRecordDataSource(instructions) if instructions else None

    def __len__(self) -> int:
        return self._ends[-1]

    def locate(self, index: int) -> tuple[str, int]:
        """(shard path, position in the shard) of a record index."""
        shard = bisect.bisect_right(self._ends, index)
        return self.paths[shard], index - (self._ends[shard - 1] if shard else 0)

    def __getitem__(self, index: int) -> Located | Skipped:
        path, position = self.locate(index)
        where = f"{path} #{position}"
        try:
            data = self._source[index]
        except RuntimeError as error:  # a chunk whose checksum or framing fails
            return SkipRecord("corrupt_shard", str(error)).at(where)
        try:
            return Located(records.decode_record(data), where)
        except SkipRecord as error:
            return error.at(where, _readable_id(data))

    def __repr__(self) -> str:
        return f"ShardSource({self.name!r}, {len(self.paths)} shards, {len(self)} records)"


def _readable_id(data: bytes) -> str | None:
    """The id of a record that failed to decode, if its bytes still hold one (for the log line)."""
    try:
        fields = msgpack.unpackb(data, raw=True)
        record_id = fields.get(b"id") if isinstance(fields, dict) else None
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    return record_id.decode("utf-8", "replace") if isinstance(record_id, bytes) else None


def _count_records(path: epath.Path) -> int:
    """Opens one shard to count its records; raises ShardError naming the path if it cannot be read."""
    if not path.exists():
        raise records.ShardError(f"shard {path} does not exist")
    try:
        reader = array_record_module.ArrayRecordReader(os.fspath(path))
    except (RuntimeError, OSError, ValueError) as error:
        raise records.ShardError(f"shard {path} cannot be opened: {error}") from error
    if not reader.ok():
        raise records.ShardError(
            f"shard {path} is not a readable ArrayRecord file (truncated, corrupt or another format); "
            "re-copy or re-convert it, or remove it from the source"
        )
    count = reader.num_records()
    reader.close()
    return count


def glob_paths(pattern: str) -> list[epath.Path]:
    """Files matching a glob (wildcards in the file name only for non-local paths), sorted; raises
    FileNotFoundError naming the pattern when nothing matches."""
    if not glob.has_magic(pattern):
        if not epath.Path(pattern).exists():
            raise FileNotFoundError(f"{pattern} does not exist")
        return [epath.Path(pattern)]
    if "://" in pattern:
        path = epath.Path(pattern)
        matches = path.parent.glob(path.name)
    else:
        matches = (epath.Path(match) for match in glob.glob(pattern, recursive=True))
    matches = sorted(match for match in matches if not match.is_dir())
    if not matches:
        raise FileNotFoundError(f"the glob {pattern} matches no file")
    return matches


def default_tfds_config() -> ml_collections.ConfigDict:
    """`config.data.tfds`: where prepared tfds datasets live and which features hold the image and captions."""
    return ml_collections.ConfigDict(dict(
        data_dir="",  # empty = tfds's default (~/tensorflow_datasets or $TFDS_DATA_DIR)
        image_key="image",
        caption_key="captions",  # '/' reaches into nested features, e.g. 'captions/text' for coco_captions
    ))


def open_source(spec: SourceSpec, flag: str, tfds_config: ml_collections.ConfigDict | None = None):
    """The random-access source for one parsed spec entry (not 'synthetic': callers resolve it to a directory)."""
    if spec.location == SYNTHETIC:
        raise ValueError(f"{flag}: 'synthetic' is resolved by the pipeline; here name a directory, glob or tfds:NAME")
    if spec.location.startswith(TFDS_PREFIX):
        from vlp_jax.data import tfds_source  # optional extra: imported only when used

        name = spec.location[len(TFDS_PREFIX):]
        return tfds_source.TfdsSource(name, spec.split, tfds_config or default_tfds_config(), flag)
    path = epath.Path(spec.location)
    try:
        if path.is_dir():
            return ShardSource(records.shard_paths(path, spec.split), f"{spec.location}:{spec.split}")
        return ShardSource(glob_paths(spec.location), spec.location)
    except (FileNotFoundError, records.ShardError, records.ManifestError) as error:
        raise type(error)(f"{flag}: {error}") from error


def source_captions(opened: list, limit: int = 0) -> Iterator[str]:
    """The non-empty captions of the sources' readable records, in order; at most ``limit`` (0 = all). A source
    with `captions_at(index)` (the embedded world) gives them without decoding its images."""
    count = 0
    for source in opened:
        captions_at = getattr(source, "captions_at", None)
        for index in range(len(source)):
            if captions_at is not None:
                captions = captions_at(index)
            else:
                item = source[index]
                if not isinstance(item, Located):
                    continue
                captions = item.record.captions
            for caption in captions:
                if caption.strip():
                    yield caption
                    count += 1
                    if count == limit:
                        return
