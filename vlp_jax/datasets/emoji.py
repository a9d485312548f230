"""Emoji artwork with human-written names and keywords, as image-text ArrayRecord shards: `make data-emoji`.

    python -m vlp_jax.datasets.emoji --npm-dir=DIR --out=DIR [--eval-fraction=0.1] [--svg-size=64]
        [--records-per-shard=N] [--baselines]

DIR (--npm-dir) is an npm prefix whose node_modules holds the packages `make data-emoji` installs (pinned there):
emoji-datasource (the emoji list, short names, Unicode names), emoji-datasource-google and -twitter (64 px PNGs),
openmoji (SVGs and `openmoji_tags`), emojibase-data (CLDR labels and keywords) and emojilib (keyword lists).

Every source is joined on one key: the code-point sequence in upper-case hex, at least four digits per code
point, U+FE0F (emoji presentation selector) dropped, e.g. "1F501", "0023-20E3" for "#️⃣". The emoji are those of
emoji-datasource (skin-tone variants excluded: they would be near-identical images of different emoji). Each emoji
gets every distinct caption of: its CLDR label ("repeat button"), its CLDR keywords ("arrow, button, clockwise,
repeat"), its emojilib keywords, its short names, its Unicode name and its OpenMoji tags, lower-cased.

One record per emoji and art style: id "<key>-<style>", the image bytes (Google/Twitter PNGs as stored, with
alpha; OpenMoji SVGs rendered to --svg-size px PNGs with resvg-py, the `[emoji]` extra), tags [style] and labels
{"emoji": key, "style": style}. The split is chosen per emoji from a hash of its key, so every style of an emoji
lands in the same split. Images that cannot be used are skipped and counted by reason (SKIP_REASONS);
`<out>/emoji_report.json` keeps the counts and the package versions read.

--baselines prints the unimodal baselines a trained model must beat, on the eval split: raw-pixel cosine
image→image retrieval (same emoji in another style) and character-trigram TF-IDF text→text retrieval (CLDR
label → CLDR keyword list).
"""

import argparse
import collections
import dataclasses
import hashlib
import io
import json
import sys
from collections.abc import Callable, Iterable

import numpy as np
from etils import epath
from PIL import Image

from vlp_jax.data.records import ImageTextRecord, write_records
from vlp_jax.data.skips import SkipLog, SkipRecord

STYLES = ("google", "twitter", "openmoji")
SPLITS = ("train", "eval")
SKIP_REASONS = {
    "missing_image": "the package lists no image of this emoji in this style, or its file is absent",
    "bad_image": "image bytes that PIL cannot decode",
    "no_rasteriser": "OpenMoji ships SVG only and no SVG rasteriser is installed (pip install -e '.[emoji]')",
    "bad_svg": "an SVG that the rasteriser cannot render",
}
VARIATION_SELECTOR_16 = 0xFE0F
DEFAULT_EVAL_FRACTION = 0.1
DEFAULT_SVG_SIZE = 64  # the size of the Google and Twitter PNGs
DEFAULT_RECORDS_PER_SHARD = 2000
BASELINE_PIXELS = 32  # raw-pixel baseline compares images at this side length
BASELINE_IMAGE_PAIRS = (("google", "twitter"), ("google", "openmoji"))
BASELINE_RECALL_KS = (1, 5, 10)  # the recalls the baselines report, as retrieval evaluation does
TRIGRAM = 3
REPORT_NAME = "emoji_report.json"
EXAMPLES_PER_REASON = 5

# Where each package keeps what is read from it, relative to node_modules.
DATASOURCE_JSON = "emoji-datasource/emoji.json"
PNG_DIRS = {"google": "emoji-datasource-google/img/google/64", "twitter": "emoji-datasource-twitter/img/twitter/64"}
OPENMOJI_JSON = "openmoji/data/openmoji.json"
OPENMOJI_SVG_DIR = "openmoji/color/svg"
EMOJIBASE_JSON = "emojibase-data/en/data.json"
EMOJILIB_JSON = "emojilib/dist/emoji-en-US.json"
PACKAGES = (
    "emoji-datasource", "emoji-datasource-google", "emoji-datasource-twitter", "openmoji", "emojibase-data", "emojilib",
)


class EmojiSourceError(ValueError):
    """A package file that is missing or not in the expected layout; the message names the path and the fix."""


