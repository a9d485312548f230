"""Record encoding, ArrayRecord shards and the manifest: round trips, checksums, and the reasons bad records get."""

import hashlib
import json

import msgpack
import numpy as np
import pytest

from vlp_jax.data import records
from vlp_jax.data.records import ImageTextRecord
from vlp_jax.data.skips import SkipRecord


def make_records(count: int) -> list[ImageTextRecord]:
    """Records using every field, with non-ASCII captions; every other one has only the required fields."""
    out = []
    for i in range(count):
        full = i % 2 == 0
        out.append(ImageTextRecord(
            id=f"img-{i:03d}",
            image=bytes([i % 256]) * (10 + i),
            captions=[f"un chat n°{i} ☕", "猫がいる", ""] if full else [f"caption {i}"],
            boxes=np.array([[0, 1.5, 20, 30.25], [i, i, i + 1, i + 2]], np.float32) if full else None,
            tags=["cat", "mug"] if full else None,
            split="train" if full else None,
            labels={"answer": "yes", "count": i, "score": 0.5, "box": [1.0, 2.0, 3.0], "noisy": 0} if full else None,
        ))
    return out


def test_encode_decode_round_trip():
    for record in make_records(4):
        decoded = records.decode_record(records.encode_record(record))
        assert decoded == record
    decoded = records.decode_record(records.encode_record(make_records(1)[0]))
    assert decoded.boxes.dtype == np.float32 and decoded.boxes.shape == (2, 4)


def test_empty_boxes_round_trip():
    record = ImageTextRecord("a", b"x", ["c"], boxes=np.zeros((0, 4), np.float32), tags=[])
    decoded = records.decode_record(records.encode_record(record))
    assert decoded.boxes.shape == (0, 4) and decoded.tags == [] and decoded == record


def test_records_differ_when_boxes_differ():
    a, b = make_records(1)[0], make_records(1)[0]
    b.boxes = b.boxes + 1
    assert a != b


def packed(**fields) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\xc1 not msgpack", "bad_encoding"),
        (b"", "bad_encoding"),
        (msgpack.packb([1, 2]), "bad_encoding"),
        (packed(id="a", img=b"x", cap=["c"]), "missing_field"),
        (packed(v=2, id="a", img=b"x", cap=["c"]), "unknown_version"),
        (packed(v=1, img=b"x", cap=["c"]), "missing_field"),
        (packed(v=1, id="a", cap=["c"]), "missing_field"),
        (packed(v=1, id="a", img=b"x"), "missing_field"),
        (packed(v=1, id="a", img="not bytes", cap=["c"]), "bad_field"),
        (packed(v=1, id="a", img=b"x", cap="not a list"), "bad_field"),
        (packed(v=1, id="a", img=b"x", cap=["c"], box=b"123"), "bad_field"),
        (packed(v=1, id="a", img=b"x", cap=["c"], lab=[1]), "bad_field"),
    ],
)
def test_decode_errors_carry_reasons(data, reason):
    with pytest.raises(SkipRecord) as raised:
        records.decode_record(data)
    assert raised.value.reason == reason
    assert reason in records.DECODE_REASONS


def test_decode_rejects_non_utf8_strings():
    good = packed(v=1, id="é", img=b"x", cap=["c"])
    bad = good.replace("é".encode(), b"\xff\xfe")
    with pytest.raises(SkipRecord) as raised:
        records.decode_record(bad)
    assert raised.value.reason == "bad_utf8"


def test_encode_rejects_wrong_types():
    with pytest.raises(SkipRecord, match="boxes must be"):
        records.encode_record(ImageTextRecord("a", b"x", ["c"], boxes=np.zeros((3, 3))))
    with pytest.raises(SkipRecord, match="'cap'"):
        records.encode_record(ImageTextRecord("a", b"x", [1]))


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shards_and_manifest(tmp_path):
    written = make_records(7)
    manifest = records.write_records(written, tmp_path, "train", records_per_shard=3)
    names = [f"train-{i:05d}-of-00003.array_record" for i in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, "manifest.json"])
    entry = manifest["splits"]["train"]
    assert [s["file"] for s in entry["shards"]] == names
    assert [s["num_records"] for s in entry["shards"]] == [3, 3, 1]
    assert entry["num_records"] == 7
    assert [s["num_bytes"] for s in entry["shards"]] == [(tmp_path / n).stat().st_size for n in names]
    assert [s["sha256"] for s in entry["shards"]] == [sha256(tmp_path / n) for n in names]
    assert entry["num_bytes"] == sum(s["num_bytes"] for s in entry["shards"])
    assert records.read_manifest(tmp_path) == manifest == json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["schema_version"] == records.SCHEMA_VERSION
    assert list(records.read_split(tmp_path, "train")) == written
    assert [records.decode_record(d) for d in records.read_shard(tmp_path / names[1])] == written[3:6]
    assert records.verify_manifest(tmp_path) == manifest


