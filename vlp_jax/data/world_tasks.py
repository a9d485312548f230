"""Downstream-task ground truth of the embedded world: visual entailment (VE), VQA and referring expressions (REC)
about a scene's objects, in the record schema of tasks.py.

Every item is computed from the scene's objects (distinct (size, colour, shape) kinds, ordered left to right as
record.boxes are), so its label is exact. The items of scene i are drawn from a stream of their own,
(seed, _TASK_STREAM, split, i): scenes, images, captions and noisy pairs do not change when items are added.
Labels, question types and expression forms cycle over an item's position in the split (scene index * task_items +
item), so every split is balanced to within one item whatever its size (VQA types and REC forms up to the rare
fallbacks below: a scene that cannot ask a type asks the next one).

- VE: entailment states something true of the scene ("there is a small red circle", "a X is left of a Y",
  "a Y is right of a X"); contradiction is the same forms made false by one change (an object's colour or shape
  changed so that no such object is in the scene, or a true pair in reverse order). Neutral is defined here (ours)
  as a true object given a property the world never draws (NEUTRAL_PREDICATES: "the small red circle is made of
  wood"), where SNLI-VE's neutral is any hypothesis the image does not determine. Text alone spots these
  predicates, so with balanced labels a text-only model's ceiling is 2/3 (every neutral, and a guess between the
  other two), not 1/3.
- VQA: colour, shape and size questions naming the object by its other two attributes (asked only when those
  single it out), counts of a shape, left/middle/right positions, and yes/no existence questions (no: a true object
  with one attribute changed so that it is absent), one annotator's answer each (`answer_vocabulary`).
- REC: the full phrase, the shortest description that singles the object out, or the object just left or just
  right of a named one (its immediate neighbour; "just" because "left of" alone could mean several objects).
"""

import ml_collections
import numpy as np

from vlp_jax.data import tasks
from vlp_jax.data.synthetic import _TASK_STREAM, Draw, Scene, _integer, _Rules, _uniforms, indefinite

Kind = tuple[str, str, str]  # (size, colour, shape): SceneObject's attributes in phrase order
SIZE, COLOUR, SHAPE = 0, 1, 2  # positions in a Kind
ATTRIBUTE_NAMES = ("size", "colour", "shape")  # by position, as questions name them
# Properties no scene shows or rules out: a true object with one of them is neither entailed nor contradicted.
NEUTRAL_PREDICATES = ("is made of wood", "is heavy", "is moving", "was drawn by a child")
POSITIONS = ("left", "middle", "right")  # VQA position answers
YES, NO = "yes", "no"
ENTAILMENT, NEUTRAL, CONTRADICTION = tasks.VE_LABELS
EXISTS, RELATION_FORMS = "exists", ("left", "right")
VE_FORMS = (EXISTS, *RELATION_FORMS)  # entailments and contradictions draw these alike
VQA_TYPES = ("colour", "shape", "size", "count", "position", "yes/no")  # cycled in this order
REC_FORMS = ("full", "shortest", "relational")  # cycled in this order
# Attribute sets tried, in order, for the shortest expression that singles an object out (a kind is unique).
SHORTEST_ATTRIBUTES = ((SHAPE,), (COLOUR,), (SIZE,), (COLOUR, SHAPE), (SIZE, SHAPE), (SIZE, COLOUR),
                       (SIZE, COLOUR, SHAPE))
_PLURAL_ES_ENDINGS = ("s", "x", "z", "ch", "sh")  # nouns whose plural adds "es" ("cross" -> "crosses")


def scene_tasks(scene: Scene, world_or_rules: ml_collections.ConfigDict | _Rules, split_code: int,
                index: int) -> dict[str, list[dict]]:
    """{"ve": [...], "vqa": [...], "rec": [...]}: world.task_items items of each task about scene `index` of the
    split (split code as synthetic.SPLITS numbers it), in the schema of tasks.py; REC boxes index scene.objects."""
    rules = world_or_rules if isinstance(world_or_rules, _Rules) else _Rules.from_world(world_or_rules)
    draw = _uniforms(np.random.default_rng((rules.seed, _TASK_STREAM, split_code, index)))
    scene_kinds = [(obj.size, obj.colour, obj.shape) for obj in scene.objects]  # left to right
    positions = range(index * rules.task_items, (index + 1) * rules.task_items)  # the items' places in the split
    return {
        tasks.VE: [_ve_item(tasks.VE_LABELS[p % len(tasks.VE_LABELS)], scene_kinds, rules, draw) for p in positions],
        tasks.VQA: [_vqa_item(p, scene_kinds, rules, draw) for p in positions],
        tasks.REC: [_rec_item(p % len(REC_FORMS), scene_kinds, draw) for p in positions],
    }


