"""The embedded world: seeded scenes of coloured shapes, each image with several true captions.

This is the project's default data; it needs nothing from the network. A scene holds a few objects
(shape, colour, size name, pixel box, tag) and captions that name every object by size, colour and shape and
state their left-to-right order, so one caption identifies its scene. Train and eval are disjoint by scene
content: each scene's signature (its objects from left to right) goes to one split by a stable hash, so no eval
description is ever trained on. Scene ``i`` of a split depends only on (seed, split, i), never on how many
scenes are generated.

Never flip these images horizontally in a pipeline: a flip contradicts every left/right caption.
"""

import dataclasses
import functools
import hashlib

import ml_collections
import numpy as np

SPLITS = ("train", "eval")

# Words the caption templates add around the object phrases; caption_vocabulary lists them.
_TEMPLATE_WORDS = ("a", "an", "alone", "and", "from", "in", "left", "middle", "of", "on", "one", "right",
                   "the", "then", "to")
_PLACES = ("on the left", "in the middle", "on the right")
_SCENE_STREAM, _NOISE_STREAM = 0, 1  # independent random streams of one seed


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One shape; ``box`` is (x0, y0, x1, y1) in pixels, half-open, and ``tag`` names what it is."""

    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]
    tag: str

    @property
    def phrase(self) -> str:
        """The words a caption uses for this object, e.g. 'large red circle'."""
        return f"{self.size} {self.colour} {self.shape}"

    @property
    def centre_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2


@dataclasses.dataclass(frozen=True)
class Scene:
    """Objects ordered left to right, their captions, and an id unique across splits."""

    id: int
    objects: tuple[SceneObject, ...]
    captions: tuple[str, ...]


@dataclasses.dataclass
class SyntheticSplit:
    images: np.ndarray  # uint8 [N, H, W, 3]
    captions: list[list[str]]
    ids: np.ndarray  # int64 [N]
    scenes: list[Scene]


def default_config() -> ml_collections.ConfigDict:
    """The world's knobs; sizes are box sides as fractions of the image side."""
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
    world.sizes = ml_collections.ConfigDict({"small": 0.25, "large": 0.45})
    world.min_centre_gap = 0.1  # x-centres of any two objects at least this far apart (fraction of the side)
    world.box_gap = 1  # pixels between any two boxes
    world.background = (30, 30, 30)
    world.background_noise = 6.0  # std of Gaussian noise on background pixels, in intensity levels
    world.placement_tries = 50  # random positions tried per object before the candidate scene is redrawn
    world.scene_tries = 10_000  # candidate scenes tried per scene before the world is declared impossible
    return world


def generate_scenes(world: ml_collections.ConfigDict, split: str, num: int) -> list[Scene]:
    """Scenes 0..num-1 of ``split``; each depends only on (world.seed, split, its index)."""
    split_code = _split_code(split)
    return [_generate_scene(world, split_code, index) for index in range(num)]


def render(scene: Scene, world: ml_collections.ConfigDict) -> np.ndarray:
    """The scene's uint8 [H, W, 3] image: noisy plain background, objects painted in flat colour."""
    size = world.image_size
    noise_rng = np.random.default_rng((world.seed, _NOISE_STREAM, scene.id))
    noise = noise_rng.normal(0.0, world.background_noise, (size, size, 3))
    image = np.clip(np.rint(np.asarray(world.background, np.float32) + noise), 0, 255).astype(np.uint8)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        image[y0:y1, x0:x1][_shape_mask(obj.shape, x1 - x0)] = world.colours[obj.colour]
    return image


def make_split(world: ml_collections.ConfigDict, split: str, num: int) -> SyntheticSplit:
    """Generate and render ``num`` scenes of ``split``."""
    scenes = generate_scenes(world, split, num)
    images = np.empty((num, world.image_size, world.image_size, 3), np.uint8)
    for row, scene in enumerate(scenes):
        images[row] = render(scene, world)
    return SyntheticSplit(
        images=images,
        captions=[list(scene.captions) for scene in scenes],
        ids=np.array([scene.id for scene in scenes], np.int64),
        scenes=scenes,
    )


def caption_vocabulary(world: ml_collections.ConfigDict) -> list[str]:
    """Every word a caption of this world can use, sorted."""
    return sorted({*_TEMPLATE_WORDS, *world.sizes.keys(), *world.colours.keys(), *world.shapes})


def signature(objects: tuple[SceneObject, ...]) -> str:
    """What captions say about a scene: its objects' size, colour and shape from left to right."""
    return ", ".join(obj.phrase for obj in sorted(objects, key=lambda obj: obj.centre_x))


