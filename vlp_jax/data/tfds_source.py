"""`tfds:NAME[:SPLIT]` sources: tfds datasets prepared in the ArrayRecord format, read without TensorFlow.

Needs the optional extra (`pip install -e '.[tfds]'`). The dataset must already be prepared under
`config.data.tfds.data_dir` (nothing is downloaded at run time) with ``file_format='array_record'``. The image
feature is read undecoded (tfds.decode.SkipDecoding), so its bytes go through the same decoder, pixel cap and
transforms as our own shards; captions are read from a configurable feature path ('captions', or e.g.
'captions/text' for coco_captions). Every other top-level scalar feature (a class label, an id) becomes one of the
record's labels, as the converter's --label_field columns do, so `config.eval.zeroshot.tasks` can read tfds
classification sets; a ClassLabel feature keeps its index and gives its class names (`class_names`). A dataset
without the caption feature is read with no captions: usable for zero-shot tasks, not for training.
"""

import dataclasses

import ml_collections
import numpy as np
from absl import logging

from vlp_jax.data.records import ImageTextRecord, Located
from vlp_jax.data.skips import Skipped

try:
    import tensorflow_datasets as tfds
except ImportError as error:  # pragma: no cover - depends on the optional extra
    raise ImportError(
        "a tfds: source needs tensorflow-datasets; install the extra: pip install -e '.[tfds]'"
    ) from error


@dataclasses.dataclass(frozen=True)
class TfdsKeys:
    """Where the image and the captions live in a tfds example ('/' separates nested features)."""

    image: str
    captions: str


class TfdsSource:
    """grain random-access source over one split of a prepared tfds dataset; items are Located or Skipped.

    Picklable: worker processes get the name, split and directory and open the dataset themselves.
    """

    def __init__(self, name: str, split: str, tfds_config: ml_collections.ConfigDict, flag: str):
        self.name, self.split = name, split
        self.data_dir = tfds_config.data_dir or None
        self.keys = TfdsKeys(tfds_config.image_key, tfds_config.caption_key)
        try:
            builder = tfds.builder(name, data_dir=self.data_dir)
        except Exception as error:  # tfds raises several types for unknown or unprepared datasets
            raise FileNotFoundError(
                f"{flag}: tfds dataset {name!r} not found under config.data.tfds.data_dir={self.data_dir!r} "
                f"({error}); prepare it there first with file_format='array_record'"
            ) from error
        if not builder.data_path.exists():
            raise FileNotFoundError(
                f"{flag}: tfds dataset {name!r} is not prepared in {builder.data_dir}; nothing is downloaded at run "
                "time: prepare it there with tfds (file_format='array_record')"
            )
        file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
        if file_format != "array_record":
            raise ValueError(
                f"{flag}: tfds dataset {name!r} in {builder.data_dir} is stored as {file_format}; random access "
                "needs it prepared with file_format='array_record'"
            )
        if split not in builder.info.splits:
            known = list(builder.info.splits)
            raise ValueError(f"{flag}: tfds dataset {name!r} has no split {split!r}; it has {known}")
        self._length = builder.info.splits[split].num_examples
        self._class_names = {key: tuple(feature.names) for key, feature in builder.info.features.items()
                             if isinstance(feature, tfds.features.ClassLabel)}
        try:
            _feature(builder.info.features, self.keys.captions)
            self.has_captions = True
        except KeyError:
            self.has_captions = False
            logging.warning("%s: tfds dataset %r has no feature %r (config.data.tfds.caption_key): its records "
                            "have no captions, usable for zero-shot tasks only", flag, name, self.keys.captions)
        # Top-level features that are not labels: the image and the captions.
        self._not_labels = {self.keys.image.split("/")[0], self.keys.captions.split("/")[0]}
        self._source = None  # opened lazily in each process

    def class_names(self, feature: str) -> tuple[str, ...] | None:
        """The class names of a ClassLabel feature (its labels are indices into them); None for other features."""
        return self._class_names.get(feature)

    def _open(self):
        if self._source is None:
            builder = tfds.builder(self.name, data_dir=self.data_dir)
            self._source = builder.as_data_source(
                split=self.split, decoders={self.keys.image: tfds.decode.SkipDecoding()}
            )
        return self._source

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Located | Skipped:
        where = f"tfds:{self.name}:{self.split} #{index}"
        record_id = f"{self.name}/{self.split}/{index}"
        example = self._open()[index]
        try:
            image = _feature(example, self.keys.image)
            captions = [_text(caption) for caption in np.atleast_1d(_feature(example, self.keys.captions)).tolist()
                        ] if self.has_captions else []
        except KeyError as error:
            return Skipped("missing_field", where, record_id, f"no feature {error} in the tfds example")
        except UnicodeDecodeError as error:
            return Skipped("bad_utf8", where, record_id, f"a caption is not valid UTF-8: {error}")
        if not isinstance(image, bytes):
            return Skipped("bad_field", where, record_id, f"feature {self.keys.image!r} is not encoded image bytes")
        labels = {key: _scalar(value) for key, value in example.items()
                  if key not in self._not_labels and np.ndim(value) == 0}
        return Located(ImageTextRecord(id=record_id, image=image, captions=captions, labels=labels or None), where)

    def __repr__(self) -> str:
        return f"TfdsSource({self.name}:{self.split}, {self._length} examples)"


def _feature(example: dict, path: str):
    """example['a']['b'] for the path 'a/b'."""
    for key in path.split("/"):
        example = example[key]
    return example


def _scalar(value):
    """A scalar feature as a plain label: bytes as text, numpy numbers as Python numbers."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value.item() if isinstance(value, np.generic | np.ndarray) else value


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
