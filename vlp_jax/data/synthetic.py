"""The embedded world: seeded scenes of coloured shapes, each image with several true captions.

This is the project's default data; it needs nothing from the network. A scene holds a few objects (shape,
colour, size name, pixel box, tag) ordered left to right, and captions that name every object by size, colour
and shape and state their left-to-right order, so a single caption identifies its scene. Train and eval are
disjoint by content: a scene's signature (its objects from left to right) belongs to one split by a stable
hash, so no eval description is ever trained on. Scene ``i`` of a split depends only on (seed, split, i).

Noisy pairs: with ``world.noise_fraction`` > 0, about that fraction of TRAIN scenes carry the captions of another
random train scene (eval scenes never do); the flag is kept as ground truth (``SyntheticSplit.noisy``, and
``labels={"noisy": ...}`` in the records), for methods that filter noisy pairs to report how well they do.

Downstream tasks: with ``world.task_items`` > 0, every record also carries that many visual-entailment, VQA and
referring-expression items about its image under ``labels["ve"|"vqa"|"rec"]`` (world_tasks.py, schema in
tasks.py), drawn from a stream of their own so scenes, images and captions do not depend on them.

The pipeline reads the world like any other dataset of records (PNG images, every caption, boxes and tags):
rendered on demand as records are read (`SceneRecords`, the default), or written once as ArrayRecord shards in a
directory keyed by the world config and reused (world_shards.py, `config.data.world_storage="shards"`).

Never flip these images horizontally in a pipeline: a flip contradicts every left/right caption.
"""

import collections
import dataclasses
import functools
import hashlib
import io
import itertools
import math
from collections.abc import Callable, Iterator

import ml_collections
import numpy as np
from PIL import Image

from vlp_jax.data import records

SPLITS = ("train", "eval")
Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) in pixels, half-open
Draw = Callable[[], float]  # the next uniform [0, 1) float of a scene's random stream

_PLACES = ("on the left", "in the middle", "on the right")
# Words the caption templates put around object phrases; caption_vocabulary adds the world's names.
_TEMPLATE_WORDS = ("a", "an", "alone", "and", "from", "in", "left", "middle", "of", "on", "only", "right",
                   "the", "then", "to")
