# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # Zero-shot classification of your own images
#
# A contrastive model scores any image against any text, so it classifies images into classes it was never trained
# on as classes: each class name is put into a few prompt templates ("a small {}", "only a large {}", ...), the
# prompts' embeddings are averaged into one class vector (a *prompt ensemble*), and each image takes the classes
# whose vectors are closest to its own embedding.
#
# `python -m vlp_jax.embed --checkpoint=RUN --images=DIR --classes=FILE --templates=FILE --out=DIR` does all of it
# and writes each image's top 5 classes to `zeroshot.jsonl`. Here the model is a tiny CLIP trained in about a minute
# on the embedded world (scenes of coloured shapes), so the images are shapes too; the last section does the same
# with OpenAI's or open_clip's CLIP weights on photos. About three minutes on a CPU runtime, installing included.

# %%
import os
import sys

IN_COLAB = "google.colab" in sys.modules
IN_NOTEBOOK = "ipykernel" in sys.modules

# %% [markdown]
# ## Install (Colab only)

# %%
if IN_COLAB:
    import subprocess

    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "git+https://github.com/vlp-jax/vlp_jax.git"],
                   check=True)

# %% [markdown]
# ## Settings
#
# `CHECKPOINT`: a trained run to use (a run's directory, e.g. the quickstart's); empty trains a tiny CLIP here.
# `UPLOAD`: in Colab, upload your own image files instead of the demo's shapes (then write your own `CLASSES`).
# Headless, `VLP_DEMO_RUN`, `VLP_DEMO_STEPS`, `VLP_DEMO_BATCH`, `VLP_DEMO_EVAL`, `VLP_DEMO_TOWERS` (`tiny` or
# `micro`), `VLP_DEMO_IMAGES` and `VLP_DEMO_WORKDIR` set them.

# %%
CHECKPOINT = os.environ.get("VLP_DEMO_RUN", "")
UPLOAD = False
STEPS = int(os.environ.get("VLP_DEMO_STEPS", 120))
BATCH = int(os.environ.get("VLP_DEMO_BATCH", 128))
EVAL_IMAGES = int(os.environ.get("VLP_DEMO_EVAL", 256))
TOWERS = os.environ.get("VLP_DEMO_TOWERS", "tiny")
if TOWERS not in ("tiny", "micro"):
    raise ValueError(f"VLP_DEMO_TOWERS={TOWERS!r}: use tiny or micro")
NUM_IMAGES = int(os.environ.get("VLP_DEMO_IMAGES", 12))
WORKDIR = os.environ.get("VLP_DEMO_WORKDIR", "/content/vlp_demo" if IN_COLAB else "workdir/colab")
DEMO_DIR = os.path.join(WORKDIR, "zeroshot")
IMAGES = os.path.join(DEMO_DIR, "images")
os.makedirs(IMAGES, exist_ok=True)

# %% [markdown]
# ## A model
#
# Unless `CHECKPOINT` names one, a tiny CLIP (`configs/clip.py:tiny`, shortened) trains on the embedded world,
# exactly as in the quickstart.

# %%
import ml_collections
from absl import flags, logging

from configs import clip
from vlp_jax import cli, train

flags.FLAGS.mark_as_parsed()  # absl flags are not used here; the library's logging expects them parsed
logging.set_verbosity(logging.INFO)
cli.quiet_library_logs()  # our progress lines, not the libraries' INFO chatter