def test_write_records_adds_and_replaces_splits(tmp_path):
    records.write_records(make_records(5), tmp_path, "train", records_per_shard=2)
    records.write_records(make_records(2), tmp_path, "eval", records_per_shard=2)
    manifest = records.write_records(make_records(1), tmp_path, "train", records_per_shard=2)
    assert {s: e["num_records"] for s, e in manifest["splits"].items()} == {"train": 1, "eval": 2}
    # the old three train shards are gone, not left beside the new one
    assert sorted(p.name for p in tmp_path.glob("train-*")) == ["train-00000-of-00001.array_record"]
    records.verify_manifest(tmp_path)


def test_empty_split_has_no_shards(tmp_path):
    manifest = records.write_records([], tmp_path, "eval", records_per_shard=4)
    assert manifest["splits"]["eval"] == {"num_records": 0, "num_bytes": 0, "shards": []}
    assert list(records.read_split(tmp_path, "eval")) == []


def test_shard_writer_discards_partial_shards_on_error(tmp_path):
    with pytest.raises(KeyError):
        with records.ShardWriter(tmp_path, "train", records_per_shard=2) as writer:
            for record in make_records(3):
                writer.write(record)
            raise KeyError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_non_local_destination_goes_through_a_local_copy(tmp_path, monkeypatch):
    """gs:// and other remote paths are staged locally and copied; local paths stand in for a bucket here."""
    monkeypatch.setattr(records, "_is_local", lambda path: False)
    manifest = records.write_records(make_records(3), tmp_path, "train", records_per_shard=2)
    assert list(records.read_split(tmp_path, "train")) == make_records(3)
    assert records.verify_manifest(tmp_path) == manifest


def test_verify_manifest_detects_a_modified_shard(tmp_path):
    records.write_records(make_records(4), tmp_path, "train", records_per_shard=2)
    shard = tmp_path / "train-00001-of-00002.array_record"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(records.ManifestError, match="train-00001-of-00002.array_record.*changed"):
        records.verify_manifest(tmp_path)
    shard.unlink()
    with pytest.raises(records.ManifestError, match="train-00001-of-00002.array_record.*missing"):
        records.verify_manifest(tmp_path)


def test_manifest_errors_name_the_path(tmp_path):
    with pytest.raises(records.ManifestError, match=f"{tmp_path}/manifest.json does not exist"):
        records.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(records.ManifestError, match=f"{tmp_path}/manifest.json is corrupt"):
        records.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 1, "splits": {"train": {}}}))
    with pytest.raises(records.ManifestError, match="is corrupt \\(missing key 'shards'\\)"):
        records.read_manifest(tmp_path)
    (tmp_path / "manifest.json").unlink()
    records.write_records(make_records(1), tmp_path, "train", records_per_shard=2)
    with pytest.raises(records.ManifestError, match="no split 'val'; it has: train"):
        records.shard_paths(tmp_path, "val")


def test_read_shard_errors_name_the_path(tmp_path):
    with pytest.raises(records.ShardError, match="does not exist"):
        list(records.read_shard(tmp_path / "nope.array_record"))
    garbage = tmp_path / "garbage.array_record"
    garbage.write_bytes(b"garbage" * 20)
    with pytest.raises(records.ShardError, match=f"{garbage} is not a readable ArrayRecord"):
        list(records.read_shard(garbage))
    records.write_records(make_records(4), tmp_path, "train", records_per_shard=4)
    shard = tmp_path / "train-00000-of-00001.array_record"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(records.ShardError, match=f"{shard}"):
        list(records.read_shard(shard))
