"""Zero-shot classification: classifier construction, accuracy against brute force, and the world's tasks.

The trained tiny model's zero-shot accuracy is checked in test_suite.py, on the shared trained run.
"""

import numpy as np
import pytest

from tests.helpers import normalised
from vlp_jax.data import synthetic
from vlp_jax.data.tokenizer import train_tokenizer
from vlp_jax.evaluate import retrieval, zeroshot
from vlp_jax.evaluate import world as world_eval


def reference_topk(image_emb, classifier, labels, k):
    """Percent of images whose label is among the k best classes by a full sort (for untied scores)."""
    best = np.argsort(-(image_emb @ classifier.T), axis=1)[:, :k]  # [N, k]
    return 100.0 * np.mean([label in row for label, row in zip(labels, best, strict=True)])


def test_prompts_fill_every_template_with_every_class_class_major():
    assert zeroshot.prompts(["red", "blue"], ["a {}", "{} thing"]) == ["a red", "red thing", "a blue", "blue thing"]


@pytest.mark.parametrize("template", ["a red thing", "{} and {}"])
def test_template_without_exactly_one_slot_is_an_error(template):
    with pytest.raises(ValueError, match="exactly one"):
        zeroshot.prompts(["red"], [template])


def test_classifier_averages_normalised_prompts_then_renormalises():
    # Normalising first matters: the raw mean of (2, 0) and (0, 5) points at (1, 2.5), not along the diagonal.
    text_emb = np.array([[2.0, 0.0], [0.0, 5.0], [0.0, -3.0], [0.0, -1.0]])  # 2 classes x 2 prompts
    np.testing.assert_allclose(
        zeroshot.class_embeddings(text_emb, num_classes=2, num_prompts=2), [[0.5**0.5, 0.5**0.5], [0.0, -1.0]]
    )


def test_classifier_matches_a_per_class_loop():
    rng = np.random.default_rng(0)
    num_classes, num_prompts = 4, 3
    text_emb = rng.normal(size=(num_classes * num_prompts, 8)) * rng.uniform(0.1, 10, size=(12, 1))
    want = []
    for c in range(num_classes):
        rows = text_emb[c * num_prompts : (c + 1) * num_prompts]
        mean = normalised(rows).mean(axis=0)
        want.append(mean / np.linalg.norm(mean))
    got = zeroshot.class_embeddings(text_emb, num_classes, num_prompts)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_classifier_rejects_a_row_count_that_is_not_classes_times_prompts():
    with pytest.raises(ValueError, match=r"\[6, d\]"):
        zeroshot.class_embeddings(np.ones((5, 4)), num_classes=3, num_prompts=2)


@pytest.mark.parametrize("seed", range(3))
def test_accuracy_matches_full_sort_reference(seed):
    rng = np.random.default_rng(seed)
    num_classes = 7
    classifier = normalised(rng.normal(size=(num_classes, 6)))
    labels = rng.integers(0, num_classes, size=90)
    image_emb = normalised(classifier[labels] + 1.2 * rng.normal(size=(90, 6)))
    scorer = retrieval.Scorer(query_chunk=16, gallery_chunk=3)
    got = zeroshot.zeroshot_accuracy(image_emb, classifier, labels, ks=(1, 3, 5), scorer=scorer)
    for k in (1, 3, 5):
        assert got[f"top{k}"] == pytest.approx(reference_topk(image_emb, classifier, labels, k))
    assert 0 < got["top1"] < got["top5"] < 100


def test_hand_built_case_with_ties_counts_them_against_the_image():
    classifier = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # classes 1 and 2 are identical
    image_emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.6, 0.8]])
    labels = np.array([0, 1, 2, 0])
    # ranks of the true class: 1; 2 (tied with class 2); 2 (tied with class 1); 3 (behind both tied classes)
    got = zeroshot.zeroshot_accuracy(image_emb, classifier, labels, ks=(1, 2, 3))
    assert got == {"top1": 25.0, "top2": 75.0, "top3": 100.0}


def test_top5_is_clipped_to_the_class_count():
    classifier = np.eye(3)
    image_emb = np.array([[0.0, 0.0, 1.0]])  # scores its label, class 0, last of 3
    assert zeroshot.zeroshot_accuracy(image_emb, classifier, np.array([0])) == {"top1": 0.0, "top5": 100.0}
    classifier6 = np.eye(6)
    image_emb6 = np.array([[0.0, 1, 1, 1, 1, 1]])  # label 0 scores below five other classes
    assert zeroshot.zeroshot_accuracy(image_emb6, classifier6, np.array([0])) == {"top1": 0.0, "top5": 0.0}


def test_labels_outside_the_classes_are_an_error():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        zeroshot.zeroshot_accuracy(np.eye(3), np.eye(3), np.array([0, 1, 3]))


@pytest.fixture(scope="module")
def world_tasks():
    """The world's tasks on 40 images each, and the scenes they were drawn from (by task-name prefix)."""
    world = synthetic.default_config()
    splits = {
        "single_object": synthetic.make_split(world_eval.single_object_world(world), "eval", 40),
        "leftmost": synthetic.make_split(world, "eval", 40),
    }
    return world, world_eval.world_zeroshot_tasks(world, 40), splits


def test_world_tasks_label_the_only_or_the_leftmost_object(world_tasks):
    world, tasks, splits = world_tasks
    assert [task.name for task in tasks] == [
        "single_object_colour", "single_object_shape", "leftmost_colour", "leftmost_shape"
    ]
    assert all(len(scene.objects) == 1 for scene in splits["single_object"].scenes)
    for task in tasks:
        prefix, attribute = task.name.rsplit("_", 1)
        split = splits[prefix]
        np.testing.assert_array_equal(task.images, split.images)
        leftmost = [min(scene.objects, key=lambda obj: obj.box[0] + obj.box[2]) for scene in split.scenes]
        assert [task.class_names[label] for label in task.labels] == [getattr(obj, attribute) for obj in leftmost]
        classes = world.colours.keys() if attribute == "colour" else world.shapes
        assert sorted(task.class_names) == sorted(classes)


def test_world_prompts_use_only_caption_words(world_tasks):
    world, tasks, _ = world_tasks
    vocabulary = set(synthetic.caption_vocabulary(world))
    for task in tasks:
        words = {word for text in zeroshot.prompts(task.class_names, task.templates) for word in text.split()}
        assert words <= vocabulary, words - vocabulary


def test_an_oracle_that_sees_the_object_classifies_every_world_task_perfectly(world_tasks, tmp_path):
    """Bag-of-words embeddings: a prompt is its words, an image the words of its only or leftmost object."""
    world, tasks, splits = world_tasks
    vocabulary = synthetic.caption_vocabulary(world)
    captions = (caption for split in splits.values() for captions in split.captions for caption in captions)
    tokenizer = train_tokenizer(captions, tmp_path / "tokenizer.model", vocab_size=128)
    object_words = {
        image.tobytes(): f"{scene.objects[0].phrase} on the left"
        for split in splits.values()
        for image, scene in zip(split.images, split.scenes, strict=True)
    }

    def bag_of_words(texts):
        counts = np.array([[text.split().count(word) for word in vocabulary] for text in texts], np.float32)
        return normalised(counts)

    def embed_images(images):
        return bag_of_words([object_words[image.tobytes()] for image in images])

    def embed_texts(tokens):
        return bag_of_words(tokenizer.decode(tokens))

    for task in tasks:
        got = zeroshot.evaluate_zeroshot(task, embed_images, embed_texts, tokenizer, max_len=32)
        assert got["top1"] == 100.0, task.name
