"""Converts the image-text data users have on disk into ArrayRecord shards: `python -m vlp_jax.datasets.convert`.

    python -m vlp_jax.datasets.convert SRC --format=FORMAT --out=DIR [--records_per_shard=N] [--max_side=N]
        [--workers=N] [--split=NAME] [--image_root=DIR] [--label_field=COLUMN[,COLUMN]] [--instances=FILE]
        [--annotations=FILE] [--coco_subset=NAME] [--resume]

Formats:
  folder      a captions file (JSONL, CSV or TSV; SRC is the file, or a folder holding exactly one) with keys or
              columns `image` (path relative to the file's folder, or to --image_root) and `caption` (several rows
              of one image are merged) or `captions` (a list; in CSV/TSV a JSON list); an optional `split`
              column, else --split. Each --label_field column (e.g. a class name, for zero-shot tasks:
              vlp_jax/evaluate/labelled.py) goes into the record's labels under its column name; a row without it
              gives no label. Optional `boxes` (a list of [x0, y0, x1, y1] in the image's pixels) and `tags` (a
              list of names, one per box; in CSV/TSV both are JSON lists) carry object detections, e.g. for
              CMAL's anchors; an image's first row holding `boxes` gives them. The id is the image's relative path.
  coco        COCO captions JSON (`images` + `annotations`); images under --image_root (default: the JSON's
              folder); all in --split. The id is the image's file_name. --instances=PATH adds a COCO instances
              JSON's boxes (bbox [x, y, w, h]) and category names as each record's boxes and tags.
  karpathy    Karpathy-split JSON (dataset_coco.json, dataset_flickr30k.json): images under
              --image_root/<filepath>/<filename>; splits kept, 'restval' merged into 'train' as is customary
              for the retrieval benchmarks. The id is the filename.
  webdataset  WebDataset / img2dataset tar shards: SRC is a tar, a folder of *.tar, or a glob in the file name
              (e.g. gs://bucket/cc3m/*.tar). Consecutive members sharing a key form a sample; the image is its
              jpg/jpeg/png/webp member, the caption its txt member or the "caption" of its json member.
              All in --split. The id is the key.

Downstream-task formats write the task items of data/tasks.py into each record's labels, one record per image
(records need at least one caption: each gets its image's premises, questions or expressions); items that
tasks.valid_items rejects are skipped one by one, as are entries the files cannot tie to an image or answer:
  snli_ve     an SNLI-VE jsonl file (snli_ve_train.jsonl): per line `Flikr30kID` (or `Flickr30kID`), `sentence1`
              (the premise, a Flickr30K caption), `sentence2` (the hypothesis) and `gold_label`. Lines are grouped
              by image (records in order of first appearance): labels["ve"] = [{hypothesis, label}], captions =
              the distinct premises. Images under --image_root (default: SRC's folder); all in --split. The id is
              the image's file name.
  vqa         a VQA v2 questions JSON (`questions`: image_id, question, question_id) with --annotations=FILE,
              the VQA v2 annotations JSON whose `answers` give each question's ten human answers (required:
              test-dev questions have no public answers, so they can be neither trained on nor scored).
              labels["vqa"] = [{question, answers}], captions = the distinct questions; records by image id.
              The image is --image_root/COCO_<subset>_<12-digit id>.jpg (subset: --coco_subset, default from
              SRC's name, e.g. train2014) or, COCO 2017 style, <12-digit id>.jpg. All in --split. The id is the
              image's file name.
  refcoco     a RefCOCO / RefCOCO+ / RefCOCOg refs JSON (a list of {ref_id, ann_id, image_id, split, sentences:
              [{sent}]}; the JSON form of refs(unc).p: pickles are never loaded) with --instances=FILE, the COCO
              instances JSON of the same release (required). One record per (image, the refs' split), in image
              id order: boxes and tags = every instance of the image (x0, y0, x1, y1 pixels; category names),
              labels["rec"] = [{expression, box: the index of the ref's ann_id among those boxes}] for each
              sentence of each ref of that image and split, captions = the distinct expressions. The image is
              the instances' images[].file_name under --image_root. The id is <split>/<file_name>.

Every image must decode fully with PIL (verify() misses truncated JPEGs); it is stored as given unless it is
larger than --max_side or not JPEG/PNG/WebP, in which case it is re-encoded (orientation applied). Items that fail
are skipped and counted by reason (SKIP_REASONS); the closing report shows the first few of each.

Work is cut into units: up to records_per_shard consecutive items, or one tar file. A unit writes its shards and
then a completion marker into <out>/.convert/, so --resume skips finished units. When all are done, shards are
renamed to <split>-NNNNN-of-MMMMM.array_record in unit order, records whose id was already seen are dropped as
duplicates, and manifest.json and convert_report.json are written. The output depends only on the input and
the options, not on --workers or on interruptions.
"""

import argparse
import collections
import csv
import dataclasses
import hashlib
import io
import json
import os
import posixpath
import re
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from concurrent import futures

import numpy as np
from etils import epath
from PIL import Image, ImageOps

from vlp_jax.data import tasks
from vlp_jax.data.records import (
    MANIFEST_NAME,
    ImageTextRecord,
    ShardInfo,
    ShardWriter,
    read_manifest,
    read_shard,
    shard_name,
    write_manifest,
    write_records,
    write_shard,
)
from vlp_jax.data.skips import SkipLog, SkipRecord

__all__ = ["FORMATS", "SKIP_REASONS", "ConvertError", "Options", "Report", "convert", "main", "write_records"]

