"""The grain pipeline: round trip, every bad input skipped with its count and log line, exact resume, disjoint
process slices, determinism, mixing weights, noisy pairs, the world's shard cache, the tokenizer CLI, tfds."""

import io
import logging
import os

import msgpack
import numpy as np
import pytest
from PIL import Image

from configs import clip
from tests.helpers import tiny_config
from vlp_jax.data import examples, loader, pipeline, records, sources, synthetic, tokenizer, train_stream, transforms
from vlp_jax.data.records import ImageTextRecord
from vlp_jax.data.skips import SkipLog, Skipped
from vlp_jax.data.world_shards import WorldSource, cached_shards

SIZE = 8  # image side of these tests' records and batches
MAX_LEN = 12


def image_bytes(value: int, size: int = SIZE, mode: str = "RGB", image_format: str = "PNG") -> bytes:
    """A solid image whose pixels all equal `value` (so a batch row names its record, whatever the crop)."""
    image = Image.new(mode, (size, size), value)
    encoded = io.BytesIO()
    image.save(encoded, image_format)
    return encoded.getvalue()


def numbered_records(count: int, offset: int = 0) -> list[ImageTextRecord]:
    """Record i: a grey image of value offset + i and three captions naming i."""
    return [ImageTextRecord(id=f"r{offset + i}", image=image_bytes(offset + i),
                            captions=[f"item {offset + i}", f"thing {offset + i}", f"object {offset + i}"])
            for i in range(count)]


def image_options(**overrides) -> transforms.ImageOptions:
    settings = dict(size=SIZE, max_pixels=10_000, background=(255, 255, 255), crop_scale=(0.5, 1.0),
                    crop_ratio=(3 / 4, 4 / 3), crop_tries=10, resample=transforms.RESAMPLING["bilinear"])
    return transforms.ImageOptions(**{**settings, **overrides})


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    texts = [f"{word} {i}" for word in ("item", "thing", "object", "caption") for i in range(200)]
    return tokenizer.train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "t.model", vocab_size=64)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """48 numbered records in 3 shards."""
    out = tmp_path_factory.mktemp("numbered")
    records.write_records(numbered_records(48), out, "train", records_per_shard=16)
    return out


def make_iterator(parts, word_tokenizer, global_batch=8, seed=0, process_index=0, process_count=1, weights=None,
                  options=None, **image_overrides):
    prepare = examples.TrainExamples(image_options(**image_overrides), word_tokenizer, MAX_LEN, noisy=False)
    source = train_stream.TrainSource(parts, weights or [1.0] * len(parts), prepare)
    return train_stream.TrainIterator(source, global_batch, seed, process_index, process_count,
                                      options or loader.LoaderOptions(skip_log_limit=5))


def open_dir(path, split="train"):
    return sources.open_source(sources.SourceSpec(str(path), split, 1.0), "test")


def record_numbers(batch) -> list[int]:
    return batch["image"][:, 0, 0, 0].tolist()


