"""The retrieval picture: image queries with their top captions, text queries with their top images, hits marked.

Drawn with PIL and its default font; the result is a uint8 [H, W, 3] array for a PNG file and for TensorBoard.
"""

import dataclasses

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Layout in pixels; the image side comes from config.eval.picture.image_px.
FONT_PX = 12
MARGIN = 10
GAP = 8
BORDER = 3  # coloured frame around each retrieved image
MARK = 8  # side of the square hit/miss mark before each retrieved caption
TEXT_COLUMN = 260  # width of the wrapped caption of a text query
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)
HIT, MISS = (20, 150, 40), (210, 40, 40)


@dataclasses.dataclass
class ImageQuery:
    """An image and the captions it retrieved, best first; hits[i] says whether caption i is a right one."""

    image: np.ndarray  # uint8 [H, W, 3]
    captions: list[str]
    hits: list[bool]


@dataclasses.dataclass
class TextQuery:
    """A caption and the images it retrieved, best first; hits[i] says whether image i is a right one."""

    caption: str
    images: list[np.ndarray]  # uint8 [H, W, 3] each
    hits: list[bool]


def retrieval_picture(
    image_queries: list[ImageQuery], text_queries: list[TextQuery], image_px: int, title: str = ""
) -> np.ndarray:
    """Under `title` (e.g. the eval set's name), two sections, image→text then text→image, one row per query;
    green marks a hit, red a miss."""
    font = ImageFont.load_default(size=FONT_PX)
    line = _text_height(font) + GAP // 2
    top_k = max([len(q.hits) for q in [*image_queries, *text_queries]], default=0)
    headings = [title] if title else []
    titles = (
        f"image -> text: top-{top_k} captions of each image (green = one of its captions, red = another's)",
        f"text -> image: top-{top_k} images of each caption (green frame = its image, red = another)",
    )
    caption_width = max([font.getlength(f"{top_k}. {c}") for q in image_queries for c in q.captions], default=0)
    image_row_width = MARGIN + image_px + GAP + MARK + GAP + int(caption_width) + MARGIN
    text_row_width = MARGIN + TEXT_COLUMN + GAP + top_k * (image_px + 2 * BORDER + GAP) + MARGIN
    width = max(image_row_width, text_row_width, *(int(font.getlength(t)) + 2 * MARGIN for t in (*headings, *titles)))
    image_row_height = max(image_px, top_k * line) + GAP
    text_rows = [_wrapped(q.caption, font, TEXT_COLUMN) for q in text_queries]
    text_row_heights = [max(image_px + 2 * BORDER, len(rows) * line) + GAP for rows in text_rows]
    heading_rows = len(headings) + 2  # the title, then each section's heading
    height = MARGIN + heading_rows * (line + GAP) + len(image_queries) * image_row_height + sum(text_row_heights)
    height += MARGIN

    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = MARGIN
    for heading in headings:
        draw.text((MARGIN, y), heading, fill=INK, font=font)
        y += line + GAP
    draw.text((MARGIN, y), titles[0], fill=INK, font=font)
    y += line + GAP
    for query in image_queries:
        canvas.paste(_scaled(query.image, image_px), (MARGIN, y))
        x = MARGIN + image_px + GAP
        for rank, (caption, hit) in enumerate(zip(query.captions, query.hits, strict=True), start=1):
            line_y = y + (rank - 1) * line
            mark_y = line_y + (_text_height(font) - MARK) // 2
            draw.rectangle((x, mark_y, x + MARK, mark_y + MARK), fill=HIT if hit else MISS)
            draw.text((x + MARK + GAP, line_y), f"{rank}. {caption}", fill=HIT if hit else MISS, font=font)
        y += image_row_height
    draw.text((MARGIN, y), titles[1], fill=INK, font=font)
    y += line + GAP
    for query, rows, row_height in zip(text_queries, text_rows, text_row_heights, strict=True):
        for i, text in enumerate(rows):
            draw.text((MARGIN, y + i * line), text, fill=INK, font=font)
        x = MARGIN + TEXT_COLUMN + GAP
        for image, hit in zip(query.images, query.hits, strict=True):
            framed = image_px + 2 * BORDER
            draw.rectangle((x, y, x + framed - 1, y + framed - 1), fill=HIT if hit else MISS)
            canvas.paste(_scaled(image, image_px), (x + BORDER, y + BORDER))
            x += image_px + 2 * BORDER + GAP
        y += row_height
    return np.asarray(canvas)


def _scaled(image: np.ndarray, side: int) -> Image.Image:
    """The image as a side × side PIL image, pixels kept sharp (nearest neighbour)."""
    return Image.fromarray(image).resize((side, side), Image.Resampling.NEAREST)


def _text_height(font) -> int:
    """Pixels from a line's top to the bottom of its descenders."""
    return font.getbbox("Ag")[3]


def _wrapped(text: str, font, width: int) -> list[str]:
    """`text` broken into lines no wider than `width` pixels (a longer single word keeps its own line)."""
    lines, current = [], ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and font.getlength(candidate) > width:
            lines.append(current)
            candidate = word
        current = candidate
    return [*lines, current] if current else lines
