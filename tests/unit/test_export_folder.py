"""Shards → folder export: the folder converter reads the export back to the same images, captions and splits;
the split file names every image of each split; flattening composites transparency as the pipeline decodes it;
bad ids and formats are errors naming the record."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from vlp_jax.data import records, transforms
from vlp_jax.datasets import convert, export


def encoded(mode: str, fmt: str, seed: int, size=(12, 10)) -> bytes:
    channels = len(mode)
    pixels = np.random.RandomState(seed).randint(0, 255, (size[1], size[0], channels), np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode).save(out, format=fmt)
    return out.getvalue()


def write_dataset(out_dir) -> dict[str, list[records.ImageTextRecord]]:
    rgba = encoded("RGBA", "PNG", 1)
    splits = {
        "train": [
            records.ImageTextRecord(id="a/b c", image=encoded("RGB", "JPEG", 2), captions=["one", "uno"],
                                    labels={"emoji": "1F600"}),
            records.ImageTextRecord(id="clear.png", image=rgba, captions=["see-through"]),
        ],
        "eval": [records.ImageTextRecord(id="w", image=encoded("RGB", "WEBP", 3), captions=["webp", "café ☕"])],
    }
    for split, items in splits.items():
        records.write_records(items, out_dir, split, records_per_shard=2)
    return splits


def test_export_reads_back_through_the_folder_converter(tmp_path):
    splits = write_dataset(tmp_path / "shards")
    assert export.main([str(tmp_path / "shards"), f"--out={tmp_path / 'folder'}",
                        f"--split_file={tmp_path / 'split.json'}"]) == 0
    names = {"train": ["a__b_c.jpg", "clear.png"], "eval": ["w.webp"]}
    assert json.loads((tmp_path / "split.json").read_text()) == names
    lines = [json.loads(line) for line in (tmp_path / "folder" / "captions.jsonl").read_text().splitlines()]
    assert lines[0] == {"image": "a__b_c.jpg", "captions": ["one", "uno"], "split": "train",
                        "labels": {"emoji": "1F600"}}

    convert.convert(tmp_path / "folder", "folder", tmp_path / "back", convert.Options())
    for split, items in splits.items():
        back = {r.id: r for r in records.read_split(tmp_path / "back", split)}
        assert sorted(back) == names[split]
        for name, record in zip(names[split], items, strict=True):
            assert back[name].image == record.image  # the stored bytes, unchanged
            assert back[name].captions == record.captions


def test_background_flattens_transparency_as_the_pipeline_does(tmp_path):
    splits = write_dataset(tmp_path / "shards")
    export.export_folder(tmp_path / "shards", tmp_path / "folder", ("train",), background=(255, 0, 255))
    with Image.open(tmp_path / "folder" / "clear.png") as image:
        assert image.mode == "RGB"
        flat = np.asarray(image)
    want = transforms.decode_image(splits["train"][1].image, max_pixels=10**6, background=(255, 0, 255))
    np.testing.assert_array_equal(flat, np.asarray(want))
    with Image.open(io.BytesIO(splits["train"][1].image)) as original:
        assert not np.array_equal(flat, np.asarray(original.convert("RGB")))  # what dropping alpha would give
    # Every image is re-encoded as a (lossless) PNG and named so.
    assert (tmp_path / "folder" / "a__b_c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_name_the_records(tmp_path, capsys):
    clash = [records.ImageTextRecord(id="x y", image=encoded("RGB", "PNG", 0), captions=["a"]),
             records.ImageTextRecord(id="x_y", image=encoded("RGB", "PNG", 1), captions=["b"])]
    records.write_records(clash, tmp_path / "clash", "train", records_per_shard=4)
    with pytest.raises(ValueError, match=r"records 'x y' and 'x_y' both export as 'x_y.png'"):
        export.export_folder(tmp_path / "clash", tmp_path / "out1", ("train",))

    tiff = [records.ImageTextRecord(id="t", image=encoded("RGB", "TIFF", 0), captions=["a"])]
    records.write_records(tiff, tmp_path / "tiff", "train", records_per_shard=4)
    assert export.main([str(tmp_path / "tiff"), f"--out={tmp_path / 'out2'}"]) == 2
    assert "record 't': its image is not PNG, JPEG, WebP or GIF" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        export.main([str(tmp_path / "tiff"), f"--out={tmp_path / 'out3'}", "--background=1,2"])
    assert "--background='1,2': give three integers 0-255" in capsys.readouterr().err
