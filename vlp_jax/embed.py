"""`python -m vlp_jax.embed --checkpoint=RUN --images=DIR [--texts=FILE] --out=DIR`: a trained run's image and
text embeddings of your own files.

RUN is a run's workdir (its latest checkpoint) or one of its checkpoints/<step> directories; the run's saved config
and text tokenizer are used. Images: every .jpg/.jpeg/.png/.webp/.gif/.bmp file under DIR (centre square, resized as
in evaluation); texts: one per line. Written to --out: image_embeddings.npy (float32 [n, d], unit norm) with
image_ids.txt (paths relative to DIR, one per row), text_embeddings.npy with texts.txt. Batches are sharded over
the devices of this machine.

Zero-shot classification of the images: `--classes=FILE` (one class name per line) and optionally
`--templates=FILE` (prompt templates, one per line, each with one "{}"; default DEFAULT_TEMPLATES): each class is the
mean of its prompts' embeddings (evaluate/zeroshot.py), and zeroshot.jsonl gets one line per image with its top 5
classes and their cosine scores.
"""

import json
import os
import sys

import ml_collections
import numpy as np
from absl import app, flags, logging

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
DEFAULT_TEMPLATES = ("{}", "a photo of a {}.", "a picture of a {}.")
TOP_K = 5

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined only when it runs: importing this module (tests, notebooks) next to
    vlp_jax.main, whose --checkpoint has the same name, must not define them twice."""
    flags.DEFINE_string("checkpoint", None, "A run's workdir or one of its checkpoints/<step> directories.")
    flags.DEFINE_string("images", None, "A directory of images (searched recursively).")
    flags.DEFINE_string("texts", None, "A text file, one text per line.")
    flags.DEFINE_string("out", None, "Where the .npy files and their ids are written.")
    flags.DEFINE_string("classes", None, "Zero-shot: a file of class names, one per line (needs --images).")
    flags.DEFINE_string("templates", None, "Zero-shot: a file of prompt templates with one '{}' each, one per line.")
    flags.DEFINE_integer("batch_size", 0, "Images/texts per batch over all devices; 0 = the run's eval.batch_size.")


def image_files(directory: str) -> list[str]:
    """Image paths under `directory`, relative to it, sorted."""
    found = []
    for root, _, files in os.walk(directory):
        found += [os.path.relpath(os.path.join(root, f), directory) for f in files
                  if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
        raise FileNotFoundError(f"--images={directory}: no {'/'.join(IMAGE_EXTENSIONS)} files there")
    return sorted(found)


def read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def embed(checkpoint_path: str, out: str, images: str | None = None, texts: str | None = None,
          batch_size: int = 0, classes: str | None = None, templates: str | None = None) -> dict[str, np.ndarray]:
    """Writes the embeddings of `images` (a directory) and `texts` (a file) under `out`, and with `classes` the
    images' zero-shot top 5; returns the embeddings by modality (and "classes", the classifier rows)."""
    from vlp_jax import checkpoint, stages, step
    from vlp_jax.data import pipeline, transforms
    from vlp_jax.evaluate import zeroshot
    from vlp_jax.evaluate.embeddings import Encoders

    if not images and not texts:
        raise ValueError("give --images=DIR, --texts=FILE or both")
    if classes and not images:
        raise ValueError("--classes classifies images: give --images=DIR too")
    run_dir, at = checkpoint.find_checkpoint(checkpoint_path, "--checkpoint")
    checkpointer = checkpoint.Checkpointer(run_dir, ml_collections.ConfigDict(dict(keep=None, keep_every=0,
                                                                                   use_async=False)))
    config = stages.prepare(ml_collections.ConfigDict(checkpointer.saved_config(at)), run_dir, None)
    run = step.setup(config, abstract=True)  # shapes and shardings only: the state comes from the checkpoint
    state, _ = checkpointer.restore(at, checkpoint.abstract_like(run.state, run.shardings))
    checkpointer.close()
    encoders = Encoders(run.method, run.shardings.params, run.mesh, batch_size or config.eval.batch_size)
    os.makedirs(out, exist_ok=True)
    result = {}
    if images:
        image_names = image_files(images)
        options = transforms.ImageOptions.from_config(config.data.image, config.model.image.image_size)
        pixels = []
        for name in image_names:
            with open(os.path.join(images, name), "rb") as f:
                pixels.append(transforms.eval_image(f.read(), options))
        result["image"] = encoders.images(state.params, np.stack(pixels))
        write(out, "image", result["image"], image_names)
    if texts or classes:
        tokenizer = pipeline.load_tokenizer(config, run_dir, pipeline.open_sources(config, "train", run_dir)[0])

        def encode_texts(lines: list[str]) -> np.ndarray:
            return encoders.texts(state.params, tokenizer.encode(lines, config.model.text.max_len))

    if texts:
        lines = read_lines(texts)
        result["text"] = encode_texts(lines)
        write(out, "text", result["text"], lines)
    if classes:
        class_names = read_lines(classes)
        prompt_templates = read_lines(templates) if templates else DEFAULT_TEMPLATES
        prompts = zeroshot.prompts(class_names, prompt_templates)
        result["classes"] = zeroshot.class_embeddings(encode_texts(prompts), len(class_names), len(prompt_templates))
        scores = result["image"] @ result["classes"].T  # [images, classes]
        with open(os.path.join(out, "zeroshot.jsonl"), "w", encoding="utf-8") as f:
            for name, row in zip(image_names, scores, strict=True):
                top = np.argsort(-row, kind="stable")[:TOP_K]
                ranked = [[class_names[c], round(float(row[c]), 4)] for c in top]
                f.write(json.dumps({"image": name, "top": ranked}) + "\n")
    counts = ", ".join(f"{len(v)} {dict(image='images', text='texts').get(k, k)}" for k, v in result.items())
    logging.info("embedded %s from %s step %d into %s", counts, run_dir, at, out)
    return result


def write(out: str, modality: str, embeddings: np.ndarray, ids: list[str]) -> None:
    np.save(os.path.join(out, f"{modality}_embeddings.npy"), embeddings, allow_pickle=False)
    with open(os.path.join(out, "image_ids.txt" if modality == "image" else "texts.txt"), "w", encoding="utf-8") as f:
        f.write("".join(f"{i}\n" for i in ids))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from vlp_jax import cli

    logging.set_verbosity(logging.INFO)
    cli.quiet_library_logs()
    if not FLAGS.checkpoint or not FLAGS.out:
        print("error: --checkpoint and --out are required", file=sys.stderr)
        sys.exit(2)
    cli.report_errors(embed, FLAGS.checkpoint, FLAGS.out, FLAGS.images, FLAGS.texts, FLAGS.batch_size,
                      FLAGS.classes, FLAGS.templates)


if __name__ == "__main__":
    define_flags()
    app.run(main)
