"""Zero-shot tasks from labelled shards (evaluate/labelled.py), the eval set named after its source, and the capped
full evaluation of short runs: one --mode=eval of the shared trained tiny run on labelled shards, checked against a
brute-force numpy reference computed from the model's own embeddings, plus the error cases."""

import dataclasses
import json
import logging

import jax
import numpy as np
import pytest

from tests.helpers import read_metrics, tiny_config
from vlp_jax import parallel, step, train
from vlp_jax.checkpoint import Checkpointer, abstract_like
from vlp_jax.data import records, synthetic
from vlp_jax.data.tokenizer import Tokenizer
from vlp_jax.evaluate import labelled, picture, scope
from vlp_jax.evaluate import run as eval_run
from vlp_jax.evaluate import world as world_eval

NUM_RECORDS, CAP = 72, 40


def colour_records(config) -> tuple[list[records.ImageTextRecord], np.ndarray, tuple[str, ...]]:
    """One-object scenes of the world with their object's colour in labels["colour"], as a name or an index; every
    9th record has no colour (labels["shape"] only), every 9th from the 8th a colour that is no class. Returns the
    records, their rendered images and the class names."""
    single = world_eval.single_object_world(config.data.world)
    colours = tuple(sorted(single.colours.keys()))
    scenes = synthetic.generate_scenes(single, "eval", NUM_RECORDS)
    written = []
    for i, record in enumerate(synthetic.split_records(single, "eval", NUM_RECORDS)):
        colour = scenes[i].objects[0].colour
        if i % 9 == 4:
            labels = {"shape": scenes[i].objects[0].shape}
        elif i % 9 == 7:
            labels = {"colour": "mauve"}
        else:
            labels = {"colour": colours.index(colour) if i % 2 else colour}
        written.append(dataclasses.replace(record, labels=labels))
    return written, synthetic.make_split(single, "eval", NUM_RECORDS).images, colours


def reference_accuracy(image_emb, prompt_emb, labels, num_classes, num_prompts) -> dict[str, float]:
    """Top-1/top-5 by brute force in float64: each class's prompt embeddings normalised, averaged, renormalised;
    an image's rank is 1 + the classes scoring above its true class + the others scoring equal (ties count
    against the model)."""
    prompt_emb = np.asarray(prompt_emb, np.float64)
    unit = prompt_emb / np.linalg.norm(prompt_emb, axis=1, keepdims=True)
    classes = unit.reshape(num_classes, num_prompts, -1).mean(axis=1)
    classes /= np.linalg.norm(classes, axis=1, keepdims=True)
    scores = np.asarray(image_emb, np.float64) @ classes.T  # [N, C]
    true = scores[np.arange(len(labels)), labels][:, None]
    ranks = 1 + (scores > true).sum(1) + (scores == true).sum(1) - 1
    return {f"top{k}": 100.0 * float(np.mean(ranks <= k)) for k in (1, 5)}


def model_embeddings(config, workdir, images, tokens):
    """The trained model's image and text embeddings, straight from method.encode on the restored parameters."""
    run = step.setup(config)
    checkpointer = Checkpointer(workdir, config.checkpoint)
    state, _ = checkpointer.restore(30, abstract_like(run.state, run.shardings), config)
    checkpointer.close()
    with parallel.mesh_context(run.mesh):
        encode = jax.jit(run.method.encode)
        image_emb = encode(state.params, {"image": images})["image"]
        text_emb = encode(state.params, {"text": tokens})["text"]
    return np.asarray(image_emb), np.asarray(text_emb)


