"""Image decoding and the train/eval image transforms: stored bytes -> uint8 [size, size, 3], or SkipRecord.

The crop box is chosen from the header alone, then the pixels are decoded. RGB and greyscale JPEGs (nearly all
photographs) are decoded by libjpeg-turbo through simplejpeg, scaled down in the DCT by the largest power of two
(1/2, 1/4, 1/8) that still leaves the crop at least `size` pixels on each side. (libjpeg-turbo's other n/8 scales
use slow generic IDCTs: measured no faster than a full decode, often slower.) Every other image goes
through PIL, which makes any mode RGB: CMYK, YCbCr, greyscale and 1-bit are converted; palette and alpha images
are composited over a configured background colour (a transparent emoji must not become a black square); 16-bit
and 32-bit integer pixels are scaled down to 8 bits. The pixel cap is checked on the header, before any pixel is
decompressed, so a decompression bomb costs nothing.

The crop is then resized to size x size by one of two resizers (`config.data.image.resizer`):
- "opencv" (the default): OpenCV's SIMD resize. A crop still at least twice the output size on its short side (a
  PNG, or a JPEG already at 1/8) is first averaged over whole k x k pixel blocks (an exact box filter), which leaves
  less than 2x to go there; the rest is plain interpolation at the output's sample points (`resample`), the way TF's
  tf.image.resize does by default (big_vision's preprocessing). About 8x faster than PIL's resize: what brings the
  pipeline to a bare decode's speed (`python -m vlp_jax.bench data`).
- "pil": PIL's antialiased resize, whose filter widens with the scale factor (open_clip/torchvision's).

Train images get a random resized crop (area fraction and aspect ratio drawn from the config, as in Inception /
CLIP preprocessing) and eval images a centre crop of the largest square. There is no horizontal flip: it would
contradict every left/right caption.
"""

import dataclasses
import io
import math
import warnings

import cv2
import ml_collections
import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from vlp_jax.data.skips import SkipRecord

# Why decode_image rejects bytes (SkipRecord reasons); the pipeline counts skipped records under these names.
IMAGE_REASONS = ("empty_image", "not_an_image", "too_many_pixels", "truncated_image")
RESAMPLING = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
              "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
_OPENCV_INTERPOLATION = {Image.Resampling.NEAREST: cv2.INTER_NEAREST, Image.Resampling.BILINEAR: cv2.INTER_LINEAR,
                         Image.Resampling.BICUBIC: cv2.INTER_CUBIC, Image.Resampling.LANCZOS: cv2.INTER_LANCZOS4}