# Each shape as a test on box coordinates u (rightwards) and v (downwards), both in [-1, 1].
_SHAPES = {
    "circle": lambda u, v: u**2 + v**2 <= 1,
    "square": lambda u, v: np.ones_like(u, bool),
    "triangle": lambda u, v: np.abs(u) <= (v + 1) / 2,  # apex up
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1,
    "cross": lambda u, v: (np.abs(u) <= 0.4) | (np.abs(v) <= 0.4),
}
# Independent random streams under one seed (_TASK_STREAM: world_tasks.py's task items; _TWIN_STREAM: hard negatives).
_SCENE_STREAM, _NOISE_STREAM, _NOISY_PAIR_STREAM, _TASK_STREAM, _TWIN_STREAM = 0, 1, 2, 3, 4
TWIN_GROUP = 2  # a scene and its hard-negative twin: indices 2k and 2k + 1
_RENDER_PIXELS = 1 << 22  # image pixels rendered per vectorised batch; bounds the scratch memory


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One shape; ``box`` is (x0, y0, x1, y1) in pixels, half-open; ``tag`` names what it is."""

    shape: str
    colour: str
    size: str
    box: Box
    tag: str

    @property
    def phrase(self) -> str:
        """How captions name this object, e.g. 'large red circle'."""
        return f"{self.size} {self.colour} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
    """Objects ordered left to right by x-centre, their captions, and an id unique across splits."""

    id: int  # 2 * index + split code
    objects: tuple[SceneObject, ...]
    captions: tuple[str, ...]


@dataclasses.dataclass
class SyntheticSplit:
    images: np.ndarray  # uint8 [N, H, W, 3]
    captions: list[list[str]]  # after noise: a noisy scene's captions describe another scene
    ids: np.ndarray  # int64 [N]
    scenes: list[Scene]  # the true content of each image
    noisy: np.ndarray  # bool [N]: the captions belong to another scene


def default_config() -> ml_collections.ConfigDict:
    """The world's knobs.

    Three objects of 8 colours x 5 shapes x 2 sizes give ~490k left-to-right sequences, so 1,000 eval scenes
    rarely share a description; two-object scenes (~6k sequences, a tenth of them eval) could not.
    """
    world = ml_collections.ConfigDict()
    world.seed = 0
    world.image_size = 32
    world.min_objects = 3
    world.max_objects = 3
    world.captions_per_image = 5
    world.eval_fraction = 0.1  # share of scene signatures that belong to eval
    world.colours = ml_collections.ConfigDict({
        "red": (230, 30, 30), "orange": (255, 140, 0), "yellow": (250, 230, 30), "green": (30, 190, 50),
        "cyan": (0, 220, 230), "blue": (40, 80, 255), "purple": (160, 40, 230), "white": (245, 245, 245),
    })
    world.shapes = ("circle", "square", "triangle", "diamond", "cross")
    world.sizes = ml_collections.ConfigDict({"small": 0.25, "large": 0.45})  # box side / image side
    world.min_centre_gap = 0.1  # x-centres of two objects at least this far apart (fraction of image side)
    world.box_gap = 0.03  # space between any two boxes (fraction of image side, rounded to pixels)
    world.background = (30, 30, 30)
    world.png_compress_level = 1  # zlib level of the PNG images in the world's shards: fast, still lossless
    world.records_per_shard = 4096  # scenes per ArrayRecord shard
    world.background_noise = 6.0  # std of Gaussian grey noise on background pixels, in intensity levels
    world.layout_tries = 100  # layouts tried per object sequence before another sequence is drawn
    world.scene_tries = 10_000  # object sequences drawn per scene before the world is declared impossible
    world.noise_fraction = 0.0  # share of train scenes whose captions are swapped for another scene's
    world.task_items = 2  # VE, VQA and REC items per task per scene in the records' labels (0: none)
    # Share of odd scenes 2k + 1 that are hard negatives of scene 2k: the same scene with one object's shape changed
    # (even k) or its objects in another left-to-right order (odd k). A training epoch keeps the two adjacent, so
    # they meet in one batch. 0: every scene drawn independently.
    world.hard_negative_fraction = 0.5
    return world


def generate_scenes(world: ml_collections.ConfigDict, split: str, num: int) -> list[Scene]:
    """Scenes 0..num-1 of ``split``; scene i depends only on (world.seed, split, i)."""
    split_code = _split_code(split)
    rules = _Rules.from_world(world)
    return [_generate_scene(rules, split_code, index) for index in range(num)]


def render(scene: Scene, world: ml_collections.ConfigDict) -> np.ndarray:
    """The scene's uint8 [H, W, 3] image: grey-noised background, objects painted in flat colour."""
    return _render_chunk([scene], world)[0]


def make_split(world: ml_collections.ConfigDict, split: str, num: int) -> SyntheticSplit:
    """Generate and render ``num`` scenes of ``split``."""
    scenes = generate_scenes(world, split, num)
    images = np.empty((num, world.image_size, world.image_size, 3), np.uint8)
    for start, chunk in _rendered_chunks(scenes, world):
        images[start : start + len(chunk)] = chunk
    captions, noisy = noisy_captions(scenes, world, split)
    return SyntheticSplit(
        images=images,
        captions=captions,
        ids=np.array([scene.id for scene in scenes], np.int64),
        scenes=scenes,
        noisy=noisy,
    )