@dataclasses.dataclass(frozen=True)
class Emoji:
    """One emoji joined across the packages: its key, its captions, and the image file of each style."""

    key: str  # e.g. "1F501"
    captions: tuple[str, ...]
    images: dict[str, epath.Path]  # style -> PNG or SVG file named by its package (it may still be absent)
    label: str  # CLDR label, lower-case
    keywords: str  # CLDR keywords joined by ", " ("" if it has none)


@dataclasses.dataclass
class Report:
    """What a conversion wrote and skipped, for the closing summary and emoji_report.json."""

    emoji: dict[str, int] = dataclasses.field(default_factory=dict)  # split -> emoji count
    records: dict[str, int] = dataclasses.field(default_factory=dict)  # split -> record count
    images: dict[str, int] = dataclasses.field(default_factory=dict)  # style -> images written
    captions_per_emoji: float = 0.0
    skips: SkipLog = dataclasses.field(default_factory=lambda: SkipLog(EXAMPLES_PER_REASON, log=False))
    versions: dict[str, str] = dataclasses.field(default_factory=dict)  # package -> version read

    @property
    def skipped(self) -> dict[str, int]:
        return self.skips.counts

    def to_json(self) -> dict:
        """The content of emoji_report.json."""
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self) if field.name != "skips"}
        return fields | self.skips.to_json()

    def summary(self) -> str:
        per_split = ", ".join(f"{s}: {self.emoji.get(s, 0)} emoji / {self.records.get(s, 0)} records" for s in SPLITS)
        per_style = ", ".join(f"{style} {self.images.get(style, 0)}" for style in STYLES)
        lines = [
            f"emoji: {sum(self.emoji.values())} ({per_split}); {self.captions_per_emoji:.2f} captions per emoji",
            f"images per style: {per_style}; skipped {sum(self.skipped.values())}",
        ]
        return "\n".join(lines + self.skips.summary(SKIP_REASONS))


# ---------------------------------------------------------------- keys, captions, split


def hex_key(hexcode: str) -> str:
    """'0023-fe0f-20e3' -> '0023-20E3': upper-case, four digits at least, U+FE0F dropped."""
    points = (int(part, 16) for part in hexcode.replace("_", "-").split("-"))
    return "-".join(f"{point:04X}" for point in points if point != VARIATION_SELECTOR_16)


def char_key(text: str) -> str:
    """The key of an emoji given as characters ('#️⃣' -> '0023-20E3')."""
    return "-".join(f"{ord(char):04X}" for char in text if ord(char) != VARIATION_SELECTOR_16)


def _phrase(text: str) -> str:
    """Lower-case words separated by single spaces; snake_case names become words ('repeat_button')."""
    return " ".join(text.replace("_", " ").lower().split())


def keyword_caption(keywords: Iterable[str]) -> str:
    """Distinct keywords as one comma list ('arrow, button, clockwise'); keywords with no letter or digit
    (emoticons such as ':)') are dropped."""
    words = (_phrase(keyword) for keyword in keywords)
    return ", ".join(dict.fromkeys(w for w in words if any(c.isalnum() for c in w)))


def build_captions(
    label: str, tags: list[str], keywords: list[str], short_names: list[str], unicode_name: str, openmoji_tags: str
) -> tuple[str, ...]:
    """The distinct non-empty captions of an emoji, most specific first (the CLDR label leads)."""
    candidates = (
        _phrase(label),
        keyword_caption(tags),
        keyword_caption(keywords),
        keyword_caption(short_names),
        _phrase(unicode_name),
        keyword_caption(openmoji_tags.split(",")),
    )
    return tuple(dict.fromkeys(caption for caption in candidates if caption))


def split_of(key: str, eval_fraction: float) -> str:
    """'eval' for a stable pseudo-random `eval_fraction` of the keys, else 'train' (sha256 of the key)."""
    position = int.from_bytes(hashlib.sha256(key.encode("ascii")).digest()[:8], "big") / 2**64  # uniform in [0, 1)
    return "eval" if position < eval_fraction else "train"


# ---------------------------------------------------------------- reading the packages


def _load_json(node_modules: epath.Path, relative: str, kind: type):
    """The JSON content of one package file, which must be a `kind` (list or dict) at the top level."""
    path = node_modules / relative
    if not path.exists():
        raise EmojiSourceError(
            f"{path} does not exist: --npm-dir must be an npm prefix holding node_modules/{relative.split('/')[0]} "
            "(`make data-emoji` installs the pinned packages into data/emoji/npm)"
        )
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise EmojiSourceError(f"{path} is not valid JSON ({error}); reinstall it with `make data-emoji`") from error
    if not isinstance(content, kind):
        raise EmojiSourceError(
            f"{path} holds a JSON {type(content).__name__}, expected a {kind.__name__}; is this the package "
            "version that `make data-emoji` pins?"
        )
    return content


