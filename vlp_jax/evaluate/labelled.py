"""Zero-shot tasks read from labelled records: `config.eval.zeroshot.tasks`, one entry per task, keyed by its name.

A task names
- `source`: where its records are, a spec as in `config.data.eval_sources` (DIR[:SPLIT], a glob of ArrayRecord
  shards, tfds:NAME[:SPLIT]; the split defaults to "eval");
- `label_field`: the key of a record's `labels` that holds its class, as an index into the class names or as the
  class name itself (`python -m vlp_jax.data.convert ... --label_field=COLUMN` writes the latter);
- `class_names`: given in the config, else read from `class_names_file`, else from `<label_field>.classnames.txt`
  or `classnames.txt` beside the shards (one name per line), else a tfds ClassLabel feature's names, else the
  distinct names the records hold (sorted);
- `templates`: prompts with one "{}" for the class name; empty = `DEFAULT_TEMPLATES`, CLIP's ensemble;
- `max_examples`: the first labelled images used (0 = all; the suite's own cap applies too).

Images go through the eval transform (decode, centre crop, resize: transforms.eval_image); captions are not needed.
A record without the label, or whose label is no class, is skipped, counted and logged; a source where no record
has the label at all is an error naming the field and the source.
"""

import collections
import glob

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from vlp_jax.data import sources, transforms
from vlp_jax.data.loader import LoaderOptions, ordered_stream
from vlp_jax.data.records import Located
from vlp_jax.data.skips import SkipLog, Skipped, SkipRecord
from vlp_jax.evaluate.zeroshot import ZeroShotTask

# CLIP's prompt ensemble for ImageNet, the seven templates its authors selected, and the plain photo prompt.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
CLASS_NAME_FILES = ("{field}.classnames.txt", "classnames.txt")  # looked for beside the shards, in this order
MISSING_LABEL, UNKNOWN_LABEL = "missing_label", "unknown_label"  # why a readable record is left out of a task
_NO_LABEL = object()  # a record without labels[label_field]


def default_task() -> ml_collections.ConfigDict:
    """The keys of one `config.eval.zeroshot.tasks.<name>` entry, with their defaults."""
    return ml_collections.ConfigDict(
        dict(source="", label_field="", class_names=(), class_names_file="", templates=(), max_examples=0)
    )


class _LabelledImage:
    """Record -> {"image": uint8 [S, S, 3], "label": labels[field] or _NO_LABEL, "keys": the record's label keys}."""

    def __init__(self, image: transforms.ImageOptions, label_field: str):
        self.image, self.label_field = image, label_field

    def __call__(self, item: Located | Skipped) -> dict | Skipped:
        if isinstance(item, Skipped):
            return item
        record = item.record
        try:
            image = transforms.eval_image(record.image, self.image)
        except SkipRecord as error:
            return Skipped(error.reason, item.where, record.id, error.message)
        labels = record.labels or {}
        return {"image": image, "label": labels.get(self.label_field, _NO_LABEL), "keys": tuple(labels)}


def load_task(name: str, settings: ml_collections.ConfigDict, config: ml_collections.ConfigDict, limit: int = 0
              ) -> tuple[ZeroShotTask, dict[str, int]]:
    """The task `config.eval.zeroshot.tasks.<name>` with at most `limit` images (0 = no cap beyond its own), and
    how many records were skipped by reason (missing_label, unknown_label and the data pipeline's reasons)."""
    flag = f"config.eval.zeroshot.tasks.{name}"
    settings = _checked(settings, flag)
    field = settings.label_field
    specs = sources.parse_specs(settings.source, "eval", f"{flag}.source")
    parts = [sources.open_source(spec, f"{flag}.source", config.data.tfds) for spec in specs]
    class_names = _given_class_names(settings, specs, flag) or _feature_class_names(parts, field, flag)
    limit = min(x for x in (limit, settings.max_examples, np.inf) if x > 0)
    options = LoaderOptions.from_config(config.data.loader)
    image = transforms.ImageOptions.from_config(config.data.image, config.model.image.image_size)
    items = ordered_stream(parts, _LabelledImage(image, field), options)
    unreadable = SkipLog(options.skip_log_limit)
    skipped: collections.Counter[str] = collections.Counter()
    images, labels, keys_seen, unknown_examples = [], [], set(), []
    for item in items:
        if isinstance(item, Skipped):
            unreadable.add(item)
            continue
        keys_seen.update(item["keys"])
        label = item["label"]
        if label is _NO_LABEL:
            skipped[MISSING_LABEL] += 1
            continue
        if class_names is not None and _class_index(label, class_names) is None:
            skipped[UNKNOWN_LABEL] += 1
            if len(unknown_examples) < 3:
                unknown_examples.append(label)
            continue
        images.append(item["image"])
        labels.append(label)
        if len(images) >= limit:
            break
    where = f"{flag}.source={settings.source}"
    if not images and not skipped[UNKNOWN_LABEL]:
        if skipped[MISSING_LABEL]:
            found = ", ".join(sorted(keys_seen)) or "none"
            raise ValueError(f"{flag}.label_field={field!r}: no record of {where} has labels[{field!r}] "
                             f"(the label keys its records carry: {found}); name one of those")
        raise ValueError(f"{where} holds no readable record ({dict(unreadable.counts)} skipped)")
    if class_names is None:
        class_names = _names_from_labels(labels, flag, where)
    indices = np.array([_class_index(label, class_names) for label in labels], np.int64)
    skipped.update(unreadable.counts)
    _log_task(name, where, len(indices), class_names, skipped, field, unknown_examples)
    if not len(indices):
        raise ValueError(f"{flag}: no record of {where} has a label among its {len(class_names)} class names "
                         f"(labels found, e.g. {unknown_examples}); check class_names or label_field={field!r}")
    templates = tuple(settings.templates) or DEFAULT_TEMPLATES
    return ZeroShotTask(name, np.stack(images), indices, class_names, templates), dict(skipped)