def noisy_partners(world: ml_collections.ConfigDict, split: str, num: int) -> np.ndarray:
    """int64 [num]: the scene whose captions scene i carries, i itself unless it is a noisy pair.

    With ``world.noise_fraction`` > 0, train scene i is noisy when the i-th draw of its own stream falls below the
    fraction, so the flags of the first scenes do not depend on how many are generated; its partner is uniform
    among the other scenes. O(num) draws, no scene generated: random access reads it once per split.
    """
    partners = np.arange(num, dtype=np.int64)
    if split != "train" or world.noise_fraction <= 0 or num < 2:
        return partners
    rng = np.random.default_rng((world.seed, _NOISY_PAIR_STREAM))
    noisy = rng.random(num) < world.noise_fraction
    shifts = 1 + (rng.random(num) * (num - 1)).astype(np.int64)  # in [1, n - 1]: never itself
    partners[noisy] = (partners[noisy] + shifts[noisy]) % num
    return partners


def noisy_captions(
    scenes: list[Scene], world: ml_collections.ConfigDict, split: str
) -> tuple[list[list[str]], np.ndarray]:
    """Each scene's captions (another scene's for a noisy pair, noisy_partners) and the noisy flags."""
    partners = noisy_partners(world, split, len(scenes))
    return [list(scenes[partner].captions) for partner in partners], partners != np.arange(len(scenes))


class SceneRecords:
    """Random access to the records of ``num`` scenes of ``split`` (those `split_records` yields, byte for byte):
    record i is generated and rendered when it is read, so a run renders only the scenes it reads and writes
    nothing. About 9 ms per 224 px scene (0.6 ms at 32 px) on one core; captions alone (`captions`) take 0.3 ms.
    Picklable: grain worker processes get a copy."""

    def __init__(self, world: ml_collections.ConfigDict, split: str, num: int):
        self.world = ml_collections.ConfigDict(world.to_dict())  # a private copy: later config edits never leak in
        self.split, self.num = split, num
        self.rules = _Rules.from_world(self.world)
        self.split_code = _split_code(split)
        self.partners = noisy_partners(self.world, split, num)
        self.carries_flag = split == "train" and self.world.noise_fraction > 0
        self.carries_tasks = self.world.task_items > 0

    def __len__(self) -> int:
        return self.num

    def scene(self, index: int) -> Scene:
        if not 0 <= index < self.num:
            raise IndexError(f"scene {index} of a {self.num}-scene {self.split} split")
        return _generate_scene(self.rules, self.split_code, index)

    def captions(self, index: int) -> list[str]:
        """The captions record `index` carries (its partner's for a noisy pair), without rendering."""
        return list(self.scene(int(self.partners[index])).captions)

    def __getitem__(self, index: int) -> records.ImageTextRecord:
        scene = self.scene(index)
        return self.record(index, scene, _render_chunk([scene], self.world)[0])

    def record(self, index: int, scene: Scene, image: np.ndarray) -> records.ImageTextRecord:
        """Scene `index`'s record from its rendered image: a lossless PNG, all captions, boxes, tags, the noisy
        flag (stored only when the world makes noise, so only then does the pipeline emit ``batch["noisy"]``) and
        the task items about the image (when ``world.task_items`` > 0; a noisy pair's are still its own scene's)."""
        encoded = io.BytesIO()
        Image.fromarray(image).save(encoded, "PNG", compress_level=self.world.png_compress_level)
        partner = int(self.partners[index])
        labels = {"noisy": partner != index} if self.carries_flag else None
        if self.carries_tasks:
            labels = (labels or {}) | _task_labels(scene, self.rules, self.split_code, index)
        return records.ImageTextRecord(
            id=str(scene.id),
            image=encoded.getvalue(),
            captions=list(scene.captions) if partner == index else self.captions(index),
            boxes=np.array([obj.box for obj in scene.objects], np.float32),
            tags=[obj.tag for obj in scene.objects],
            split=self.split,
            labels=labels,
        )


def _task_labels(scene: Scene, rules: "_Rules", split_code: int, index: int) -> dict[str, list[dict]]:
    """world_tasks.scene_tasks; imported here, on first use, because world_tasks builds on this module."""
    from vlp_jax.data import world_tasks

    return world_tasks.scene_tasks(scene, rules, split_code, index)