def _fields(path: str, entry, required: tuple[str, ...]) -> dict:
    """The entry itself once it is a dict holding `required`; else an EmojiSourceError naming the file."""
    if not isinstance(entry, dict) or any(name not in entry for name in required):
        raise EmojiSourceError(
            f"{path}: entry {str(entry)[:80]!r} lacks {', '.join(required)}; is this the package version that "
            "`make data-emoji` pins?"
        )
    return entry


def _by_hexcode(node_modules: epath.Path, relative: str, required: tuple[str, ...]) -> dict[str, dict]:
    """The entries of a JSON list keyed by hex_key of their "hexcode"."""
    entries = (_fields(relative, entry, required) for entry in _load_json(node_modules, relative, list))
    return {hex_key(entry["hexcode"]): entry for entry in entries}


def node_modules_of(npm_dir: epath.PathLike) -> epath.Path:
    """`<npm_dir>/node_modules`, or npm_dir itself when it already is a node_modules folder."""
    npm_dir = epath.Path(npm_dir)
    return npm_dir if npm_dir.name == "node_modules" else npm_dir / "node_modules"


def package_versions(node_modules: epath.Path) -> dict[str, str]:
    """The version in each package's package.json ('missing' when absent)."""
    versions = {}
    for package in PACKAGES:
        manifest = node_modules / package / "package.json"
        exists = manifest.exists()
        versions[package] = json.loads(manifest.read_text(encoding="utf-8"))["version"] if exists else "missing"
    return versions


def load_emoji(npm_dir: epath.PathLike) -> list[Emoji]:
    """Joins the packages under `npm_dir` into Emoji, in emoji-datasource order."""
    node_modules = node_modules_of(npm_dir)
    datasource = _load_json(node_modules, DATASOURCE_JSON, list)
    cldr = _by_hexcode(node_modules, EMOJIBASE_JSON, ("hexcode", "label"))
    emojilib = {char_key(chars): words for chars, words in _load_json(node_modules, EMOJILIB_JSON, dict).items()}
    openmoji = _by_hexcode(node_modules, OPENMOJI_JSON, ("hexcode",))
    emoji = []
    for entry in datasource:
        entry = _fields(DATASOURCE_JSON, entry, ("unified", "name", "image", "short_names"))
        key = hex_key(entry["unified"])
        label = cldr.get(key, {}).get("label", "")
        tags = cldr.get(key, {}).get("tags", [])
        openmoji_entry = openmoji.get(key, {})
        captions = build_captions(
            label, tags, emojilib.get(key, []), entry["short_names"], entry["name"],
            openmoji_entry.get("openmoji_tags", ""),
        )
        images = {style: node_modules / folder / entry["image"] for style, folder in PNG_DIRS.items()}
        if openmoji_entry:
            images["openmoji"] = node_modules / OPENMOJI_SVG_DIR / f"{openmoji_entry['hexcode']}.svg"
        emoji.append(Emoji(key, captions, images, _phrase(label), keyword_caption(tags)))
    return emoji


# ---------------------------------------------------------------- images


def svg_rasteriser() -> Callable[[str, int], bytes] | None:
    """A function (svg text, side) -> PNG bytes, or None when resvg-py (the `[emoji]` extra) is not installed."""
    try:
        import resvg_py
    except ImportError:
        return None
    return lambda svg, side: bytes(resvg_py.svg_to_bytes(svg_string=svg, width=side, height=side))


