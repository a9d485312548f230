"""The SNLI-VE, VQA v2 and RefCOCO converters on tiny fixtures: task items, boxes and splits read back exactly,
one bad entry per skip reason counted, pickled refs refused, the CLI."""

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from vlp_jax.data import records, tasks
from vlp_jax.datasets import convert
from vlp_jax.datasets.convert import ConvertError, Options


def write_image(path, fmt="JPEG", seed=0) -> bytes:
    """A tiny noise image at `path`; returns its bytes."""
    pixels = np.random.RandomState(seed).randint(0, 255, (6, 8, 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out.getvalue())
    return out.getvalue()


def read_back(out_dir, split) -> dict[str, records.ImageTextRecord]:
    found = {r.id: r for r in records.read_split(out_dir, split)}
    for record in found.values():  # what the converter wrote, the readers' check keeps
        for task, items in record.labels.items():
            boxes = 0 if record.boxes is None else len(record.boxes)
            assert tasks.valid_items(task, items, boxes) == (items, [])
    return found


# ---------------------------------------------------------------- SNLI-VE

VE_LINES = [
    {"Flikr30kID": "1.jpg", "sentence1": "Two dogs run.", "sentence2": "Animals move.", "gold_label": "entailment"},
    {"Flikr30kID": "1.jpg", "sentence1": "Two dogs run.", "sentence2": "The dogs sleep.",
     "gold_label": "contradiction"},
    {"Flickr30kID": "2.png", "sentence1": "A man cooks.", "sentence2": "He is a chef.", "gold_label": "neutral"},
    {"Flikr30kID": "1.jpg", "sentence1": "Dogs outside.", "sentence2": "Dogs are out.", "gold_label": "entailment"},
    {"Flikr30kID": "1.jpg", "sentence1": "Two dogs run.", "sentence2": "Cats.", "gold_label": "-"},  # line 5
    {"Flikr30kID": "3.jpg", "sentence1": "Gone.", "sentence2": "Nothing.", "gold_label": "neutral"},  # line 6
    {"sentence1": "No image.", "sentence2": "None.", "gold_label": "neutral"},  # line 7
]


def snli_ve_fixture(folder):
    write_image(folder / "flickr30k-images" / "1.jpg", seed=1)
    write_image(folder / "flickr30k-images" / "2.png", "PNG", seed=2)
    text = "\n".join(json.dumps(line) for line in VE_LINES) + "\n{not json\n"  # line 8
    (folder / "snli_ve_dev.jsonl").write_text(text)
    return folder / "snli_ve_dev.jsonl", folder / "flickr30k-images"


def test_snli_ve(tmp_path):
    src, images = snli_ve_fixture(tmp_path)
    manifest, report = convert.convert(src, "snli_ve", tmp_path / "out", Options(image_root=str(images), split="val"))

    val = read_back(tmp_path / "out", "val")
    def item(line):
        return {"hypothesis": line["sentence2"], "label": line["gold_label"]}

    assert list(val) == ["1.jpg", "2.png"]  # first appearance
    assert val["1.jpg"].labels == {"ve": [item(VE_LINES[0]), item(VE_LINES[1]), item(VE_LINES[3])]}
    assert val["1.jpg"].captions == ["Two dogs run.", "Dogs outside."]  # the distinct premises
    assert val["2.png"].labels == {"ve": [item(VE_LINES[2])]} and val["2.png"].captions == ["A man cooks."]
    assert val["1.jpg"].image == (images / "1.jpg").read_bytes()
    assert list(manifest["splits"]) == ["val"]
    assert report.converted == 2
    assert report.skipped == {"bad_task_item": 1, "missing_image": 1, "bad_row": 2}
    assert report.examples["bad_task_item"] == [
        f"{src}:5 (labels['ve'][0] label '-' is not one of entailment, neutral, contradiction)"]
    assert report.examples["missing_image"] == [f"{src}:6 ({images}/3.jpg)"]
    assert [e.split(" ")[0] for e in report.examples["bad_row"]] == [f"{src}:7", f"{src}:8"]


# ---------------------------------------------------------------- VQA v2

def answers(*words):
    """Ten human answers, as VQA v2 annotations hold them."""
    raw = [words[i % len(words)] for i in range(10)]
    return [{"answer": word, "answer_confidence": "yes", "answer_id": i + 1} for i, word in enumerate(raw)]


VQA_QUESTIONS = [
    {"image_id": 42, "question": "What color is the cat?", "question_id": 420},
    {"image_id": 7, "question": "How many dogs?", "question_id": 70},
    {"image_id": 42, "question": "Is it day?", "question_id": 421},
    {"image_id": 42, "question": "Who asked?", "question_id": 422},  # questions[3]: no annotation
    {"image_id": 99, "question": "Where?", "question_id": 990},  # questions[4]: no image file
    {"question": "Which image?"},  # questions[5]: no ids
    {"image_id": 7, "question": "  ", "question_id": 71},  # questions[6]: blank question
]
VQA_ANSWERS = {420: answers("orange", "ginger"), 421: answers("yes"), 70: answers("2", "two", "3"),
               990: answers("here"), 71: answers("yes")}


def vqa_fixture(folder):
    write_image(folder / "val2014" / "COCO_val2014_000000000042.jpg", seed=3)  # COCO 2014 naming
    write_image(folder / "val2014" / "000000000007.jpg", seed=4)  # COCO 2017 naming
    src = folder / "v2_OpenEnded_mscoco_val2014_questions.json"
    src.write_text(json.dumps({"task_type": "Open-Ended", "questions": VQA_QUESTIONS}))
    annotations = [{"question_id": qid, "image_id": next(q["image_id"] for q in VQA_QUESTIONS
                                                        if q.get("question_id") == qid),
                    "answers": given, "multiple_choice_answer": given[0]["answer"]}
                   for qid, given in VQA_ANSWERS.items()]
    (folder / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": annotations}))
    return src, folder / "v2_mscoco_val2014_annotations.json", folder / "val2014"


def test_vqa(tmp_path):
    src, annotations, images = vqa_fixture(tmp_path)
    manifest, report = convert.convert(src, "vqa", tmp_path / "out", Options(
        image_root=str(images), annotations=str(annotations), split="val"))

    val = read_back(tmp_path / "out", "val")
    def item(question):
        return {"question": question["question"],
                "answers": [given["answer"] for given in VQA_ANSWERS[question["question_id"]]]}

    assert list(val) == ["000000000007.jpg", "COCO_val2014_000000000042.jpg"]  # by image id
    assert val["COCO_val2014_000000000042.jpg"].labels == {"vqa": [item(VQA_QUESTIONS[0]), item(VQA_QUESTIONS[2])]}
    assert val["COCO_val2014_000000000042.jpg"].captions == ["What color is the cat?", "Is it day?"]
    assert val["000000000007.jpg"].labels == {"vqa": [item(VQA_QUESTIONS[1])]}
    assert len(val["000000000007.jpg"].labels["vqa"][0]["answers"]) == 10
    assert manifest["splits"]["val"]["num_records"] == 2
    assert report.skipped == {"unanswered_question": 1, "missing_image": 1, "bad_row": 1, "bad_task_item": 1}
    assert report.examples["unanswered_question"] == [
        f"{src}:questions[3] (question_id 422 is not in --annotations={annotations})"]
    assert report.examples["missing_image"] == [
        f"{src}:questions[4] (no COCO_val2014_000000000099.jpg or 000000000099.jpg in {images})"]
    assert report.examples["bad_row"][0].startswith(f"{src}:questions[5] ")
    assert report.examples["bad_task_item"][0].startswith(f"{src}:questions[6] (labels['vqa'][0] has no question")


def test_vqa_needs_annotations_and_names_the_coco_subset(tmp_path):
    src, annotations, images = vqa_fixture(tmp_path)
    with pytest.raises(ConvertError, match="--format=vqa needs --annotations=FILE .*test-dev has none"):
        convert.convert(src, "vqa", tmp_path / "out", Options(image_root=str(images)))
    # --coco_subset overrides the name's subset: the 2014-named file is then not found.
    _, report = convert.convert(src, "vqa", tmp_path / "out2", Options(
        image_root=str(images), annotations=str(annotations), coco_subset="train2014"))
    assert report.converted == 1 and report.skipped["missing_image"] == 2
    assert convert._coco_subset("v2_OpenEnded_mscoco_test-dev2015_questions.json") == "test2015"


# ---------------------------------------------------------------- RefCOCO

INSTANCES = {
    "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 8, "height": 6},
               {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "width": 8, "height": 6},
               {"id": 3, "file_name": "COCO_train2014_000000000003.jpg", "width": 8, "height": 6}],
    "annotations": [{"id": 10, "image_id": 1, "bbox": [1, 2, 3, 2], "category_id": 1},
                    {"id": 20, "image_id": 2, "bbox": [0, 0, 8, 6], "category_id": 2},
                    {"id": 11, "image_id": 1, "bbox": [4.5, 1, 3, 4], "category_id": 2},
                    {"id": 30, "image_id": 3, "bbox": [0, 0, 1, 1], "category_id": 1}],
    "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}],
}


def ref(ref_id, ann_id, image_id, split, *sentences):
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "category_id": 1,
            "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",  # RefCOCO's own name: not the image file
            "sentences": [{"sent": s, "tokens": s.split(), "raw": s} for s in sentences]}


