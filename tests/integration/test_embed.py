"""`python -m vlp_jax.embed`: a trained run's embeddings of a folder of image files and a text file, and zero-shot
classification of the images."""

import json
import os

import jax
import numpy as np

from tests.helpers import tiny_config
from vlp_jax import embed, step
from vlp_jax.checkpoint import Checkpointer, abstract_like
from vlp_jax.data import pipeline, synthetic, transforms


def test_embed_writes_the_runs_embeddings_of_image_files_and_texts(tiny_run, tmp_path):
    workdir = tiny_run[0]
    config = tiny_config()
    records = list(synthetic.split_records(config.data.world, "eval", 6))
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for index, record in enumerate(records):  # the stored (PNG) bytes as files, one in a subfolder
        (images / ("sub" if index == 5 else "") / f"scene{index}.png").write_bytes(record.image)
    (images / "notes.txt").write_text("not an image")
    captions = [record.captions[0] for record in records]
    (tmp_path / "texts.txt").write_text("\n".join(captions) + "\n\n")
    colours = list(config.data.world.colours)
    (tmp_path / "classes.txt").write_text("\n".join(colours) + "\n")
    out = tmp_path / "out"
    result = embed.embed(str(workdir), str(out), str(images), str(tmp_path / "texts.txt"), batch_size=8,
                         classes=str(tmp_path / "classes.txt"))

    ids = (out / "image_ids.txt").read_text().splitlines()
    assert ids == [f"scene{i}.png" for i in range(5)] + [os.path.join("sub", "scene5.png")]
    assert (out / "texts.txt").read_text().splitlines() == captions
    image, text = np.load(out / "image_embeddings.npy"), np.load(out / "text_embeddings.npy")
    assert image.shape == (6, config.model.embed_dim) and text.shape == (6, config.model.embed_dim)
    np.testing.assert_array_equal(image, result["image"])
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, atol=1e-5)
    # Zero-shot: each image's top 5 colours by cosine with the colour's prompt ensemble, best first.
    lines = [json.loads(line) for line in (out / "zeroshot.jsonl").read_text().splitlines()]
    assert [line["image"] for line in lines] == ids
    scores = image @ result["classes"].T
    for line, row in zip(lines, scores, strict=True):
        assert [name for name, _ in line["top"]] == [colours[c] for c in np.argsort(-row, kind="stable")[:5]]
        assert [score for _, score in line["top"]] == sorted((score for _, score in line["top"]), reverse=True)
    # The same as the method's own encoders, called directly on the decoded images and the run's tokens.
    run = step.setup(config, abstract=True)  # shapes only: the state comes from the checkpoint
    checkpointer = Checkpointer(workdir, config.checkpoint)
    state, _ = checkpointer.restore(checkpointer.latest_step(), abstract_like(run.state, run.shardings))
    checkpointer.close()
    options = transforms.ImageOptions.from_config(config.data.image, config.model.image.image_size)
    pixels = np.stack([transforms.eval_image(r.image, options) for r in records])
    tokens = pipeline.load_tokenizer(config, workdir, []).encode(captions, config.model.text.max_len)
    reference = jax.jit(run.method.encode)(state.params, {"image": pixels, "text": tokens})  # unsharded 6 rows
    np.testing.assert_allclose(image, np.asarray(reference["image"]), atol=1e-5)
    np.testing.assert_allclose(text, np.asarray(reference["text"]), atol=1e-5)


def test_imported_clip_weights_become_a_run_that_embed_reads(tmp_path):
    """`python -m vlp_jax.weights.make_run`: the tiny open_clip fixture (tests/data/openclip) written as a run
    directory, then `embed` through the pipeline's CLIP BPE tokenizer and eval image transform reproduces open_clip's
    own embeddings."""
    from PIL import Image

    from vlp_jax.weights import make_run, safetensors

    fixture = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "openclip")
    expected = safetensors.load(os.path.join(fixture, "expected.safetensors"))
    with open(os.path.join(fixture, "texts.json"), encoding="utf-8") as f:
        meta = json.load(f)
    workdir = tmp_path / "imported"
    argv = [f"--weights={fixture}/model.safetensors", "--origin=open_clip", f"--vocab={fixture}/vocab.txt.gz",
            f"--workdir={workdir}", "--preset=tiny", f"--image_heads={meta['image_heads']}",
            f"--text_heads={meta['text_heads']}"]
    assert make_run.main(argv) == 0
    images = tmp_path / "images"
    images.mkdir()
    for index, pixels in enumerate(expected["images"]):
        Image.fromarray(pixels).save(images / f"{index}.png")
    texts = [text for text in meta["texts"] if text]  # embed reads one text per non-empty line
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    result = embed.embed(str(workdir), str(tmp_path / "out"), str(images), str(tmp_path / "texts.txt"),
                         batch_size=8)
    np.testing.assert_allclose(result["image"], expected["image_open_clip"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(result["text"], expected["text_open_clip"][: len(texts)], atol=1e-4, rtol=0)
    # The directory is a run: a second import into it is refused, naming the flag.
    with np.testing.assert_raises_regex(FileExistsError, "--workdir=.*already holds a run"):
        make_run.make_run(f"{fixture}/model.safetensors", "open_clip", f"{fixture}/vocab.txt.gz", str(workdir),
                          "tiny", meta["image_heads"], meta["text_heads"])