FORMATS = ("folder", "coco", "karpathy", "webdataset", "snli_ve", "vqa", "refcoco")
SKIP_REASONS = {
    "missing_image": "image file not found, or no image member in the sample",
    "bad_image": "image bytes that PIL cannot decode (truncated, empty, not an image)",
    "missing_caption": "no caption field",
    "empty_caption": "every caption is empty",
    "bad_utf8": "a caption or id that is not valid UTF-8",
    "duplicate_id": "an id converted earlier",
    "bad_row": "a malformed annotation row or field",
    "bad_tar": "a tar file unreadable from this point on",
    "bad_task_item": "a VE, VQA or RefCOCO item that tasks.valid_items rejects: blank text, a gold_label other "
                     "than entailment/neutral/contradiction (SNLI's '-': no consensus), no answer strings",
    "unanswered_question": "a VQA question with no annotation in --annotations",
    "unknown_object": "a RefCOCO ref whose ann_id is not an annotation of its image in --instances",
}
STORED_FORMATS = ("JPEG", "PNG", "WEBP")
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
CAPTION_FILE_SUFFIXES = (".jsonl", ".csv", ".tsv")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
STAGING_DIR = ".convert"
ORIENTATION_TAG = 0x0112  # EXIF orientation
REPORT_NAME = "convert_report.json"
EXAMPLES_PER_REASON = 5
SNLI_VE_IMAGE_KEYS = ("Flikr30kID", "Flickr30kID")  # the released files spell it "Flikr"
COCO_ID_DIGITS = 12  # COCO file names zero-pad the image id: 000000000042.jpg
COCO_SUBSET = re.compile(r"(train|val|test)(?:-dev)?(\d{4})")  # v2_..._test-dev2015_... -> test2015
PICKLE_SUFFIXES = (".p", ".pkl", ".pickle")


class ConvertError(ValueError):
    """Unusable input or options; the message names the path or flag and the fix."""


@dataclasses.dataclass(frozen=True)
class Options:
    records_per_shard: int = 2000  # ~100 MB shards at ~50 KB per image
    max_side: int | None = None  # re-encode images whose longer side exceeds this
    quality: int = 95  # JPEG/WebP quality when re-encoding
    workers: int = 0  # threads converting units in parallel; 0 or 1 = inline
    split: str = "train"  # split name for formats that carry none
    image_root: str | None = None
    label_fields: tuple[str, ...] = ()  # folder format: columns copied into each record's labels
    instances: str | None = None  # coco, refcoco formats: a COCO instances JSON whose boxes and names are kept
    annotations: str | None = None  # vqa format: the VQA v2 annotations JSON holding each question's answers
    coco_subset: str | None = None  # vqa format: <subset> of COCO_<subset>_<id>.jpg; None = from SRC's name
    progress_seconds: float = 10.0  # at most one progress line per this many seconds

    def fingerprint_fields(self) -> dict:
        """The options that change the output (not how fast it is made)."""
        fields = {"records_per_shard": self.records_per_shard, "max_side": self.max_side, "quality": self.quality}
        fields |= {"label_fields": list(self.label_fields)} if self.label_fields else {}
        named = {"instances": self.instances, "annotations": self.annotations, "coco_subset": self.coco_subset}
        return fields | {name: value for name, value in named.items() if value}


def _skip_log() -> SkipLog:
    """Skips of a conversion: counted, the first EXAMPLES_PER_REASON of each reason kept for the report."""
    return SkipLog(EXAMPLES_PER_REASON, log=False)


@dataclasses.dataclass
class Report:
    """Counts of converted and skipped items, with the first few sources of each skip reason."""

    converted: int = 0
    skips: SkipLog = dataclasses.field(default_factory=_skip_log)

    @property
    def skipped(self) -> dict[str, int]:
        return self.skips.counts

    @property
    def examples(self) -> dict[str, list[str]]:
        return self.skips.examples

    def merge(self, other: "Report") -> None:
        self.converted += other.converted
        self.skips.merge(other.skips)

    def to_json(self) -> dict:
        return {"converted": self.converted, **self.skips.to_json()}

    @classmethod
    def from_json(cls, saved: dict) -> "Report":
        return cls(saved["converted"], SkipLog.from_json(saved, EXAMPLES_PER_REASON))

    def summary(self) -> str:
        lines = [f"converted {self.converted} records; skipped {sum(self.skipped.values())}"]
        return "\n".join(lines + self.skips.summary(SKIP_REASONS))


@dataclasses.dataclass(frozen=True)
class _Item:
    """One image listed by an annotation file; ``reject`` is a skip reason found while listing."""

    source: str
    id: str = ""
    image: str = ""
    captions: tuple[str, ...] = ()
    split: str = ""
    # (label field, value) pairs for the record's labels: a class name or index, or a task's items (data/tasks.py)
    labels: tuple[tuple[str, str | int | list[dict]], ...] = ()
    boxes: tuple[tuple[float, float, float, float], ...] = ()  # object boxes (x0, y0, x1, y1) in pixels
    tags: tuple[str, ...] = ()  # the name of each box
    reject: str | None = None
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class _Unit:
    """A piece of work with its own staged shards: a run of items, or one tar file (``source``)."""

    index: int
    split: str
    source: str
    items: tuple[_Item, ...] = ()
    is_tar: bool = False


# ---------------------------------------------------------------- captions


def _require_utf8(text: str, what: str) -> None:
    """Raises SkipRecord('bad_utf8') for text holding lone surrogates: bytes that were not UTF-8 (surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise SkipRecord("bad_utf8", f"{what} {text[:40]!r}") from None


def _clean_captions(raw: list) -> list[str]:
    """Stripped non-empty captions; raises SkipRecord when none is usable."""
    if not raw:
        raise SkipRecord("missing_caption")
    if not all(isinstance(caption, str) for caption in raw):
        raise SkipRecord("bad_row", "a caption is not a string")
    for caption in raw:
        _require_utf8(caption, "caption")
    captions = [caption.strip() for caption in raw if caption.strip()]
    if not captions:
        raise SkipRecord("empty_caption")
    return captions


def _decode_text(data: bytes) -> str:
    """UTF-8 text whose invalid bytes survive as lone surrogates, for _clean_captions to reject per item."""
    return data.decode("utf-8", errors="surrogateescape")


def _image_root(src: epath.Path, options: Options) -> epath.Path:
    """The folder image paths are relative to: --image_root, else SRC's folder."""
    return epath.Path(options.image_root) if options.image_root else src.parent


def _read_json(path: epath.Path):
    try:
        return json.loads(_decode_text(path.read_bytes()))
    except json.JSONDecodeError as error:
        raise ConvertError(f"{path} is not valid JSON ({error}); check the file or --format") from error


