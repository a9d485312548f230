"""Task ground truth of the embedded world (data/world_tasks.py): every VE label, VQA answer and REC target is
re-derived here from the scene by an independent route (the item's text parsed with this file's own grammar and
evaluated against the objects' boxes), labels are balanced, and adding tasks changes nothing else."""

import collections
import dataclasses
import itertools
import re

import pytest

from vlp_jax.data import records, synthetic, tasks, world_tasks
from vlp_jax.data.world_shards import cached_shards

NUM_SCENES = 300  # per split; with 2 items per scene, 600 items: a multiple of the three VE labels
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "cross": "crosses"}
WHERE = ("left", "middle", "right")


def varied_world():
    """One to four objects per scene."""
    world = synthetic.default_config()
    world.image_size, world.min_objects, world.max_objects = 64, 1, 4
    return world


def crowded_world():
    """Two colours, two shapes, four objects: attributes often fail to single an object out."""
    world = synthetic.default_config()
    world.image_size, world.min_objects, world.max_objects = 64, 4, 4
    world.colours = {"red": (230, 30, 30), "blue": (40, 80, 255)}
    world.shapes = ("circle", "cross")
    world.eval_fraction = 0.3
    return world


WORLDS = {"default": synthetic.default_config, "varied": varied_world, "crowded": crowded_world}


@dataclasses.dataclass
class Truth:
    """A scene as the test reads it: object kinds (size, colour, shape) with their x-centres from the boxes."""

    kinds: list[tuple[str, str, str]]
    centres: list[float]

    @classmethod
    def of(cls, scene):
        kinds = [(obj.size, obj.colour, obj.shape) for obj in scene.objects]
        return cls(kinds, [(obj.box[0] + obj.box[2]) / 2 for obj in scene.objects])

    def index(self, kind) -> int:
        assert kind in self.kinds, f"{kind} is not in the scene {self.kinds}"
        return self.kinds.index(kind)

    def matching(self, size=None, colour=None, shape=None) -> list[int]:
        """Indices of the objects with the given attributes (None: any)."""
        wanted = (size, colour, shape)
        return [i for i, kind in enumerate(self.kinds)
                if all(w in (None, k) for w, k in zip(wanted, kind, strict=True))]

    def one_change_from_the_scene(self, kind, attributes) -> bool:
        """Some object of the scene differs from `kind` in exactly one attribute, one of `attributes` (0-2)."""
        for other in self.kinds:
            differences = [a for a in range(3) if kind[a] != other[a]]
            if len(differences) == 1 and differences[0] in attributes:
                return True
        return False


class Grammar:
    """This test's reading of the task texts: a regex per form, over the world's names."""

    def __init__(self, world):
        self.size, self.colour, self.shape = ("|".join(names) for names in (world.sizes.keys(), world.colours.keys(),
                                                                            world.shapes))
        self.names = {*world.sizes.keys(), *world.colours.keys(), *world.shapes, *WHERE}
        phrase = rf"({self.size}) ({self.colour}) ({self.shape})"
        plural = "|".join(PLURALS[shape] for shape in world.shapes)
        self.ve = {
            "exists": re.compile(rf"there is an? {phrase}"),
            "left": re.compile(rf"an? {phrase} is left of an? {phrase}"),
            "right": re.compile(rf"an? {phrase} is right of an? {phrase}"),
            "neutral": re.compile(rf"the {phrase} ([a-z ]+)"),
        }
        self.vqa = {
            "colour": re.compile(rf"what colour is the ({self.size}) ({self.shape})\?"),
            "shape": re.compile(rf"what shape is the ({self.size}) ({self.colour}) object\?"),
            "size": re.compile(rf"what size is the ({self.colour}) ({self.shape})\?"),
            "count": re.compile(rf"how many ({plural}) are there\?"),
            "position": re.compile(rf"where is the {phrase}\?"),
            "yes/no": re.compile(rf"is there an? {phrase}\?"),
        }
        self.rec = {
            "relational": re.compile(rf"the object just (left|right) of the {phrase}"),
            "description": re.compile(rf"the (?:({self.size}) )?(?:({self.colour}) )?(?:({self.shape})|one)"),
        }

    @staticmethod
    def parse(forms, text):
        found = [(form, match.groups()) for form, regex in forms.items() if (match := regex.fullmatch(text))]
        assert len(found) == 1, f"{text!r} reads as {found}"
        return found[0]


def ve_label(text, truth, grammar):
    """(form, the label the scene gives the hypothesis)."""
    form, groups = grammar.parse(grammar.ve, text)
    if form == "exists":
        if tuple(groups) in truth.kinds:
            return form, "entailment"
        assert truth.one_change_from_the_scene(tuple(groups), attributes=(1, 2)), text  # colour or shape changed
        return form, "contradiction"
    if form == "neutral":
        truth.index(tuple(groups[:3]))  # a true object...
        assert not set(groups[3].split()) & grammar.names, text  # ...with a property the image cannot show
        return form, "neutral"
    first, second = truth.index(tuple(groups[:3])), truth.index(tuple(groups[3:]))
    leftwards = truth.centres[first] < truth.centres[second]
    return form, "entailment" if leftwards == (form == "left") else "contradiction"


