"""The converter on tiny fixtures of every input format: records, skip reasons, re-encoding, resume, workers, CLI."""

import csv
import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from vlp_jax.data import records
from vlp_jax.datasets import convert
from vlp_jax.datasets.convert import ConvertError, Options


def image_bytes(fmt: str, size=(40, 30), mode="RGB", seed=0) -> bytes:
    """A noise image, so JPEG files are large enough to truncate meaningfully."""
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.RandomState(seed).randint(0, 255, (size[1], size[0], channels), np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(out, format=fmt)
    return out.getvalue()


def write_images(folder) -> dict[str, bytes]:
    """Good images of each kind, and the bad files a scrape contains; returns name -> bytes written."""
    files = {
        "a.jpg": image_bytes("JPEG", seed=1),
        "b.png": image_bytes("PNG", mode="RGBA", seed=2),
        "c.webp": image_bytes("WEBP", seed=3),
        "grey.jpg": image_bytes("JPEG", mode="L", seed=4),
        "truncated.jpg": image_bytes("JPEG", size=(200, 150), seed=5)[:2000],
        "zero.jpg": b"",
        "text.jpg": b"this is not an image\n",
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def read_back(out_dir, split="train") -> dict[str, records.ImageTextRecord]:
    return {r.id: r for r in records.read_split(out_dir, split)}


def test_folder_jsonl(tmp_path):
    files = write_images(tmp_path / "images")
    lines = [
        {"image": "images/a.jpg", "caption": "a noisy square"},
        {"image": "images/a.jpg", "caption": "  static on a screen "},  # merged into a.jpg, stripped
        {"image": "images/b.png", "captions": ["transparent noise", "", "café ☕"]},
        {"image": "images/c.webp", "caption": "webp noise", "split": "val"},
        {"image": "images/grey.jpg", "caption": "grey noise"},
        {"image": "images/missing.jpg", "caption": "gone"},
        {"image": "images/truncated.jpg", "caption": "cut short"},
        {"image": "images/zero.jpg", "caption": "nothing"},
        {"image": "images/text.jpg", "caption": "words"},
        {"caption": "no image key"},
        {"image": "images/grey.jpg", "caption": "second grey caption"},
        {"image": "images/a.jpg"},
    ]
    text = "\n".join(json.dumps(line, ensure_ascii=False) for line in lines)
    text += '\n{"image": "images/empty.jpg", "caption": "   "}\n{"image": "images/nocap.jpg"}\nnot json\n'
    data = text.encode() + b'{"image": "images/latin1.jpg", "caption": "caf\xe9"}\n'
    (tmp_path / "captions.jsonl").write_bytes(data)

    manifest, report = convert.convert(tmp_path / "captions.jsonl", "folder", tmp_path / "out")

    train = read_back(tmp_path / "out")
    assert list(train) == ["images/a.jpg", "images/b.png", "images/grey.jpg"]
    assert train["images/a.jpg"].captions == ["a noisy square", "static on a screen"]
    assert train["images/b.png"].captions == ["transparent noise", "café ☕"]
    assert train["images/grey.jpg"].captions == ["grey noise", "second grey caption"]
    assert all(r.image == files[r.id.split("/")[1]] for r in train.values())  # stored as given
    assert all(r.split == "train" for r in train.values())
    val = read_back(tmp_path / "out", "val")
    assert list(val) == ["images/c.webp"] and val["images/c.webp"].split == "val"
    assert manifest["splits"]["train"]["num_records"] == 3
    assert report.converted == 4
    assert report.skipped == {
        "missing_image": 1, "bad_image": 3, "bad_row": 2, "empty_caption": 1, "missing_caption": 1, "bad_utf8": 1,
    }
    assert report.examples["missing_image"] == [f"{tmp_path}/captions.jsonl:6 ({tmp_path}/images/missing.jpg)"]
    assert [e.split(" ")[0] for e in report.examples["bad_image"]] == [
        f"{tmp_path}/captions.jsonl:{n}" for n in (7, 8, 9)
    ]
    assert "truncated" in report.examples["bad_image"][0]
    assert report.examples["bad_row"][0] == f"{tmp_path}/captions.jsonl:10 (no `image` field)"
    assert records.verify_manifest(tmp_path / "out") == manifest
    saved = json.loads((tmp_path / "out" / "convert_report.json").read_text())
    assert saved["report"]["skipped"] == report.skipped
    assert not (tmp_path / "out" / ".convert").exists()


@pytest.mark.parametrize("suffix, delimiter", [(".csv", ","), (".tsv", "\t")])
def test_folder_csv_and_tsv(tmp_path, suffix, delimiter):
    write_images(tmp_path)
    with open(tmp_path / f"captions{suffix}", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["image", "caption"])
        writer.writerows([["a.jpg", "first, with a comma"], ["b.png", "second\ttabbed"], ["a.jpg", "third"],
                          ["zero.jpg", "empty file"], ["b.png", ""]])
    _, report = convert.convert(tmp_path, "folder", tmp_path / "out")  # SRC may be the folder holding the file
    train = read_back(tmp_path / "out")
    assert {k: r.captions for k, r in train.items()} == {
        "a.jpg": ["first, with a comma", "third"], "b.png": ["second\ttabbed"],
    }
    assert report.skipped == {"bad_image": 1}
    assert report.examples["bad_image"][0].startswith(f"{tmp_path}/captions{suffix}:5 ")


def test_folder_csv_captions_column_holds_a_json_list(tmp_path):
    write_images(tmp_path / "imgs")
    (tmp_path / "caps.csv").write_text('image,captions\na.jpg,"[""one"", ""two""]"\nb.png,not a list\n')
    _, report = convert.convert(tmp_path / "caps.csv", "folder", tmp_path / "out",
                                Options(image_root=str(tmp_path / "imgs")))
    assert {k: r.captions for k, r in read_back(tmp_path / "out").items()} == {"a.jpg": ["one", "two"]}
    assert report.skipped == {"bad_row": 1}


def test_folder_label_columns_go_into_the_records_labels(tmp_path):
    write_images(tmp_path)
    with open(tmp_path / "caps.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["image", "caption", "animal", "size"], ["a.jpg", "one", " dog ", "3"],
                                 ["b.png", "two", "", ""], ["b.png", "again", "cat", ""],
                                 ["grey.jpg", "three", "", ""]])
    rows = [{"image": "a.jpg", "caption": "x", "animal": 4}, {"image": "b.png", "caption": "y", "animal": 1.5}]
    (tmp_path / "j" / "c.jsonl").parent.mkdir()
    (tmp_path / "j" / "c.jsonl").write_text("\n".join(json.dumps(row) for row in rows))

    _, report = convert.convert(tmp_path / "caps.csv", "folder", tmp_path / "out", Options(label_fields=("animal",)))
    labelled = {k: r.labels for k, r in read_back(tmp_path / "out").items()}
    # The first row of an image that holds the column gives the value; no value, no label; only the named columns.
    assert labelled == {"a.jpg": {"animal": "dog"}, "b.png": {"animal": "cat"}, "grey.jpg": None}
    assert report.converted == 3

    assert convert.main([str(tmp_path / "caps.csv"), "--format=folder", f"--out={tmp_path / 'cli'}",
                         "--label_field=animal, size"]) == 0
    assert read_back(tmp_path / "cli")["a.jpg"].labels == {"animal": "dog", "size": "3"}  # CSV cells are text
    _, report = convert.convert(tmp_path / "j" / "c.jsonl", "folder", tmp_path / "out2",
                                Options(image_root=str(tmp_path), label_fields=("animal",)))
    assert {k: r.labels for k, r in read_back(tmp_path / "out2").items()} == {"a.jpg": {"animal": 4}}  # JSON int
    assert report.skipped == {"bad_row": 1}  # a float label is neither a name nor an index


def test_coco(tmp_path):
    write_images(tmp_path / "train2014")
    coco = {
        "images": [
            {"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.png"}, {"id": 3, "file_name": "c.webp"},
            {"id": 4, "file_name": "missing.jpg"}, {"id": 5, "file_name": "a.jpg"}, {"id": 6},
        ],
        "annotations": [
            {"image_id": 1, "caption": "one"}, {"image_id": 2, "caption": "two"}, {"image_id": 1, "caption": "uno"},
            {"image_id": 4, "caption": "four"}, {"image_id": 5, "caption": "again"},
        ],
    }
    (tmp_path / "captions_train2014.json").write_text(json.dumps(coco))
    manifest, report = convert.convert(tmp_path / "captions_train2014.json", "coco", tmp_path / "out",
                                       Options(image_root=str(tmp_path / "train2014"), split="val"))
    val = read_back(tmp_path / "out", "val")
    assert {k: r.captions for k, r in val.items()} == {"a.jpg": ["one", "uno"], "b.png": ["two"]}
    assert list(manifest["splits"]) == ["val"]
    assert report.skipped == {"missing_caption": 1, "missing_image": 1, "duplicate_id": 1, "bad_row": 1}
    assert report.examples["duplicate_id"] == [f"{tmp_path}/captions_train2014.json:images[4] (a.jpg)"]
    assert report.examples["missing_caption"][0] == f"{tmp_path}/captions_train2014.json:images[2]"


def test_karpathy_keeps_splits(tmp_path):
    write_images(tmp_path / "root" / "val2014")
    sentences = lambda *raw: [{"raw": r, "tokens": r.split()} for r in raw]  # noqa: E731
    karpathy = {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": "a.jpg", "split": "train", "sentences": sentences("A", "B")},
        {"filepath": "val2014", "filename": "b.png", "split": "restval", "sentences": sentences("C")},
        {"filepath": "val2014", "filename": "c.webp", "split": "val", "sentences": sentences("D")},
        {"filepath": "val2014", "filename": "grey.jpg", "split": "test", "sentences": sentences("E", "F")},
        {"filepath": "val2014", "filename": "zero.jpg", "split": "dev", "sentences": sentences("G")},
        {"filepath": "val2014", "filename": "text.jpg", "split": "test", "sentences": []},
    ]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    manifest, report = convert.convert(tmp_path / "dataset_coco.json", "karpathy", tmp_path / "out",
                                       Options(image_root=str(tmp_path / "root")))
    assert {s: e["num_records"] for s, e in manifest["splits"].items()} == {"train": 2, "val": 1, "test": 1}
    assert {k: r.captions for k, r in read_back(tmp_path / "out").items()} == {"a.jpg": ["A", "B"], "b.png": ["C"]}
    assert read_back(tmp_path / "out", "test")["grey.jpg"].captions == ["E", "F"]
    assert report.skipped == {"bad_row": 1, "missing_caption": 1}


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            add_member(tar, name, data)


def webdataset_fixture(folder) -> dict[str, bytes]:
    """Two img2dataset-style tars; returns the good images by key."""
    folder.mkdir(parents=True, exist_ok=True)
    good = {"000": image_bytes("JPEG", seed=10), "001": image_bytes("PNG", seed=11),
            "005": image_bytes("WEBP", seed=12), "006": image_bytes("JPEG", seed=13)}
    write_tar(folder / "00000.tar", [
        ("000.jpg", good["000"]), ("000.txt", b"a jpg with a txt"),
        ("001.png", good["001"]), ("001.json", json.dumps({"caption": "a png with json", "url": "u"}).encode()),
        ("002.txt", b"caption without image"),
        ("003.jpg", image_bytes("JPEG", seed=14)),
        ("004.jpg", image_bytes("JPEG", size=(200, 150))[:1500]), ("004.txt", b"truncated"),
    ])
    write_tar(folder / "00001.tar", [
        ("000.jpg", image_bytes("JPEG", seed=15)), ("000.txt", b"same key as in the first tar"),
        ("005.webp", good["005"]), ("005.json", json.dumps({"caption": "ünïcode webp"}).encode()),
        ("006.jpeg", good["006"]), ("006.txt", b"\xff\xfe not utf-8"),
        ("key\udcff.jpg", image_bytes("JPEG", seed=16)), ("key\udcff.txt", b"a key that is not utf-8"),
    ])
    return good


def test_webdataset(tmp_path):
    good = webdataset_fixture(tmp_path / "tars")
    (tmp_path / "tars" / "notes.md").write_text("not a tar")
    manifest, report = convert.convert(f"{tmp_path}/tars/*.tar", "webdataset", tmp_path / "out",
                                       Options(records_per_shard=2))
    train = read_back(tmp_path / "out")
    assert {k: r.captions for k, r in train.items()} == {
        "000": ["a jpg with a txt"], "001": ["a png with json"], "005": ["ünïcode webp"],
    }
    assert all(r.image == good[k] for k, r in train.items())
    # one shard per tar here: a shard never spans two input tars
    assert [s["num_records"] for s in manifest["splits"]["train"]["shards"]] == [2, 1]
    assert report.skipped == {"missing_image": 1, "missing_caption": 1, "bad_image": 1, "duplicate_id": 1,
                              "bad_utf8": 2}
    assert report.examples["missing_image"][0].startswith(f"{tmp_path}/tars/00000.tar:002 ")
    assert report.examples["duplicate_id"] == [f"{tmp_path}/tars/00001.tar:000 (000)"]
    assert report.examples["bad_utf8"] == [
        f"{tmp_path}/tars/00001.tar:006 (caption '\\udcff\\udcfe not utf-8')",
        f"{tmp_path}/tars/00001.tar:key\\udcff (id 'key\\udcff')",
    ]


def test_webdataset_truncated_tar_keeps_what_it_could_read(tmp_path):
    members = [(f"{i:03d}.{ext}", data) for i in range(6)
               for ext, data in (("jpg", image_bytes("JPEG", seed=i)), ("txt", f"caption {i}".encode()))]
    write_tar(tmp_path / "full.tar", members)
    (tmp_path / "cut.tar").write_bytes((tmp_path / "full.tar").read_bytes()[:7000])
    _, report = convert.convert(tmp_path / "cut.tar", "webdataset", tmp_path / "out")
    assert report.skipped["bad_tar"] == 1 and report.examples["bad_tar"][0].startswith(f"{tmp_path}/cut.tar ")
    kept = list(read_back(tmp_path / "out"))
    assert 0 < len(kept) < 6 and kept == [f"{i:03d}" for i in range(len(kept))]


def test_max_side_reencodes_large_images_only(tmp_path):
    small_png = image_bytes("PNG", size=(40, 30), mode="RGBA")
    (tmp_path / "big.jpg").write_bytes(image_bytes("JPEG", size=(200, 100)))
    (tmp_path / "tall.webp").write_bytes(image_bytes("WEBP", size=(50, 130)))
    (tmp_path / "small.png").write_bytes(small_png)
    Image.new("RGB", (90, 10), "red").save(tmp_path / "wide.bmp")  # not a stored format: becomes PNG
    names = ("big.jpg", "tall.webp", "small.png", "wide.bmp")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"image": n, "caption": n}) + "\n" for n in names))
    convert.convert(tmp_path / "c.jsonl", "folder", tmp_path / "out", Options(max_side=64))
    stored = read_back(tmp_path / "out")
    opened = {k: Image.open(io.BytesIO(r.image)) for k, r in stored.items()}
    assert {k: (im.format, im.size) for k, im in opened.items()} == {
        "big.jpg": ("JPEG", (64, 32)), "tall.webp": ("WEBP", (25, 64)), "small.png": ("PNG", (40, 30)),
        "wide.bmp": ("PNG", (64, 7)),
    }
    assert stored["small.png"].image == small_png