def _checked_png(data: bytes) -> bytes:
    """`data` unchanged once PIL decodes it fully; raises SkipRecord('bad_image') otherwise."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError) for bad bytes
        raise SkipRecord("bad_image", f"{type(error).__name__}: {error}") from None
    return data


def image_bytes(path: epath.Path, rasterise: Callable[[str, int], bytes] | None, svg_size: int) -> bytes:
    """The PNG bytes to store for one image file: a PNG as stored, an SVG rendered; raises SkipRecord."""
    if not path.exists():
        raise SkipRecord("missing_image", str(path))
    if path.suffix != ".svg":
        return _checked_png(path.read_bytes())
    if rasterise is None:
        raise SkipRecord("no_rasteriser")
    try:
        return _checked_png(rasterise(path.read_text(encoding="utf-8"), svg_size))
    except (ValueError, UnicodeDecodeError) as error:
        raise SkipRecord("bad_svg", f"{path.name}: {error}") from None


# ---------------------------------------------------------------- conversion


def emoji_records(
    emoji: list[Emoji], eval_fraction: float, svg_size: int, report: Report,
    rasterise: Callable[[str, int], bytes] | None,
) -> dict[str, list[ImageTextRecord]]:
    """The records of every emoji and style, by split; skipped images are counted in `report`."""
    by_split = {split: [] for split in SPLITS}
    for item in emoji:
        split = split_of(item.key, eval_fraction)
        report.emoji[split] = report.emoji.get(split, 0) + 1
        for style in STYLES:
            record_id = f"{item.key}-{style}"
            try:
                if style not in item.images:
                    raise SkipRecord("missing_image", "not in the package's list")
                data = image_bytes(item.images[style], rasterise, svg_size)
            except SkipRecord as skip:
                report.skips.add(skip.at("", record_id))
                continue
            report.images[style] = report.images.get(style, 0) + 1
            by_split[split].append(
                ImageTextRecord(
                    id=record_id, image=data, captions=list(item.captions), tags=[style], split=split,
                    labels={"emoji": item.key, "style": style},
                )
            )
    report.captions_per_emoji = sum(len(item.captions) for item in emoji) / max(len(emoji), 1)
    return by_split


def convert_emoji(
    npm_dir: epath.PathLike,
    out_dir: epath.PathLike,
    *,
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
    svg_size: int = DEFAULT_SVG_SIZE,
    records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
    rasterise: Callable[[str, int], bytes] | None = None,
) -> Report:
    """Writes the train and eval shards, manifest.json and emoji_report.json into `out_dir`.

    `rasterise` renders OpenMoji SVGs; by default resvg-py when installed (else those images are skipped).
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    rasterise = rasterise or svg_rasteriser()
    report = Report(versions=package_versions(node_modules_of(npm_dir)))
    by_split = emoji_records(load_emoji(npm_dir), eval_fraction, svg_size, report, rasterise)
    out_dir = epath.Path(out_dir)
    for split, split_records in by_split.items():
        write_records(split_records, out_dir, split, records_per_shard)
        report.records[split] = len(split_records)
    (out_dir / REPORT_NAME).write_text(json.dumps(report.to_json(), indent=1) + "\n", encoding="utf-8")
    return report


# ---------------------------------------------------------------- unimodal baselines


def _normalised(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def pixel_vector(png: bytes, side: int = BASELINE_PIXELS) -> np.ndarray:
    """An image as float32 [side * side * 3] pixels, alpha composited onto white, resized with a box filter."""
    with Image.open(io.BytesIO(png)) as image:
        rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, "white")
    canvas.alpha_composite(rgba)
    small = canvas.convert("RGB").resize((side, side), Image.Resampling.BOX)
    return np.asarray(small, np.float32).reshape(-1) / 255.0


def trigram_tfidf(texts: list[str]) -> np.ndarray:
    """L2-normalised character-trigram TF-IDF rows [len(texts), vocabulary] (smooth idf, as scikit-learn)."""
    grams = [collections.Counter(padded[i : i + TRIGRAM] for i in range(len(padded) - TRIGRAM + 1))
             for padded in (f" {text} " for text in texts)]
    vocabulary = {gram: index for index, gram in enumerate(sorted(set().union(*grams)))}
    counts = np.zeros((len(texts), len(vocabulary)), np.float32)
    for row, text_grams in enumerate(grams):
        for gram, count in text_grams.items():
            counts[row, vocabulary[gram]] = count
    document_frequency = np.count_nonzero(counts, axis=0)
    idf = np.log((1 + len(texts)) / (1 + document_frequency)) + 1
    return _normalised(counts * idf.astype(np.float32))


def paired_recalls(direction: str, queries: np.ndarray, gallery: np.ndarray) -> dict[str, float]:
    """{f"{direction}_r{k}": percent of queries i whose gallery row i is among the k best by dot product} for k in
    BASELINE_RECALL_KS; every other row scoring at least as high ranks ahead (ties count against the query, as in
    evaluate/retrieval.py). Dense: the baselines' sets are a few hundred rows."""
    scores = queries.astype(np.float64) @ gallery.astype(np.float64).T  # [n, n]
    ranks = (scores >= np.diag(scores)[:, None]).sum(axis=1)  # 1-based: the pair itself and every row tied or ahead
    return {f"{direction}_r{k}": 100.0 * float(np.mean(ranks <= k)) for k in BASELINE_RECALL_KS}