def vqa_answers(text, truth, grammar):
    """(question type, every answer consistent with the scene)."""
    kind, groups = grammar.parse(grammar.vqa, text)
    if kind == "colour":
        return kind, {truth.kinds[i][1] for i in truth.matching(size=groups[0], shape=groups[1])}
    if kind == "shape":
        return kind, {truth.kinds[i][2] for i in truth.matching(size=groups[0], colour=groups[1])}
    if kind == "size":
        return kind, {truth.kinds[i][0] for i in truth.matching(colour=groups[0], shape=groups[1])}
    if kind == "count":
        shape = next(s for s, plural in PLURALS.items() if plural == groups[0])
        return kind, {str(len(truth.matching(shape=shape)))}
    if kind == "position":
        centre = truth.centres[truth.index(tuple(groups))]
        left_of = sum(c < centre for c in truth.centres)
        right_of = sum(c > centre for c in truth.centres)
        return kind, {"left" if left_of == 0 < right_of else "right" if right_of == 0 < left_of else "middle"}
    present = tuple(groups) in truth.kinds
    if not present:
        assert truth.one_change_from_the_scene(tuple(groups), attributes=(0, 1, 2)), text
    return kind, {"yes" if present else "no"}


def rec_targets(text, truth, grammar):
    """(form, every object the expression fits)."""
    form, groups = grammar.parse(grammar.rec, text)
    if form == "relational":
        anchor = truth.centres[truth.index(tuple(groups[1:]))]
        side = [i for i, c in enumerate(truth.centres) if (c < anchor if groups[0] == "left" else c > anchor)]
        nearest = min(side, key=lambda i: abs(truth.centres[i] - anchor)) if side else None
        return form, [] if nearest is None else [nearest]
    named = [a for a in range(3) if groups[a] is not None]
    assert named, text
    targets = truth.matching(*groups)
    if len(named) < 3 and len(targets) == 1:  # a short description: no fewer attributes single the object out
        kind = truth.kinds[targets[0]]
        for fewer in itertools.chain.from_iterable(itertools.combinations(range(3), n) for n in range(1, len(named))):
            assert len(truth.matching(*[kind[a] if a in fewer else None for a in range(3)])) > 1, text
    return ("full" if len(named) == 3 else "short"), targets


@pytest.fixture(scope="module", params=list(WORLDS))
def labelled(request):
    """(world, {split: [(scene, record)]}) for NUM_SCENES scenes of each split."""
    world = WORLDS[request.param]()
    splits = {}
    for split in synthetic.SPLITS:
        source = synthetic.SceneRecords(world, split, NUM_SCENES)
        splits[split] = [(source.scene(i), source[i]) for i in range(NUM_SCENES)]
    return world, splits


def test_every_label_answer_and_target_is_true_of_its_scene(labelled):
    world, splits = labelled
    grammar = Grammar(world)
    for pairs in splits.values():
        for scene, record in pairs:
            truth = Truth.of(scene)
            assert set(record.labels) == set(tasks.TASKS)
            for item in record.labels["ve"]:
                assert ve_label(item["hypothesis"], truth, grammar)[1] == item["label"], (item, truth)
            for item in record.labels["vqa"]:
                _, consistent = vqa_answers(item["question"], truth, grammar)
                assert [*consistent] == item["answers"], (item, truth)  # one answer, the stored one
            for item in record.labels["rec"]:
                assert rec_targets(item["expression"], truth, grammar)[1] == [item["box"]], (item, truth)


def test_labels_types_and_forms_are_balanced(labelled):
    world, splits = labelled
    grammar = Grammar(world)
    for pairs in splits.values():
        truths = [(Truth.of(scene), record.labels) for scene, record in pairs]
        ve = collections.Counter(item["label"] for _, labels in truths for item in labels["ve"])
        assert set(ve) == set(tasks.VE_LABELS) and max(ve.values()) - min(ve.values()) <= 1, ve
        ve_forms = collections.Counter(ve_label(item["hypothesis"], truth, grammar)[0]
                                       for truth, labels in truths for item in labels["ve"])
        assert set(ve_forms) == set(grammar.ve), ve_forms
        answers = [(vqa_answers(item["question"], truth, grammar)[0], item["answers"][0])
                   for truth, labels in truths for item in labels["vqa"]]
        types = collections.Counter(kind for kind, _ in answers)
        assert set(types) == set(grammar.vqa), types
        yes_no = collections.Counter(answer for kind, answer in answers if kind == "yes/no")
        assert abs(yes_no["yes"] - yes_no["no"]) <= 1, yes_no
        positions = {answer for kind, answer in answers if kind == "position"}
        assert positions == set(WHERE), positions
        rec_forms = collections.Counter(rec_targets(item["expression"], truth, grammar)[0]
                                        for truth, labels in truths for item in labels["rec"])
        assert set(rec_forms) == {"relational", "full", "short"}, rec_forms