def folder_fixture(folder, count=7) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        (folder / f"{i}.jpg").write_bytes(image_bytes("JPEG", seed=i))
        lines.append(json.dumps({"image": f"{i}.jpg", "caption": f"picture {i}", "split": "val" if i % 3 else "train"}))
    lines.append(json.dumps({"image": "gone.jpg", "caption": "missing"}))
    (folder / "c.jsonl").write_text("\n".join(lines))


def test_resume_after_interruption_gives_the_same_dataset(tmp_path, monkeypatch):
    folder_fixture(tmp_path / "src")
    options = Options(records_per_shard=2)
    reference, reference_report = convert.convert(tmp_path / "src" / "c.jsonl", "folder", tmp_path / "ref", options)

    original, calls = convert._convert_unit, []

    def crash_on_third_unit(unit, staging, options):
        calls.append(unit.index)
        if unit.index == 2:
            (staging / f"{unit.split}-u00002-00000.array_record.partial").write_bytes(b"half-written")
            raise KeyboardInterrupt
        return original(unit, staging, options)

    monkeypatch.setattr(convert, "_convert_unit", crash_on_third_unit)
    with pytest.raises(KeyboardInterrupt):
        convert.convert(tmp_path / "src" / "c.jsonl", "folder", tmp_path / "out", options)
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(ConvertError, match="already holds a conversion; pass --resume"):
        convert.convert(tmp_path / "src" / "c.jsonl", "folder", tmp_path / "out", options)
    with pytest.raises(ConvertError, match="another input or options"):
        convert.convert(tmp_path / "src" / "c.jsonl", "folder", tmp_path / "out", Options(records_per_shard=3),
                        resume=True)

    monkeypatch.setattr(convert, "_convert_unit", lambda *args: calls.append(args[0].index) or original(*args))
    calls.clear()
    manifest, report = convert.convert(tmp_path / "src" / "c.jsonl", "folder", tmp_path / "out", options, resume=True)
    assert calls == [2, 3]  # units 0 and 1 were finished before the interruption
    assert manifest == reference and report == reference_report
    assert {s: e["num_records"] for s, e in manifest["splits"].items()} == {"train": 3, "val": 4}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in (tmp_path / "ref").iterdir())
    # resuming a finished conversion changes nothing
    calls.clear()
    again, _ = convert.convert(tmp_path / "src" / "c.jsonl", "folder", tmp_path / "out", options, resume=True)
    assert again == reference
    assert calls == []