def _listed_item(
    source: str, item_id: str, image: epath.Path, raw_captions: list, split: str, labels: tuple = (),
    objects: tuple[tuple, tuple] = ((), ()),
) -> _Item:
    try:
        captions = tuple(_clean_captions(raw_captions))
    except SkipRecord as skip:
        return _Item(source, item_id, os.fspath(image), split=split, reject=skip.reason, detail=skip.message)
    return _Item(source, item_id, os.fspath(image), captions, split, labels, *objects)


def _rejected(source: str, split: str, skip: SkipRecord) -> _Item:
    """The item of an annotation entry skipped while listing, counted when its unit runs."""
    return _Item(source, split=split, reject=skip.reason, detail=skip.message)


def _stripped(text):
    """``text`` without surrounding white space when it is a string; anything else as it is, for checks to name."""
    return text.strip() if isinstance(text, str) else text


def _task_item(task: str, item: dict, num_boxes: int = 0) -> dict:
    """``item`` when tasks.valid_items keeps it and its text is UTF-8; raises SkipRecord otherwise."""
    _, reasons = tasks.valid_items(task, [item], num_boxes)
    if reasons:
        raise SkipRecord("bad_task_item", reasons[0])
    query_field = tasks.QUERY_FIELD[task]
    _require_utf8(item[query_field], query_field)
    for answer in item.get("answers", ()):
        _require_utf8(answer, "answer")
    return item


def _objects(boxes, tags) -> tuple[tuple, tuple]:
    """Validated (boxes, tags): boxes a list of [x0, y0, x1, y1] numbers with x0 <= x1 and y0 <= y1, tags a list
    of as many strings (a CSV/TSV cell holds either as JSON); raises SkipRecord('bad_row')."""
    try:
        boxes = json.loads(boxes) if isinstance(boxes, str) else boxes
        tags = json.loads(tags) if isinstance(tags, str) else tags
    except json.JSONDecodeError:
        raise SkipRecord("bad_row", "`boxes` or `tags` is not a JSON list") from None
    if not isinstance(boxes, list) or not isinstance(tags, list) or len(boxes) != len(tags):
        raise SkipRecord("bad_row", "`boxes` and `tags` must be lists of equal length")
    for box in boxes:
        if (not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box)
                or box[0] > box[2] or box[1] > box[3]):
            raise SkipRecord("bad_row", f"box {box!r} is not [x0, y0, x1, y1] with x0 <= x1 and y0 <= y1")
    if not all(isinstance(tag, str) and tag.strip() for tag in tags):
        raise SkipRecord("bad_row", "every tag must be a non-empty string")
    return tuple(tuple(float(v) for v in box) for box in boxes), tuple(tag.strip() for tag in tags)


# ---------------------------------------------------------------- listing each format


def _captions_file(src: epath.Path) -> epath.Path:
    if not src.is_dir():
        return src
    found = sorted(p for p in src.iterdir() if p.suffix.lower() in CAPTION_FILE_SUFFIXES)
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise ConvertError(f"{src} must hold exactly one captions file (.jsonl/.csv/.tsv), found: {names}; "
                           "pass the file itself as SRC")
    return found[0]


def _read_rows(path: epath.Path) -> Iterator[tuple[int, dict | None]]:
    """(line number, row dict or None when unparseable) for each row of a JSONL, CSV or TSV file."""
    text = _decode_text(path.read_bytes())
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for number, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                yield number, row if isinstance(row, dict) else None
    elif suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        for row in reader:
            yield reader.line_num, row
    else:
        raise ConvertError(f"{path}: captions file must end in .jsonl, .csv or .tsv")


def _row_captions(row: dict) -> list:
    """The captions a row contributes; a CSV/TSV `captions` cell holds a JSON list."""
    if "captions" in row:
        value = row["captions"]
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise SkipRecord("bad_row", "`captions` is not a JSON list") from None
        if not isinstance(value, list):
            raise SkipRecord("bad_row", "`captions` is not a list")
        return value
    return [row["caption"]] if row.get("caption") is not None else []


def _list_folder(src: epath.Path, options: Options) -> list[_Item]:
    path = _captions_file(src)
    root = _image_root(path, options)
    entries: dict[str, dict] = {}  # image id (or a row marker) -> what its rows say, in first-seen order
    for number, row in _read_rows(path):
        source = f"{path}:{number}"
        image = row.get("image") if row else None
        if not isinstance(image, str) or not image.strip():
            entries[f"\0{number}"] = {"source": source, "reject": ("bad_row", "no `image` field")}
            continue
        item_id = posixpath.normpath(image.strip())
        entry = entries.setdefault(item_id, {"source": source, "captions": [], "split": row.get("split"),
                                             "labels": {}, "objects": ((), ())})
        try:
            entry["captions"].extend(_row_captions(row))
            if row.get("boxes") is not None and not entry["objects"][0]:
                entry["objects"] = _objects(row["boxes"], row.get("tags"))
            for field in options.label_fields:  # an image's first row that holds the column gives its value
                if entry["labels"].get(field) is None:
                    entry["labels"][field] = _row_label(row, field)
        except SkipRecord as skip:
            entry["reject"] = (skip.reason, skip.message)
    items = []
    for item_id, entry in entries.items():
        split = entry.get("split") or options.split
        if "reject" in entry:
            items.append(_Item(entry["source"], split=split, reject=entry["reject"][0], detail=entry["reject"][1]))
        else:
            labels = tuple((field, value) for field, value in entry["labels"].items() if value is not None)
            items.append(_listed_item(entry["source"], item_id, root / item_id, entry["captions"], split, labels,
                                      entry["objects"]))
    return items


def _row_label(row: dict, field: str) -> str | int | None:
    """A row's value of a label column: a string (a CSV/TSV cell, stripped) or a JSON string or integer; None when
    the row has none."""
    value = row.get(field)
    if isinstance(value, str):
        return value.strip() or None
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise SkipRecord("bad_row", f"label `{field}` is {type(value).__name__}, not a string or an integer")