REFS = [
    ref(0, 11, 1, "train", "dog on the right", "small dog"),
    ref(1, 10, 1, "train", "the man"),
    ref(2, 10, 1, "testA", "person left"),
    ref(3, 20, 2, "val", "the dog", "   "),  # refs[3].sentences[1]: blank
    ref(4, 99, 2, "val", "nobody"),  # refs[4]: ann_id 99 is no annotation
    ref(5, 30, 3, "train", "tiny person"),  # refs[5]: image file absent
    {"ref_id": 6, "sentences": []},  # refs[6]: no ids
]


def refcoco_fixture(folder):
    for image_id in (1, 2):
        write_image(folder / "train2014" / f"COCO_train2014_{image_id:012d}.jpg", seed=image_id)
    (folder / "refcoco").mkdir()
    (folder / "refcoco" / "instances.json").write_text(json.dumps(INSTANCES))
    (folder / "refcoco" / "refs_unc.json").write_text(json.dumps(REFS))
    return folder / "refcoco" / "refs_unc.json", folder / "refcoco" / "instances.json", folder / "train2014"


def test_refcoco(tmp_path):
    src, instances, images = refcoco_fixture(tmp_path)
    options = Options(image_root=str(images), instances=str(instances))
    manifest, report = convert.convert(src, "refcoco", tmp_path / "out", options)

    assert {split: entry["num_records"] for split, entry in manifest["splits"].items()} == {
        "train": 1, "testA": 1, "val": 1}
    one, two = "COCO_train2014_000000000001.jpg", "COCO_train2014_000000000002.jpg"
    train, test_a, val = (read_back(tmp_path / "out", split) for split in ("train", "testA", "val"))
    assert list(train) == [f"train/{one}"] and list(test_a) == [f"testA/{one}"] and list(val) == [f"val/{two}"]
    for record in (train[f"train/{one}"], test_a[f"testA/{one}"]):  # every instance of image 1, in file order
        np.testing.assert_array_equal(record.boxes, [[1, 2, 4, 4], [4.5, 1, 7.5, 5]])
        assert record.tags == ["person", "dog"]
    assert train[f"train/{one}"].labels == {"rec": [{"expression": "dog on the right", "box": 1},
                                                    {"expression": "small dog", "box": 1},
                                                    {"expression": "the man", "box": 0}]}
    assert train[f"train/{one}"].captions == ["dog on the right", "small dog", "the man"]
    assert train[f"train/{one}"].split == "train" and test_a[f"testA/{one}"].split == "testA"
    assert test_a[f"testA/{one}"].labels == {"rec": [{"expression": "person left", "box": 0}]}
    assert val[f"val/{two}"].labels == {"rec": [{"expression": "the dog", "box": 0}]}
    np.testing.assert_array_equal(val[f"val/{two}"].boxes, [[0, 0, 8, 6]])
    assert val[f"val/{two}"].tags == ["dog"] and val[f"val/{two}"].image == (images / two).read_bytes()
    assert report.skipped == {"bad_task_item": 1, "unknown_object": 1, "missing_image": 1, "bad_row": 1}
    assert report.examples["bad_task_item"][0].startswith(f"{src}:refs[3].sentences[1] (labels['rec'][0] has no")
    assert report.examples["unknown_object"] == [
        f"{src}:refs[4] (ann_id 99 is not an annotation of image 2 in --instances={instances})"]
    assert report.examples["missing_image"] == [f"{src}:refs[5] ({images}/COCO_train2014_000000000003.jpg)"]
    assert report.examples["bad_row"][0].startswith(f"{src}:refs[6] ")

    pooled = Options(image_root=str(images), instances=str(instances), records_per_shard=1, workers=2)
    convert.convert(src, "refcoco", tmp_path / "pooled", pooled)
    for split in ("train", "testA", "val"):
        assert list(records.read_split(tmp_path / "pooled", split)) == list(records.read_split(tmp_path / "out", split))


