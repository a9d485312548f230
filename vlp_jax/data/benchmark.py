"""Input-pipeline throughput (`python -m vlp_jax.bench data`): the training pipeline against plain JPEG decoding.

Writes JPEG shards textured like photographs (smooth colour regions plus grain: they compress and decode like
photos, unlike flat synthetic shapes) with world captions, then measures on the same images
- decoding alone, on one core: PIL opening and decoding each JPEG to RGB at full size (the reference the target
  is set against: >= 70% of it per core), libjpeg-turbo (simplejpeg) at full size, and libjpeg-turbo at the
  reduced DCT scale the pipeline itself decodes at for its random crops (transforms.turbo_decode_for_box: the
  smallest of 1/8, 1/4, 1/2, 1 that keeps the crop >= the output size). The pipeline is compared with the
  full-size PIL decode, so the time it saves by decoding fewer pixels counts in its favour; the last baseline
  shows how much that is;
- the pipeline: ArrayRecord read, record decode, JPEG decode, random resized crop to the model's image size,
  caption choice, tokenisation and batching, with 0 worker processes (all in this process) or W workers (W
  processes decode; the main process only assembles batches),
and reports images/s per core (rate / max(W, 1)) and its ratios to the decode rates. Every rate is the best of
`windows` equal windows, so a shared machine's busy moments do not decide the comparison, and the windows of the
rates compared are taken in turn (pipeline, PIL, pipeline, PIL, ...), so a slow spell lasting minutes (another
job, a lower clock) falls on both: each pipeline is compared with PIL's decode measured in between its windows.

A core decodes more slowly when many are busy (shared caches and memory bandwidth, lower boost clocks), so a
W-worker pipeline is also compared with PIL's full-size decode run in W processes at once, started together: the
like-for-like reference at that parallelism.
"""

import concurrent.futures
import dataclasses
import io
import multiprocessing
import os
import tempfile
import time

import ml_collections
import numpy as np
import simplejpeg
from PIL import Image

from vlp_jax.data import examples, records, sources, synthetic, transforms
from vlp_jax.data.loader import LoaderOptions
from vlp_jax.data.tokenizer import train_tokenizer
from vlp_jax.data.train_stream import TrainIterator, TrainSource

DECODE_STEP = 32  # images per timed call of a decode baseline
PIL_FULL = "PIL, full size"
TURBO_FULL = "libjpeg-turbo (simplejpeg), full size"
TURBO_SCALED = "libjpeg-turbo at the pipeline's DCT scale"
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
    seconds: float  # per measurement, split into `windows` windows
    data_dir: str = ""  # where to write the shards; empty = a temporary directory
    windows: int = 5
    target: float = 0.7  # per-core pipeline rate / full-size PIL decode rate the pipeline should reach


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


def _best_rates(works: dict, spec: DataBenchmark) -> dict[str, float]:
    """Items per second of each `work()` (which returns how many items it did): the best of spec.windows windows
    of spec.seconds / spec.windows each. The works take turns window by window (a, b, a, b, ...), so a shared
    machine's slow spells fall on all of them alike and their ratios hold."""
    best = dict.fromkeys(works, 0.0)
    for _ in range(spec.windows):
        for name, work in works.items():
            done, started = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - started) < spec.seconds / spec.windows or not done:
                done += work()
            best[name] = max(best[name], done / elapsed)
    return best


def _cycling(items: list, step: int):
    """A function returning the next `step` items of `items` at each call, round and round."""
    position = 0

    def next_items() -> list:
        nonlocal position
        chunk = [items[(position + i) % len(items)] for i in range(step)]
        position = (position + step) % len(items)
        return chunk

    return next_items


def pil_full_decode(jpegs: list[bytes]):
    """The reference work: PIL opening and decoding the next DECODE_STEP JPEGs at full size."""
    next_jpegs = _cycling(jpegs, DECODE_STEP)

    def work() -> int:
        for jpeg in next_jpegs():
            Image.open(io.BytesIO(jpeg)).load()
        return DECODE_STEP

    return work


def decode_rates(jpegs: list[bytes], options: transforms.ImageOptions, spec: DataBenchmark) -> dict[str, float]:
    """Images/s of decoding alone on one core (these JPEGs are RGB: no conversion): PIL and libjpeg-turbo at
    full size, and libjpeg-turbo at the DCT scale the pipeline picks for the random crops it draws."""
    rng = np.random.default_rng(0)
    sized = []
    for jpeg in jpegs:
        width, height = transforms.turbo_jpeg_size(jpeg)
        sized.append((jpeg, width, height, transforms.random_crop_box(width, height, options, rng)))
    next_jpegs, next_sized = _cycling(jpegs, DECODE_STEP), _cycling(sized, DECODE_STEP)

    def turbo_full():
        for jpeg in next_jpegs():
            simplejpeg.decode_jpeg(jpeg)
        return DECODE_STEP

    def turbo_scaled():
        for jpeg, width, height, box in next_sized():
            transforms.turbo_decode_for_box(jpeg, width, height, box, options)
        return DECODE_STEP

    return _best_rates({PIL_FULL: pil_full_decode(jpegs), TURBO_FULL: turbo_full, TURBO_SCALED: turbo_scaled}, spec)


def _pil_decode_rate_from(path: str, start_at: float, spec: DataBenchmark) -> float:
    """In a worker process: waits for the wall-clock `start_at`, then the best-window rate of full-size PIL
    decoding of the JPEGs stored in `path` (an .npz of uint8 buffers)."""
    with np.load(path) as stored:
        jpegs = [stored[name].tobytes() for name in sorted(stored.files)]
    time.sleep(max(0.0, start_at - time.time()))
    return _best_rates({PIL_FULL: pil_full_decode(jpegs)}, spec)[PIL_FULL]


