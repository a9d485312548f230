"""Records -> model inputs: one builder per feature a method declares (FEATURES); a bad record becomes a Skipped
marker.

These run inside grain (worker processes or read threads), so they never raise for bad data and hold only
picklable state. The reasons a record is skipped are the names in SKIP_REASONS; the pipeline counts them and
training reports them as `data/skipped/<reason>`.
"""

import dataclasses
from collections.abc import Callable

import numpy as np

from vlp_jax.data import records, sources, tasks, transforms
from vlp_jax.data.records import Located
from vlp_jax.data.skips import Skipped, SkipRecord
from vlp_jax.data.tokenizer import Tokenizer
from vlp_jax.objectives.anchors import Normaliser, anchor_example

EMPTY_CAPTION = "empty_caption"  # no caption left after dropping blank ones
NO_TASK_ITEM = "no_task_item"  # the `task` feature found no well-formed item of config.data.task (or none kept)
SKIP_REASONS = (*sources.READ_REASONS, *records.DECODE_REASONS, *transforms.IMAGE_REASONS, EMPTY_CAPTION,
                NO_TASK_ITEM)
NOISY_LABEL = "noisy"  # labels key of the ground-truth noisy-pair flag (the embedded world writes it)
IMAGE_TEXT = ("image", "text")  # the features of a two-tower method
BOX_KEEP_FRACTION = 0.5  # a box stays when at least this fraction of its area lies inside the crop


def clean_captions(captions: list[str]) -> list[str]:
    """Captions stripped of surrounding whitespace, blank ones dropped."""
    return [caption.strip() for caption in captions if caption.strip()]


def carries_noisy_flag(source) -> bool:
    """Whether a source's records hold the noisy-pair flag (judged by its first record)."""
    first = source[0] if len(source) else None
    return isinstance(first, Located) and NOISY_LABEL in (first.record.labels or {})


def _usable_captions(record: records.ImageTextRecord) -> list[str]:
    """The record's non-blank captions; raises SkipRecord when there is none."""
    captions = clean_captions(record.captions)
    if not captions:
        raise SkipRecord(EMPTY_CAPTION, f"none of its {len(record.captions)} captions has text")
    return captions


@dataclasses.dataclass(frozen=True)
class FeatureOptions:
    """What the feature builders need besides the record: plain values, picklable for worker processes."""

    image: transforms.ImageOptions
    tokenizer: Tokenizer
    max_len: int  # tokens per caption
    max_boxes: int  # rows of the boxes feature
    normalise: Normaliser | None = None  # the anchors feature's tag/word normalisation (CMAL)
    task: str = ""  # the `task` feature's downstream task (data/tasks.py TASKS)
    answers: tuple[str, ...] = ()  # VQA: the answer vocabulary, normalised (data/tasks.py normalise_answer)


@dataclasses.dataclass
class Building:
    """One record on its way to a training example: what the builders read, and what one leaves for the next."""

    record: records.ImageTextRecord
    captions: list[str]  # usable (non-blank) captions
    rng: np.random.Generator  # the example's generator: the builders draw from it in FEATURES order
    crop: transforms.Box | None = None  # the pixels the image builder took, in the stored image's coordinates
    caption: str = ""  # the caption the text builder chose
    kept_boxes: np.ndarray | None = None  # int [k]: the record's boxes the boxes builder kept, in its row order
    dropped_boxes: int = 0  # the record's boxes the crop cut away (or that did not fit max_boxes)


def image_feature(building: Building, options: FeatureOptions) -> dict[str, np.ndarray]:
    """"image": a random resized crop, uint8 [S, S, 3]; records the crop for the boxes builder."""
    image, building.crop = transforms.train_image(building.record.image, options.image, building.rng)
    return {"image": image}


def text_feature(building: Building, options: FeatureOptions) -> dict[str, np.ndarray]:
    """"text": one uniformly chosen caption, int32 [L]."""
    caption = building.captions[int(building.rng.integers(len(building.captions)))]
    building.caption = caption
    return {"text": options.tokenizer.encode([caption], options.max_len)[0]}