RESIZERS = ("opencv", "pil")
_DCT_SCALES = (8, 4, 2)  # the divisors libjpeg-turbo decodes fast, largest first
cv2.setNumThreads(1)  # the loader parallelises over records; OpenCV's own thread pool would only compete with it
_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # integer greyscale, up to 16 significant bits
_MODES_WITH_ALPHA = ("RGBA", "LA", "La", "RGBa", "PA")
_JPEG_START = b"\xff\xd8"  # SOI marker
_TURBO_COLOURSPACES = ("YCbCr", "Gray", "RGB")  # JPEGs libjpeg-turbo turns into RGB itself (not CMYK/YCCK)
Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """`config.data.image` read once into plain values (workers call the transforms per record)."""

    size: int  # output side in pixels (config.model.image.image_size)
    max_pixels: int  # larger images are skipped as possible decompression bombs
    background: tuple[int, int, int]  # RGB that transparent pixels are composited over
    crop_scale: tuple[float, float]  # area fraction of a random resized crop
    crop_ratio: tuple[float, float]  # aspect ratio (width / height) of a random resized crop
    crop_tries: int  # draws before a random resized crop falls back to a centre crop
    resample: Image.Resampling
    resizer: str = "opencv"  # one of RESIZERS
    fast_jpeg: bool = False  # libjpeg-turbo's fast integer IDCT and plain chroma upsampling (a little less exact)

    @classmethod
    def from_config(cls, image: ml_collections.ConfigDict, size: int) -> "ImageOptions":
        if image.resample not in RESAMPLING:
            raise ValueError(f"config.data.image.resample={image.resample!r}; use one of {sorted(RESAMPLING)}")
        if image.resizer not in RESIZERS:
            raise ValueError(f"config.data.image.resizer={image.resizer!r}; use one of {list(RESIZERS)}")
        low, high = image.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"config.data.image.crop_scale={tuple(image.crop_scale)}: need 0 < low <= high <= 1")
        low, high = image.crop_ratio
        if not 0 < low <= high:
            raise ValueError(f"config.data.image.crop_ratio={tuple(image.crop_ratio)}: need 0 < low <= high")
        return cls(
            size=size,
            max_pixels=image.max_pixels,
            background=tuple(image.background),
            crop_scale=tuple(image.crop_scale),
            crop_ratio=tuple(image.crop_ratio),
            crop_tries=image.crop_tries,
            resample=RESAMPLING[image.resample],
            resizer=image.resizer,
            fast_jpeg=image.fast_jpeg,
        )


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Reads only the header of ``data``; raises SkipRecord for empty, unknown or oversized images."""
    if not data:
        raise SkipRecord("empty_image", "zero image bytes")
    try:
        with warnings.catch_warnings():  # the size is checked below against our own cap
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise SkipRecord("too_many_pixels", str(error)) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise SkipRecord("not_an_image", f"{len(data)} bytes that PIL cannot identify: {error}") from error
    _check_pixels(*image.size, max_pixels)
    return image


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise SkipRecord(
            "too_many_pixels",
            f"{width}x{height} = {width * height:,} pixels exceeds config.data.image.max_pixels={max_pixels:,}",
        )


def load_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Decodes the pixels and converts any mode to 8-bit RGB; raises SkipRecord if the data is truncated or bad."""
    try:
        image.load()
        return _to_rgb(image, background)
    except (OSError, SyntaxError, ValueError, EOFError) as error:  # PIL's ways of saying the stream is broken
        raise SkipRecord("truncated_image", f"{image.format} {image.size[0]}x{image.size[1]}: {error}") from error


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _INTEGER_MODES:
        pixels = np.asarray(image, dtype=np.int64)
        # Sixteen significant bits (PNG/TIFF) are scaled to eight; anything wider is clipped first.
        image = Image.fromarray((np.clip(pixels, 0, 65535) // 257).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in _MODES_WITH_ALPHA:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, max_pixels: int, background: tuple[int, int, int]) -> Image.Image:
    """Stored image bytes -> RGB PIL image; raises SkipRecord with a reason when they are not a usable image."""
    return load_rgb(open_image(data, max_pixels), background)


def random_crop_box(width: int, height: int, options: ImageOptions, rng: np.random.Generator) -> Box:
    """A box covering a random area fraction and aspect ratio of the image (Inception-style random resized crop).

    Draws up to ``crop_tries`` (area, ratio) pairs, log-uniform in ratio, and places the first that fits at a
    uniform position; if none fits, the largest centred box whose ratio lies in ``crop_ratio``.
    """
    area, (low, high) = width * height, options.crop_scale
    log_low, log_high = math.log(options.crop_ratio[0]), math.log(options.crop_ratio[1])
    draws = rng.random(2 * options.crop_tries + 2).tolist()  # one generator call (per-call overhead dominates)
    for scale, log_ratio in zip(draws[0:-2:2], draws[1:-2:2], strict=True):
        target = area * (low + (high - low) * scale)
        ratio = math.exp(log_low + (log_high - log_low) * log_ratio)
        crop_w, crop_h = math.sqrt(target * ratio), math.sqrt(target / ratio)
        if crop_w <= width and crop_h <= height:
            x0, y0 = draws[-2] * (width - crop_w), draws[-1] * (height - crop_h)
            return (x0, y0, x0 + crop_w, y0 + crop_h)
    ratio = min(max(width / height, options.crop_ratio[0]), options.crop_ratio[1])
    crop_w, crop_h = (width, width / ratio) if width / height <= ratio else (height * ratio, height)
    return _centred(width, height, crop_w, crop_h)


def centre_square_box(width: int, height: int) -> Box:
    """The largest centred square: with a resize, the same as resizing the short side then centre-cropping."""
    side = min(width, height)
    return _centred(width, height, side, side)


def _centred(width: int, height: int, crop_w: float, crop_h: float) -> Box:
    x0, y0 = (width - crop_w) / 2, (height - crop_h) / 2
    return (x0, y0, x0 + crop_w, y0 + crop_h)


def crop_resize(image: Image.Image | np.ndarray, box: Box, options: ImageOptions) -> np.ndarray:
    """The ``box`` of ``image`` (rounded to whole pixels) resized to size x size: uint8 [size, size, 3].

    Cropped before resizing: PIL's resize(box=...) would let its filter read pixels outside the box. Whole images
    already at size are returned as they are, pixel for pixel.
    """
    size = options.size
    height, width = image.shape[:2] if isinstance(image, np.ndarray) else image.size[::-1]
    x0, y0, x1, y1 = pixel_box(box, width, height)
    if options.resizer == "opencv":
        pixels = image if isinstance(image, np.ndarray) else np.asarray(image)
        return opencv_resize(pixels[y0:y1, x0:x1], size, _OPENCV_INTERPOLATION[options.resample])
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image[y0:y1, x0:x1])
    elif (x0, y0, x1, y1) != (0, 0, width, height):
        image = image.crop((x0, y0, x1, y1))
    if image.size != (size, size):
        image = image.resize((size, size), options.resample)
    return np.asarray(image)


def pixel_box(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """The whole pixels crop_resize takes for ``box`` in a width x height image: rounded, at least one pixel."""
    x0, y0 = min(round(box[0]), width - 1), min(round(box[1]), height - 1)
    return x0, y0, max(round(box[2]), x0 + 1), max(round(box[3]), y0 + 1)


def opencv_resize(pixels: np.ndarray, size: int, interpolation: int) -> np.ndarray:
    """uint8 [h, w, 3] -> [size, size, 3]. Where the short side is >= 2 x size, whole k x k blocks are averaged
    first (k = short side // size; the < k rows/columns left over are trimmed evenly from both edges), leaving
    less than 2x to go on the short side (< 2x the aspect ratio on the long one); then ``interpolation``. (OpenCV
    averages square blocks fast; k x j blocks take it ten times longer.)"""
    height, width = pixels.shape[:2]
    block = min(height, width) // size
    if block > 1:
        top, left = height % block // 2, width % block // 2
        pixels = pixels[top:top + height - height % block, left:left + width - width % block]
        pixels = cv2.resize(pixels, (width // block, height // block), interpolation=cv2.INTER_AREA)
    if pixels.shape[:2] == (size, size):
        return np.ascontiguousarray(pixels)
    return cv2.resize(pixels, (size, size), interpolation=interpolation)


def turbo_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG that libjpeg-turbo decodes straight to RGB; None for anything else."""
    if not data.startswith(_JPEG_START):
        return None
    try:
        height, width, colourspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None  # PIL gets it, and says what is wrong with it
    return (width, height) if colourspace in _TURBO_COLOURSPACES else None


def turbo_decode_for_box(data: bytes, width: int, height: int, box: Box, options: ImageOptions
                         ) -> tuple[np.ndarray, Box]:
    """Decodes a JPEG at the smallest of the scales 1/8, 1/4, 1/2, 1 that leaves ``box`` at least size pixels each
    way: (uint8 [h, w, 3] pixels, the box in their coordinates)."""
    x0, y0, x1, y1 = box
    need = options.size / min(x1 - x0, y1 - y0)  # the least scale that keeps the box's short side at size
    divisor = next((d for d in _DCT_SCALES if 1 / d >= need), 1)
    try:  # libjpeg-turbo decodes at the smallest n/8 scale giving at least these sizes: exactly 1/divisor
        pixels = simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_width=-(-width // divisor), min_height=-(-height // divisor),
            fastdct=options.fast_jpeg, fastupsample=options.fast_jpeg,
        )
    except ValueError as error:  # libjpeg-turbo's errors and, strict, its warnings (premature end of data)
        raise SkipRecord("truncated_image", f"JPEG {width}x{height}: {error}") from error
    scale_x, scale_y = pixels.shape[1] / width, pixels.shape[0] / height
    return pixels, (x0 * scale_x, y0 * scale_y, x1 * scale_x, y1 * scale_y)


def _decode_crop(data: bytes, options: ImageOptions, choose_box) -> tuple[np.ndarray, Box]:
    """Stored bytes -> (the box ``choose_box(width, height)`` picks, resized; the whole pixels it took, in the
    stored image's coordinates); raises SkipRecord."""
    if not data:
        raise SkipRecord("empty_image", "zero image bytes")
    size = turbo_jpeg_size(data)
    if size is not None:
        width, height = size
        _check_pixels(width, height, options.max_pixels)
        pixels, box = turbo_decode_for_box(data, width, height, choose_box(width, height), options)
        scale_x, scale_y = pixels.shape[1] / width, pixels.shape[0] / height
        x0, y0, x1, y1 = pixel_box(box, pixels.shape[1], pixels.shape[0])
        return crop_resize(pixels, box, options), (x0 / scale_x, y0 / scale_y, x1 / scale_x, y1 / scale_y)
    image = open_image(data, options.max_pixels)
    box = choose_box(*image.size)
    return crop_resize(load_rgb(image, options.background), box, options), pixel_box(box, *image.size)


def train_image(data: bytes, options: ImageOptions, rng: np.random.Generator) -> tuple[np.ndarray, Box]:
    """Stored bytes -> (a random resized crop, uint8 [size, size, 3]; the crop, (x0, y0, x1, y1) in the stored
    image's pixels, exactly the pixels taken, for moving boxes into it); raises SkipRecord."""
    return _decode_crop(data, options, lambda width, height: random_crop_box(width, height, options, rng))


def eval_image(data: bytes, options: ImageOptions) -> np.ndarray:
    """Stored bytes -> the centre square resized, uint8 [size, size, 3]; raises SkipRecord."""
    return eval_image_and_box(data, options)[0]


def eval_image_and_box(data: bytes, options: ImageOptions) -> tuple[np.ndarray, Box]:
    """eval_image and the centre square it took, in the stored image's pixels (to map boxes into it)."""
    return _decode_crop(data, options, centre_square_box)