def _rendered_chunks(scenes: list[Scene], world: ml_collections.ConfigDict) -> Iterator[tuple[int, np.ndarray]]:
    """(start, uint8 [n, H, W, 3]) for consecutive chunks of scenes: bounded scratch memory at any image size."""
    chunk = max(1, _RENDER_PIXELS // world.image_size**2)
    for start in range(0, len(scenes), chunk):
        yield start, _render_chunk(scenes[start : start + chunk], world)


def split_records(world: ml_collections.ConfigDict, split: str, num: int) -> Iterator[records.ImageTextRecord]:
    """The records of ``num`` scenes of ``split`` in order (SceneRecords), generated and rendered chunk by chunk:
    the first record comes at once and memory stays bounded whatever ``num``."""
    source = SceneRecords(world, split, num)
    chunk = max(1, _RENDER_PIXELS // world.image_size**2)
    for start in range(0, num, chunk):
        scenes = [source.scene(index) for index in range(start, min(num, start + chunk))]
        for offset, (scene, image) in enumerate(zip(scenes, _render_chunk(scenes, world), strict=True)):
            yield source.record(start + offset, scene, image)


def caption_vocabulary(world: ml_collections.ConfigDict) -> list[str]:
    """Every word a caption of this world can use, sorted: the template words and the world's names."""
    return sorted({*_TEMPLATE_WORDS, *world.sizes.keys(), *world.colours.keys(), *world.shapes})


def _split_code(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; the synthetic world has splits {SPLITS}.")
    return SPLITS.index(split)


@dataclasses.dataclass(frozen=True)
class _Rules:
    """The world config read once into plain values (ConfigDict lookups are slow in the per-scene loop)."""

    seed: int
    image_size: int
    kinds: tuple[tuple[str, str, str], ...]  # every (size, colour, shape) an object can have
    sizes: tuple[str, ...]  # the names, in the order of kinds
    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    sides: tuple[int, ...]  # box side in pixels of each kind
    min_objects: int
    max_objects: int
    captions_per_image: int
    eval_fraction: float
    min_centre_gap: float  # pixels
    box_gap: int  # pixels
    layout_tries: int
    scene_tries: int
    task_items: int  # per task per scene (world_tasks.py)
    hard_negative_fraction: float  # share of odd scenes that are twins of the scene before

    @classmethod
    def from_world(cls, world: ml_collections.ConfigDict) -> "_Rules":
        sizes, colours, shapes = tuple(sorted(world.sizes.keys())), tuple(sorted(world.colours.keys())), world.shapes
        kinds = tuple((size, colour, shape) for size in sizes for colour in colours for shape in shapes)
        unknown = sorted(set(world.shapes) - set(_SHAPES))
        if unknown:
            raise ValueError(f"Unknown shapes {unknown} in world.shapes; known shapes: {sorted(_SHAPES)}.")
        if not 1 <= world.min_objects <= world.max_objects <= len(kinds):
            raise ValueError(
                f"world.min_objects={world.min_objects}, max_objects={world.max_objects}: need "
                f"1 <= min_objects <= max_objects <= {len(kinds)} (the number of distinct objects)."
            )
        if world.task_items < 0 or (world.task_items > 0 and len(colours) + len(shapes) < 3):
            raise ValueError(
                f"world.task_items={world.task_items}: use 0 (no task labels) or more with at least two colours or "
                "two shapes (a contradiction changes an object's colour or shape)."
            )
        return cls(
            seed=world.seed,
            image_size=world.image_size,
            kinds=kinds,
            sizes=sizes,
            colours=colours,
            shapes=tuple(shapes),
            sides=tuple(round(world.sizes[size] * world.image_size) for size, _, _ in kinds),
            min_objects=world.min_objects,
            max_objects=world.max_objects,
            captions_per_image=world.captions_per_image,
            eval_fraction=world.eval_fraction,
            min_centre_gap=world.min_centre_gap * world.image_size,
            box_gap=round(world.box_gap * world.image_size),
            layout_tries=world.layout_tries,
            scene_tries=world.scene_tries,
            task_items=world.task_items,
            hard_negative_fraction=world.get("hard_negative_fraction", 0.0),
        )


def _generate_scene(rules: _Rules, split_code: int, index: int) -> Scene:
    """Scene `index` of the split: the hard-negative twin of scene index - 1 (odd indices, with probability
    hard_negative_fraction, when a twin of that split exists), else drawn on its own (`_draw_scene`)."""
    twin = _twin_scene(rules, split_code, index)
    return _draw_scene(rules, split_code, index) if twin is None else twin


def _twin_scene(rules: _Rules, split_code: int, index: int) -> Scene | None:
    """Scene `index` when it is the hard-negative twin of scene index - 1, else None."""
    if rules.hard_negative_fraction <= 0 or not index % TWIN_GROUP:
        return None
    draw = _uniforms(np.random.default_rng((rules.seed, _TWIN_STREAM, split_code, index)))
    if draw() >= rules.hard_negative_fraction:
        return None
    return _twin(_draw_scene(rules, split_code, index - 1), rules, split_code, index, draw)


def twin_pairs(world: ml_collections.ConfigDict, split: str, num: int) -> list[tuple[int, int, str]]:
    """(scene, its twin, "shape" | "order") for every hard-negative pair among the first `num` scenes of `split`."""
    rules, split_code, pairs = _Rules.from_world(world), _split_code(split), []
    for index in range(1, num, TWIN_GROUP):
        twin = _twin_scene(rules, split_code, index)
        if twin is not None:
            base = _draw_scene(rules, split_code, index - 1)
            same_objects = sorted(o.phrase for o in base.objects) == sorted(o.phrase for o in twin.objects)
            pairs.append((index - 1, index, "order" if same_objects else "shape"))
    return pairs


def _twin(base: Scene, rules: _Rules, split_code: int, index: int, draw: Draw) -> Scene | None:
    """A scene that differs from `base` only in one object's shape (index // 2 even) or only in the left-to-right
    order of its objects (odd; the other kind when this one has no variant in the split), with fresh captions;
    None when no variant belongs to the split. A shape twin keeps every box; an order twin keeps them when the
    sizes at each place stay, else is laid out again."""
    kinds = [(obj.size, obj.colour, obj.shape) for obj in base.objects]
    shape_twins = [kinds[:j] + [(size, colour, other)] + kinds[j + 1 :]
                   for j, (size, colour, shape) in enumerate(kinds) for other in rules.shapes
                   if other != shape and (size, colour, other) not in kinds]
    order_twins = [list(order) for order in itertools.permutations(kinds) if list(order) != kinds]
    groups = (order_twins, shape_twins) if (index // TWIN_GROUP) % 2 else (shape_twins, order_twins)
    side = {kind: side for kind, side in zip(rules.kinds, rules.sides, strict=True)}
    for group in groups:
        for twin_kinds in _shuffled(group, draw):
            if _split_of(twin_kinds, rules.eval_fraction) != split_code:
                continue
            sides = [side[kind] for kind in twin_kinds]
            boxes = ([obj.box for obj in base.objects] if sides == [side[kind] for kind in kinds]
                     else _layout(sides, rules, draw))
            if boxes is None:
                continue
            objects = tuple(SceneObject(shape=shape, colour=colour, size=size, box=box, tag=shape)
                            for (size, colour, shape), box in zip(twin_kinds, boxes, strict=True))
            return Scene(id=index * len(SPLITS) + split_code, objects=objects,
                         captions=_captions(objects, rules.captions_per_image, draw))
    return None


def _draw_scene(rules: _Rules, split_code: int, index: int) -> Scene:
    """Draw left-to-right object sequences until one belongs to the split, then lay it out in the image."""
    draw = _uniforms(np.random.default_rng((rules.seed, _SCENE_STREAM, split_code, index)))
    for _ in range(rules.scene_tries):
        count = _integer(draw, rules.min_objects, rules.max_objects + 1)
        picks = [_integer(draw, 0, len(rules.kinds)) for _ in range(count)]
        kinds = [rules.kinds[k] for k in picks]
        if len(set(picks)) < count or _split_of(kinds, rules.eval_fraction) != split_code:
            continue
        for _ in range(rules.layout_tries):  # retry the same sequence: keeps crowded size mixes as likely
            boxes = _layout([rules.sides[k] for k in picks], rules, draw)
            if boxes is not None:
                objects = tuple(
                    SceneObject(shape=shape, colour=colour, size=size, box=box, tag=shape)
                    for (size, colour, shape), box in zip(kinds, boxes, strict=True)
                )
                captions = _captions(objects, rules.captions_per_image, draw)
                return Scene(id=index * len(SPLITS) + split_code, objects=objects, captions=captions)
    raise RuntimeError(
        f"No {SPLITS[split_code]} scene found in {rules.scene_tries} tries: the objects do not fit the "
        f"image or eval_fraction={rules.eval_fraction} starves the split; lower sizes, min_centre_gap, "
        "box_gap or max_objects, or move eval_fraction away from 0 and 1."
    )


def _split_of(kinds: list[tuple[str, str, str]], eval_fraction: float) -> int:
    """Split code of a left-to-right object sequence, by a hash stable across runs, machines and seeds."""
    signature = ", ".join(" ".join(kind) for kind in kinds)
    unit = int.from_bytes(hashlib.sha256(signature.encode()).digest()[:8], "big") / 2**64
    return SPLITS.index("eval" if unit < eval_fraction else "train")


def _uniforms(rng: np.random.Generator, block: int = 64) -> Draw:
    """Uniform [0, 1) floats one at a time, drawn in blocks: a numpy call costs more than the arithmetic."""
    blocks = (rng.random(block).tolist() for _ in itertools.count())
    return itertools.chain.from_iterable(blocks).__next__


def _integer(draw: Draw, low: int, high: int) -> int:
    """A uniform integer in [low, high)."""
    return low + int(draw() * (high - low))


def _shuffled(items, draw: Draw) -> list:
    """The items in random order."""
    return sorted(items, key=lambda _: draw())


def _layout(sides: list[int], rules: _Rules, draw: Draw) -> list[Box] | None:
    """Boxes of these sides, x-centres increasing by >= min_centre_gap, any two boxes box_gap apart; or None.

    Placed left to right: x0 at random in the range that leaves room for the objects still to come, then y0
    at random among the rows clear of the earlier boxes it meets in x. None when a box finds no free row.
    """
    size, gap, min_gap2 = rules.image_size, rules.box_gap, 2 * rules.min_centre_gap  # 2x: centres as x0 + x1
    boxes: list[Box] = []
    for side, high in zip(sides, _x0_highs(tuple(sides), size, min_gap2), strict=True):
        low = math.ceil((boxes[-1][0] + boxes[-1][2] + min_gap2 - side) / 2) if boxes else 0
        if low > high:
            return None
        x0 = _integer(draw, low, high + 1)
        # Earlier boxes lie to the left by centre; one reaching past x0 - gap forbids y0s that would touch it.
        blocked = [(by0 - side - gap + 1, by1 + gap) for _, by0, bx1, by1 in boxes if x0 < bx1 + gap]
        y0 = _draw_free(size - side + 1, blocked, draw)
        if y0 is None:
            return None
        boxes.append((x0, y0, x0 + side, y0 + side))
    return boxes


@functools.cache
def _x0_highs(sides: tuple[int, ...], size: int, min_gap2: float) -> tuple[int, ...]:
    """Largest x0 of each box that leaves room for the boxes right of it, centres min_gap2 / 2 apart."""
    highs = []
    for k, side in enumerate(sides):
        centre2 = min(2 * size - later - j * min_gap2 for j, later in enumerate(sides[k:]))  # doubled
        highs.append(math.floor((centre2 - side) / 2))
    return tuple(highs)


def _draw_free(span: int, blocked: list[tuple[int, int]], draw: Draw) -> int | None:
    """A uniform draw from range(span) outside the half-open ``blocked`` intervals; None if none is free."""
    free, start = [], 0  # half-open free intervals, left to right
    for low, high in [*sorted(blocked), (span, span)]:
        if min(low, span) > start:
            free.append((start, min(low, span)))
        start = max(start, high)
    pick = _integer(draw, 0, sum(high - low for low, high in free)) if free else None
    for low, high in free:
        if pick < high - low:
            return low + pick
        pick -= high - low
    return None


def _captions(objects: tuple[SceneObject, ...], count: int, draw: Draw) -> tuple[str, ...]:
    """``count`` captions from distinct templates (cycling when count exceeds them), all true of the scene."""
    mentions = [indefinite(obj.phrase) for obj in objects]  # left to right
    templates = _shuffled(_SINGLE_TEMPLATES if len(objects) == 1 else _TEMPLATES, draw)
    return tuple(templates[i % len(templates)](mentions, draw) for i in range(count))


def indefinite(phrase: str) -> str:
    """The phrase with its indefinite article: 'a large red circle', 'an orange square'."""
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _left_chain(mentions, draw):
    return " left of ".join(mentions)


def _right_chain(mentions, draw):
    return " to the right of ".join(reversed(mentions))


def _left_to_right(mentions, draw):
    return "from left to right " + " then ".join(mentions)


def _right_to_left(mentions, draw):
    return "from right to left " + " then ".join(reversed(mentions))


def _placed(mentions, draw):
    """Objects in random order, each with its place; with 4+ objects all inner ones read 'in the middle'."""
    places = [_PLACES[min(i, 1)] for i in range(len(mentions) - 1)] + [_PLACES[2]]
    return " and ".join(f"{m} {place}" for m, place in _shuffled(zip(mentions, places, strict=True), draw))


def _single(mentions, draw):
    return mentions[0]


def _single_alone(mentions, draw):
    return f"{mentions[0]} alone"


def _only(mentions, draw):
    return f"only {mentions[0]}"


_TEMPLATES = (_left_chain, _right_chain, _left_to_right, _right_to_left, _placed)
_SINGLE_TEMPLATES = (_single, _single_alone, _only)


def _render_chunk(scenes: list[Scene], world: ml_collections.ConfigDict) -> np.ndarray:
    """uint8 [n, H, W, 3] images of these scenes; each image's noise comes from its scene id alone."""
    size = world.image_size
    noise = np.empty((len(scenes), size, size, 1), np.float32)  # grey: one value for all three channels
    for row, scene in enumerate(scenes):
        rng = np.random.default_rng((world.seed, _NOISE_STREAM, scene.id))
        rng.standard_normal(dtype=np.float32, out=noise[row])
    levels = np.rint(world.background_noise * noise).astype(np.int16)
    images = np.clip(levels + np.asarray(world.background, np.int16), 0, 255).astype(np.uint8)
    # Objects never overlap, so all objects of one shape and side are painted in one indexed assignment.
    colours = dict(world.colours.items())
    groups = collections.defaultdict(list)  # (shape, side) -> [(row, x0, y0, rgb)]
    for row, scene in enumerate(scenes):
        for obj in scene.objects:
            x0, y0, x1, _ = obj.box
            groups[obj.shape, x1 - x0].append((row, x0, y0, colours[obj.colour]))
    for (shape, side), members in groups.items():
        rows, x0, y0, rgb = (np.array(column) for column in zip(*members, strict=True))
        dy, dx = _shape_pixels(shape, side)  # [q] offsets inside the box
        images[rows[:, None], y0[:, None] + dy, x0[:, None] + dx] = rgb[:, None, :]
    return images


@functools.cache
def _shape_pixels(shape: str, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(dy, dx) of the box pixels a shape covers, tested at pixel centres in box coordinates."""
    centres = (np.arange(side) + 0.5) / side * 2 - 1
    u, v = np.meshgrid(centres, centres)  # u grows rightwards, v downwards
    return np.nonzero(np.broadcast_to(_SHAPES[shape](u, v), (side, side)))
