"""Input-pipeline throughput (`python -m vlp_jax.bench data`): the training pipeline against plain PIL decoding.

Writes JPEG shards textured like photographs (smooth colour regions plus grain: they compress and decode like
photos, unlike flat synthetic shapes) with world captions, then measures on the same images
- the raw decode rate: PIL opening and decoding each JPEG to RGB, full size, on one core;
- the pipeline rate: ArrayRecord read, record decode, PIL decode, random resized crop to the model's image size,
  caption choice, tokenisation and batching, with 0 worker processes (all in this process) or W workers (W
  processes decode; the main process only assembles batches),
and reports images/s per core (rate / max(W, 1)) and its ratio to the raw decode rate.
"""

import dataclasses
import io
import os
import tempfile
import time

import ml_collections
import numpy as np
from PIL import Image

from vlp_jax.data import examples, pipeline, records, sources, synthetic, transforms
from vlp_jax.data.tokenizer import train_tokenizer

GRAIN_STD = 12.0  # per-pixel noise of the photo-like images, in intensity levels
BLOB_PIXELS = 32  # side of the smooth colour regions, in pixels


@dataclasses.dataclass(frozen=True)
class DataBenchmark:
    """What to measure: `count` JPEGs of `size` (width, height) at `quality`, each worker count for `seconds`."""

    count: int
    size: tuple[int, int]
    quality: int
    workers: tuple[int, ...]
    batch: int
    seconds: float
    data_dir: str = ""  # where to write the shards; empty = a temporary directory


def photo_like_jpeg(rng: np.random.Generator, width: int, height: int, quality: int) -> bytes:
    """A JPEG with photograph-like statistics: bicubic-smoothed random colours plus fine grain."""
    coarse = rng.integers(0, 256, (height // BLOB_PIXELS + 2, width // BLOB_PIXELS + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32)
    grain = rng.normal(0, GRAIN_STD, (height, width, 1)).astype(np.float32)
    encoded = io.BytesIO()
    Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(encoded, "JPEG", quality=quality)
    return encoded.getvalue()


def write_shards(out_dir: str, spec: DataBenchmark, world: ml_collections.ConfigDict) -> list[bytes]:
    """Writes spec.count JPEG records with world captions to out_dir (split 'train'); returns the JPEG bytes."""
    rng = np.random.default_rng(0)
    scenes = synthetic.generate_scenes(world, "train", spec.count)
    jpegs = [photo_like_jpeg(rng, *spec.size, spec.quality) for _ in range(spec.count)]
    batch = [records.ImageTextRecord(id=str(i), image=jpeg, captions=list(scene.captions))
             for i, (jpeg, scene) in enumerate(zip(jpegs, scenes, strict=True))]
    records.write_records(batch, out_dir, "train", world.records_per_shard)
    return jpegs


def _timed(work, min_seconds: float) -> float:
    """Items per second of `work()` (which returns how many items it did), repeated for at least min_seconds."""
    done, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < min_seconds or not done:
        done += work()
    return done / elapsed


def raw_decode_rate(jpegs: list[bytes], min_seconds: float) -> float:
    """Images/s of a plain full-size PIL decode on one core (these JPEGs are RGB: no conversion)."""

    def decode_all():
        for jpeg in jpegs:
            Image.open(io.BytesIO(jpeg)).load()
        return len(jpegs)

    return _timed(decode_all, min_seconds)


def pipeline_rate(config: ml_collections.ConfigDict, data_dir: str, tokenizer, workers: int, spec: DataBenchmark
                  ) -> float:
    """Images/s of the training pipeline with `workers` worker processes, after one warm-up batch."""
    part = sources.open_source(sources.SourceSpec(data_dir, "train", 1.0), "data benchmark")
    image = transforms.ImageOptions.from_config(config.data.image, config.model.image.image_size)
    prepare = examples.TrainExamples(image, tokenizer, config.model.text.max_len, noisy=False)
    options = pipeline.LoaderOptions(worker_count=workers, worker_buffer=config.data.loader.worker_buffer)
    batches = pipeline.TrainIterator(pipeline.TrainSource([part], [1.0], prepare), spec.batch, config.seed, 0, 1,
                                     options)
    try:
        next(batches)  # starts the workers
        return _timed(lambda: len(next(batches)["image"]), spec.seconds)
    finally:
        batches.close()


def run(config: ml_collections.ConfigDict, spec: DataBenchmark) -> list[str]:
    """Measures and returns the report's lines."""
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = spec.data_dir or os.path.join(scratch, "shards")
        jpegs = write_shards(data_dir, spec, config.data.world)
        captions = sources.source_captions([sources.open_source(sources.SourceSpec(data_dir, "train", 1.0), "")])
        tokenizer = train_tokenizer(captions, os.path.join(scratch, "tokenizer.model"),
                                    config.data.tokenizer.vocab_size)
        mean_kib = sum(map(len, jpegs)) / len(jpegs) / 1024
        lines = [f"{len(jpegs)} JPEGs {spec.size[0]}x{spec.size[1]} q{spec.quality} ({mean_kib:.0f} KiB mean) -> "
                 f"{config.model.image.image_size} px, crop scale {tuple(config.data.image.crop_scale)}, "
                 f"{os.cpu_count()} CPUs"]
        raw = raw_decode_rate(jpegs, spec.seconds)
        lines.append(f"raw PIL decode, 1 core        {raw:8.1f} images/s")
        for workers in spec.workers:
            rate = pipeline_rate(config, data_dir, tokenizer, workers, spec)
            cores = max(workers, 1)
            lines.append(f"pipeline, {workers} workers ({cores} core{'s' if cores > 1 else ' '}) {rate:8.1f} images/s "
                         f"{rate / cores:8.1f} per core = {rate / cores / raw:6.1%} of raw decode")
    return lines