def test_resume_redoes_a_unit_whose_marker_is_missing(tmp_path, monkeypatch):
    """Deleting the last unit's marker and shards (as if killed while writing them) loses nothing."""
    webdataset_fixture(tmp_path / "tars")
    reference, _ = convert.convert(tmp_path / "tars", "webdataset", tmp_path / "ref", Options(records_per_shard=2))

    def stop_before_finalize(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "_finalize", stop_before_finalize)
    with pytest.raises(KeyboardInterrupt):
        convert.convert(tmp_path / "tars", "webdataset", tmp_path / "out", Options(records_per_shard=2))
    staging = tmp_path / "out" / ".convert"
    (staging / "unit-00001.json").unlink()
    for shard in staging.glob("train-u00001-*"):
        shard.unlink()
    monkeypatch.undo()
    manifest, _ = convert.convert(tmp_path / "tars", "webdataset", tmp_path / "out", Options(records_per_shard=2),
                                  resume=True)
    assert manifest == reference


def test_workers_give_the_same_records(tmp_path):
    folder_fixture(tmp_path / "src", count=9)
    inline, _ = convert.convert(tmp_path / "src" / "c.jsonl", "folder", tmp_path / "a", Options(records_per_shard=2))
    pooled, _ = convert.convert(tmp_path / "src" / "c.jsonl", "folder", tmp_path / "b",
                                Options(records_per_shard=2, workers=2))
    assert pooled == inline  # same shard names, counts and sha256, so the same bytes
    assert list(records.read_split(tmp_path / "a", "val")) == list(records.read_split(tmp_path / "b", "val"))