def _list_coco(src: epath.Path, options: Options) -> list[_Item]:
    data = _read_json(src)
    images = data.get("images") if isinstance(data, dict) else None
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise ConvertError(f"{src} is not a COCO captions file (needs `images` and `annotations` lists); "
                           "for a Karpathy-split file use --format=karpathy")
    root = _image_root(src, options)
    captions = collections.defaultdict(list)
    for annotation in annotations:
        if isinstance(annotation, dict):
            captions[annotation.get("image_id")].append(annotation.get("caption"))
    objects = _coco_instances(epath.Path(options.instances)) if options.instances else {}
    items = []
    for index, image in enumerate(images):
        file_name = image.get("file_name") if isinstance(image, dict) else None
        source = f"{src}:images[{index}]"
        if not isinstance(file_name, str):
            items.append(_Item(source, split=options.split, reject="bad_row", detail="no file_name"))
            continue
        items.append(_listed_item(source, file_name, root / file_name, captions.get(image.get("id"), []),
                                  options.split, objects=objects.get(image.get("id"), ((), ()))))
    return items


def _flag_json(flag: str, path: str | None, fmt: str, example: str):
    """The JSON file a flag names; a ConvertError naming the flag when it is not given or not there."""
    if not path:
        raise ConvertError(f"--format={fmt} needs {flag}=FILE ({example})")
    if not epath.Path(path).exists():
        raise ConvertError(f"{flag}={path} does not exist; pass the {example}")
    return _read_json(epath.Path(path))


def _instance_objects(data, path: str) -> dict[object, list[tuple]]:
    """image id -> [(annotation id, box (x0, y0, x1, y1), category name)] of a COCO instances JSON, in file order;
    a malformed annotation is a ConvertError naming it."""
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list) or not isinstance(
            data.get("categories"), list):
        raise ConvertError(f"--instances={path} is not a COCO instances file (needs `annotations` and "
                           "`categories` lists)")
    names = {c.get("id"): c.get("name") for c in data["categories"] if isinstance(c, dict)}
    found = collections.defaultdict(list)
    for index, annotation in enumerate(data["annotations"]):
        bbox = annotation.get("bbox") if isinstance(annotation, dict) else None
        name = names.get(annotation.get("category_id")) if isinstance(annotation, dict) else None
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)
                and isinstance(name, str)):
            raise ConvertError(f"--instances={path}: annotations[{index}] needs a bbox [x, y, w, h] and a known "
                               "category_id")
        x, y, w, h = (float(v) for v in bbox)
        found[annotation.get("image_id")].append((annotation.get("id"), (x, y, x + w, y + h), name))
    return found


def _coco_instances(path: epath.Path) -> dict:
    """image id -> (boxes (x0, y0, x1, y1), category names) of a COCO instances JSON."""
    found = _instance_objects(_read_json(path), os.fspath(path))
    return {key: (tuple(box for _, box, _ in objects), tuple(name for _, _, name in objects))
            for key, objects in found.items()}


def _list_karpathy(src: epath.Path, options: Options) -> list[_Item]:
    data = _read_json(src)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise ConvertError(f"{src} is not a Karpathy-split file (needs an `images` list); "
                           "for COCO captions JSON use --format=coco")
    root = _image_root(src, options)
    items = []
    for index, image in enumerate(images):
        source = f"{src}:images[{index}]"
        fields = image if isinstance(image, dict) else {}
        filename, split = fields.get("filename"), KARPATHY_SPLITS.get(fields.get("split"))
        if not isinstance(filename, str) or split is None:
            detail = f"needs filename and split in {sorted(KARPATHY_SPLITS)}"
            items.append(_Item(source, split=options.split, reject="bad_row", detail=detail))
            continue
        sentences = fields.get("sentences") or []
        raw = [s.get("raw") if isinstance(s, dict) else None for s in sentences]
        items.append(_listed_item(source, filename, root / (fields.get("filepath") or "") / filename, raw, split))
    return items


def _list_snli_ve(src: epath.Path, options: Options) -> list[_Item]:
    if src.suffix.lower() != ".jsonl":
        raise ConvertError(f"{src}: --format=snli_ve reads the SNLI-VE JSON lines files (snli_ve_train.jsonl, ...)")
    root = _image_root(src, options)
    images: dict[str, dict] = {}  # image file name -> its first line, premises and items, in first-seen order
    rejects = []
    for number, row in _read_rows(src):
        source = f"{src}:{number}"
        try:
            image, premise, item = _snli_ve_line(row)
        except SkipRecord as skip:
            rejects.append(_rejected(source, options.split, skip))
            continue
        entry = images.setdefault(image, {"source": source, "premises": [], "items": []})
        entry["premises"] += [premise] if premise else []
        entry["items"].append(item)
    items = [_listed_item(entry["source"], image, root / image, list(dict.fromkeys(entry["premises"])),
                          options.split, ((tasks.VE, entry["items"]),)) for image, entry in images.items()]
    return items + rejects


def _snli_ve_line(row: dict | None) -> tuple[str, str | None, dict]:
    """(image file name, premise or None, VE item) of one SNLI-VE line; raises SkipRecord."""
    image = next((row[key] for key in SNLI_VE_IMAGE_KEYS if key in row), None) if row else None
    if not isinstance(image, str) or not image.strip():
        raise SkipRecord("bad_row", f"not a JSON object with a {' or '.join(SNLI_VE_IMAGE_KEYS)} string")
    premise = row["sentence1"].strip() if isinstance(row.get("sentence1"), str) else None
    if premise:
        _require_utf8(premise, "sentence1")
    item = _task_item(tasks.VE, {"hypothesis": _stripped(row.get("sentence2")), "label": row.get("gold_label")})
    return posixpath.normpath(image.strip()), premise, item