world = clip.get_config("tiny").data.world  # the scenes' colours, shapes and sizes
if not CHECKPOINT:
    config = clip.get_config("tiny")
    if TOWERS == "micro":  # the tests' towers: compile in seconds, learn little
        for tower in (config.model.image, config.model.text):
            tower.update(dict(width=32, depth=1, heads=2, mlp_dim=64))
        config.model.embed_dim = 16
    config.train.update(dict(steps=STEPS, batch_size=BATCH, warmup_steps=max(1, STEPS // 10),
                             log_every=max(1, STEPS // 10)))
    config.data.train_size = min(20_000, max(256, STEPS * BATCH))
    config.data.eval_size = EVAL_IMAGES
    config.eval.update(dict(every=STEPS, subset_size=EVAL_IMAGES, max_examples=EVAL_IMAGES,
                            batch_size=min(EVAL_IMAGES, 256)))
    config.eval.evaluators = ml_collections.ConfigDict(dict(retrieval=config.eval.evaluators.retrieval))
    config.checkpoint.every = STEPS
    CHECKPOINT = os.path.join(DEMO_DIR, "run")
    final = train.train_and_evaluate(config, CHECKPOINT)
    print(f"trained {CHECKPOINT}: held-out mean R@1 {final['mean_r1']:.1f}")
print(f"the model: {CHECKPOINT}")

# %% [markdown]
# ## The images
#
# The demo's images are held-out scenes with a single shape (the model trained on scenes of three), saved as PNG
# files; their names carry no label. With `UPLOAD = True` in Colab you pick files from your computer instead.

# %%
truth = {}
if IN_COLAB and UPLOAD:
    from google.colab import files

    for name, data in files.upload().items():
        with open(os.path.join(IMAGES, os.path.basename(name)), "wb") as f:
            f.write(data)
else:
    from vlp_jax.data import synthetic
    from vlp_jax.evaluate import world as world_tasks

    single = world_tasks.single_object_world(world)  # one object per scene, none of them trained on
    scenes = synthetic.generate_scenes(single, "eval", NUM_IMAGES)
    for index, record in enumerate(synthetic.split_records(single, "eval", NUM_IMAGES)):
        name = f"image{index:02d}.png"
        with open(os.path.join(IMAGES, name), "wb") as f:
            f.write(record.image)
        shape = scenes[index].objects[0]
        truth[name] = f"{shape.colour} {shape.shape}"
print(f"{len(os.listdir(IMAGES))} images in {IMAGES}")

# %% [markdown]
# ## Classes and prompt templates
#
# One class per line; each template holds one `{}` where the class name goes. The templates speak the world's
# language (its captions say "a large red circle", "only a small blue cross"); for photos "a photo of a {}." is the
# usual start (vlp_jax.embed's default templates).

# %%
CLASSES = [f"{colour} {shape}" for colour in world.colours.keys() for shape in world.shapes]
TEMPLATES = ["a small {}", "a large {}", "a small {} alone", "a large {} alone", "only a small {}", "only a large {}"]
with open(os.path.join(DEMO_DIR, "classes.txt"), "w", encoding="utf-8") as f:
    f.write("".join(name + "\n" for name in CLASSES))
with open(os.path.join(DEMO_DIR, "templates.txt"), "w", encoding="utf-8") as f:
    f.write("".join(template + "\n" for template in TEMPLATES))
print(f"{len(CLASSES)} classes x {len(TEMPLATES)} templates = {len(CLASSES) * len(TEMPLATES)} prompts")

# %% [markdown]
# ## Classify
#
# `embed` writes `image_embeddings.npy`, `image_ids.txt` and `zeroshot.jsonl` (one line per image: its top 5
# classes with their cosine similarities) to the output folder.

# %%
import json

from vlp_jax import embed

OUT = os.path.join(DEMO_DIR, "out")
embed.embed(CHECKPOINT, OUT, images=IMAGES, classes=os.path.join(DEMO_DIR, "classes.txt"),
            templates=os.path.join(DEMO_DIR, "templates.txt"))
with open(os.path.join(OUT, "zeroshot.jsonl"), encoding="utf-8") as f:
    predictions = [json.loads(line) for line in f]

top1 = top5 = 0
for prediction in predictions:
    name, ranked = prediction["image"], prediction["top"]
    if IN_NOTEBOOK:
        from IPython.display import Image, display

        display(Image(filename=os.path.join(IMAGES, name), width=64))
    label = truth.get(name)
    print(f"{name}" + (f" (truly {label})" if label else "") + ": "
          + " | ".join(f"{'*' if cls == label else ''}{cls} {score:.3f}" for cls, score in ranked))
    top1 += bool(label) and ranked[0][0] == label
    top5 += bool(label) and label in [cls for cls, _ in ranked]
if truth:
    print(f"zero-shot over {len(truth)} images: top-1 {100 * top1 / len(truth):.0f}%, top-5 "
          f"{100 * top5 / len(truth):.0f}% (chance {100 / len(CLASSES):.1f}% and {500 / len(CLASSES):.1f}%)")

# %% [markdown]
# A minute of training on scenes of three shapes teaches colours before shapes: expect the right colour in the top
# classes far more often than the right shape.

# %% [markdown]
# ## With OpenAI or open_clip weights (Colab only)
#
# For photos, start from a real CLIP. Download two files yourself and put them next to this notebook (Colab:
# the folder icon → upload); nothing is fetched by vlp_jax:
#
# - the weights as `.safetensors`, e.g. OpenAI's ViT-B/32 as `ViT-B-32.safetensors` (open_clip publishes its
#   checkpoints in this format; `--origin=openai` for OpenAI's weights, `--origin=open_clip` for open_clip's own);
# - CLIP's BPE vocabulary `bpe_simple_vocab_16e6.txt.gz` (in the open_clip and OpenAI CLIP repositories).
#
# `python -m vlp_jax.weights.make_run` turns them into a run directory that `embed` reads like one of ours:
#
# ```
# python -m vlp_jax.weights.make_run --weights=ViT-B-32.safetensors --origin=openai \
#     --vocab=bpe_simple_vocab_16e6.txt.gz --workdir=clip_b32
# python -m vlp_jax.embed --checkpoint=clip_b32 --images=my_photos --classes=classes.txt --out=clip_b32_out
# ```
#
# The cell below does that when the files are there: the images above (your own with `UPLOAD = True`) against
# `PHOTO_CLASSES`, with vlp_jax.embed's default templates ("a photo of a {}.", ...).

# %%
WEIGHTS, VOCAB, ORIGIN = "ViT-B-32.safetensors", "bpe_simple_vocab_16e6.txt.gz", "openai"
PHOTO_CLASSES = ["dog", "cat", "car", "bird", "flower", "house", "person", "tree"]
if IN_COLAB:
    if os.path.exists(WEIGHTS) and os.path.exists(VOCAB):
        import subprocess

        if not os.path.exists("clip_b32"):  # make_run writes a new run directory once
            subprocess.run([sys.executable, "-m", "vlp_jax.weights.make_run", f"--weights={WEIGHTS}",
                            f"--origin={ORIGIN}", f"--vocab={VOCAB}", "--workdir=clip_b32"], check=True)
        with open("photo_classes.txt", "w", encoding="utf-8") as f:
            f.write("".join(name + "\n" for name in PHOTO_CLASSES))
        embed.embed("clip_b32", "clip_b32_out", images=IMAGES, classes="photo_classes.txt")
        with open(os.path.join("clip_b32_out", "zeroshot.jsonl"), encoding="utf-8") as f:
            for line in f:
                prediction = json.loads(line)
                print(prediction["image"] + ": " + " | ".join(f"{c} {s:.3f}" for c, s in prediction["top"]))
    else:
        print(f"put {WEIGHTS} and {VOCAB} here first (see above)")
