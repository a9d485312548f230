"""Image-text records in ArrayRecord shards, and the manifest that describes a dataset of them.

A record holds the image bytes as stored (JPEG/PNG/WebP, never decoded here), its UTF-8 captions, an id and
optional fields (boxes, tags, split, task labels). It is encoded as a msgpack map with short keys and a schema
version "v", so readers can reject what they do not understand instead of misreading it:

    {"v": 1, "id": str, "img": bytes, "cap": [str, ...],              required
     "box": bytes (float32 little-endian, [k, 4] x0 y0 x1 y1 pixels),  optional
     "tag": [str, ...], "split": str, "lab": {str: value}}             optional

A dataset directory holds shards named ``<split>-00000-of-00004.array_record`` (group_size:1, uncompressed, so grain
reads them by random access) and ``manifest.json``: schema version and, per split, each shard's file name, record
count, size and sha256. Reading a split checks each shard's size against the manifest (a stat per shard);
`python -m vlp_jax.data.verify DIR` recomputes every sha256. Paths are etils.epath paths; shards for a non-local path
are written to a local temporary file and copied, because the ArrayRecord library opens local files only.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator

import msgpack
import numpy as np
from array_record.python import array_record_module
from etils import epath

from vlp_jax.data.skips import SkipRecord

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".array_record"
# One record per chunk: random access without decompressing neighbours. Uncompressed: the image bytes are JPEG/PNG/
# WebP already, so the default brotli only costs (3x the write time, +50% read time per record, same size).
WRITER_OPTIONS = "group_size:1,uncompressed"
# Why decode_record rejects a record (SkipRecord reasons); the pipeline counts skipped records under these names.
DECODE_REASONS = ("bad_encoding", "bad_utf8", "unknown_version", "missing_field", "bad_field")
_BOX_BYTES = 4 * 4  # four little-endian float32 per box
_HASH_BLOCK = 1 << 20


class ShardError(RuntimeError):
    """A shard file that is missing, unreadable or corrupt; the message names the path."""


class ManifestError(ValueError):
    """A manifest that is missing, malformed, or disagrees with the shards; the message names the path."""


@dataclasses.dataclass(eq=False)
class ImageTextRecord:
    """One image with its captions; ``boxes`` is float32 [k, 4] (x0, y0, x1, y1) in pixels."""

    id: str
    image: bytes
    captions: list[str]
    boxes: np.ndarray | None = None
    tags: list[str] | None = None
    split: str | None = None
    labels: dict | None = None

    def __eq__(self, other):
        if not isinstance(other, ImageTextRecord):
            return NotImplemented
        fields = ("id", "image", "captions", "tags", "split", "labels")
        same_boxes = (self.boxes is None) == (other.boxes is None) and (
            self.boxes is None or np.array_equal(self.boxes, other.boxes)
        )
        return same_boxes and all(getattr(self, f) == getattr(other, f) for f in fields)


@dataclasses.dataclass(frozen=True)
class Located:
    """A decoded record and where it was read (shard and position), for the log line if a later stage rejects it."""

    record: ImageTextRecord
    where: str


def _is_str_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# Required and optional keys with the check each value must pass.
_REQUIRED = {"id": lambda v: isinstance(v, str), "img": lambda v: isinstance(v, bytes), "cap": _is_str_list}
_OPTIONAL = {
    "box": lambda v: isinstance(v, bytes) and len(v) % _BOX_BYTES == 0,
    "tag": _is_str_list,
    "split": lambda v: isinstance(v, str),
    "lab": lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
}


def _check_fields(fields) -> None:
    """Raises SkipRecord unless ``fields`` is a valid map of the current schema."""
    if not isinstance(fields, dict):
        raise SkipRecord("bad_encoding", f"expected a msgpack map, got {type(fields).__name__}")
    if "v" not in fields:
        raise SkipRecord("missing_field", "no schema version 'v'")
    if fields["v"] != SCHEMA_VERSION:
        raise SkipRecord("unknown_version", f"schema version {fields['v']!r}; this reader knows {SCHEMA_VERSION}")
    for key in _REQUIRED:
        if key not in fields:
            raise SkipRecord("missing_field", f"no {key!r} field (record id {fields.get('id')!r})")
    for key, valid in (_REQUIRED | _OPTIONAL).items():
        if key in fields and not valid(fields[key]):
            raise SkipRecord("bad_field", f"field {key!r} has the wrong type (record id {fields.get('id')!r})")


def encode_record(record: ImageTextRecord) -> bytes:
    """The msgpack bytes of a record; raises SkipRecord for fields of the wrong type."""
    fields = {"v": SCHEMA_VERSION, "id": record.id, "img": record.image, "cap": list(record.captions)}
    if record.boxes is not None:
        boxes = np.asarray(record.boxes, dtype="<f4")
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise SkipRecord("bad_field", f"boxes must be [k, 4], got shape {boxes.shape} (record id {record.id!r})")
        fields["box"] = boxes.tobytes()
    optional = {"tag": record.tags, "split": record.split, "lab": record.labels}
    fields.update({key: value for key, value in optional.items() if value is not None})
    _check_fields(fields)
    return msgpack.packb(fields, use_bin_type=True)


def decode_record(data: bytes) -> ImageTextRecord:
    """Parses record bytes; raises SkipRecord with a reason code when they are not a valid record."""
    try:
        fields = msgpack.unpackb(data, raw=False)
    except UnicodeDecodeError as error:
        raise SkipRecord("bad_utf8", f"a string is not valid UTF-8: {error}") from error
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise SkipRecord("bad_encoding", f"not a msgpack record: {error}") from error
    _check_fields(fields)
    boxes = np.frombuffer(fields["box"], dtype="<f4").reshape(-1, 4).astype(np.float32) if "box" in fields else None
    return ImageTextRecord(
        id=fields["id"],
        image=fields["img"],
        captions=fields["cap"],
        boxes=boxes,
        tags=fields.get("tag"),
        split=fields.get("split"),
        labels=fields.get("lab"),
    )


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """What the manifest records about one shard file."""

    file: str
    num_records: int
    num_bytes: int
    sha256: str


def _is_local(path: epath.Path) -> bool:
    return "://" not in os.fspath(path)


def _file_digest(path: epath.Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in blocks."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


class _OpenShard:
    """One ArrayRecord file being written; a non-local destination is staged in a local temporary file."""

    def __init__(self, path: epath.Path):
        self.path = path
        self.num_records = 0
        if _is_local(path):
            self.local = path
        else:
            handle, name = tempfile.mkstemp(suffix=SHARD_SUFFIX)
            os.close(handle)
            self.local = epath.Path(name)
        self.local.parent.mkdir(parents=True, exist_ok=True)
        self.writer = array_record_module.ArrayRecordWriter(os.fspath(self.local), WRITER_OPTIONS)
        if not self.writer.ok():
            raise ShardError(f"cannot create ArrayRecord shard {self.local}")

    def write(self, data: bytes) -> None:
        self.writer.write(data)
        self.num_records += 1

    def close(self) -> ShardInfo:
        self.writer.close()
        num_bytes, sha256 = _file_digest(self.local)
        if self.local != self.path:
            with self.local.open("rb") as source, self.path.open("wb") as target:
                shutil.copyfileobj(source, target)
            self.local.unlink()
        return ShardInfo(self.path.name, self.num_records, num_bytes, sha256)

    def discard(self) -> None:
        self.writer.close()
        for path in {self.local, self.path}:
            path.unlink(missing_ok=True)


def write_shard(path: epath.PathLike, records: Iterable[bytes]) -> ShardInfo:
    """Writes encoded records into one shard file at exactly ``path``."""
    shard = _OpenShard(epath.Path(path))
    try:
        for data in records:
            shard.write(data)
    except BaseException:
        shard.discard()
        raise
    return shard.close()


def shard_name(prefix: str, index: int, count: int) -> str:
    """``<prefix>-00003-of-00010.array_record``."""
    return f"{prefix}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


class ShardWriter:
    """Writes records into ``<out_dir>/<prefix>-NNNNN-of-MMMMM.array_record``, a new shard every N records.

    The shard count is known only at the end, so shards are written as ``<prefix>-NNNNN.array_record.partial``
    and renamed on a clean close; on an exception the partial shards are deleted. ``prefix`` defaults to the split.
    """

    def __init__(self, out_dir: epath.PathLike, split: str, records_per_shard: int, prefix: str | None = None):
        if records_per_shard < 1:
            raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
        self.out_dir = epath.Path(out_dir)
        self.prefix = prefix or split
        self.records_per_shard = records_per_shard
        self._open: _OpenShard | None = None
        self._closed: list[ShardInfo] = []
        self.shards: list[ShardInfo] = []  # final shards, filled by close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is None:
            self.close()
        else:
            self.discard()

    def _partial_path(self, index: int) -> epath.Path:
        return self.out_dir / f"{self.prefix}-{index:05d}{SHARD_SUFFIX}.partial"

    def write(self, record: ImageTextRecord | bytes) -> None:
        """Appends one record (encoded here if it is an ImageTextRecord)."""
        data = encode_record(record) if isinstance(record, ImageTextRecord) else record
        if self._open is None:
            self._open = _OpenShard(self._partial_path(len(self._closed)))
        self._open.write(data)
        if self._open.num_records == self.records_per_shard:
            self._closed.append(self._open.close())
            self._open = None

    def close(self) -> list[ShardInfo]:
        """Finishes the last shard and gives every shard its final ``-of-N`` name."""
        if self._open is not None:
            self._closed.append(self._open.close())
            self._open = None
        count = len(self._closed)
        for index, info in enumerate(self._closed):
            name = shard_name(self.prefix, index, count)
            self._partial_path(index).replace(self.out_dir / name)
            self.shards.append(dataclasses.replace(info, file=name))
        self._closed = []
        return self.shards

    def discard(self) -> None:
        """Deletes everything written so far."""
        if self._open is not None:
            self._open.discard()
            self._open = None
        for index in range(len(self._closed)):
            self._partial_path(index).unlink(missing_ok=True)
        self._closed = []


@contextlib.contextmanager
def _local_copy(path: epath.Path) -> Iterator[epath.Path]:
    """``path`` itself when local, else a temporary local copy (ArrayRecord reads local files only)."""
    if _is_local(path):
        yield path
        return
    handle, name = tempfile.mkstemp(suffix=SHARD_SUFFIX)
    os.close(handle)
    local = epath.Path(name)
    try:
        with path.open("rb") as source, local.open("wb") as target:
            shutil.copyfileobj(source, target)
        yield local
    finally:
        local.unlink(missing_ok=True)


def read_shard(path: epath.PathLike) -> Iterator[bytes]:
    """Yields the encoded records of one shard in order; raises ShardError naming the path if it is bad."""
    path = epath.Path(path)
    if not path.exists():
        raise ShardError(f"shard {path} does not exist")
    with _local_copy(path) as local:
        reader = array_record_module.ArrayRecordReader(os.fspath(local))
        if not reader.ok():
            raise ShardError(f"shard {path} is not a readable ArrayRecord file (truncated or corrupt?)")
        try:
            for _ in range(reader.num_records()):
                yield reader.read()
        except RuntimeError as error:
            raise ShardError(f"shard {path} is corrupt: {error}") from error
        finally:
            with contextlib.suppress(RuntimeError):  # a corrupt file fails again on close, already reported
                reader.close()


def write_manifest(out_dir: epath.PathLike, splits: dict[str, list[ShardInfo]]) -> dict:
    """Writes ``manifest.json`` for these splits (replacing it atomically) and returns its content."""
    out_dir = epath.Path(out_dir)
    manifest = {"schema_version": SCHEMA_VERSION, "splits": {}}
    for split, shards in sorted(splits.items()):
        manifest["splits"][split] = {
            "num_records": sum(s.num_records for s in shards),
            "num_bytes": sum(s.num_bytes for s in shards),
            "shards": [dataclasses.asdict(s) for s in shards],
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    staged = out_dir / f"{MANIFEST_NAME}.partial"
    staged.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    staged.replace(out_dir / MANIFEST_NAME)
    return manifest


def read_manifest(data_dir: epath.PathLike) -> dict:
    """Loads ``<data_dir>/manifest.json``; raises ManifestError naming the path when missing or malformed."""
    path = epath.Path(data_dir) / MANIFEST_NAME
    if not path.exists():
        raise ManifestError(
            f"{path} does not exist: is {data_dir} a dataset made by `python -m vlp_jax.datasets.convert`?"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        version = manifest["schema_version"]
        for split, entry in manifest["splits"].items():
            for shard in entry["shards"]:
                ShardInfo(**shard)
            if entry["num_records"] != sum(s["num_records"] for s in entry["shards"]):
                raise ValueError(f"split {split!r}: num_records disagrees with its shards")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        detail = f"missing key {error}" if isinstance(error, KeyError) else str(error)
        raise ManifestError(f"{path} is corrupt ({detail}); re-run the conversion that wrote it") from error
    if version != SCHEMA_VERSION:
        raise ManifestError(f"{path} has schema version {version!r}; this code reads version {SCHEMA_VERSION}")
    return manifest


def shard_paths(data_dir: epath.PathLike, split: str) -> list[epath.Path]:
    """The shard files of one split, in order, as listed by the manifest. Each present shard's size is checked
    against the manifest (one stat per shard): a truncated or half-copied file is a ManifestError naming it."""
    data_dir = epath.Path(data_dir)
    manifest = read_manifest(data_dir)
    if split not in manifest["splits"]:
        known = ", ".join(manifest["splits"]) or "none"
        raise ManifestError(f"{data_dir / MANIFEST_NAME} has no split {split!r}; it has: {known}")
    paths = []
    for shard in manifest["splits"][split]["shards"]:
        path = data_dir / shard["file"]
        try:
            size = path.stat().length
        except FileNotFoundError:  # the shard source reports a missing file by name
            size = shard["num_bytes"]
        if size != shard["num_bytes"]:
            raise ManifestError(
                f"shard {path} has {size} bytes but {MANIFEST_NAME} says {shard['num_bytes']}: re-copy it or re-run "
                f"the converter; `python -m vlp_jax.data.verify {data_dir}` checks every checksum"
            )
        paths.append(path)
    return paths


def read_split(data_dir: epath.PathLike, split: str) -> Iterator[ImageTextRecord]:
    """Every record of one split, decoded, in shard order."""
    for path in shard_paths(data_dir, split):
        for data in read_shard(path):
            yield decode_record(data)


def write_records(
    records: Iterable[ImageTextRecord], out_dir: epath.PathLike, split: str, records_per_shard: int
) -> dict:
    """Writes one split's shards into ``out_dir`` and adds (or replaces) that split in its manifest."""
    out_dir = epath.Path(out_dir)
    splits = {}
    if (out_dir / MANIFEST_NAME).exists():
        old = read_manifest(out_dir)["splits"]
        splits = {name: [ShardInfo(**s) for s in entry["shards"]] for name, entry in old.items()}
    with ShardWriter(out_dir, split, records_per_shard) as writer:
        for record in records:
            writer.write(record)
    for stale in {s.file for s in splits.get(split, [])} - {s.file for s in writer.shards}:
        (out_dir / stale).unlink(missing_ok=True)
    splits[split] = writer.shards
    return write_manifest(out_dir, splits)