def _list_vqa(src: epath.Path, options: Options) -> list[_Item]:
    data = _read_json(src)
    questions = data.get("questions") if isinstance(data, dict) else None
    if not isinstance(questions, list):
        raise ConvertError(f"{src} is not a VQA questions file (needs a `questions` list, as in "
                           "v2_OpenEnded_mscoco_train2014_questions.json)")
    annotations = _flag_json("--annotations", options.annotations, "vqa",
                             "the VQA v2 annotations JSON of the same questions, e.g. "
                             "v2_mscoco_train2014_annotations.json; test-dev has none, so it cannot be converted")
    if not isinstance(annotations, dict) or not isinstance(annotations.get("annotations"), list):
        raise ConvertError(f"--annotations={options.annotations} is not a VQA annotations file (needs an "
                           "`annotations` list)")
    answered = {a["question_id"]: a for a in annotations["annotations"]
                if isinstance(a, dict) and _is_int(a.get("question_id"))}
    images: dict[int, dict] = {}  # image id -> its first question's place and its items
    rejects = []
    for index, question in enumerate(questions):
        source = f"{src}:questions[{index}]"
        try:
            image_id, item = _vqa_question(question, answered, options.annotations)
        except SkipRecord as skip:
            rejects.append(_rejected(source, options.split, skip))
            continue
        images.setdefault(image_id, {"source": source, "items": []})["items"].append(item)
    root = _image_root(src, options)
    present = {path.name for path in root.iterdir()}
    subset = options.coco_subset or _coco_subset(src.name)
    items = []
    for image_id in sorted(images):
        entry = images[image_id]
        names = _coco_image_names(image_id, subset)
        name = next((name for name in names if name in present), None)
        if name is None:
            hint = "" if subset else "; name the COCO_<subset>_ part with --coco_subset"
            items.append(_rejected(entry["source"], options.split,
                                   SkipRecord("missing_image", f"no {' or '.join(names)} in {root}{hint}")))
            continue
        questions_asked = list(dict.fromkeys(item["question"] for item in entry["items"]))
        items.append(_listed_item(entry["source"], name, root / name, questions_asked, options.split,
                                  ((tasks.VQA, entry["items"]),)))
    return items + rejects


def _vqa_question(question, answered: dict, annotations: str) -> tuple[int, dict]:
    """(image id, VQA item with the annotation's raw answers) of one question; raises SkipRecord."""
    fields = question if isinstance(question, dict) else {}
    image_id, question_id = fields.get("image_id"), fields.get("question_id")
    if not _is_int(image_id) or not _is_int(question_id):
        raise SkipRecord("bad_row", "needs an integer image_id and question_id")
    if question_id not in answered:
        raise SkipRecord("unanswered_question", f"question_id {question_id} is not in --annotations={annotations}")
    answers = answered[question_id].get("answers")
    raw = [a.get("answer") if isinstance(a, dict) else None for a in answers] if isinstance(answers, list) else answers
    return image_id, _task_item(tasks.VQA, {"question": _stripped(fields.get("question")), "answers": raw})


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _coco_subset(file_name: str) -> str | None:
    """The COCO subset a VQA file name names (train2014, val2014, test2015 for test-dev2015), or None."""
    found = COCO_SUBSET.search(file_name)
    return f"{found[1]}{found[2]}" if found else None


def _coco_image_names(image_id: int, subset: str | None) -> tuple[str, ...]:
    """The names COCO gives an image: COCO_<subset>_<padded id>.jpg (2014/2015) and <padded id>.jpg (2017)."""
    plain = f"{image_id:0{COCO_ID_DIGITS}d}.jpg"
    return (f"COCO_{subset}_{plain}", plain) if subset else (plain,)


def _list_refcoco(src: epath.Path, options: Options) -> list[_Item]:
    if src.suffix.lower() in PICKLE_SUFFIXES:
        raise ConvertError(
            f"{src} is a Python pickle, and this converter never loads pickles (loading one can run any code). "
            f"Save the refs as JSON once, from a copy you trust: python -c \"import json, pickle; json.dump("
            f"pickle.load(open('{src.name}', 'rb')), open('{src.stem}.json', 'w'))\", then pass that .json as SRC")
    refs = _read_json(src)
    if not isinstance(refs, list):
        raise ConvertError(f"{src} is not a RefCOCO refs JSON (a list of refs with ann_id, image_id, split and "
                           "sentences)")
    instances = _flag_json("--instances", options.instances, "refcoco",
                           "the COCO instances JSON of the refs' release, e.g. refcoco/instances.json")
    objects = _instance_objects(instances, options.instances)
    files = _instance_files(instances, options.instances)
    by_record: dict[tuple, dict] = {}  # (image id, split) -> its first ref's place and its items
    rejects = []
    for index, ref in enumerate(refs):
        source = f"{src}:refs[{index}]"
        try:
            image_id, split, box = _ref_object(ref, files, objects, options.instances)
        except SkipRecord as skip:
            rejects.append(_rejected(source, options.split, skip))
            continue
        entry = by_record.setdefault((image_id, split), {"source": source, "items": []})
        for number, sentence in enumerate(ref["sentences"]):
            expression = _stripped(sentence.get("sent")) if isinstance(sentence, dict) else None
            try:
                entry["items"].append(_task_item(tasks.REC, {"expression": expression, "box": box},
                                                 len(objects[image_id])))
            except SkipRecord as skip:
                rejects.append(_rejected(f"{source}.sentences[{number}]", split, skip))
    root = _image_root(src, options)
    items = []
    for (image_id, split), entry in sorted(by_record.items()):  # keys are unique: entries are never compared
        if not entry["items"]:
            continue  # every sentence was skipped, each counted
        boxes = tuple(box for _, box, _ in objects[image_id])
        tags = tuple(name for _, _, name in objects[image_id])
        expressions = list(dict.fromkeys(item["expression"] for item in entry["items"]))
        items.append(_listed_item(entry["source"], f"{split}/{files[image_id]}", root / files[image_id], expressions,
                                  split, ((tasks.REC, entry["items"]),), (boxes, tags)))
    return items + rejects


def _instance_files(instances: dict, path: str) -> dict[int, str]:
    """image id -> file_name of a COCO instances JSON's `images`; a ConvertError naming a malformed entry."""
    images = instances.get("images")
    if not isinstance(images, list):
        raise ConvertError(f"--instances={path} has no `images` list; pass the instances JSON of the refs' release")
    files = {}
    for index, image in enumerate(images):
        fields = image if isinstance(image, dict) else {}
        if not _is_int(fields.get("id")) or not isinstance(fields.get("file_name"), str):
            raise ConvertError(f"--instances={path}: images[{index}] needs an integer id and a file_name")
        files[fields["id"]] = fields["file_name"]
    return files


