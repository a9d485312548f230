"""Writes converted shards back out as a plain folder: `python -m vlp_jax.datasets.export`.

    python -m vlp_jax.datasets.export DATA_DIR --out=FOLDER [--splits=train,eval] [--split_file=FILE]
        [--background=R,G,B]

The inverse of `convert --format=folder`: every record of the named splits becomes an image file (its stored
bytes, unchanged) and one line of FOLDER/captions.jsonl, ``{"image": NAME, "captions": [...], "split": SPLIT}``
plus the record's ``labels`` when it has any. ``--split_file`` writes ``{"<split>": [image names]}`` (JSON), a plain
split format (the open_clip harness of docs/results/real-data.md reads it), so another framework trains
and evaluates on exactly the images this one does. What for: side-by-side runs with other systems (open_clip's
folder loaders, the bench harness), and looking at a dataset with ordinary tools.

``--background=R,G,B`` writes every image as an RGB PNG with transparent pixels composited over that colour, as
vlp_jax's pipeline decodes it (config.data.image.background, white by default): other tools' loaders often drop
the alpha channel instead (PIL's convert("RGB") keeps whatever colour hides under it; emoji become black
squares), which would compare the systems on different pixels.

Image names are the record ids made file-safe (characters other than letters, digits, '.', '-' and '_' become
'_', the image format's extension added when missing); two records whose names would collide are an error naming
both, and so is an image whose format is not PNG, JPEG, WebP or GIF.
"""

import argparse
import io
import json
import re
import sys

from etils import epath

from vlp_jax.data import records, transforms

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_SIGNATURES = (  # leading bytes → extension
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"\xff\xd8\xff", ".jpg"),
    (b"GIF8", ".gif"),
)


def image_extension(data: bytes) -> str | None:
    """The file extension of an encoded image from its leading bytes; None when the format is not recognised."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    for signature, extension in _SIGNATURES:
        if data.startswith(signature):
            return extension
    return None


def flattened_png(data: bytes, background: tuple[int, int, int]) -> bytes:
    """The image as an RGB PNG, transparent pixels composited over `background` (vlp_jax's decoding)."""
    image = transforms.decode_image(data, max_pixels=2**40, background=background)  # SkipRecord is a ValueError
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def file_name(record: records.ImageTextRecord) -> str:
    """The record's image file name: its id made file-safe, with the image format's extension."""
    extension = image_extension(record.image)
    if extension is None:
        raise ValueError(
            f"record {record.id!r}: its image is not PNG, JPEG, WebP or GIF (first bytes {record.image[:8]!r}); "
            "export writes the stored bytes unchanged, so it only handles formats other tools read by extension"
        )
    name = _UNSAFE.sub("_", record.id.replace("/", "__"))
    return name if name.lower().endswith(extension) else name + extension


def export_folder(data_dir: epath.PathLike, out: epath.PathLike, splits: tuple[str, ...],
                  background: tuple[int, int, int] | None = None) -> dict[str, list[str]]:
    """Writes the splits' records into `out` (images + captions.jsonl); returns {split: [image names]}.

    With `background`, images are written as flattened RGB PNGs (flattened_png) instead of their stored bytes."""
    out = epath.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names: dict[str, list[str]] = {split: [] for split in splits}
    owner: dict[str, str] = {}
    with (out / "captions.jsonl").open("w") as lines:
        for split in splits:
            for record in records.read_split(data_dir, split):
                if background is not None:
                    try:
                        record.image = flattened_png(record.image, background)
                    except ValueError as error:
                        raise ValueError(f"record {record.id!r} of split {split!r}: {error}") from error
                name = file_name(record)
                if name in owner:
                    raise ValueError(
                        f"records {owner[name]!r} and {record.id!r} both export as {name!r}: their ids differ only "
                        "in characters a file name cannot hold"
                    )
                owner[name] = record.id
                (out / name).write_bytes(record.image)
                line = {"image": name, "captions": list(record.captions), "split": split}
                if record.labels:
                    line["labels"] = record.labels
                lines.write(json.dumps(line) + "\n")
                names[split].append(name)
    return names


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vlp_jax.datasets.export", description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", help="a dataset directory written by vlp_jax.datasets.convert (or emoji)")
    parser.add_argument("--out", required=True, help="the folder to write images and captions.jsonl into")
    parser.add_argument("--splits", default="train,eval", help="comma-separated splits to export")
    parser.add_argument("--split_file", "--split-file", dest="split_file", default="",
                        help="also write {split: [image names]} here (JSON)")
    parser.add_argument("--background", default="",
                        help="R,G,B: write RGB PNGs with transparent pixels composited over this colour")
    args = parser.parse_args(argv)
    if args.background:
        try:
            colour = tuple(int(c) for c in args.background.split(","))
            if len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
                raise ValueError
        except ValueError:
            parser.error(f"--background={args.background!r}: give three integers 0-255, e.g. --background=255,255,255")
        args.background = colour
    else:
        args.background = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    splits = tuple(s for s in args.splits.split(",") if s)
    try:
        names = export_folder(args.data_dir, args.out, splits, args.background)
    except (ValueError, records.ManifestError, records.ShardError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.split_file:
        epath.Path(args.split_file).write_text(json.dumps(names))
    print(", ".join(f"{split}: {len(n)} images" for split, n in names.items()) + f"; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