def parallel_pil_rate(jpegs: list[bytes], processes: int, spec: DataBenchmark, scratch: str) -> float:
    """Per-core images/s of full-size PIL decoding in `processes` processes started together (fresh interpreters:
    nothing of this process's threads is forked)."""
    path = os.path.join(scratch, "jpegs.npz")
    np.savez(path, **{f"{i:08d}": np.frombuffer(jpeg, np.uint8) for i, jpeg in enumerate(jpegs)})
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        list(pool.map(time.sleep, [0.0] * processes))  # every worker started and imported before the clock runs
        start_at = time.time() + 1.0
        rates = list(pool.map(_pil_decode_rate_from, [path] * processes, [start_at] * processes, [spec] * processes))
    return sum(rates) / processes


def pipeline_rates(config: ml_collections.ConfigDict, data_dir: str, tokenizer, workers: int, spec: DataBenchmark,
                   jpegs: list[bytes]) -> tuple[float, float]:
    """(images/s of the training pipeline with `workers` worker processes after one warm-up batch, images/s of
    PIL's full-size decode of `jpegs` on this core in windows taken in turn with the pipeline's)."""
    part = sources.open_source(sources.SourceSpec(data_dir, "train", 1.0), "data benchmark")
    image = transforms.ImageOptions.from_config(config.data.image, config.model.image.image_size)
    prepare = examples.TrainExamples(image, tokenizer, config.model.text.max_len, noisy=False)
    options = LoaderOptions(worker_count=workers, worker_buffer=config.data.loader.worker_buffer)
    batches = TrainIterator(TrainSource([part], [1.0], prepare), spec.batch, config.seed, 0, 1, options)
    try:
        next(batches)  # starts the workers
        rates = _best_rates({"pipeline": lambda: len(next(batches)["image"]), PIL_FULL: pil_full_decode(jpegs)},
                            spec)
        return rates["pipeline"], rates[PIL_FULL]
    finally:
        batches.close()


def run(config: ml_collections.ConfigDict, spec: DataBenchmark) -> list[str]:
    """Measures and returns the report's lines: a table of decode and pipeline rates."""
    image = transforms.ImageOptions.from_config(config.data.image, config.model.image.image_size)
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = spec.data_dir or os.path.join(scratch, "shards")
        jpegs = write_shards(data_dir, spec, config.data.world)
        captions = sources.source_captions([sources.open_source(sources.SourceSpec(data_dir, "train", 1.0), "")])
        tokenizer = train_tokenizer(captions, os.path.join(scratch, "tokenizer.model"),
                                    config.data.tokenizer.vocab_size)
        decode = decode_rates(jpegs, image, spec)
        measured = {workers: pipeline_rates(config, data_dir, tokenizer, workers, spec, jpegs)
                    for workers in spec.workers}
        # PIL's per-core rate with as many processes decoding at once as the pipeline had workers.
        at_parallelism = {workers: measured[workers][1] if workers <= 1 else
                          parallel_pil_rate(jpegs, workers, spec, scratch) for workers in spec.workers}
    scaled = decode[TURBO_SCALED]
    mean_kib = sum(map(len, jpegs)) / len(jpegs) / 1024
    lines = [
        f"{len(jpegs)} JPEGs {spec.size[0]}x{spec.size[1]} q{spec.quality} ({mean_kib:.0f} KiB mean) -> "
        f"{image.size} px, crop scale {image.crop_scale}, aspect ({image.crop_ratio[0]:.2f}, "
        f"{image.crop_ratio[1]:.2f}), {image.resizer} resize; {os.cpu_count()} CPUs; each rate the best of "
        f"{spec.windows} windows of {spec.seconds / spec.windows:.1f} s, taken in turn with those it is compared to",
        "",
        f"{'decode only, 1 core':<46}{'images/s':>10}",
    ]
    notes = {PIL_FULL: "  <- the reference", TURBO_FULL: "", TURBO_SCALED: "  (what the pipeline decodes)"}
    lines += [f"  {name:<44}{rate:10.1f}{notes[name]}" for name, rate in decode.items()]
    lines += ["", f"{'full pipeline (read .. batch)':<30}{'images/s':>10}{'per core':>10}{'PIL, 1 core':>13}"
                  f"{'vs it':>8}{'vs scaled decode':>18}{'PIL at W cores':>16}{'vs it':>8}"]
    ratios = {}
    for workers, (rate, reference) in measured.items():
        cores = max(workers, 1)
        label = f"{workers} worker{'' if workers == 1 else 's'} ({cores} core{'' if cores == 1 else 's'})"
        per_core = rate / cores
        ratios[workers] = per_core / at_parallelism[workers]
        lines.append(f"  {label:<28}{rate:10.1f}{per_core:10.1f}{reference:13.1f}{per_core / reference:8.1%}"
                     f"{per_core / scaled:18.1%}{at_parallelism[workers]:16.1f}{ratios[workers]:8.1%}")
    lines += ["", "PIL, 1 core: its full-size decode in windows taken in turn with the pipeline's (the reference).",
              f"target: per core >= {spec.target:.0%} of PIL's full-size decode rate at the same number of "
              f"cores: " + ", ".join(f"{workers} worker{'' if workers == 1 else 's'} "
                                    f"{'met' if ratio >= spec.target else 'NOT met'} ({ratio:.1%})"
                                    for workers, ratio in ratios.items())
              + ". The pipeline decodes at a reduced DCT scale where its crop allows; the PIL reference always "
              "decodes at full size."]
    return lines