def test_the_default_world_asks_each_question_type_as_often_as_the_others():
    """Three objects rarely share two attributes, so fallbacks are rare: each type is about a sixth of the items."""
    world = synthetic.default_config()
    grammar = Grammar(world)
    types = collections.Counter()
    for index, scene in enumerate(synthetic.generate_scenes(world, "train", NUM_SCENES)):
        items = world_tasks.scene_tasks(scene, world, synthetic.SPLITS.index("train"), index)["vqa"]
        types.update(vqa_answers(item["question"], Truth.of(scene), grammar)[0] for item in items)
    expected = world.task_items * NUM_SCENES / len(grammar.vqa)
    assert set(types) == set(grammar.vqa) and all(abs(n - expected) <= 0.1 * expected for n in types.values()), types


def test_items_are_well_formed_and_answers_in_the_vocabulary(labelled):
    world, splits = labelled
    vocabulary = world_tasks.answer_vocabulary(world)
    assert list(vocabulary) == sorted(set(vocabulary))
    assert {"yes", "no", "left", "middle", "right", "0", str(world.max_objects)} <= set(vocabulary)
    assert [tasks.normalise_answer(answer) for answer in vocabulary] == list(vocabulary)  # as VQA scoring reads them
    for pairs in splits.values():
        for _, record in pairs:
            for task in tasks.TASKS:
                kept, reasons = tasks.valid_items(task, record.labels[task], len(record.boxes))
                assert len(kept) == world.task_items and not reasons, reasons
            assert {answer for item in record.labels["vqa"] for answer in item["answers"]} <= set(vocabulary)


@pytest.mark.parametrize("noise_fraction", [0.0, 0.3])
def test_task_items_change_nothing_but_the_labels(noise_fraction):
    without, with_tasks = synthetic.default_config(), synthetic.default_config()
    without.task_items, without.noise_fraction, with_tasks.noise_fraction = 0, noise_fraction, noise_fraction
    for split in synthetic.SPLITS:
        assert synthetic.generate_scenes(without, split, 50) == synthetic.generate_scenes(with_tasks, split, 50)
        for plain, labelled in zip(synthetic.split_records(without, split, 50),
                                   synthetic.split_records(with_tasks, split, 50), strict=True):
            assert dataclasses.replace(labelled, labels=None) == dataclasses.replace(plain, labels=None)
            flag = {} if plain.labels is None else plain.labels
            assert plain.labels is None or set(plain.labels) == {"noisy"}
            assert labelled.labels == flag | {task: labelled.labels[task] for task in tasks.TASKS}
            if noise_fraction == 0:
                assert plain.labels is None


def test_items_depend_only_on_seed_split_and_index():
    world = synthetic.default_config()
    world.noise_fraction = 0.3
    for split_code, split in enumerate(synthetic.SPLITS):
        source = synthetic.SceneRecords(world, split, 40)
        streamed = list(synthetic.split_records(world, split, 40))
        assert [source[i] for i in range(40)] == streamed
        longer = synthetic.SceneRecords(world, split, 1000)
        for i in (0, 17, 39):
            stored = {task: streamed[i].labels[task] for task in tasks.TASKS}
            assert world_tasks.scene_tasks(source.scene(i), world, split_code, i) == stored
            assert world_tasks.scene_tasks(longer.scene(i), world, split_code, i) == stored
    other = synthetic.default_config()
    other.seed = 1
    scene = synthetic.generate_scenes(world, "train", 1)[0]
    assert world_tasks.scene_tasks(scene, world, 0, 0) != world_tasks.scene_tasks(scene, other, 0, 0)


def test_world_shards_hold_the_task_labels_and_are_keyed_by_task_items(tmp_path):
    world = synthetic.default_config()
    sizes = {"train": 6, "eval": 3}
    labelled = cached_shards(world, sizes, tmp_path)
    world.task_items = 0
    plain = cached_shards(world, sizes, tmp_path)
    assert labelled != plain
    stored = list(records.read_split(labelled, "eval"))
    assert stored == list(synthetic.split_records(synthetic.default_config(), "eval", 3))
    assert all(record.labels is None for record in records.read_split(plain, "eval"))


def test_worlds_that_cannot_contradict_are_refused():
    world = synthetic.default_config()
    world.colours, world.shapes = {"red": (230, 30, 30)}, ("circle",)
    world.min_objects = world.max_objects = 1
    with pytest.raises(ValueError, match="task_items=2"):
        synthetic.SceneRecords(world, "train", 4)
    world.task_items = 0
    assert synthetic.SceneRecords(world, "train", 4)[0].labels is None
