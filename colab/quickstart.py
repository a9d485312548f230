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
# # vlp_jax quickstart: a tiny CLIP in about a minute
#
# This notebook installs [vlp_jax](https://github.com/vlp-jax/vlp_jax), trains a tiny CLIP (two small transformer
# towers, symmetric InfoNCE) on the **embedded world** (procedurally drawn scenes of coloured shapes, each with
# several true captions; nothing is downloaded), plots its loss curve and shows what it retrieves.
#
# A CPU runtime is enough (*Runtime → Change runtime type → CPU*): about a minute of training and a minute of
# installing and compiling. The same file runs as a plain script (`python colab/quickstart.py` from a checkout);
# the `VLP_DEMO_*` environment variables in the settings cell make it smaller (the tests run it that way).

# %%
import os
import sys

IN_COLAB = "google.colab" in sys.modules
IN_NOTEBOOK = "ipykernel" in sys.modules

# %% [markdown]
# ## Install (Colab only)
#
# Installs this repository from git with its dependencies (JAX, Flax, Optax, Orbax, Grain). If pip asks you to
# restart the runtime, do so and run the notebook again. Outside Colab this cell does nothing: install the checkout
# with `pip install -e .` instead.

# %%
if IN_COLAB:
    import subprocess

    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "git+https://github.com/vlp-jax/vlp_jax.git"],
                   check=True)

# %% [markdown]
# ## Settings
#
# The defaults train for about a minute on a 2-core Colab CPU. Headless, the environment variables override them:
# `VLP_DEMO_STEPS`, `VLP_DEMO_BATCH`, `VLP_DEMO_EVAL` (held-out images scored), `VLP_DEMO_TOWERS` (`tiny`, or
# `micro` for the tests' even smaller towers) and `VLP_DEMO_WORKDIR` (where runs are written).

# %%
STEPS = int(os.environ.get("VLP_DEMO_STEPS", 120))
BATCH = int(os.environ.get("VLP_DEMO_BATCH", 128))
EVAL_IMAGES = int(os.environ.get("VLP_DEMO_EVAL", 256))
TOWERS = os.environ.get("VLP_DEMO_TOWERS", "tiny")
if TOWERS not in ("tiny", "micro"):
    raise ValueError(f"VLP_DEMO_TOWERS={TOWERS!r}: use tiny or micro")
WORKDIR = os.environ.get("VLP_DEMO_WORKDIR", "/content/vlp_demo" if IN_COLAB else "workdir/colab")
RUN_DIR = os.path.join(WORKDIR, "quickstart")
print(f"{STEPS} steps x batch {BATCH}, {TOWERS} towers, {EVAL_IMAGES} eval images, run in {RUN_DIR}")

# %% [markdown]
# ## The config
#
# `configs/clip.py:tiny` is the whole recipe as an `ml_collections.ConfigDict`: 32-pixel images in 8-pixel
# patches, two 2-layer towers of width 96, a 96-dimensional joint space. We only shorten the schedule and the
# evaluation, and keep the two evaluators this notebook shows: image↔text retrieval and its picture.

# %%
import ml_collections
from absl import flags, logging

from configs import clip
from vlp_jax import cli

flags.FLAGS.mark_as_parsed()  # absl flags are not used here; the library's logging expects them parsed
logging.set_verbosity(logging.INFO)
cli.quiet_library_logs()  # our progress lines, not the libraries' INFO chatter


def shrink_towers(config: ml_collections.ConfigDict) -> None:
    """The `micro` towers: one block of width 32 per tower (compiles in seconds; for tests, not for learning)."""
    for tower in (config.model.image, config.model.text):
        tower.update(dict(width=32, depth=1, heads=2, mlp_dim=64))
    config.model.embed_dim = 16


config = clip.get_config("tiny")
if TOWERS == "micro":
    shrink_towers(config)