def _ref_object(ref, files: dict, objects: dict, instances: str) -> tuple[int, str, int]:
    """(image id, split, index of the ref's object among the image's boxes) of one ref; raises SkipRecord."""
    fields = ref if isinstance(ref, dict) else {}
    image_id, split = fields.get("image_id"), fields.get("split")
    if not (_is_int(image_id) and isinstance(split, str) and split.strip() and "ann_id" in fields
            and isinstance(fields.get("sentences"), list)):
        raise SkipRecord("bad_row", "needs an integer image_id, ann_id, a split and a sentences list")
    if image_id not in files:
        raise SkipRecord("missing_image", f"image_id {image_id} is not in --instances={instances} images")
    annotation_ids = [annotation_id for annotation_id, _, _ in objects.get(image_id, ())]
    if fields["ann_id"] not in annotation_ids:
        raise SkipRecord("unknown_object", f"ann_id {fields['ann_id']!r} is not an annotation of image {image_id} "
                         f"in --instances={instances}")
    return image_id, split.strip(), annotation_ids.index(fields["ann_id"])


def _list_tars(src: str) -> list[epath.Path]:
    """The tar files named by SRC: a file, a folder of *.tar, or a glob in the last path component."""
    if any(char in src for char in "*?["):
        pattern = epath.Path(src)
        if not pattern.parent.exists():
            raise ConvertError(f"SRC {src}: folder {pattern.parent} does not exist; check the path")
        return sorted(pattern.parent.glob(pattern.name))
    path = epath.Path(src)
    return sorted(path.glob("*.tar")) if path.is_dir() else [path]


def _plan(src: str, fmt: str, options: Options) -> list[_Unit]:
    """Lists the input and cuts it into units."""
    if fmt not in FORMATS:
        raise ConvertError(f"--format={fmt} is unknown; use one of: {', '.join(FORMATS)}")
    if options.records_per_shard < 1:
        raise ConvertError(f"--records_per_shard={options.records_per_shard} must be at least 1")
    if options.image_root and not epath.Path(options.image_root).exists():
        raise ConvertError(f"--image_root={options.image_root} does not exist; pass the folder holding the images")
    if fmt == "webdataset":
        tars = _list_tars(src)
        if not tars or not tars[0].exists():
            raise ConvertError(f"SRC {src} names no tar files; pass a .tar, a folder of them, or a glob like dir/*.tar")
        return [_Unit(index, options.split, os.fspath(tar), is_tar=True) for index, tar in enumerate(tars)]
    path = epath.Path(src)
    if not path.exists():
        raise ConvertError(f"SRC {src} does not exist; pass the captions file or JSON to convert")
    listers = {"folder": _list_folder, "coco": _list_coco, "karpathy": _list_karpathy, "snli_ve": _list_snli_ve,
               "vqa": _list_vqa, "refcoco": _list_refcoco}
    items = listers[fmt](path, options)
    by_split = collections.defaultdict(list)
    for item in items:
        by_split[item.split].append(item)
    units = []
    for split, split_items in by_split.items():
        for start in range(0, len(split_items), options.records_per_shard):
            chunk = tuple(split_items[start : start + options.records_per_shard])
            units.append(_Unit(len(units), split, f"{src} [{split} {start}:{start + len(chunk)}]", chunk))
    if not units:
        raise ConvertError(f"SRC {src} lists no images; check that it is a {fmt} file")
    return units


# ---------------------------------------------------------------- images


def _reencode(image: Image.Image, image_format: str, options: Options) -> bytes:
    """The image upright, with its longer side at most max_side, in its own format if storable else PNG."""
    image = ImageOps.exif_transpose(image)  # the re-encoded file keeps no EXIF orientation
    if image.mode in ("1", "P", "PA"):
        image = image.convert("RGBA" if image.has_transparency_data else "RGB")
    if options.max_side and max(image.size) > options.max_side:
        scale = options.max_side / max(image.size)
        size = tuple(max(1, round(side * scale)) for side in image.size)
        image = image.resize(size, Image.Resampling.LANCZOS)
    image_format = image_format if image_format in STORED_FORMATS else "PNG"
    if image_format == "JPEG" and image.mode not in ("L", "RGB", "CMYK"):
        image = image.convert("RGB")
    out = io.BytesIO()
    image.save(out, format=image_format, quality=options.quality)
    return out.getvalue()