def test_refcoco_refuses_pickles_and_needs_instances(tmp_path):
    src, instances, images = refcoco_fixture(tmp_path)
    pickled = tmp_path / "refcoco" / "refs(unc).p"
    pickled.write_bytes(b"\x80\x04N.")
    with pytest.raises(ConvertError, match=re.escape(f"{pickled} is a Python pickle") + ".*never loads pickles"
                       + ".*" + re.escape("open('refs(unc).p', 'rb')")):
        convert.convert(pickled, "refcoco", tmp_path / "out", Options(instances=str(instances)))
    with pytest.raises(ConvertError, match="--format=refcoco needs --instances=FILE"):
        convert.convert(src, "refcoco", tmp_path / "out", Options(image_root=str(images)))


# ---------------------------------------------------------------- CLI

def test_cli_converts_each_format(tmp_path, capsys):
    ve, ve_images = snli_ve_fixture(tmp_path / "ve")
    vqa, vqa_answers, vqa_images = vqa_fixture(tmp_path / "vqa")
    refs, instances, ref_images = refcoco_fixture(tmp_path / "ref")
    commands = {
        "snli_ve": [str(ve), "--format=snli_ve", f"--image_root={ve_images}"],
        "vqa": [str(vqa), "--format=vqa", f"--annotations={vqa_answers}", f"--image_root={vqa_images}", "--split=val"],
        "refcoco": [str(refs), "--format=refcoco", f"--instances={instances}", f"--image_root={ref_images}"],
    }
    summaries = {"snli_ve": ("converted 2 records; skipped 4", "wrote", "(train: 2)", "bad_task_item: 1"),
                 "vqa": ("converted 2 records; skipped 4", "(val: 2)", "unanswered_question: 1"),
                 "refcoco": ("converted 3 records; skipped 4", "(testA: 1, train: 1, val: 1)", "unknown_object: 1")}
    for fmt, args in commands.items():
        assert convert.main([*args, f"--out={tmp_path / fmt / 'out'}", "--progress_seconds=0"]) == 0
        printed = capsys.readouterr().out
        assert all(text in printed for text in summaries[fmt]), printed
