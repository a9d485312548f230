"""The emoji converter on a fake node_modules that mirrors the real packages' layout: join keys, captions,
the split by emoji, ids and labels, skip reasons, baselines and the CLI. No network."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vlp_jax.data import records
from vlp_jax.datasets import emoji

# key -> (datasource unified code, emojibase hexcode, emojilib characters, openmoji hexcode, CLDR label, CLDR tags,
#         emojilib keywords, short names, Unicode name, openmoji tags)
EMOJI = {
    "1F501": ("1F501", "1F501", "\U0001f501", "1F501", "repeat button", ["arrow", "button", "clockwise", "repeat"],
              ["repeat_button", "loop", "arrow", ":)"], ["repeat"],
              "CLOCKWISE RIGHTWARDS AND LEFTWARDS OPEN CIRCLE ARROWS", "cycle"),
    "0023-20E3": ("0023-FE0F-20E3", "0023-FE0F-20E3", "#\ufe0f\u20e3", "0023-FE0F-20E3", "keycap: #", ["keycap"],
                  ["keycap_", "hash", "keycap"], ["hash"], "HASH KEY", ""),
    "00A9": ("00A9-FE0F", "00A9", "\u00a9\ufe0f", "00A9", "copyright", ["c", "copyright"],
             ["copyright", "license"], ["copyright"], "COPYRIGHT SIGN", ""),
    "1F600": ("1F600", "1F600", "\U0001f600", "1F600", "grinning face", ["face", "grin"],
              ["grinning_face", "smile"], ["grinning"], "GRINNING FACE", "smile, happy"),
    "1F4A9": ("1F4A9", "1F4A9", "\U0001f4a9", None, "pile of poo", ["dung", "poo"],
              ["pile_of_poo", "poop"], ["hankey", "poop", "shit"], "PILE OF POO", ""),
    "1F680": ("1F680", "1F680", "\U0001f680", "1F680", "rocket", ["rocket", "space"],
              ["rocket", "launch"], ["rocket"], "ROCKET", "space"),
}
EVAL_FRACTION = 0.5  # puts 1F501, 1F4A9 and 1F680 in eval, the rest in train (sha256 of the key)
MISSING_TWITTER = "1F600"  # its Twitter PNG is absent
CORRUPT_GOOGLE = "1F4A9"  # its Google PNG is not an image; OpenMoji does not list it
BROKEN_SVG = "1F680"  # its SVG does not parse


def colour_png(index: int, mode: str = "RGBA") -> bytes:
    """A 64 px PNG of a flat colour unique to one emoji, on a transparent border like the real artwork."""
    image = Image.new(mode, (64, 64), (0, 0, 0, 0) if mode == "RGBA" else (255, 255, 255))
    image.paste((40 * index % 256, 90 * index % 256, 200 - 30 * index, 255), (8, 8, 56, 56))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def fake_rasteriser(svg: str, side: int) -> bytes:
    """Renders the fake SVGs: each holds its emoji's colour index in a <desc>; invalid markup raises ValueError."""
    if not svg.startswith("<svg"):
        raise ValueError("not an SVG")
    return colour_png(int(svg.split("<desc>")[1].split("<")[0]))