def _prepare_image(data: bytes, options: Options) -> bytes:
    """The image bytes to store; raises SkipRecord('bad_image') unless they decode fully."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # verify() passes truncated JPEGs; a full decode does not
            fits = not options.max_side or max(image.size) <= options.max_side
            if image.format in STORED_FORMATS and fits:
                return data
            return _reencode(image, image.format, options)
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, struct.error, bombs) for bad bytes
        raise SkipRecord("bad_image", f"{type(error).__name__}: {error}") from None


def _stored_boxes(boxes: tuple, original: bytes, stored: bytes) -> np.ndarray | None:
    """Boxes in the stored image's pixels: scaled with it when it was re-encoded smaller. float32 [k, 4] or None.
    Boxes cannot follow an EXIF rotation that re-encoding applies: such a record is skipped ('bad_row')."""
    if not boxes:
        return None
    boxes = np.asarray(boxes, np.float32)
    if stored is original:
        return boxes
    with Image.open(io.BytesIO(original)) as before, Image.open(io.BytesIO(stored)) as after:
        if before.getexif().get(ORIENTATION_TAG, 1) != 1:
            raise SkipRecord("bad_row", "boxes given for an EXIF-rotated image that is re-encoded upright")
        scale = np.array([after.width / before.width, after.height / before.height] * 2, np.float32)
    return boxes * scale


# ---------------------------------------------------------------- samples of a unit

# A sample: (source for the report, a function returning (id, image bytes, captions, labels or None, (boxes, tags))
# or raising SkipRecord).
_Sample = tuple[str, Callable[[], tuple[str, bytes, list[str], dict | None, tuple]]]


def _item_samples(unit: _Unit) -> Iterator[_Sample]:
    for item in unit.items:

        def build(item=item):
            if item.reject:
                raise SkipRecord(item.reject, item.detail)
            try:
                data = epath.Path(item.image).read_bytes()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                raise SkipRecord("missing_image", item.image) from None
            return item.id, data, list(item.captions), dict(item.labels) or None, (item.boxes, item.tags)

        yield item.source, build


def _tar_members(path: epath.Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample: consecutive members sharing a key, as WebDataset defines it."""
    with path.open("rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        key, members = None, {}
        for member in tar:
            directory, base = posixpath.split(posixpath.normpath(member.name))
            if not member.isfile() or base.startswith(".") or "." not in base:
                continue
            stem, extension = base.split(".", 1)
            member_key = posixpath.join(directory, stem)
            if member_key != key:
                if members:
                    yield key, members
                key, members = member_key, {}
            members[extension.lower()] = tar.extractfile(member).read()
        if members:
            yield key, members


def _sample_captions(members: dict[str, bytes]) -> list:
    if "txt" in members:
        return [_decode_text(members["txt"])]
    if "json" in members:
        try:
            fields = json.loads(_decode_text(members["json"]))
        except json.JSONDecodeError:
            raise SkipRecord("bad_row", "json member is not valid JSON") from None
        if not isinstance(fields, dict):
            raise SkipRecord("bad_row", "json member is not an object")
        captions = fields.get("captions", [fields["caption"]] if "caption" in fields else [])
        return captions if isinstance(captions, list) else [captions]
    return []


def _tar_samples(unit: _Unit, report: Report) -> Iterator[_Sample]:
    try:
        for key, members in _tar_members(epath.Path(unit.source)):

            def build(key=key, members=members):
                captions = _clean_captions(_sample_captions(members))
                extension = next((e for e in IMAGE_EXTENSIONS if e in members), None)
                if extension is None:
                    raise SkipRecord("missing_image", f"members: {', '.join(sorted(members))}")
                return key, members[extension], captions, None, ((), ())

            yield f"{unit.source}:{key}", build
    except (tarfile.TarError, EOFError, OSError) as error:
        report.skips.add(SkipRecord("bad_tar", f"{type(error).__name__}: {error}").at(unit.source))


# ---------------------------------------------------------------- units


def _marker_path(staging: epath.Path, index: int) -> epath.Path:
    return staging / f"unit-{index:05d}.json"


def _convert_unit(unit: _Unit, staging: epath.Path, options: Options) -> dict:
    """Writes one unit's staged shards, then its completion marker; returns the marker."""
    report, written = Report(), []  # written: [id, source] of each record, in shard order
    samples = _tar_samples(unit, report) if unit.is_tar else _item_samples(unit)
    with ShardWriter(staging, unit.split, options.records_per_shard, prefix=f"{unit.split}-u{unit.index:05d}") as w:
        for source, build in samples:
            try:
                record_id, data, captions, labels, (boxes, tags) = build()
                _require_utf8(record_id, "id")
                stored = _prepare_image(data, options)
                record = ImageTextRecord(record_id, stored, captions, split=unit.split, labels=labels,
                                         boxes=_stored_boxes(boxes, data, stored), tags=list(tags) or None)
            except SkipRecord as skip:
                report.skips.add(skip.at(source))
                continue
            w.write(record)
            written.append([record_id, source])
    report.converted = len(written)
    shards, start = [], 0
    for info in w.shards:
        shards.append({"info": dataclasses.asdict(info), "ids": written[start : start + info.num_records]})
        start += info.num_records
    marker = {"unit": unit.index, "split": unit.split, "shards": shards, "report": report.to_json()}
    staged = staging / f"unit-{unit.index:05d}.json.partial"
    staged.write_text(json.dumps(marker), encoding="utf-8")
    staged.replace(_marker_path(staging, unit.index))
    return marker


def _run_units(units: list[_Unit], staging: epath.Path, options: Options) -> Iterator[dict]:
    """Markers of the given units in order, converted inline or by a thread pool."""
    if options.workers <= 1:
        for unit in units:
            yield _convert_unit(unit, staging, options)
        return
    pool = futures.ThreadPoolExecutor(options.workers)
    try:
        yield from pool.map(lambda unit: _convert_unit(unit, staging, options), units)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _Progress:
    """A progress line on stderr at most every ``seconds``, and after the last unit."""

    def __init__(self, total_units: int, done_units: int, seconds: float):
        self.total, self.done, self.seconds = total_units, done_units, seconds
        self.records = self.skipped = 0
        self.start = self.last = time.monotonic()

    def update(self, marker: dict) -> None:
        self.done += 1
        self.records += marker["report"]["converted"]
        self.skipped += sum(marker["report"]["skipped"].values())
        now = time.monotonic()
        if now - self.last >= self.seconds or self.done == self.total:
            rate = self.records / max(now - self.start, 1e-9)
            print(f"convert: {self.done}/{self.total} units, {self.records} records, {self.skipped} skipped, "
                  f"{rate:.0f} records/s", file=sys.stderr, flush=True)
            self.last = now


def _place(staged: epath.Path, final: epath.Path, keep: list[bool], info: ShardInfo) -> ShardInfo:
    """Moves a staged shard to its final name, dropping the records ``keep`` marks False (a rewrite)."""
    if not all(keep):
        records = (data for data, kept in zip(read_shard(staged), keep, strict=True) if kept)
        return write_shard(final, records)
    if staged.exists():
        staged.replace(final)
    elif not final.exists():
        raise ConvertError(f"{staged} and {final} are both missing; rerun without --resume into an empty --out")
    return dataclasses.replace(info, file=final.name)


def _finalize(
    out: epath.Path, staging: epath.Path, units: list[_Unit], markers: dict[int, dict]
) -> tuple[dict, Report]:
    """Drops duplicate ids, names the shards of each split in unit order and writes the manifest."""
    report, seen = Report(), set()
    planned = collections.defaultdict(list)  # split -> [(staged path, keep mask, info)]
    for unit in units:
        marker = markers[unit.index]
        report.merge(Report.from_json(marker["report"]))
        for shard in marker["shards"]:
            keep = []
            for record_id, source in shard["ids"]:
                keep.append(record_id not in seen)
                if record_id in seen:
                    report.skips.add(SkipRecord("duplicate_id", record_id).at(source))
                seen.add(record_id)
            if any(keep):
                planned[unit.split].append((staging / shard["info"]["file"], keep, ShardInfo(**shard["info"])))
    report.converted = len(seen)
    splits = {}
    for split, shards in planned.items():
        splits[split] = [
            _place(staged, out / shard_name(split, index, len(shards)), keep, info)
            for index, (staged, keep, info) in enumerate(shards)
        ]
    return write_manifest(out, splits), report


def _fingerprint(fmt: str, units: list[_Unit], options: Options) -> str:
    """Identifies a conversion's input and output-changing options, so --resume cannot mix two of them."""
    plan = {"format": fmt, "options": options.fingerprint_fields(), "units": [dataclasses.asdict(u) for u in units]}
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode("utf-8", "surrogateescape")).hexdigest()