def test_errors_name_the_input(tmp_path):
    with pytest.raises(ConvertError, match=f"SRC {tmp_path}/nope.jsonl does not exist"):
        convert.convert(tmp_path / "nope.jsonl", "folder", tmp_path / "out")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConvertError, match="lists no images"):
        convert.convert(tmp_path / "empty.jsonl", "folder", tmp_path / "out")
    with pytest.raises(ConvertError, match="names no tar files"):
        convert.convert(f"{tmp_path}/*.tar", "webdataset", tmp_path / "out")
    (tmp_path / "k.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ConvertError, match="not a COCO captions file.*--format=karpathy"):
        convert.convert(tmp_path / "k.json", "coco", tmp_path / "out")
    with pytest.raises(ConvertError, match="--image_root=/no/such/dir does not exist"):
        convert.convert(tmp_path / "k.json", "karpathy", tmp_path / "out", Options(image_root="/no/such/dir"))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "vlp_jax.datasets.convert", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_cli(tmp_path):
    missing = run_cli(tmp_path / "nope.jsonl", "--format=folder", f"--out={tmp_path / 'out'}")
    assert missing.returncode == 2
    assert missing.stderr.strip() == (f"error: SRC {tmp_path}/nope.jsonl does not exist; "
                                      "pass the captions file or JSON to convert")
    unknown = run_cli(tmp_path, "--format=parquet", f"--out={tmp_path / 'out'}")
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("error: argument --format: invalid choice: 'parquet'")
    assert len(unknown.stderr.strip().splitlines()) == 1

    folder_fixture(tmp_path / "src", count=2)
    done = run_cli(tmp_path / "src" / "c.jsonl", "--format=folder", f"--out={tmp_path / 'out'}")
    assert done.returncode == 0, done.stderr
    assert "converted 2 records; skipped 1" in done.stdout and "missing_image: 1" in done.stdout
    assert "convert: 2/2 units" in done.stderr


def test_the_old_module_path_runs_the_same_command():
    old = subprocess.run([sys.executable, "-m", "vlp_jax.data.convert", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert old.returncode == 0 and old.stdout.startswith("usage: python -m vlp_jax.datasets.convert ")