def write_json(path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture
def npm_dir(tmp_path):
    """A node_modules with the six EMOJI in the real packages' file layout and field names."""
    modules = tmp_path / "npm" / "node_modules"
    datasource, cldr, emojilib, openmoji = [], [], {}, []
    for index, (key, row) in enumerate(EMOJI.items()):
        unified, hexcode, chars, openmoji_hex, label, tags, keywords, short_names, name, openmoji_tags = row
        image = f"{unified.lower()}.png"
        datasource.append(dict(name=name, unified=unified, image=image, short_name=short_names[0],
                               short_names=short_names, has_img_google=True, has_img_twitter=True))
        cldr.append(dict(label=label, hexcode=hexcode, tags=tags, emoji=chars))
        emojilib[chars] = keywords
        for style in ("google", "twitter"):
            folder = modules / f"emoji-datasource-{style}" / "img" / style / "64"
            folder.mkdir(parents=True, exist_ok=True)
            if not (style == "twitter" and key == MISSING_TWITTER):
                data = b"not a png" if (style == "google" and key == CORRUPT_GOOGLE) else colour_png(index)
                (folder / image).write_bytes(data)
        if openmoji_hex:
            openmoji.append(dict(hexcode=openmoji_hex, annotation=label, openmoji_tags=openmoji_tags))
            svg = "{broken" if key == BROKEN_SVG else f'<svg viewBox="0 0 72 72"><desc>{index}</desc></svg>'
            svg_path = modules / "openmoji" / "color" / "svg" / f"{openmoji_hex}.svg"
            svg_path.parent.mkdir(parents=True, exist_ok=True)
            svg_path.write_text(svg, encoding="utf-8")
    write_json(modules / emoji.DATASOURCE_JSON, datasource)
    write_json(modules / emoji.EMOJIBASE_JSON, cldr)
    write_json(modules / emoji.EMOJILIB_JSON, emojilib)
    write_json(modules / emoji.OPENMOJI_JSON, openmoji)
    for package in emoji.PACKAGES:
        write_json(modules / package / "package.json", {"name": package, "version": "1.0.0"})
    return tmp_path / "npm"


def convert(npm_dir, out, **kwargs) -> tuple[emoji.Report, dict[str, list[records.ImageTextRecord]]]:
    report = emoji.convert_emoji(npm_dir, out, eval_fraction=EVAL_FRACTION, records_per_shard=4, **kwargs)
    return report, {split: list(records.read_split(out, split)) for split in emoji.SPLITS}


def test_keys_drop_fe0f_and_pad_to_four_digits():
    assert emoji.hex_key("0023-fe0f-20e3") == "0023-20E3"
    assert emoji.hex_key("a9") == "00A9"
    assert emoji.char_key("#\ufe0f\u20e3") == "0023-20E3"
    assert emoji.char_key("\u00a9\ufe0f") == emoji.hex_key("00A9-FE0F") == "00A9"


def test_captions_are_distinct_natural_and_lower_case(npm_dir):
    by_key = {item.key: item for item in emoji.load_emoji(npm_dir)}
    assert list(by_key) == list(EMOJI)  # every source joined, FE0F and padding included
    assert by_key["1F501"].captions == (
        "repeat button",
        "arrow, button, clockwise, repeat",
        "repeat button, loop, arrow",  # the emoticon ':)' is not a keyword
        "repeat",
        "clockwise rightwards and leftwards open circle arrows",
        "cycle",
    )
    assert by_key["0023-20E3"].captions == ("keycap: #", "keycap", "keycap, hash", "hash", "hash key")
    assert by_key["1F4A9"].captions[3] == "hankey, poop, shit"
    assert by_key["1F600"].captions[-1] == "smile, happy"
    assert (by_key["1F501"].label, by_key["1F501"].keywords) == ("repeat button", "arrow, button, clockwise, repeat")


def test_records_ids_labels_split_by_emoji_and_skips(npm_dir, tmp_path):
    report, by_split = convert(npm_dir, tmp_path / "shards", rasterise=fake_rasteriser)
    split_of_emoji = {}
    for split, split_records in by_split.items():
        for record in split_records:
            key, style = record.labels["emoji"], record.labels["style"]
            assert record.id == f"{key}-{style}" and record.tags == [style] and record.split == split
            assert split_of_emoji.setdefault(key, split) == split  # every style of an emoji in one split
            assert Image.open(io.BytesIO(record.image)).size == (64, 64)
    assert split_of_emoji == {key: emoji.split_of(key, EVAL_FRACTION) for key in EMOJI}
    assert {split for split in split_of_emoji.values()} == {"train", "eval"}

    ids = {record.id for split_records in by_split.values() for record in split_records}
    assert len(ids) == 6 * 3 - 4
    assert {"1F600-twitter", "1F4A9-google", "1F4A9-openmoji", "1F680-openmoji"}.isdisjoint(ids)
    assert report.skipped == {"missing_image": 2, "bad_image": 1, "bad_svg": 1}
    assert report.images == {"google": 5, "twitter": 5, "openmoji": 4}
    assert report.emoji == {"train": 3, "eval": 3} and report.records == {"train": 8, "eval": 6}
    google = next(r for r in by_split["eval"] if r.id == "1F501-google")
    assert google.image == (npm_dir / "node_modules" / emoji.PNG_DIRS["google"] / "1f501.png").read_bytes()
    assert google.captions[0] == "repeat button"
    saved = json.loads((tmp_path / "shards" / emoji.REPORT_NAME).read_text())
    assert saved["skipped"] == report.skipped and saved["versions"]["openmoji"] == "1.0.0"
    assert records.verify_manifest(tmp_path / "shards")["splits"]["train"]["num_records"] == 8


def test_without_a_rasteriser_openmoji_images_are_skipped_but_its_tags_kept(npm_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(emoji, "svg_rasteriser", lambda: None)
    report, by_split = convert(npm_dir, tmp_path / "shards")
    assert report.skipped["no_rasteriser"] == 5 and "openmoji" not in report.images
    captions = {r.labels["emoji"]: r.captions for split_records in by_split.values() for r in split_records}
    assert captions["1F501"][-1] == "cycle"
    assert "no_rasteriser: 5" in report.summary()


def test_resvg_renders_an_openmoji_svg():
    rasterise = emoji.svg_rasteriser()
    if rasterise is None:
        pytest.skip("resvg-py (the [emoji] extra) is not installed")
    svg = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72">'
           '<circle cx="36" cy="36" r="30" fill="red"/></svg>')
    image = Image.open(io.BytesIO(rasterise(svg, 32)))
    assert image.size == (32, 32)
    assert image.convert("RGBA").getpixel((16, 16)) == (255, 0, 0, 255)
    assert image.convert("RGBA").getpixel((0, 0))[3] == 0  # transparent outside the artwork


def test_baselines_find_identical_art_and_rank_text_by_trigrams(npm_dir):
    items = emoji.load_emoji(npm_dir)
    results = emoji.baselines(items, EVAL_FRACTION, rasterise=fake_rasteriser)
    # Same colour in both styles: raw pixels find the pair. Only 1F501 has a usable Google and OpenMoji image.
    assert results["google→twitter"] == {"i2i_r1": 100.0, "i2i_r5": 100.0, "i2i_r10": 100.0, "count": 2}
    assert results["google→openmoji"]["count"] == 1
    assert results["label→keywords"]["count"] == 3
    assert results["label→keywords"]["t2t_r1"] == 100.0  # each label shares words with its own keywords only
    tfidf = emoji.trigram_tfidf(["repeat button", "repeat", "rocket"])
    np.testing.assert_allclose(np.linalg.norm(tfidf, axis=1), 1.0, rtol=1e-6)
    assert tfidf[0] @ tfidf[1] > tfidf[0] @ tfidf[2]


def test_cli_writes_shards_and_prints_report_and_baselines(npm_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert emoji.main([f"--npm-dir={npm_dir}", f"--out={out}", "--eval-fraction=0.5", "--baselines"]) == 0
    printed = capsys.readouterr().out
    assert "emoji: 6 (train: 3 emoji" in printed and "unimodal baselines" in printed
    assert set(records.read_manifest(out)["splits"]) == {"train", "eval"}


def test_the_old_module_path_runs_the_same_command():
    old = subprocess.run([sys.executable, "-m", "vlp_jax.data.emoji", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert old.returncode == 0 and old.stdout.startswith("usage: python -m vlp_jax.datasets.emoji ")


def test_missing_package_is_a_clear_error(tmp_path, capsys):
    assert emoji.main([f"--npm-dir={tmp_path}", f"--out={tmp_path / 'out'}"]) == 2
    error = capsys.readouterr().err
    assert str(tmp_path / "node_modules" / emoji.DATASOURCE_JSON) in error and "make data-emoji" in error


def test_a_package_file_of_the_wrong_shape_is_a_clear_error(npm_dir, tmp_path):
    (npm_dir / "node_modules" / emoji.EMOJILIB_JSON).write_text("[]", encoding="utf-8")
    with pytest.raises(emoji.EmojiSourceError, match="emoji-en-US.json holds a JSON list, expected a dict"):
        emoji.load_emoji(npm_dir)


def test_emoji_config_groups_every_style_of_an_emoji_in_eval(npm_dir, tmp_path):
    from configs import clip
    from vlp_jax.data import pipeline

    out = tmp_path / "shards"
    convert(npm_dir, out, rasterise=fake_rasteriser)
    config = clip.get_config("emoji")
    assert config.data.train_sources == f"{clip.EMOJI_SHARDS}:train" and config.data.group_label == "emoji"
    config.data.train_sources, config.data.eval_sources = f"{out}:train", f"{out}:eval"
    config.data.tokenizer.vocab_size = 64
    eval_data = pipeline.load_eval(config, tmp_path / "workdir")
    # eval: 1F501 in three styles, 1F4A9 in one (Twitter), 1F680 in two (no OpenMoji): groups of 3, 1 and 2.
    assert sorted(np.bincount(eval_data.image_groups).tolist()) == [1, 2, 3]
    assert eval_data.images.shape[1:] == (32, 32, 3)