def _split_code(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; the synthetic world has splits {SPLITS}.")
    return SPLITS.index(split)


def _split_of_signature(text: str, eval_fraction: float) -> int:
    """A stable hash (independent of seed and Python's hash salt) assigns each signature to one split."""
    unit = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64
    return SPLITS.index("eval") if unit < eval_fraction else SPLITS.index("train")


def _generate_scene(world: ml_collections.ConfigDict, split_code: int, index: int) -> Scene:
    """Draw candidate scenes until one's signature belongs to the split."""
    rng = np.random.default_rng((world.seed, _SCENE_STREAM, split_code, index))
    for _ in range(world.scene_tries):
        objects = _sample_objects(world, rng)
        if objects is not None and _split_of_signature(signature(objects), world.eval_fraction) == split_code:
            return Scene(
                id=index * len(SPLITS) + split_code,
                objects=objects,
                captions=_captions(objects, world.captions_per_image, rng),
            )
    raise RuntimeError(
        f"No {SPLITS[split_code]} scene found in {world.scene_tries} tries: the world cannot fit "
        f"{world.min_objects}-{world.max_objects} objects or eval_fraction={world.eval_fraction} starves the "
        "split; lower sizes, min_centre_gap or box_gap, or change eval_fraction."
    )


def _sample_objects(world: ml_collections.ConfigDict, rng: np.random.Generator) -> tuple[SceneObject, ...] | None:
    """Distinct objects at non-overlapping boxes with well-separated x-centres, ordered left to right."""
    sizes, colours = sorted(world.sizes.keys()), sorted(world.colours.keys())
    count = int(rng.integers(world.min_objects, world.max_objects + 1))
    kinds: set[tuple[str, str, str]] = set()
    while len(kinds) < count:
        kinds.add((sizes[rng.integers(len(sizes))], colours[rng.integers(len(colours))],
                   world.shapes[rng.integers(len(world.shapes))]))
    objects = []
    for size, colour, shape in sorted(kinds):  # sorted: set order must not leak into the draw
        box = _place(round(world.sizes[size] * world.image_size), [obj.box for obj in objects], world, rng)
        if box is None:
            return None
        objects.append(SceneObject(shape=shape, colour=colour, size=size, box=box, tag=shape))
    return tuple(sorted(objects, key=lambda obj: obj.centre_x))


def _place(side: int, taken: list[tuple[int, int, int, int]], world: ml_collections.ConfigDict,
           rng: np.random.Generator) -> tuple[int, int, int, int] | None:
    """A random box of ``side`` pixels clear of ``taken`` boxes, or None if none was found."""
    min_dx = world.min_centre_gap * world.image_size
    for _ in range(world.placement_tries):
        x0, y0 = (int(v) for v in rng.integers(0, world.image_size - side + 1, size=2))
        box = (x0, y0, x0 + side, y0 + side)
        if all(_clear(box, other, world.box_gap, min_dx) for other in taken):
            return box
    return None


def _clear(box: tuple[int, int, int, int], other: tuple[int, int, int, int], gap: int, min_dx: float) -> bool:
    """True when the boxes are ``gap`` pixels apart and their x-centres ``min_dx`` apart."""
    apart = (box[2] + gap <= other[0] or other[2] + gap <= box[0]
             or box[3] + gap <= other[1] or other[3] + gap <= box[1])
    return apart and abs((box[0] + box[2]) - (other[0] + other[2])) / 2 >= min_dx


def _captions(objects: tuple[SceneObject, ...], count: int, rng: np.random.Generator) -> tuple[str, ...]:
    """``count`` captions from distinct templates (cycling when count exceeds them), all true of the scene."""
    templates = _SINGLE_TEMPLATES if len(objects) == 1 else _TEMPLATES
    order = rng.permutation(len(templates))
    return tuple(templates[order[i % len(templates)]](objects, rng) for i in range(count))


def _mention(obj: SceneObject) -> str:
    article = "an" if obj.size[0] in "aeiou" else "a"
    return f"{article} {obj.phrase}"


def _left_chain(objects, rng):
    return " left of ".join(_mention(obj) for obj in objects)


def _right_chain(objects, rng):
    return " to the right of ".join(_mention(obj) for obj in reversed(objects))


def _left_to_right(objects, rng):
    return "from left to right " + " then ".join(_mention(obj) for obj in objects)


def _right_to_left(objects, rng):
    return "from right to left " + " then ".join(_mention(obj) for obj in reversed(objects))


def _placed(objects, rng):
    """Objects in random order, each with its place; middle objects of 4+ all read 'in the middle'."""
    last = len(objects) - 1
    places = [_PLACES[0 if i == 0 else 2 if i == last else 1] for i in range(len(objects))]
    order = rng.permutation(len(objects))
    return " and ".join(f"{_mention(objects[i])} {places[i]}" for i in order)


def _single(objects, rng):
    return _mention(objects[0])


def _single_alone(objects, rng):
    return f"{_mention(objects[0])} alone"


def _one(objects, rng):
    return f"one {objects[0].phrase}"


_TEMPLATES = (_left_chain, _right_chain, _left_to_right, _right_to_left, _placed)
_SINGLE_TEMPLATES = (_single, _single_alone, _one)


@functools.cache
def _shape_mask(shape: str, side: int) -> np.ndarray:
    """bool [side, side]: which pixels of a box the shape covers (pixel centres in [-1, 1] box coordinates)."""
    centres = (np.arange(side) + 0.5) / side * 2 - 1
    u, v = np.meshgrid(centres, centres)  # u grows rightwards, v downwards
    masks = {
        "circle": lambda: u**2 + v**2 <= 1,
        "square": lambda: np.ones((side, side), bool),
        "triangle": lambda: np.abs(u) <= (v + 1) / 2,
        "diamond": lambda: np.abs(u) + np.abs(v) <= 1,
        "cross": lambda: (np.abs(u) <= 0.4) | (np.abs(v) <= 0.4),
        "ring": lambda: (u**2 + v**2 <= 1) & (u**2 + v**2 >= 0.3),
    }
    if shape not in masks:
        raise ValueError(f"Unknown shape {shape!r} in world.shapes; known shapes: {sorted(masks)}.")
    mask = masks[shape]()
    mask.flags.writeable = False
    return mask