config.train.update(dict(steps=STEPS, batch_size=BATCH, warmup_steps=max(1, STEPS // 10),
                         log_every=max(1, STEPS // 10)))
config.data.train_size = min(20_000, max(256, STEPS * BATCH))  # one pass (at most 20k), rendered as read
config.data.eval_size = EVAL_IMAGES
config.eval.update(dict(every=STEPS, subset_size=EVAL_IMAGES, max_examples=EVAL_IMAGES,
                        batch_size=min(EVAL_IMAGES, 256)))
config.eval.evaluators = ml_collections.ConfigDict({name: config.eval.evaluators[name]
                                                    for name in ("retrieval", "picture")})
config.checkpoint.every = STEPS

# %% [markdown]
# ## Train
#
# `train_and_evaluate` is what `python -m vlp_jax.main --config=configs/clip.py:tiny` runs: it compiles the step
# (checking memory first), trains, saves a checkpoint, and evaluates the held-out scenes. Rerunning the cell resumes
# from the checkpoint in the run directory (delete it to start again).

# %%
import time

from vlp_jax import train

started = time.perf_counter()
final = train.train_and_evaluate(config, RUN_DIR)
print(f"trained and evaluated in {time.perf_counter() - started:.0f} s")

# %% [markdown]
# ## Loss curve
#
# Every `log_every` steps the loop appends a line to `<run>/metrics.jsonl` (and TensorBoard). We write the loss to
# `loss.tsv` and plot it when matplotlib is installed (it is in Colab); otherwise a text summary.

# %%
import json

with open(os.path.join(RUN_DIR, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
curve = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
with open(os.path.join(RUN_DIR, "loss.tsv"), "w", encoding="utf-8") as f:
    f.write("step\tloss\n" + "".join(f"{step}\t{loss:.6g}\n" for step, loss in curve))
steps, losses = zip(*curve, strict=True)
print(f"loss: {losses[0]:.3f} at step {steps[0]} -> {losses[-1]:.3f} at step {steps[-1]} "
      f"(lowest {min(losses):.3f}); {len(curve)} points in {RUN_DIR}/loss.tsv")

try:
    import matplotlib

    if not IN_NOTEBOOK:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:  # not a dependency of vlp_jax: a text plot instead
    plt = None
if plt is not None:
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(steps, losses, marker=".")
    axes.set(xlabel="step", ylabel="contrastive loss", title="tiny CLIP on the embedded world")
    figure.tight_layout()
    figure.savefig(os.path.join(RUN_DIR, "loss_curve.png"), dpi=100)
    if IN_NOTEBOOK:
        plt.show()
else:
    low, high = min(losses), max(losses)
    for step, loss in curve:
        print(f"{step:>6}  {loss:7.3f}  " + "#" * (1 + round(40 * (loss - low) / max(high - low, 1e-9))))

# %% [markdown]
# ## Retrieval
#
# The final evaluation wrote `<run>/eval/step_<N>.json` (every figure) and `step_<N>.png`: a few image queries with
# their top captions and caption queries with their top images, hits and misses marked.

# %%
picture = os.path.join(RUN_DIR, "eval", f"step_{STEPS}.png")
if IN_NOTEBOOK:
    from IPython.display import Image, display

    display(Image(filename=picture))
else:
    print(f"retrieval picture: {picture}")

# %% [markdown]
# The same question by hand: `vlp_jax.embed` embeds files with the trained run (the command
# `python -m vlp_jax.embed --checkpoint=RUN --images=DIR --texts=FILE --out=DIR` does the same). We write a few
# held-out scenes as PNG files, all captions of the held-out scenes as a text file, and rank the captions for each
# image: ✓ marks a caption of that very image.

# %%
import numpy as np

from vlp_jax import embed
from vlp_jax.data import synthetic

SHOWN = 4
scenes = list(synthetic.split_records(config.data.world, "eval", min(EVAL_IMAGES, 64)))
image_dir = os.path.join(RUN_DIR, "retrieval", "images")
os.makedirs(image_dir, exist_ok=True)
for index, record in enumerate(scenes[:SHOWN]):
    with open(os.path.join(image_dir, f"scene{index}.png"), "wb") as f:
        f.write(record.image)
captions = [caption for record in scenes for caption in record.captions]
owner = np.repeat(np.arange(len(scenes)), [len(record.captions) for record in scenes])
with open(os.path.join(RUN_DIR, "retrieval", "captions.txt"), "w", encoding="utf-8") as f:
    f.write("".join(caption + "\n" for caption in captions))
embedded = embed.embed(RUN_DIR, os.path.join(RUN_DIR, "retrieval", "out"), images=image_dir,
                       texts=os.path.join(RUN_DIR, "retrieval", "captions.txt"))
scores = embedded["image"] @ embedded["text"].T  # cosine similarities: both sides are unit vectors
for index in range(SHOWN):
    print(f"scene{index}.png, truly: {scenes[index].captions[0]!r}")
    for rank, caption in enumerate(np.argsort(-scores[index])[:3], start=1):
        print(f"  {rank}. {'✓' if owner[caption] == index else '✗'} {scores[index, caption]:.3f}  {captions[caption]}")

# %% [markdown]
# ## The headline figure
#
# Mean R@1 is the average of image→text and text→image recall at 1 over the held-out scenes (several true captions
# per image: any of them counts). Chance is about 1 / (number of images).

# %%
print("retrieval on held-out scenes: " + "  ".join(f"{key} {final[key]:.1f}" for key in
                                                   ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")))
print(f"mean R@1: {final['mean_r1']:.2f}")