def boxes_feature(building: Building, options: FeatureOptions) -> dict[str, np.ndarray]:
    """"boxes" float32 [max_boxes, 4] (x0, y0, x1, y1 in [0, 1] of the output image) and "box_mask" bool
    [max_boxes]: the record's boxes clipped to the image builder's crop and scaled with it (`crop_boxes`)."""
    boxes, mask, building.kept_boxes = crop_boxes(building.record.boxes, building.crop, options.max_boxes)
    if building.record.boxes is not None:
        building.dropped_boxes = len(building.record.boxes) - len(building.kept_boxes)
    return {"boxes": boxes, "box_mask": mask}


def crop_boxes(saved: np.ndarray | None, crop: transforms.Box, max_boxes: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A record's boxes [k, 4] (stored-image pixels) seen through a crop: (boxes float32 [max_boxes, 4] in [0, 1]
    of the crop, mask bool [max_boxes], the kept boxes' record indices int [n]). Boxes with less than
    BOX_KEEP_FRACTION of their area inside are dropped, the first max_boxes of the rest kept, zero rows pad."""
    boxes = np.zeros((max_boxes, 4), np.float32)
    mask = np.zeros(max_boxes, bool)
    if saved is None or not len(saved):
        return boxes, mask, np.zeros(0, np.int64)
    x0, y0, x1, y1 = crop
    saved = np.asarray(saved, np.float64)
    inside = np.clip(saved, [x0, y0, x0, y0], [x1, y1, x1, y1])
    keep = _area(inside) >= BOX_KEEP_FRACTION * _area(saved)
    keep &= _area(inside) > 0
    kept = ((inside[keep] - [x0, y0, x0, y0]) / [x1 - x0, y1 - y0, x1 - x0, y1 - y0])[:max_boxes]
    boxes[: len(kept)] = kept
    mask[: len(kept)] = True
    return boxes, mask, np.flatnonzero(keep)[:max_boxes]


def _area(boxes: np.ndarray) -> np.ndarray:
    """Areas of [k, 4] (x0, y0, x1, y1) boxes; 0 for empty ones."""
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def anchors_feature(building: Building, options: FeatureOptions) -> dict[str, np.ndarray]:
    """CMAL's tag-based anchors (objectives/anchors.py) of the chosen caption and the kept boxes:
    "region_tags" int32 [max_boxes] and "token_tags" int32 [L] (concept ids, 0 = none), "token_words" int32 [L]
    (the word each token belongs to, -1 at BOS/EOS/padding) and "boxes_dropped" int32 [] (boxes the crop cut)."""
    words, token_words = options.tokenizer.word_alignment(building.caption, options.max_len)
    tags = building.record.tags or []
    if building.record.boxes is not None and len(tags) != len(building.record.boxes):
        tags = []  # tags that do not name the boxes one to one cannot place an anchor
    kept = building.kept_boxes if tags else np.zeros(0, np.int64)
    return {**anchor_example(tags, kept, words, token_words, options.max_boxes, options.normalise),
            "token_words": token_words, "boxes_dropped": np.int32(building.dropped_boxes)}


def image_view_feature(building: Building, options: FeatureOptions) -> dict[str, np.ndarray]:
    """"image_view": a second random resized crop of the same image, drawn independently of "image" (uint8
    [S, S, 3]); e.g. what a teacher sees while the student sees "image"."""
    image, _ = transforms.train_image(building.record.image, options.image, building.rng)
    return {"image_view": image}


def text_view_feature(building: Building, options: FeatureOptions) -> dict[str, np.ndarray]:
    """"text_view": another of the record's captions, uniformly among those that differ from the one "text" chose
    (the same caption when the record has no other), int32 [L]."""
    others = [caption for caption in building.captions if caption != building.caption] or [building.caption]
    caption = others[int(building.rng.integers(len(others)))]
    return {"text_view": options.tokenizer.encode([caption], options.max_len)[0]}


def task_feature(building: Building, options: FeatureOptions) -> dict[str, np.ndarray]:
    """One uniformly chosen item of the record's `options.task` ground truth (data/tasks.py): "query" int32 [L]
    (the hypothesis, question or expression) and "target" int32 [] (VE: the label's index in VE_LABELS; VQA: the
    best-scored answer's index in the vocabulary, -1 when no answer is in it; REC: the target box's row in the
    `boxes` feature); VQA adds "answer_scores" float32 [A] (each vocabulary answer's VQA score). REC draws only
    among items whose box the crop kept. No usable item: the record is skipped (NO_TASK_ITEM)."""
    items = usable_task_items(building.record, options.task)
    if options.task == tasks.REC:
        rows = {int(index): row for row, index in enumerate(building.kept_boxes)}
        items = [item for item in items if item["box"] in rows]
    if not items:
        raise SkipRecord(NO_TASK_ITEM, f"no usable {options.task!r} item (labels[{options.task!r}])")
    item = items[int(building.rng.integers(len(items)))]
    return task_arrays(item, options, rows if options.task == tasks.REC else None)


def usable_task_items(record: records.ImageTextRecord, task: str) -> list[dict]:
    """The well-formed items of `record.labels[task]` (data/tasks.py valid_items)."""
    boxes = 0 if record.boxes is None else len(record.boxes)
    return tasks.valid_items(task, (record.labels or {}).get(task, []), boxes)[0]


def task_arrays(item: dict, options: FeatureOptions, box_rows: dict[int, int] | None) -> dict[str, np.ndarray]:
    """The `task` feature's arrays of one item (`box_rows`: REC's record box index -> boxes row)."""
    query = options.tokenizer.encode([item[tasks.QUERY_FIELD[options.task]]], options.max_len)[0]
    if options.task == tasks.VE:
        return {"query": query, "target": np.int32(tasks.VE_LABELS.index(item["label"]))}
    if options.task == tasks.REC:
        return {"query": query, "target": np.int32(box_rows[item["box"]])}
    scores = np.array([tasks.vqa_score(answer, item["answers"]) for answer in options.answers], np.float32)
    target = int(np.argmax(scores)) if scores.any() else -1
    return {"query": query, "target": np.int32(target), "answer_scores": scores}


# One builder per feature a method may declare (Method.features). They run in this order for every record, so
# the random draws keep their order (crop, then caption, ...) whatever else is declared: new builders go last.
FEATURES: dict[str, Callable[[Building, FeatureOptions], dict[str, np.ndarray]]] = {
    "image": image_feature, "text": text_feature, "boxes": boxes_feature, "anchors": anchors_feature,
    "image_view": image_view_feature, "text_view": text_view_feature, "task": task_feature,
}
# A builder that reads what others leave in Building.
_NEEDS = {"boxes": ("image",), "anchors": ("text", "boxes"), "text_view": ("text",), "task": ("image",)}


def check_features(features) -> tuple[str, ...]:
    """The declared features in building order; an unknown name, or one without the feature it needs, is an
    error naming it."""
    unknown = [name for name in features if name not in FEATURES]
    if unknown:
        raise ValueError(f"unknown data feature(s) {', '.join(map(repr, unknown))}; known: {', '.join(FEATURES)}")
    for name, needs in _NEEDS.items():
        for needed in needs:
            if name in features and needed not in features:
                raise ValueError(f"data feature {name!r} needs {needed!r} declared too")
    return tuple(name for name in FEATURES if name in features)


class TrainExamples:
    """One training example per record with the declared features (FEATURES), plus the noisy flag when asked.

    Called by grain's random_map with a generator seeded by (seed, position in the stream), so every epoch draws
    a fresh crop and caption and a resumed run draws the same ones.
    """

    def __init__(self, image: transforms.ImageOptions, tokenizer: Tokenizer, max_len: int, noisy: bool,
                 features=IMAGE_TEXT, max_boxes: int = 0, anchor_map: str = "", task: str = "",
                 answers: tuple[str, ...] = ()):
        self.features = check_features(features)
        if "boxes" in self.features and max_boxes < 1:
            raise ValueError(f"config.data.max_boxes={max_boxes}: the boxes feature needs at least 1")
        if "task" in self.features:
            check_task_options(task, answers, "boxes" in self.features)
        normalise = Normaliser.load(anchor_map) if "anchors" in self.features else None
        self.options = FeatureOptions(image, tokenizer, max_len, max_boxes, normalise, task,
                                      tuple(tasks.normalise_answer(answer) for answer in answers))
        self.noisy = noisy

    def __call__(self, item: Located | Skipped, rng: np.random.Generator) -> dict[str, np.ndarray] | Skipped:
        if isinstance(item, Skipped):
            return item
        try:
            building, example = Building(item.record, _usable_captions(item.record), rng), {}
            for name in self.features:
                example.update(FEATURES[name](building, self.options))
        except SkipRecord as error:
            return error.at(item.where, item.record.id)
        if self.noisy:
            example[NOISY_LABEL] = np.bool_((item.record.labels or {}).get(NOISY_LABEL, False))
        return example


def check_task_options(task: str, answers: tuple[str, ...], has_boxes: bool) -> None:
    """The `task` feature's settings are usable: a known task, VQA with an answer vocabulary, REC with boxes."""
    tasks.check_task(task, "config.data.task")
    if task == tasks.VQA and not answers:
        raise ValueError("config.data.task='vqa' needs an answer vocabulary in config.data.answers")
    if task == tasks.REC and not has_boxes:
        raise ValueError("config.data.task='rec' needs the boxes feature declared too (the candidate regions)")


class TaskEvalExamples:
    """Every usable item of a record's `task` ground truth with its centre-cropped image, for the downstream
    evaluator: "image" [S, S, 3] and, stacked over the items, "query" [n, L], "target" [n] (and "answers"
    [n] lists of VQA answers; REC: "boxes" [max_boxes, 4], "box_mask", "target_box" [n, 4] in [0, 1] of the
    crop, "cropped_items": how many items were dropped because the crop cut their box away). A record without
    usable items is skipped (NO_TASK_ITEM)."""

    def __init__(self, image: transforms.ImageOptions, options: FeatureOptions):
        self.image, self.options = image, options

    def __call__(self, item: Located | Skipped) -> dict | Skipped:
        if isinstance(item, Skipped):
            return item
        record, options = item.record, self.options
        try:
            image, crop = transforms.eval_image_and_box(record.image, self.image)
            items = usable_task_items(record, options.task)
            example = {"image": image}
            rows = None
            if options.task == tasks.REC:
                boxes, mask, kept = crop_boxes(record.boxes, crop, options.max_boxes)
                rows = {int(index): row for row, index in enumerate(kept)}
                usable = [entry for entry in items if entry["box"] in rows]
                example["cropped_items"] = len(items) - len(usable)
                items = usable
                example |= {"boxes": boxes, "box_mask": mask,
                            "target_box": np.array([boxes[rows[entry["box"]]] for entry in items], np.float32)}
            if not items:
                raise SkipRecord(NO_TASK_ITEM, f"no usable {options.task!r} item (labels[{options.task!r}])")
        except SkipRecord as error:
            return error.at(item.where, record.id)
        arrays = [task_arrays(entry, options, rows) for entry in items]
        example |= {key: np.stack([a[key] for a in arrays]) for key in ("query", "target")}
        if options.task == tasks.VQA:
            example["answers"] = [entry["answers"] for entry in items]
        return example


class EvalExamples:
    """Every caption of a record with its centre-cropped image: image [S, S, 3], text int32 [k, L], and its group:
    the value of labels[group_label] (images showing the same content, e.g. one emoji in several styles) or None."""

    def __init__(self, image: transforms.ImageOptions, tokenizer: Tokenizer, max_len: int, group_label: str = ""):
        self.image, self.tokenizer, self.max_len, self.group_label = image, tokenizer, max_len, group_label

    def __call__(self, item: Located | Skipped) -> dict | Skipped:
        if isinstance(item, Skipped):
            return item
        record = item.record
        try:
            captions = _usable_captions(record)
            image = transforms.eval_image(record.image, self.image)
        except SkipRecord as error:
            return error.at(item.where, record.id)
        group = (record.labels or {}).get(self.group_label) if self.group_label else None
        return {"image": image, "text": self.tokenizer.encode(captions, self.max_len), "group": group}