def answer_vocabulary(world: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Every answer the world's VQA items can have, sorted: names, positions, yes/no and counts 0..max_objects."""
    counts = (str(count) for count in range(world.max_objects + 1))
    return tuple(sorted({*world.sizes.keys(), *world.colours.keys(), *world.shapes, *POSITIONS, YES, NO, *counts}))


# -- visual entailment -------------------------------------------------------------------------------------------

def _ve_item(label: str, scene_kinds: list[Kind], rules: _Rules, draw: Draw) -> dict:
    """A hypothesis with this label: an existence or left/right statement, true or made false by one change; or,
    for neutral, a true object with a property the world never draws."""
    if label == NEUTRAL:
        kind = scene_kinds[_integer(draw, 0, len(scene_kinds))]
        predicate = NEUTRAL_PREDICATES[_integer(draw, 0, len(NEUTRAL_PREDICATES))]
        return {"hypothesis": f"the {_phrase(kind)} {predicate}", "label": label}
    forms = VE_FORMS if len(scene_kinds) > 1 else (EXISTS,)
    form = forms[_integer(draw, 0, len(forms))]
    if form == EXISTS:
        if label == ENTAILMENT:
            kind = scene_kinds[_integer(draw, 0, len(scene_kinds))]
        else:
            kind = _absent_variant(scene_kinds, (COLOUR, SHAPE), rules, draw)
        if kind is not None:
            return {"hypothesis": f"there is {indefinite(_phrase(kind))}", "label": label}
        form = RELATION_FORMS[_integer(draw, 0, len(RELATION_FORMS))]  # every variant is in the scene
    # Two distinct objects, left one first; a contradiction states them in reverse order.
    first = _integer(draw, 0, len(scene_kinds))
    second = _integer(draw, 0, len(scene_kinds) - 1)
    second += second >= first
    left, right = sorted((first, second))
    if label == CONTRADICTION:
        left, right = right, left
    left_phrase, right_phrase = indefinite(_phrase(scene_kinds[left])), indefinite(_phrase(scene_kinds[right]))
    if form == RELATION_FORMS[1]:
        return {"hypothesis": f"{right_phrase} is right of {left_phrase}", "label": label}
    return {"hypothesis": f"{left_phrase} is left of {right_phrase}", "label": label}


# -- visual question answering -----------------------------------------------------------------------------------

def _vqa_item(position: int, scene_kinds: list[Kind], rules: _Rules, draw: Draw) -> dict:
    """The question of the type due at this place in the split (VQA_TYPES, cycled), or of the next type that the
    scene can ask with one correct answer (count and position always can); yes/no answers alternate over the
    split."""
    answer_yes = (position // len(VQA_TYPES)) % 2 == 0
    item, step = None, 0
    while item is None:
        item = _question(VQA_TYPES[(position + step) % len(VQA_TYPES)], answer_yes, scene_kinds, rules, draw)
        step += 1
    return item


def _question(question_type: str, answer_yes: bool, scene_kinds: list[Kind], rules: _Rules,
              draw: Draw) -> dict | None:
    """A question of this type with its answer, or None when the scene cannot ask it with one correct answer."""
    if question_type in ATTRIBUTE_NAMES:
        return _attribute_question(ATTRIBUTE_NAMES.index(question_type), scene_kinds, draw)
    if question_type == "count":
        shape = rules.shapes[_integer(draw, 0, len(rules.shapes))]
        count = sum(kind[SHAPE] == shape for kind in scene_kinds)
        return {"question": f"how many {_plural(shape)} are there?", "answers": [str(count)]}
    if question_type == "position":
        target = _integer(draw, 0, len(scene_kinds))
        return {"question": f"where is the {_phrase(scene_kinds[target])}?",
                "answers": [_position(target, len(scene_kinds))]}
    if answer_yes:
        return {"question": f"is there {indefinite(_phrase(scene_kinds[_integer(draw, 0, len(scene_kinds))]))}?",
                "answers": [YES]}
    absent = _absent_variant(scene_kinds, (SIZE, COLOUR, SHAPE), rules, draw)
    return None if absent is None else {"question": f"is there {indefinite(_phrase(absent))}?", "answers": [NO]}


def _attribute_question(asked: int, scene_kinds: list[Kind], draw: Draw) -> dict | None:
    """'what {attribute} is the ...?' about an object that its other two attributes single out; None if none is."""
    named = tuple(a for a in (SIZE, COLOUR, SHAPE) if a != asked)
    targets = _singled_out(scene_kinds, named)
    if not targets:
        return None
    kind = scene_kinds[targets[_integer(draw, 0, len(targets))]]
    return {"question": f"what {ATTRIBUTE_NAMES[asked]} is the {_describe(kind, named, 'object')}?",
            "answers": [kind[asked]]}


def _position(target: int, count: int) -> str:
    """'left' for the leftmost of several objects, 'right' for the rightmost, 'middle' otherwise (or alone)."""
    if count == 1 or 0 < target < count - 1:
        return POSITIONS[1]
    return POSITIONS[0] if target == 0 else POSITIONS[2]


# -- referring expressions ---------------------------------------------------------------------------------------

def _rec_item(form: int, scene_kinds: list[Kind], draw: Draw) -> dict:
    """An expression of this form (REC_FORMS) for a random object; relational needs a neighbour and otherwise
    falls back to the full phrase."""
    count = len(scene_kinds)
    target = _integer(draw, 0, count)
    if REC_FORMS[form] == "relational" and count > 1:
        # Named by its neighbour on one side: "just left of" the next object, "just right of" the previous one.
        just_left = target == 0 or (target < count - 1 and _integer(draw, 0, 2) == 0)
        side, neighbour = ("left", target + 1) if just_left else ("right", target - 1)
        return {"expression": f"the object just {side} of the {_phrase(scene_kinds[neighbour])}", "box": target}
    if REC_FORMS[form] == "shortest":
        for attributes in SHORTEST_ATTRIBUTES:
            if target in _singled_out(scene_kinds, attributes):
                return {"expression": f"the {_describe(scene_kinds[target], attributes, 'one')}", "box": target}
    return {"expression": f"the {_phrase(scene_kinds[target])}", "box": target}


# -- shared ------------------------------------------------------------------------------------------------------

def _phrase(kind: Kind) -> str:
    """'small red circle', as captions name an object."""
    return " ".join(kind)


def _describe(kind: Kind, attributes: tuple[int, ...], noun: str) -> str:
    """The object by some of its attributes in phrase order, `noun` standing in for an unnamed shape."""
    words = [kind[a] for a in (SIZE, COLOUR, SHAPE) if a in attributes]
    return " ".join(words if SHAPE in attributes else [*words, noun])


def _singled_out(scene_kinds: list[Kind], attributes: tuple[int, ...]) -> list[int]:
    """Indices of the objects that no other object matches on these attributes."""
    keys = [tuple(kind[a] for a in attributes) for kind in scene_kinds]
    return [i for i, key in enumerate(keys) if keys.count(key) == 1]


def _absent_variant(scene_kinds: list[Kind], attributes: tuple[int, ...], rules: _Rules, draw: Draw) -> Kind | None:
    """A scene object with one of these attributes changed so that no object of the scene is of that kind: object
    and attribute uniform among those that allow it, then the new value; None when none does."""
    values = (rules.sizes, rules.colours, rules.shapes)  # by attribute position
    present = set(scene_kinds)
    options = []  # for each (object, attribute) that allows it: the absent kinds it gives
    for kind in scene_kinds:
        for a in attributes:
            variants = [v for v in (kind[:a] + (value,) + kind[a + 1:] for value in values[a] if value != kind[a])
                        if v not in present]
            if variants:
                options.append(variants)
    if not options:
        return None
    variants = options[_integer(draw, 0, len(options))]
    return variants[_integer(draw, 0, len(variants))]


def _plural(noun: str) -> str:
    """'circles', 'crosses'."""
    return noun + ("es" if noun.endswith(_PLURAL_ES_ENDINGS) else "s")
