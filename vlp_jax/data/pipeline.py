"""What a run reads (`load`): endless training batches with the features its method declares, the evaluation set
in memory, the tokenizer; and how `config.data` names them (source specs, the embedded world, the tokenizer).

The pieces: sources.py (where records come from), examples.py (record -> example, one builder per feature),
train_stream.py (the training stream), loader.py (reading options, whole sets into memory), dataset.py (the
evaluation set), skips.py (bad records). Evaluation data is small and read once into memory as a PairDataset:
every image once (centre crop), every caption.
"""

import dataclasses
import time

import ml_collections
from absl import logging
from etils import epath

from vlp_jax import progress
from vlp_jax.data import examples, sources, transforms, world_shards
from vlp_jax.data.dataset import PairDataset
from vlp_jax.data.loader import LoaderOptions, read_pairs
from vlp_jax.data.tokenizer import Tokenizer, check_model, open_tokenizer, train_tokenizer
from vlp_jax.data.train_stream import TrainIterator, TrainSource

__all__ = ["Data", "LoaderOptions", "PairDataset", "TrainIterator", "load", "load_eval", "load_tokenizer",
           "open_sources"]

TOKENIZER_FILE = "tokenizer.model"  # in the workdir, when config.data.tokenizer.path is empty
WORLD_DIR = "data"  # world_storage="shards" writes the world to <workdir>/data unless config.data.world_dir is set


@dataclasses.dataclass
class Data:
    """What a run reads: endless training batches, the evaluation set in memory, the tokenizer."""

    train: TrainIterator
    eval: PairDataset
    tokenizer: Tokenizer


def open_sources(config: ml_collections.ConfigDict, split: str, workdir: epath.PathLike) -> tuple[list, list[float]]:
    """The random-access sources of `config.data.<split>_sources` and their weights; 'synthetic' is the embedded
    world (world_shards.open_world). The world's size is the config's alone (never train.steps): a resumed run
    reads the same training set."""
    data, flag = config.data, f"config.data.{split}_sources"
    specs = sources.parse_specs(data[f"{split}_sources"], split, flag)
    root = epath.Path(data.world_dir) if data.world_dir else epath.Path(workdir) / WORLD_DIR
    parts = [world_shards.open_world(data, spec.split, root) if spec.location == sources.SYNTHETIC
             else sources.open_source(spec, flag, data.tfds) for spec in specs]
    for spec, part in zip(specs, parts, strict=True):
        if not len(part):
            raise ValueError(f"{flag}: {spec.location} (split {spec.split}) holds no record")
    return parts, [spec.weight for spec in specs]


def world_only(config: ml_collections.ConfigDict, split: str = "train") -> bool:
    """Whether every source of `config.data.<split>_sources` is the embedded world."""
    specs = sources.parse_specs(config.data[f"{split}_sources"], split, f"config.data.{split}_sources")
    return all(spec.location == sources.SYNTHETIC for spec in specs)