def baselines(
    emoji: list[Emoji], eval_fraction: float = DEFAULT_EVAL_FRACTION, svg_size: int = DEFAULT_SVG_SIZE,
    rasterise: Callable[[str, int], bytes] | None = None,
) -> dict[str, dict[str, float]]:
    """Unimodal recalls (percent) on the eval emoji: raw-pixel cosine image→image for each style pair in
    BASELINE_IMAGE_PAIRS ("i2i_r1", ...), and trigram TF-IDF text→text from CLDR label to CLDR keyword list
    ("t2t_r1", ...).

    Each task uses the eval emoji that have both sides (e.g. a Google and a Twitter image); "count" says how many.
    The gallery is those emoji's other side; ties count pessimistically (paired_recalls).
    """
    rasterise = rasterise or svg_rasteriser()
    eval_emoji = [item for item in emoji if split_of(item.key, eval_fraction) == "eval"]
    results = {}
    for query_style, gallery_style in BASELINE_IMAGE_PAIRS:
        pairs = []  # (query vector, gallery vector) per eval emoji with both images
        for item in eval_emoji:
            try:
                pair = [pixel_vector(image_bytes(item.images[style], rasterise, svg_size))
                        for style in (query_style, gallery_style) if style in item.images]
            except SkipRecord:
                continue
            if len(pair) == 2:
                pairs.append(pair)
        if pairs:
            queries, gallery = (_normalised(np.stack(side)) for side in zip(*pairs, strict=True))
            results[f"{query_style}→{gallery_style}"] = {**paired_recalls("i2i", queries, gallery), "count": len(pairs)}
    texts = [(item.label, item.keywords) for item in eval_emoji if item.label and item.keywords]
    if texts:
        tfidf = trigram_tfidf([text for pair in texts for text in pair])  # rows: label, keywords, label, ...
        results["label→keywords"] = {**paired_recalls("t2t", tfidf[0::2], tfidf[1::2]), "count": len(texts)}
    return results


def format_baselines(results: dict[str, dict[str, float]]) -> str:
    """One line per task: its recalls and how many eval emoji it covers."""
    width = max(len(name) for name in results)
    lines = []
    for name, metrics in results.items():
        recall_cells = "  ".join(f"{key} {value:5.1f}%" for key, value in metrics.items() if key != "count")
        lines.append(f"{name.ljust(width)}  {recall_cells}  ({metrics['count']} eval emoji)")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


class _ArgumentParser(argparse.ArgumentParser):
    """Reports a usage error as one line naming the flag, exit code 2."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _ArgumentParser(prog="python -m vlp_jax.datasets.emoji", description=__doc__.split("\n")[0])
    parser.add_argument("--npm-dir", "--npm_dir", dest="npm_dir", required=True,
                        help="npm prefix (or its node_modules) holding the emoji packages")
    parser.add_argument("--out", help="output folder for the shards (local or any etils.epath path)")
    parser.add_argument("--eval-fraction", "--eval_fraction", dest="eval_fraction", type=float,
                        default=DEFAULT_EVAL_FRACTION, help="fraction of the emoji held out for evaluation")
    parser.add_argument("--svg-size", "--svg_size", dest="svg_size", type=int, default=DEFAULT_SVG_SIZE,
                        help="side in pixels of the rendered OpenMoji images")
    parser.add_argument("--records-per-shard", "--records_per_shard", dest="records_per_shard", type=int,
                        default=DEFAULT_RECORDS_PER_SHARD)
    parser.add_argument("--baselines", action="store_true",
                        help="print the raw-pixel and trigram TF-IDF retrieval baselines on the eval split")
    args = parser.parse_args(argv)
    if not args.out and not args.baselines:
        parser.error("give --out=DIR to write shards, --baselines to print the baselines, or both")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if svg_rasteriser() is None:
        print("note: resvg-py is not installed, so OpenMoji (SVG only) images are skipped; "
              "`pip install -e '.[emoji]'` adds them", file=sys.stderr)
    try:
        if args.out:
            report = convert_emoji(args.npm_dir, args.out, eval_fraction=args.eval_fraction,
                                   svg_size=args.svg_size, records_per_shard=args.records_per_shard)
            print(f"{report.summary()}\nwrote {args.out}")
        if args.baselines:
            results = baselines(load_emoji(args.npm_dir), args.eval_fraction, args.svg_size)
            print(f"unimodal baselines on the eval split:\n{format_baselines(results)}")
    except (EmojiSourceError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