def test_round_trip_from_shards_to_batches(dataset_dir, word_tokenizer):
    batches = make_iterator([open_dir(dataset_dir)], word_tokenizer)
    epoch = [next(batches) for _ in range(6)]  # 48 records / 8
    numbers = [n for batch in epoch for n in record_numbers(batch)]
    assert sorted(numbers) == list(range(48))
    for batch in epoch:
        assert batch["image"].shape == (8, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
        assert batch["text"].shape == (8, MAX_LEN) and batch["text"].dtype == np.int32
        for number, text in zip(record_numbers(batch), word_tokenizer.decode(batch["text"]), strict=True):
            assert text in {f"item {number}", f"thing {number}", f"object {number}"}
        assert (batch["image"] == batch["image"][:, :1, :1, :]).all()  # a solid image stays solid under crops
    eval_set = loader.read_pairs([open_dir(dataset_dir)], examples.EvalExamples(image_options(), word_tokenizer,
                                                                                MAX_LEN), loader.LoaderOptions(),
                                 "test eval")
    assert eval_set.images[:, 0, 0, 0].tolist() == list(range(48)) and eval_set.image_groups is None
    assert word_tokenizer.decode(eval_set.captions[:3]) == ["item 0", "thing 0", "object 0"]
    assert eval_set.caption_image.tolist() == np.repeat(np.arange(48), 3).tolist()


def test_each_epoch_draws_new_captions_and_crops(tmp_path, word_tokenizer):
    value_grid = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4  # every pixel differs: crops are visible
    encoded = io.BytesIO()
    Image.fromarray(np.stack([value_grid] * 3, axis=-1)).save(encoded, "PNG")
    one = [ImageTextRecord("only", encoded.getvalue(), [f"item {i}" for i in range(10)])]
    records.write_records(one * 8, tmp_path, "train", records_per_shard=8)
    batches = make_iterator([open_dir(tmp_path)], word_tokenizer)
    first, second = next(batches), next(batches)
    assert len({t.tobytes() for t in np.concatenate([first["text"], second["text"]])}) > 3
    assert not np.array_equal(first["image"], second["image"])


def test_train_image_transform_is_a_random_resized_crop_within_the_configured_ranges():
    options = image_options(size=4, crop_scale=(0.25, 0.5), crop_ratio=(0.5, 2.0))
    rng = np.random.default_rng(0)
    for _ in range(200):
        x0, y0, x1, y1 = transforms.random_crop_box(40, 30, options, rng)
        assert 0 <= x0 < x1 <= 40 and 0 <= y0 < y1 <= 30
        assert 0.25 - 1e-9 <= (x1 - x0) * (y1 - y0) / 1200 <= 0.5 + 1e-9
        assert 0.5 - 1e-9 <= (x1 - x0) / (y1 - y0) <= 2.0 + 1e-9
    assert transforms.centre_square_box(40, 30) == (5, 0, 35, 30)
    wide = Image.new("RGB", (40, 30), (9, 9, 9))
    wide.paste((200, 0, 0), (0, 0, 5, 30))  # a red band outside the centre square
    assert (transforms.crop_resize(wide, transforms.centre_square_box(40, 30), options) == 9).all()


@pytest.mark.parametrize("mode,value,expected", [
    ("L", 77, (77, 77, 77)),
    ("1", 1, (255, 255, 255)),
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ("I;16", 65535, (255, 255, 255)),
    ("I;16", 257 * 40, (40, 40, 40)),
    ("RGBA", (10, 20, 30, 0), (255, 255, 255)),  # fully transparent: the background
    ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
    ("LA", (50, 255), (50, 50, 50)),
])
def test_every_image_mode_becomes_rgb(mode, value, expected):
    image_format = "JPEG" if mode == "CMYK" else "PNG"
    decoded = transforms.decode_image(image_bytes(value, mode=mode, image_format=image_format), 10_000,
                                      (255, 255, 255))
    pixels = np.asarray(decoded)
    assert decoded.mode == "RGB" and pixels.dtype == np.uint8
    np.testing.assert_allclose(pixels[4, 4], expected, atol=2)  # JPEG may be off by a level


def test_jpegs_decode_with_libjpeg_turbo_at_a_reduced_dct_scale_like_pil_at_full_size():
    yy, xx = np.mgrid[0:96, 0:128]
    smooth = np.stack([xx * 2, yy * 2, (xx + yy)], axis=-1).astype(np.uint8)  # gradients: little JPEG loss
    encoded = io.BytesIO()
    Image.fromarray(smooth).save(encoded, "JPEG", quality=95)
    options = image_options(size=16, max_pixels=20_000)
    turbo = transforms.eval_image(encoded.getvalue(), options)  # 96 px tall -> decoded at 1/4 scale (24 px)
    full = transforms.decode_image(encoded.getvalue(), 20_000, (255, 255, 255))  # PIL, full size
    reference = transforms.crop_resize(full, transforms.centre_square_box(128, 96), options)
    assert turbo.shape == (16, 16, 3) and np.abs(turbo.astype(int) - reference).mean() < 3
    grey = transforms.eval_image(image_bytes(90, size=16, mode="L", image_format="JPEG"), options)
    assert np.abs(grey.astype(int) - 90).max() <= 2


def test_reduced_scale_decode_maps_an_off_centre_crop_box_like_a_full_decode():
    yy, xx = np.mgrid[0:96, 0:128]
    smooth = np.stack([xx * 2, yy * 2, 255 - xx - yy], axis=-1).astype(np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(smooth).save(encoded, "JPEG", quality=95)
    options = image_options(size=16, max_pixels=20_000)
    box = (70.0, 8.5, 118.0, 60.5)  # 48 x 52 px: at 1/2 scale 24 x 26 px, the smallest power of 2 leaving >= 16
    pixels, scaled = transforms.turbo_decode_for_box(encoded.getvalue(), 128, 96, box, options)
    assert pixels.shape[:2] == (48, 64) and scaled == tuple(v * 0.5 for v in box)
    full = transforms.decode_image(encoded.getvalue(), 20_000, (255, 255, 255))
    reference = transforms.crop_resize(full, box, options)
    assert np.abs(transforms.crop_resize(pixels, scaled, options).astype(int) - reference).mean() < 3


def test_opencv_resizer_matches_pils_antialiased_resize_on_a_smooth_image():
    yy, xx = np.mgrid[0:150, 0:200]
    smooth = np.stack([xx, yy, (xx + yy) // 2], axis=-1).astype(np.uint8)
    box = (10.0, 5.0, 190.0, 140.0)  # 180 x 135 -> 64: block-averaged 2x, then 1.05x / 1.41x interpolated
    fast = transforms.crop_resize(smooth, box, image_options(size=64))
    pil = transforms.crop_resize(smooth, box, image_options(size=64, resizer="pil"))
    assert fast.shape == pil.shape == (64, 64, 3) and fast.dtype == np.uint8
    assert np.abs(fast.astype(int) - pil).mean() < 1.0


def test_opencv_resizer_averages_blocks_before_a_large_downscale_instead_of_aliasing():
    yy, xx = np.mgrid[0:700, 0:900]
    stripes = np.repeat((((xx + yy) % 2) * 255).astype(np.uint8)[..., None], 3, axis=-1)  # 1-px checkerboard
    out = transforms.crop_resize(stripes, (0.0, 0.0, 900.0, 700.0), image_options(size=64))
    assert np.abs(out.astype(float) - 127.5).max() <= 3  # plain bilinear sampling would give 0s and 255s
    options = transforms.ImageOptions.from_config(tiny_config().data.image, 16)
    assert options.resizer == "opencv"
    bad = tiny_config().data.image
    bad.resizer = "cv2"
    with pytest.raises(ValueError, match=r"config.data.image.resizer='cv2'; use one of \['opencv', 'pil'\]"):
        transforms.ImageOptions.from_config(bad, 16)


def test_palette_with_transparency_is_composited_over_the_background():
    palette = Image.new("P", (SIZE, SIZE), 0)
    palette.putpalette([0, 0, 255] + [0, 255, 0] * 255)
    palette.paste(1, (0, 0, 4, SIZE))  # left half colour 1, made transparent below
    encoded = io.BytesIO()
    palette.save(encoded, "PNG", transparency=1)
    pixels = np.asarray(transforms.decode_image(encoded.getvalue(), 10_000, (7, 8, 9)))
    assert pixels[0, 0].tolist() == [7, 8, 9] and pixels[0, 7].tolist() == [0, 0, 255]


def bad_records() -> tuple[list, dict[str, int]]:
    """Encoded records, one per kind of bad input, and the skip counts they must produce."""
    good = image_bytes(3)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(noise).save(encoded, "JPEG")
    jpeg = encoded.getvalue()  # its header is a small part: cut at 80%, the scan data is truncated

    def encode(record_id, image, captions):
        return records.encode_record(ImageTextRecord(record_id, image, captions))

    bad = [
        encode("truncated", jpeg[: len(jpeg) * 4 // 5], ["a caption"]),
        encode("zero-bytes", b"", ["a caption"]),
        encode("not-an-image", b"this is text, not pixels", ["a caption"]),
        encode("bomb", image_bytes(1, size=200), ["a caption"]),  # 40,000 pixels > the 10,000 cap
        encode("blank-captions", good, ["", "   "]),
        msgpack.packb({"v": 1, "id": "bad-utf8", "img": good, "cap": [b"\xff\xfe"]}, use_bin_type=False),
        msgpack.packb({"v": 1, "id": "no-image", "cap": ["a caption"]}, use_bin_type=True),
    ]
    expected = {"truncated_image": 1, "empty_image": 1, "not_an_image": 1, "too_many_pixels": 1,
                "empty_caption": 1, "bad_utf8": 1, "missing_field": 1}
    return bad, expected


def corrupt_a_record(path) -> None:
    """Zeroes 16 bytes among a shard's first records (they start after the 64-byte file signature): that chunk
    fails its checksum while the index at the end of the file stays readable."""
    data = bytearray(path.read_bytes())
    data[512:528] = bytes(16)
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    """Shard 0: 16 good records and every bad record; shard 1: 16 good records, one of them then corrupted."""
    out = tmp_path_factory.mktemp("bad")
    bad, _ = bad_records()
    good = [records.encode_record(r) for r in numbered_records(32)]
    records.write_shard(out / "bad-00000.array_record", good[:16] + bad)
    records.write_shard(out / "bad-00001.array_record", good[16:])
    corrupt_a_record(out / "bad-00001.array_record")
    return out


def expected_skips(part) -> dict[str, int]:
    _, expected = bad_records()
    corrupt = sum(isinstance(item, Skipped) and item.reason == "corrupt_shard"
                  for item in (part[i] for i in range(len(part))))
    assert corrupt >= 1  # the records of the damaged chunk(s)
    return {**expected, "corrupt_shard": corrupt}


def test_bad_records_are_skipped_counted_and_logged(bad_dir, word_tokenizer, caplog):
    part = sources.open_source(sources.SourceSpec(str(bad_dir / "bad-*.array_record"), "train", 1.0), "test")
    expected = expected_skips(part)
    skips = SkipLog(limit=5)
    with caplog.at_level(logging.WARNING):
        pairs = loader.read_pairs([part], examples.EvalExamples(image_options(), word_tokenizer, MAX_LEN),
                                  loader.LoaderOptions(), "test", skips)
    assert dict(skips.counts) == expected  # each record read once: exact counts
    assert sorted(pairs.images[:, 0, 0, 0].tolist()) == sorted(set(pairs.images[:, 0, 0, 0].tolist()))
    assert len(pairs) == len(part) - sum(expected.values())
    log = caplog.text
    shard = bad_dir / "bad-00000.array_record"
    for position, (record_id, reason) in enumerate([
        ("truncated", "truncated_image"), ("zero-bytes", "empty_image"), ("not-an-image", "not_an_image"),
        ("bomb", "too_many_pixels"), ("blank-captions", "empty_caption"), ("bad-utf8", "bad_utf8"),
        ("no-image", "missing_field"),
    ], start=16):
        assert f"skipped record {record_id} at {shard} #{position}: {reason}: " in log
    assert f"at {bad_dir / 'bad-00001.array_record'} #2: corrupt_shard: Corrupted Riegeli" in log
    assert "config.data.image.max_pixels=10,000" in log


def test_training_skips_bad_records_and_counts_them(bad_dir, word_tokenizer, caplog):
    part = sources.open_source(sources.SourceSpec(str(bad_dir / "bad-*.array_record"), "train", 1.0), "test")
    expected = expected_skips(part)
    batches = make_iterator([part], word_tokenizer, global_batch=4)
    with caplog.at_level(logging.WARNING):
        while batches.get_state()["next_index"]["0"] < len(part):  # at least one whole epoch
            numbers = record_numbers(next(batches))
            assert set(numbers) <= set(range(32))  # only good records reach a batch
    metrics = batches.skip_metrics()  # what train.py adds to the scalars at each log step
    counts = {key.removeprefix("data/skipped/"): value for key, value in metrics.items()}
    assert all(key.startswith("data/skipped/") for key in metrics) and counts.keys() == expected.keys()
    assert all(expected[reason] <= counts[reason] <= 2 * expected[reason] for reason in expected)  # < 2 epochs
    assert "skipped record bomb at " in caplog.text


def test_sources_that_cannot_be_read_are_clear_errors_at_start(tmp_path, dataset_dir):
    with pytest.raises(FileNotFoundError, match=r"test: the glob .*/nothing-\*\.array_record matches no file"):
        sources.open_source(sources.SourceSpec(str(tmp_path / "nothing-*.array_record"), "train", 1.0), "test")
    truncated = tmp_path / "truncated.array_record"
    truncated.write_bytes((dataset_dir / "train-00000-of-00003.array_record").read_bytes()[:500])
    with pytest.raises(records.ShardError, match=rf"{truncated} is not a readable ArrayRecord file"):
        sources.open_source(sources.SourceSpec(str(truncated), "train", 1.0), "test")
    with pytest.raises(records.ManifestError, match="manifest.json does not exist"):
        sources.open_source(sources.SourceSpec(str(tmp_path), "train", 1.0), "config.data.train_sources")
    with pytest.raises(records.ManifestError, match="has no split 'val'"):
        open_dir(dataset_dir, split="val")


def test_source_specs_parse_paths_splits_weights_and_tfds():
    parsed = sources.parse_specs("/data/coco:val@2, gs://b/x/*.array_record@0.5, tfds:coco:train[:10%], synthetic",
                                 "train", "flag")
    assert [(s.location, s.split, s.weight) for s in parsed] == [
        ("/data/coco", "val", 2.0), ("gs://b/x/*.array_record", "train", 0.5), ("tfds:coco", "train[:10%]", 1.0),
        ("synthetic", "train", 1.0)]
    with pytest.raises(ValueError, match="flag is empty"):
        sources.parse_specs(" ", "train", "flag")


def test_restored_iterator_yields_the_same_batches(dataset_dir, word_tokenizer):
    reference = make_iterator([open_dir(dataset_dir)], word_tokenizer)
    expected = [next(reference) for _ in range(14)]  # 6 batches per epoch: crosses two epoch boundaries
    interrupted = make_iterator([open_dir(dataset_dir)], word_tokenizer)
    for _ in range(9):  # mid-epoch
        next(interrupted)
    state = interrupted.get_state()
    assert state == {"next_index": {"0": 72}, "batches": 9, "skipped": {}}
    resumed = make_iterator([open_dir(dataset_dir)], word_tokenizer)
    resumed.set_state(state)
    for want in expected[9:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["text"], want["text"])


def test_restore_continues_the_skip_counts(bad_dir, word_tokenizer):
    part = sources.open_source(sources.SourceSpec(str(bad_dir / "bad-00000.array_record"), "train", 1.0), "test")
    first = make_iterator([part], word_tokenizer, global_batch=4)
    for _ in range(8):
        next(first)
    state = first.get_state()
    resumed = make_iterator([part], word_tokenizer, global_batch=4)
    resumed.set_state(state)
    for _ in range(4):
        np.testing.assert_array_equal(next(resumed)["image"], next(first)["image"])
    assert resumed.get_state() == first.get_state()


def test_two_processes_read_disjoint_slices_that_cover_each_epoch_once(dataset_dir, word_tokenizer):
    single = make_iterator([open_dir(dataset_dir)], word_tokenizer)
    hosts = [make_iterator([open_dir(dataset_dir)], word_tokenizer, process_index=p, process_count=2)
             for p in range(2)]
    for _ in range(2):  # two epochs of 6 global batches
        epoch = []
        for _ in range(6):
            halves = [next(host) for host in hosts]
            assert len(halves[0]["image"]) == 4
            assert not set(record_numbers(halves[0])) & set(record_numbers(halves[1]))
            whole = next(single)  # a global batch holds the same examples whatever the process count
            assert sorted(record_numbers(halves[0]) + record_numbers(halves[1])) == sorted(record_numbers(whole))
            texts = np.concatenate([h["text"] for h in halves])
            assert sorted(map(bytes, texts)) == sorted(map(bytes, whole["text"]))
            epoch += record_numbers(halves[0]) + record_numbers(halves[1])
        assert sorted(epoch) == list(range(48))


def test_same_seed_same_order_other_seed_other_order(dataset_dir, word_tokenizer):
    def first_epoch(seed):
        batches = make_iterator([open_dir(dataset_dir)], word_tokenizer, seed=seed)
        return [n for _ in range(6) for n in record_numbers(next(batches))]

    assert first_epoch(3) == first_epoch(3)
    assert first_epoch(3) != first_epoch(4) and sorted(first_epoch(4)) == list(range(48))


def test_mixing_weights_are_honoured(tmp_path, word_tokenizer):
    records.write_records(numbered_records(60), tmp_path / "a", "train", records_per_shard=64)
    records.write_records(numbered_records(60, offset=100), tmp_path / "b", "train", records_per_shard=64)
    batches = make_iterator([open_dir(tmp_path / "a"), open_dir(tmp_path / "b")], word_tokenizer, weights=[3, 1])
    numbers = [n for _ in range(8) for n in record_numbers(next(batches))]
    from_a = sum(n < 100 for n in numbers)
    assert from_a == 48 and len(set(numbers)) == 64  # exactly 3:1, no element repeated within the mixture epoch


def test_worker_processes_give_the_same_batches(dataset_dir, word_tokenizer):
    in_process = make_iterator([open_dir(dataset_dir)], word_tokenizer)
    workers = make_iterator([open_dir(dataset_dir)], word_tokenizer, options=loader.LoaderOptions(worker_count=2))
    try:
        for _ in range(3):
            np.testing.assert_array_equal(next(workers)["text"], next(in_process)["text"])
        state = workers.get_state()
        after = next(workers)
        workers.set_state(state)
        np.testing.assert_array_equal(next(workers)["image"], after["image"])
    finally:
        workers.close()


def test_worker_chunks_give_the_in_process_batches_and_skip_counts(bad_dir, word_tokenizer):
    part = sources.open_source(sources.SourceSpec(str(bad_dir / "bad-*.array_record"), "train", 1.0), "test")
    in_process = make_iterator([part], word_tokenizer, global_batch=4)
    workers = make_iterator([part], word_tokenizer, global_batch=4,
                            options=loader.LoaderOptions(worker_count=2, worker_buffer=2))
    try:
        for _ in range(12):  # batches made of rows of several chunks, around skipped records
            np.testing.assert_array_equal(next(workers)["image"], next(in_process)["image"])
        assert workers.get_state() == in_process.get_state()
    finally:
        workers.close()


def test_data_benchmark_reports_decode_and_pipeline_rates(tmp_path):
    from vlp_jax.data import benchmark

    spec = benchmark.DataBenchmark(count=8, size=(96, 64), quality=90, workers=(0,), batch=4, seconds=0.2,
                                   data_dir=str(tmp_path / "shards"), windows=2)
    lines = benchmark.run(tiny_config(), spec)
    rates = {line.split("  ")[1].strip(): line for line in lines if line.startswith("  ")}
    assert {benchmark.PIL_FULL, benchmark.TURBO_FULL, benchmark.TURBO_SCALED, "0 workers (1 core)"} <= set(rates)
    rate, per_core, reference, ratio = rates["0 workers (1 core)"].split()[4:8]
    assert float(rate) == float(per_core) > 0 and float(reference) > 0
    assert ratio == f"{float(per_core) / float(reference):.1%}"
    assert lines[-1].startswith("target: per core >= 70% of PIL's full-size decode rate at the same number of cores: "
                                "0 workers ")


def test_parallel_decode_baseline_runs_every_process_and_counts_per_core(tmp_path):
    from vlp_jax.data import benchmark

    rng = np.random.default_rng(0)
    jpegs = [benchmark.photo_like_jpeg(rng, 96, 64, 90) for _ in range(4)]
    spec = benchmark.DataBenchmark(count=4, size=(96, 64), quality=90, workers=(2,), batch=4, seconds=0.2, windows=1)
    two = benchmark.parallel_pil_rate(jpegs, 2, spec, str(tmp_path))
    one = benchmark.decode_rates(jpegs, transforms.ImageOptions.from_config(tiny_config().data.image, 32), spec)
    # Per core, two processes decode at a rate of the same order as one (not the sum of both, not a fraction).
    assert 0.25 * one[benchmark.PIL_FULL] < two < 4 * one[benchmark.PIL_FULL]


def world_config(tmp_path, noise_fraction):
    config = tiny_config(batch_size=16)
    config.data.train_size, config.data.eval_size = 96, 16
    config.data.world.noise_fraction = noise_fraction
    config.data.world_dir = str(tmp_path / "worlds")
    return config


def test_noisy_pairs_carry_their_flag_into_training_batches(tmp_path):
    config = world_config(tmp_path, noise_fraction=0.25)
    data = pipeline.load(config, tmp_path)
    flags = np.concatenate([next(data.train)["noisy"] for _ in range(6)])  # one epoch
    split = synthetic.make_split(config.data.world, "train", 96)
    assert flags.dtype == bool and flags.sum() == split.noisy.sum() and 10 <= split.noisy.sum() <= 40
    for index in np.flatnonzero(split.noisy):
        assert split.captions[index] != list(split.scenes[index].captions)
    assert not synthetic.make_split(config.data.world, "eval", 16).noisy.any()
    clean = pipeline.load(world_config(tmp_path, noise_fraction=0.0), tmp_path / "clean")
    assert "noisy" not in next(clean.train)


def test_world_shards_are_cached_by_config(tmp_path):
    world = synthetic.default_config()
    first = cached_shards(world, {"train": 8, "eval": 4}, tmp_path)
    stamp = os.stat(first / records.MANIFEST_NAME).st_mtime_ns
    assert cached_shards(world, {"train": 8, "eval": 4}, tmp_path) == first
    assert os.stat(first / records.MANIFEST_NAME).st_mtime_ns == stamp  # reused, not rewritten
    world.seed = 1
    assert cached_shards(world, {"train": 8, "eval": 4}, tmp_path) != first
    stored = list(records.read_split(first, "train"))
    rendered = synthetic.make_split(synthetic.default_config(), "train", 8)
    for record, image, captions in zip(stored, rendered.images, rendered.captions, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(record.image))), image)  # lossless
        assert record.captions == captions and record.boxes.shape == (3, 4)
        assert set(record.labels) == {"ve", "vqa", "rec"}  # the world's downstream ground truth


@pytest.mark.parametrize("storage", ["lazy", "shards"])
def test_world_size_does_not_depend_on_train_steps(tmp_path, storage):
    """A resumed run may change train.steps: the world's training split stays the same records."""
    splits = []
    for steps in (1, 1000):
        config = tiny_config(steps=steps, batch_size=16)
        config.data.train_size, config.data.eval_size = 64, 8
        config.data.world_storage = storage
        [part], _ = pipeline.open_sources(config, "train", tmp_path / f"steps-{steps}")
        splits.append([part[index].record for index in range(len(part))])
    assert len(splits[0]) == len(splits[1]) == 64  # 1 step x 16 would have capped it at 16
    assert splits[0] == splits[1]
    assert (tmp_path / "steps-1" / "data").exists() == (storage == "shards")  # lazy writes nothing


def test_the_lazy_world_holds_the_records_of_its_shards(tmp_path):
    """Rendered on demand or read back from the cached shards, a world (noisy pairs included) is the same records,
    byte for byte; its captions come without rendering."""
    world = synthetic.default_config()
    world.noise_fraction = 0.3
    lazy = WorldSource(world, "train", 24)
    stored = list(records.read_split(cached_shards(world, {"train": 24}, tmp_path), "train"))
    assert [lazy[index].record for index in range(24)] == stored
    assert [lazy.captions_at(index) for index in range(24)] == [record.captions for record in stored]
    assert sum(record.labels["noisy"] for record in stored) > 0
    with pytest.raises(IndexError, match="scene 24 of a 24-scene train split"):
        lazy[24]


def test_an_unknown_world_storage_names_the_flag(tmp_path):
    config = tiny_config()
    config.data.world_storage = "disk"
    with pytest.raises(ValueError, match="config.data.world_storage='disk'; use one of lazy, shards"):
        pipeline.open_sources(config, "train", tmp_path)


def test_eval_image_groups_come_from_the_group_label(tmp_path, word_tokenizer):
    styles = [ImageTextRecord(f"e{i}", image_bytes(i), [f"item {i // 2}"], labels={"group": f"emoji-{i // 2}"})
              for i in range(6)]
    records.write_records(styles, tmp_path, "eval", records_per_shard=8)
    prepare = examples.EvalExamples(image_options(), word_tokenizer, MAX_LEN, group_label="group")
    pairs = loader.read_pairs([open_dir(tmp_path, "eval")], prepare, loader.LoaderOptions(), "test")
    assert pairs.image_groups.tolist() == [0, 0, 1, 1, 2, 2]
    ungrouped = examples.EvalExamples(image_options(), word_tokenizer, MAX_LEN)
    assert loader.read_pairs([open_dir(tmp_path, "eval")], ungrouped, loader.LoaderOptions(), "test"
                             ).image_groups is None


def test_tokenizer_cli_trains_from_shards(dataset_dir, tmp_path, capsys):
    out = tmp_path / "cli.model"
    assert tokenizer.main(["train", f"--shards={dataset_dir}", "--vocab-size=64", f"--out={out}"]) == 0
    trained = tokenizer.Tokenizer(out)
    assert trained.decode(trained.encode(["item 7"], 8)) == ["item 7"]
    assert f"--config.data.tokenizer.path={out}" in capsys.readouterr().out
    assert tokenizer.main(["train", f"--shards={tmp_path}/none-*", "--vocab-size=64", f"--out={out}"]) == 2
    assert "matches no file" in capsys.readouterr().err


def test_tfds_array_record_source_reads_without_tensorflow(tmp_path, word_tokenizer):
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyPairs(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "captions": tfds.features.Sequence(tfds.features.Text()),
            })
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(12):
                yield i, {"image": image_bytes(i), "captions": [f"item {i}", f"thing {i}"]}

    TinyPairs(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    tfds_config = sources.default_tfds_config()
    tfds_config.data_dir = str(tmp_path)
    (spec,) = sources.parse_specs("tfds:tiny_pairs", "train", "test")
    part = sources.open_source(spec, "test", tfds_config)
    batches = make_iterator([part], word_tokenizer, global_batch=4)
    numbers = [n for _ in range(3) for n in record_numbers(next(batches))]
    assert sorted(numbers) == list(range(12))
    assert "tensorflow" not in __import__("sys").modules
    with pytest.raises(FileNotFoundError, match="tfds dataset 'missing'"):
        sources.open_source(sources.SourceSpec("tfds:missing", "train", 1.0), "test", tfds_config)


def test_a_tfds_classification_set_without_captions_is_a_zero_shot_task_with_its_class_names(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from vlp_jax.evaluate import labelled

    colours = ["red", "green", "blue"]

    class TinyLabels(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=colours),
                "file_name": tfds.features.Text(),
            })
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"validation": self._generate_examples()}

        def _generate_examples(self):
            for i in range(9):
                yield i, {"image": image_bytes(i), "label": colours[i % 3], "file_name": f"img{i}.png"}

    TinyLabels(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    config = tiny_config()
    config.data.tfds.data_dir = str(tmp_path)
    (spec,) = sources.parse_specs("tfds:tiny_labels:validation", "eval", "test")
    part = sources.open_source(spec, "test", config.data.tfds)
    assert not part.has_captions and part.class_names("label") == tuple(colours) and part.class_names("x") is None
    record = part[4].record
    assert record.captions == [] and record.labels == {"label": 1, "file_name": "img4.png"}
    settings = labelled.default_task()
    settings.update(dict(source="tfds:tiny_labels:validation", label_field="label"))
    task, skipped = labelled.load_task("tiny", settings, config)
    assert task.class_names == tuple(colours) and not skipped
    assert sorted(task.labels.tolist()) == sorted(i % 3 for i in range(9))
    assert task.images.shape == (9, config.model.image.image_size, config.model.image.image_size, 3)


def test_training_on_the_world_alone_takes_whole_image_crops():
    config = clip.get_config("tiny")  # the real-data crop: 0.8-1 of the area, aspect 0.9-1.1
    assert tuple(config.data.image.crop_scale) == (0.8, 1.0)
    whole = pipeline.train_image_options(config)
    assert (whole.crop_scale, whole.crop_ratio) == ((1.0, 1.0), (1.0, 1.0))
    config.data.train_sources = "synthetic,/data/mine@0.5"  # any real source: the configured crop
    mixed = pipeline.train_image_options(config)
    assert (mixed.crop_scale, mixed.crop_ratio) == ((0.8, 1.0), (0.9, 1.1))
    config.data.train_sources = "synthetic"
    config.data.image.world_whole_image = False
    assert pipeline.train_image_options(config).crop_scale == (0.8, 1.0)