def shard_problem(data_dir: epath.PathLike, shard: dict) -> str | None:
    """Why a shard disagrees with its manifest entry ("missing", or the sizes and sha256 that differ), or None when
    its size and sha256 match; reads the whole file."""
    path = epath.Path(data_dir) / shard["file"]
    if not path.exists():
        return "missing"
    num_bytes, sha256 = _file_digest(path)
    if (num_bytes, sha256) == (shard["num_bytes"], shard["sha256"]):
        return None
    return (f"changed: {num_bytes} bytes, sha256 {sha256[:12]}…; the manifest says {shard['num_bytes']} bytes, "
            f"sha256 {shard['sha256'][:12]}…")


def verify_manifest(data_dir: epath.PathLike) -> dict:
    """Recomputes every shard's size and sha256; returns the manifest, or raises ManifestError listing mismatches."""
    data_dir = epath.Path(data_dir)
    manifest = read_manifest(data_dir)
    problems = [
        f"{data_dir / shard['file']} (split {split}) is {problem}"
        for split, entry in manifest["splits"].items()
        for shard in entry["shards"]
        if (problem := shard_problem(data_dir, shard))
    ]
    if problems:
        raise ManifestError(f"{data_dir / MANIFEST_NAME}: " + "; ".join(problems))
    return manifest