def _checked(settings: ml_collections.ConfigDict, flag: str) -> ml_collections.ConfigDict:
    """`settings` over the defaults; an unknown key or a missing source/label_field is an error naming it."""
    known = default_task()
    given = settings.to_dict() if isinstance(settings, ml_collections.ConfigDict) else dict(settings)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"{flag}: unknown keys {unknown}; a task has {sorted(known)}")
    known.update(given)
    for key in ("source", "label_field"):
        if not known[key]:
            raise ValueError(f"{flag}.{key} is empty; a zero-shot task needs a source and the label field to read")
    return known


def _given_class_names(settings, specs: list[sources.SourceSpec], flag: str) -> tuple[str, ...] | None:
    """Class names from the config, the named file, or a file beside the shards; None when there are none."""
    if settings.class_names:
        return _unique(tuple(settings.class_names), f"{flag}.class_names")
    if settings.class_names_file:
        path = epath.Path(settings.class_names_file)
        if not path.is_file():
            raise FileNotFoundError(f"{flag}.class_names_file={path} does not exist")
        return _read_names(path, flag)
    for spec in specs:
        folder = _shard_folder(spec)
        for pattern in CLASS_NAME_FILES if folder else ():
            path = folder / pattern.format(field=settings.label_field)
            if path.is_file():
                logging.info("%s: class names from %s", flag, path)
                return _read_names(path, flag)
    return None


def _feature_class_names(parts: list, field: str, flag: str) -> tuple[str, ...] | None:
    """The class names a source declares for `field` (a tfds ClassLabel feature); None when none does."""
    for part in parts:
        names = getattr(part, "class_names", lambda _: None)(field)
        if names:
            logging.info("%s: class names from the %r feature of %s", flag, field, part)
            return _unique(names, f"{flag}: {part} {field!r}")
    return None


def _shard_folder(spec: sources.SourceSpec) -> epath.Path | None:
    """The folder holding a spec's shards (a dataset directory, or a glob's folder); None for tfds."""
    if spec.location.startswith(sources.TFDS_PREFIX):
        return None
    path = epath.Path(spec.location)
    while glob.has_magic(str(path)) or not path.is_dir():
        if path.parent == path:
            return None
        path = path.parent
    return path


def _read_names(path: epath.Path, flag: str) -> tuple[str, ...]:
    names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if not names:
        raise ValueError(f"{flag}: {path} holds no class name (one per line)")
    return _unique(names, str(path))


def _unique(names: tuple[str, ...], what: str) -> tuple[str, ...]:
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{what} names these classes more than once: {repeated}")
    return names


def _names_from_labels(labels: list, flag: str, where: str) -> tuple[str, ...]:
    """Without given class names, the labels must be the names themselves: their distinct values, sorted."""
    if not all(isinstance(label, str) for label in labels):
        raise ValueError(f"{flag}: the records of {where} hold class indices, not names; give the names in "
                         f"{flag}.class_names, {flag}.class_names_file or a classnames.txt beside the shards")
    names = tuple(sorted(set(labels)))
    logging.info("%s: no class names given; using the %d distinct labels of the records", flag, len(names))
    return names


def _class_index(label, class_names: tuple[str, ...]) -> int | None:
    """A label's class index: an int in range, or a class name; None for anything else."""
    if isinstance(label, str):
        return class_names.index(label) if label in class_names else None
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(class_names):
        return label
    return None


def _log_task(name: str, where: str, count: int, class_names, skipped: dict, field: str, unknown: list) -> None:
    line = f"zero-shot task {name}: {count} labelled images of {where}, {len(class_names)} classes"
    if not skipped:
        logging.info(line)
        return
    reasons = []
    if skipped.get(MISSING_LABEL):
        reasons.append(f"{skipped[MISSING_LABEL]} records without labels[{field!r}]")
    if skipped.get(UNKNOWN_LABEL):
        reasons.append(f"{skipped[UNKNOWN_LABEL]} whose label is no class name or index (e.g. {unknown})")
    unreadable = {reason: n for reason, n in skipped.items() if reason not in (MISSING_LABEL, UNKNOWN_LABEL)}
    if unreadable:
        reasons.append(f"unreadable records {unreadable}")
    logging.warning("%s; skipped %s", line, "; ".join(reasons))