def train_image_options(config: ml_collections.ConfigDict) -> transforms.ImageOptions:
    """The training images' options: `config.data.image`, except that training on the embedded world alone takes
    whole-image crops when `config.data.image.world_whole_image` (the world's own recipe: its scenes are drawn at
    the model's size and its captions name positions and counts, which a crop would make false)."""
    image = transforms.ImageOptions.from_config(config.data.image, config.model.image.image_size)
    if config.data.image.get("world_whole_image", True) and world_only(config) and (
            image.crop_scale != (1.0, 1.0) or image.crop_ratio != (1.0, 1.0)):
        logging.info("the embedded world: whole-image crops (config.data.image.crop_scale=%s is for real data; "
                     "config.data.image.world_whole_image=False crops the world too)", image.crop_scale)
        image = dataclasses.replace(image, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    return image


def check_paths(config: ml_collections.ConfigDict) -> None:
    """Fails in an instant, before anything is compiled or rendered, when a data source or the tokenizer named in
    `config.data` does not exist (FileNotFoundError naming the flag). Only existence: shards are opened later."""
    data = config.data
    for split in ("train", "eval"):
        flag = f"config.data.{split}_sources"
        for spec in sources.parse_specs(data[f"{split}_sources"], split, flag):
            if spec.location != sources.SYNTHETIC and not spec.location.startswith(sources.TFDS_PREFIX):
                try:
                    sources.glob_paths(spec.location)
                except FileNotFoundError as error:
                    raise FileNotFoundError(f"{flag}: {error}") from error
    if data.tokenizer.path:
        check_model(data.tokenizer.path)


def load_tokenizer(config: ml_collections.ConfigDict, workdir: epath.PathLike, train_parts: list) -> Tokenizer:
    """`config.data.tokenizer.path`, or the workdir's tokenizer, trained on the training captions if missing (a
    resumed run reuses it, so it tokenises identically)."""
    settings = config.data.tokenizer
    if settings.path or settings.get("kind", "sentencepiece") != "sentencepiece":
        tokenizer = open_tokenizer(settings)  # only sentencepiece models are trained here
    else:
        path = epath.Path(workdir) / TOKENIZER_FILE
        if path.exists():
            tokenizer = Tokenizer(path)
        else:
            captions = progress.logged(sources.source_captions(train_parts, settings.max_captions),
                                       "text tokenizer: training captions read")
            started = time.monotonic()
            tokenizer = train_tokenizer(captions, path, settings.vocab_size)
            logging.info("text tokenizer: %d pieces trained in %.0f s, written to %s", tokenizer.vocab_size,
                         time.monotonic() - started, path)
    if tokenizer.vocab_size > config.model.text.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but config.model.text.vocab_size is "
            f"{config.model.text.vocab_size}; raise --config.model.text.vocab_size to at least {tokenizer.vocab_size}"
        )
    return tokenizer


def load(
    config: ml_collections.ConfigDict, workdir: epath.PathLike, features=examples.IMAGE_TEXT,
    process_index: int | None = None, process_count: int | None = None, eval_limit: int = 0,
) -> Data:
    """The training iterator with the declared `features` (names in examples.FEATURES; an unknown one is a
    ValueError listing them), the evaluation set (its first `eval_limit` images when > 0; image and text) and the
    tokenizer of `config.data`."""
    features = examples.check_features(features)  # before any data is read
    train_parts, weights = open_sources(config, "train", workdir)
    tokenizer = load_tokenizer(config, workdir, train_parts)
    image = train_image_options(config)
    options = LoaderOptions.from_config(config.data.loader)
    noisy = any(examples.carries_noisy_flag(part) for part in train_parts)
    prepare = examples.TrainExamples(image, tokenizer, config.model.text.max_len, noisy, features,
                                     config.data.max_boxes, config.data.anchor_map, config.data.get("task", ""),
                                     tuple(config.data.get("answers", ())))
    train = TrainIterator(TrainSource(train_parts, weights, prepare), config.train.batch_size, config.seed,
                          process_index, process_count, options)
    return Data(train, load_eval(config, workdir, tokenizer, eval_limit), tokenizer)


def load_eval(config: ml_collections.ConfigDict, workdir: epath.PathLike, tokenizer: Tokenizer | None = None,
              limit: int = 0) -> PairDataset:
    """`config.data.eval_sources` in memory (the first `limit` usable images when > 0), centre-cropped, every
    caption tokenised."""
    if tokenizer is None:
        tokenizer = load_tokenizer(config, workdir, open_sources(config, "train", workdir)[0])
    parts, _ = open_sources(config, "eval", workdir)
    image = transforms.ImageOptions.from_config(config.data.image, config.model.image.image_size)
    prepare = examples.EvalExamples(image, tokenizer, config.model.text.max_len, config.data.group_label)
    options = LoaderOptions.from_config(config.data.loader)
    return read_pairs(parts, prepare, options, f"config.data.eval_sources={config.data.eval_sources}", limit=limit)