@pytest.fixture(scope="module")
def labelled_eval(tiny_run, tmp_path_factory):
    """--mode=eval of the trained tiny run on labelled shards: they are the eval set (named after their folder)
    and a zero-shot task; config.eval.max_examples caps both at CAP."""
    workdir = tiny_run[0]
    root = tmp_path_factory.mktemp("labelled")
    config = tiny_config()
    written, images, colours = colour_records(config)
    records.write_records(written, root / "colour_shapes", "eval", records_per_shard=32)
    world = config.data.world
    templates = tuple(f"a {size} {{}} {shape}" for size in sorted(world.sizes.keys()) for shape in world.shapes)
    config.data.eval_sources = str(root / "colour_shapes")
    config.eval.max_examples = CAP
    config.eval.zeroshot.tasks = {
        "shard_colour": dict(source=str(root / "colour_shapes"), label_field="colour", class_names=colours,
                             templates=templates),
    }
    handler = _Collect()
    logging.getLogger().addHandler(handler)
    try:
        final = eval_run.evaluate_checkpoint(config, str(root / "out"), str(workdir / "checkpoints" / "30"))
    finally:
        logging.getLogger().removeHandler(handler)
    report = json.loads((root / "out" / train.EVAL_DIR / "step_30.json").read_text())
    return dict(config=config, workdir=workdir, out=root / "out", written=written, images=images, colours=colours,
                templates=templates, final=final, report=report, log="\n".join(handler.lines))


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_labelled_task_top1_matches_a_brute_force_reference_of_the_trained_model(labelled_eval):
    config, written, colours = labelled_eval["config"], labelled_eval["written"], labelled_eval["colours"]
    # The task reads records in order until CAP carry a known colour; the others before that point are skipped.
    keep, missing, unknown = [], 0, 0
    for i, record in enumerate(written):
        value = record.labels.get("colour")
        if value is None:
            missing += 1
        elif value not in colours and not isinstance(value, int):
            unknown += 1
        else:
            keep.append((i, value if isinstance(value, int) else colours.index(value)))
        if len(keep) == CAP:
            break
    indices, labels = (np.array(column) for column in zip(*keep, strict=True))
    tokenizer = Tokenizer(labelled_eval["workdir"] / "tokenizer.model")
    texts = [template.format(name) for name in colours for template in labelled_eval["templates"]]
    image_emb, text_emb = model_embeddings(config, labelled_eval["workdir"], labelled_eval["images"][indices],
                                           tokenizer.encode(texts, config.model.text.max_len))
    want = reference_accuracy(image_emb, text_emb, labels, len(colours), len(labelled_eval["templates"]))

    got = labelled_eval["report"]["zeroshot"]["shard_colour"]
    assert {key: got[key] for key in want} == want
    assert got["num_images"] == CAP and got["chance_top1"] == 100 / len(colours)
    assert (got["skipped_missing_label"], got["skipped_unknown_label"]) == (missing, unknown) and missing and unknown
    log = labelled_eval["log"]
    assert f"zero-shot task shard_colour: {CAP} labelled images" in log
    assert f"skipped {missing} records without labels['colour']; {unknown} whose label is no class" in log
    last = read_metrics(labelled_eval["out"])[-1]
    assert last["eval/zeroshot/shard_colour/top1"] == got["top1"]
    print(f"zero-shot shard_colour on the 30-step tiny model: top1 {got['top1']:.1f}% top5 {got['top5']:.1f}% "
          f"(chance {got['chance_top1']:.1f}%, {CAP} images)")


def test_the_eval_set_is_named_after_its_source_and_capped_with_a_log_line(labelled_eval):
    report, out, log = labelled_eval["report"], labelled_eval["out"], labelled_eval["log"]
    assert report["eval_set"] == {"name": "colour_shapes", "images": CAP, "available": NUM_RECORDS}
    assert list(report["sets"]) == ["colour_shapes"]
    speed = report["sets"]["colour_shapes"]["efficiency"]
    assert speed["num_images"] == CAP and speed["num_texts"] == sum(len(r.captions) for r in
                                                                    labelled_eval["written"][:CAP])
    assert report["sets"]["colour_shapes"]["retrieval"] == labelled_eval["final"]
    assert f"reads the first {CAP} of the {NUM_RECORDS} colour_shapes eval records" in log
    assert f"config.eval.max_examples={CAP}" in log and "--config.eval.max_examples=0 for the whole set" in log
    assert all(task["num_images"] == CAP for name, task in report["zeroshot"].items() if name != "shard_colour")
    last = read_metrics(out)[-1]
    assert last["eval/colour_shapes/i2t_r1"] == labelled_eval["final"]["i2t_r1"]
    assert not any(key.startswith("eval/embedded") for key in last)
    events = b"".join(path.read_bytes() for path in (out / "tensorboard").glob("events.out.tfevents.*"))
    assert b"eval/colour_shapes/retrieval" in events


def test_a_label_field_no_record_has_is_an_error_naming_field_and_source(tmp_path):
    config = tiny_config()
    written, _, colours = colour_records(config)
    records.write_records(written[:12], tmp_path / "set", "eval", records_per_shard=8)
    glob = f"{tmp_path}/set/eval-*.array_record"
    task = dict(source=glob, label_field="animal", class_names=colours)
    with pytest.raises(ValueError, match=r"shard_animal.label_field='animal': no record of .*source="
                       + glob.replace("*", r"\*") + r" has labels\['animal'\] \(the label keys its records carry: "
                       r"colour, shape\)"):
        labelled.load_task("shard_animal", task, config)


def test_task_settings_errors_and_class_names_beside_the_shards(tmp_path):
    config = tiny_config()
    written, _, colours = colour_records(config)
    records.write_records(written[:12], tmp_path / "set", "eval", records_per_shard=8)
    source = str(tmp_path / "set")
    with pytest.raises(ValueError, match=r"tasks.t: unknown keys \['label'\]"):
        labelled.load_task("t", dict(source=source, label="colour"), config)
    with pytest.raises(ValueError, match=r"tasks.t.label_field is empty"):
        labelled.load_task("t", dict(source=source), config)
    with pytest.raises(ValueError, match="hold class indices, not names"):  # some labels are indices: names needed
        labelled.load_task("t", dict(source=source, label_field="colour"), config)
    (tmp_path / "set" / "colour.classnames.txt").write_text("\n".join(colours) + "\n")
    task, skipped = labelled.load_task("t", dict(source=source, label_field="colour", max_examples=5), config)
    assert task.class_names == colours and task.templates == labelled.DEFAULT_TEMPLATES
    want = [r.labels["colour"] for r in written[:12] if r.labels.get("colour", "mauve") != "mauve"][:5]
    assert task.labels.tolist() == [v if isinstance(v, int) else colours.index(v) for v in want]
    assert task.images.shape == (5, 32, 32, 3) and skipped == {"missing_label": 1}