def _open_staging(staging: epath.Path, fingerprint: str) -> None:
    """Creates the staging folder, or checks that the one found belongs to the same conversion."""
    plan_path = staging / "plan.json"
    if not staging.exists():
        staging.mkdir(parents=True)
        plan_path.write_text(json.dumps({"fingerprint": fingerprint}))
    elif not plan_path.exists() or json.loads(plan_path.read_text())["fingerprint"] != fingerprint:
        raise ConvertError(f"--resume: {staging.parent} was started with another input or options; "
                           "rerun with those, or choose an empty --out")


def convert(
    src: str, fmt: str, out_dir: str, options: Options | None = None, resume: bool = False
) -> tuple[dict, Report]:
    """Converts SRC into shards under ``out_dir``; returns (manifest, report). Raises ConvertError on bad input."""
    options = options or Options()
    units = _plan(os.fspath(src), fmt, options)
    fingerprint = _fingerprint(fmt, units, options)
    out = epath.Path(out_dir)
    staging, report_path = out / STAGING_DIR, out / REPORT_NAME
    finished = (out / MANIFEST_NAME).exists() and not staging.exists()
    if finished and resume and report_path.exists():
        saved = json.loads(report_path.read_text(encoding="utf-8"))
        if saved["fingerprint"] == fingerprint:
            return read_manifest(out), Report.from_json(saved["report"])
    if finished or (staging.exists() and not resume):
        raise ConvertError(f"--out={out} already holds a conversion; pass --resume to continue an interrupted one "
                           "with the same input and options, or choose an empty --out")
    _open_staging(staging, fingerprint)
    markers = {}
    for unit in units:
        if _marker_path(staging, unit.index).exists():
            markers[unit.index] = json.loads(_marker_path(staging, unit.index).read_text(encoding="utf-8"))
    progress = _Progress(len(units), len(markers), options.progress_seconds)
    for marker in _run_units([u for u in units if u.index not in markers], staging, options):
        markers[marker["unit"]] = marker
        progress.update(marker)
    manifest, report = _finalize(out, staging, units, markers)
    saved = {"fingerprint": fingerprint, "src": os.fspath(src), "format": fmt, "report": report.to_json()}
    report_path.write_text(json.dumps(saved, indent=1) + "\n", encoding="utf-8")
    staging.rmtree()
    return manifest, report


class _ArgumentParser(argparse.ArgumentParser):
    """Reports a usage error as one line naming the flag, exit code 2."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = Options()
    parser = _ArgumentParser(prog="python -m vlp_jax.datasets.convert", description=__doc__.split("\n")[0],
                             epilog="Formats: " + ", ".join(FORMATS) + ". See the module docstring for details.")
    parser.add_argument("src", help="captions file/folder, COCO or Karpathy JSON, tar file/folder/glob, SNLI-VE "
                                    "jsonl, VQA v2 questions JSON or RefCOCO refs JSON")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="output folder (local or any etils.epath path, e.g. gs://)")
    parser.add_argument("--records_per_shard", type=int, default=defaults.records_per_shard)
    parser.add_argument("--max_side", type=int, default=defaults.max_side,
                        help="re-encode images whose longer side exceeds this (default: store as they are)")
    parser.add_argument("--quality", type=int, default=defaults.quality, help="JPEG/WebP quality of re-encoding")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="parallel threads; 0 or 1 = inline")
    parser.add_argument("--split", default=defaults.split, help="split name for formats that carry none")
    parser.add_argument("--image_root", default=defaults.image_root, help="folder the image paths are relative to")
    parser.add_argument("--label_field", default="",
                        help="folder format: comma-separated columns copied into each record's labels (e.g. a class)")
    parser.add_argument("--instances", default=None,
                        help="coco format: a COCO instances JSON whose boxes and category names go into the records; "
                             "refcoco format (required): the instances JSON of the refs' release")
    parser.add_argument("--annotations", default=None,
                        help="vqa format (required): the VQA v2 annotations JSON holding each question's answers")
    parser.add_argument("--coco_subset", default=None,
                        help="vqa format: <subset> in image names COCO_<subset>_<id>.jpg (default: from SRC's name, "
                             "e.g. train2014)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted conversion into --out")
    parser.add_argument("--progress_seconds", type=float, default=defaults.progress_seconds)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    options = Options(records_per_shard=args.records_per_shard, max_side=args.max_side, quality=args.quality,
                      workers=args.workers, split=args.split, image_root=args.image_root,
                      label_fields=tuple(field.strip() for field in args.label_field.split(",") if field.strip()),
                      instances=args.instances, annotations=args.annotations, coco_subset=args.coco_subset,
                      progress_seconds=args.progress_seconds)
    try:
        manifest, report = convert(args.src, args.format, args.out, options, resume=args.resume)
    except ConvertError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{split}: {entry['num_records']}" for split, entry in manifest["splits"].items())
    print(f"{report.summary()}\nwrote {args.out} ({counts or 'no records'})")
    if report.converted == 0:
        print(f"error: no records converted from {args.src}; see the reasons above", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
