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