def test_eval_set_names_follow_the_source(tmp_path):
    (tmp_path / "coco").mkdir()
    (tmp_path / "emoji" / "shards").mkdir(parents=True)
    assert scope.eval_set_name("synthetic") == "embedded"
    assert scope.eval_set_name(f"{tmp_path}/coco") == "coco"
    assert scope.eval_set_name(f"{tmp_path}/coco:val") == "coco_val"
    assert scope.eval_set_name(f"{tmp_path}/emoji/shards:eval") == "emoji"  # a generic folder: its parent's name
    assert scope.eval_set_name(f"{tmp_path}/coco/val-*.array_record") == "coco"
    assert scope.eval_set_name("tfds:coco_captions:val[:10%]") == "coco_captions_val_10"
    assert scope.eval_set_name(f"synthetic,{tmp_path}/coco@2") == "embedded+coco"


@pytest.mark.parametrize("steps, batch, max_examples, limit", [
    (2, 8, -1, scope.SMOKE_EVAL_MIN),  # the base COTS smoke command: 16 trained images, at least 64 evaluated
    (30, 64, -1, 30 * 64),  # a run that trained on more images than the eval set holds is not capped
    (2, 8, 0, 0),  # 0 = everything
    (2, 8, 500, 500),
])
def test_auto_cap_is_the_images_a_short_run_trained_on(steps, batch, max_examples, limit):
    config = tiny_config(steps=steps, batch_size=batch)
    config.eval.max_examples = max_examples
    assert scope.eval_scope(config).limit == limit


@pytest.mark.parametrize("limit, subset_size, read", [(0, 16, 0), (64, 16, 64), (64, 256, 256), (64, 0, 0)])
def test_a_capped_evaluation_reads_only_what_it_scores(limit, subset_size, read):
    assert scope.EvalScope("set", limit).read_limit(subset_size) == read


def test_load_eval_stops_reading_at_its_limit_and_counts_the_records(tmp_path):
    from vlp_jax.data import pipeline

    config = tiny_config()
    config.data.eval_size = 40
    config.data.world_dir = str(tmp_path / "world")
    tokenizer = pipeline.load_tokenizer(config, tmp_path, pipeline.open_sources(config, "train", tmp_path)[0])
    whole = pipeline.load_eval(config, tmp_path, tokenizer)
    first = pipeline.load_eval(config, tmp_path, tokenizer, limit=12)
    assert len(whole) == whole.source_records == 40
    assert len(first) == 12 and first.source_records == 40
    expected = whole.first_images(12)
    np.testing.assert_array_equal(first.images, expected.images)
    np.testing.assert_array_equal(first.captions, expected.captions)
    np.testing.assert_array_equal(first.caption_image, expected.caption_image)
    named = scope.EvalScope("embedded", 12, "config.eval.max_examples=12")
    assert scope.capped(first, named) is first and scope.records_available(first) == 40


@pytest.mark.parametrize("max_examples, mesh_data, eval_batch", [
    (-1, 8, 64),  # the smoke run's 64 images: one batch of 64, not the configured 1024
    (20, 8, 24),  # rounded up to whole shares of the 8 data-parallel devices
    (20, 1, 20),
    (0, 8, 1024),  # uncapped: the configured batch
    (5000, 8, 1024),
])
def test_a_capped_evaluation_embeds_in_batches_no_larger_than_its_cap(max_examples, mesh_data, eval_batch):
    import jax

    from vlp_jax import parallel

    config = tiny_config(steps=2, batch_size=8)
    config.eval.update(dict(max_examples=max_examples, batch_size=1024))
    mesh = parallel.make_mesh(config.mesh, jax.devices()[:mesh_data])
    assert scope.eval_batch_size(config, mesh) == eval_batch


def test_the_picture_carries_its_title():
    queries = [picture.ImageQuery(np.zeros((4, 4, 3), np.uint8), ["a"], [True])]
    plain = picture.retrieval_picture(queries, [], 16)
    titled = picture.retrieval_picture(queries, [], 16, "eval set coco: 1 images, 1 captions")
    assert titled.shape[0] > plain.shape[0]
    assert (titled[: titled.shape[0] - plain.shape[0]] != 255).any()  # the title is drawn above the sections
