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
# # A tour of the methods: CLIP, COTS, COOKIE and CMAL on the embedded world
#
# vlp_jax implements several vision-language pre-training methods on one platform: the same towers, data pipeline,
# train loop and evaluation, each method one config file plus its loss. This notebook trains four of them with the
# **same** steps, batch and tower shapes on the embedded world (scenes of coloured shapes with true captions, drawn
# on the fly; nothing is downloaded) and compares them on held-out scenes:
#
# | config | method | what it adds to two-tower contrast (symmetric InfoNCE) |
# |---|---|---|
# | `configs/clip.py` | CLIP | nothing: the baseline, with a learnable temperature |
# | `configs/cots.py` | COTS | momentum encoders, masked language and vision modelling, KL alignment, noise filter |
# | `configs/cookie.py` | COOKIE | a weight-sharing head on both towers, visual and textual knowledge sharing |
# | `configs/cmal.py` | CMAL | anchors, associative prompt, a unified encoder that re-ranks retrieval |
#
# COTS's masked vision modelling predicts the codes of a visual tokenizer (a small VQ-VAE) that the run trains
# first, as a stage; CMAL's anchors are the objects a caption names (the world gives their boxes and tags).
#
# Runs this short say little about which method is better at scale (docs/results/ has longer runs); they show what
# each method trains, logs and costs. About ten minutes on a CPU runtime.

# %%
import os
import sys

IN_COLAB = "google.colab" in sys.modules

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
# The defaults take about ten minutes for the four methods on a 2-core CPU runtime. Headless, environment variables
# override them: `VLP_DEMO_METHODS` (comma-separated subset), `VLP_DEMO_STEPS`,
# `VLP_DEMO_BATCH`, `VLP_DEMO_EVAL`, `VLP_DEMO_TOWERS` (`tiny`, or `micro` for the tests' smaller towers) and
# `VLP_DEMO_WORKDIR`.

# %%
METHODS = [name.strip() for name in os.environ.get("VLP_DEMO_METHODS", "clip,cots,cookie,cmal").split(",")]
STEPS = int(os.environ.get("VLP_DEMO_STEPS", 100))
BATCH = int(os.environ.get("VLP_DEMO_BATCH", 64))
EVAL_IMAGES = int(os.environ.get("VLP_DEMO_EVAL", 256))
TOWERS = os.environ.get("VLP_DEMO_TOWERS", "tiny")
if TOWERS not in ("tiny", "micro"):
    raise ValueError(f"VLP_DEMO_TOWERS={TOWERS!r}: use tiny or micro")
WORKDIR = os.environ.get("VLP_DEMO_WORKDIR", "/content/vlp_demo" if IN_COLAB else "workdir/colab")
TOUR_DIR = os.path.join(WORKDIR, "methods_tour")
# Compiled programs are kept on disk: COTS compiles its step once to check memory before its tokenizer stage and
# once after (the second is read back), and rerunning a cell compiles nothing again.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(WORKDIR, "jax_cache"))
print(f"{', '.join(METHODS)}: {STEPS} steps x batch {BATCH}, {TOWERS} towers, {EVAL_IMAGES} eval images")

# %% [markdown]
# ## One recipe, four methods
#
# Each config's `tiny` variant, with the schedule and evaluation set the same for all. Two things depend on the
# run's length: COTS's adaptive momentum filter waits `amf.warmup_steps` before filtering (a quarter of the run
# here), and its visual tokenizer stage takes `tokenizer_fraction` (half) as many steps as COTS itself. Every run
# is scored by image↔text retrieval and by the unimodal evaluator (text→text: another caption of the same scene;
# image→image: a shifted re-rendering of the scene); CMAL adds its re-ranked retrieval.

# %%
import ml_collections
from absl import flags, logging

from configs import clip, cmal, cookie, cots
from vlp_jax import cli

flags.FLAGS.mark_as_parsed()  # absl flags are not used here; the library's logging expects them parsed
logging.set_verbosity(logging.INFO)
cli.quiet_library_logs()  # our progress lines, not the libraries' INFO chatter

CONFIGS = {"clip": clip, "cots": cots, "cookie": cookie, "cmal": cmal}
unknown = sorted(set(METHODS) - set(CONFIGS))
if unknown:
    raise ValueError(f"VLP_DEMO_METHODS: unknown {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")


def tour_config(name: str) -> ml_collections.ConfigDict:
    config = CONFIGS[name].get_config("tiny")
    if TOWERS == "micro":  # the tests' sizes: every block one layer of width 32
        micro = dict(width=32, depth=1, heads=2, mlp_dim=64)
        for tower in (config.model.image, config.model.text):
            tower.update(micro)
        config.model.embed_dim = 16
        if "head" in config.method:  # COOKIE's shared head
            config.method.head.update(micro)
        if "unified" in config.method:  # CMAL's unified encoder
            config.method.unified.update(micro)
    config.train.update(dict(steps=STEPS, batch_size=BATCH, warmup_steps=max(1, STEPS // 10),
                             log_every=max(1, STEPS // 10)))
    config.data.train_size = min(20_000, max(256, STEPS * BATCH))
    config.data.eval_size = EVAL_IMAGES
    config.eval.update(dict(every=STEPS, subset_size=EVAL_IMAGES, max_examples=EVAL_IMAGES,
                            batch_size=min(EVAL_IMAGES, 256)))
    config.eval.evaluators = ml_collections.ConfigDict({name: config.eval.evaluators[name]
                                                        for name in ("retrieval", "unimodal")})
    config.checkpoint.every = STEPS
    if name == "cots":
        config.method.amf.warmup_steps = max(1, STEPS // 4)
    return config


for name in METHODS:
    print(f"{name}: {tour_config(name).method.to_dict()}")

# %% [markdown]
# ## Train
#
# One run per method in `<workdir>/methods_tour/<method>` (COTS trains its tokenizer first, into
# `<method>/tokenizer`). Rerunning the cell resumes each run from its checkpoint (a finished run is only
# evaluated again).

# %%
import json
import time

from vlp_jax import train

results = {}
for name in METHODS:
    run_dir = os.path.join(TOUR_DIR, name)
    started = time.perf_counter()
    final = train.train_and_evaluate(tour_config(name), run_dir)
    seconds = time.perf_counter() - started
    with open(os.path.join(run_dir, "eval", f"step_{STEPS}.json"), encoding="utf-8") as f:
        report = json.load(f)
    figures = next(iter(report["sets"].values()))  # the one eval set: the world's held-out scenes
    results[name] = {"mean_r1": final["mean_r1"], "i2t_r1": final["i2t_r1"], "t2i_r1": final["t2i_r1"],
                     **{key: figures.get("unimodal", {}).get(key) for key in ("t2t_r1", "i2i_r1")},
                     "reranked_mean_r1": figures.get("rerank", {}).get("mean_r1"), "seconds": seconds}
    print(f"{name}: mean R@1 {final['mean_r1']:.2f} in {seconds:.0f} s")

# %% [markdown]
# ## The table
#
# R@1 in percent on the held-out scenes: image→text, text→image and their mean; text→text and image→image from the
# unimodal evaluator; CMAL's mean R@1 after its unified encoder re-ranks the two-tower top candidates. Seconds
# include compiling and, for COTS, its tokenizer stage.

# %%
COLUMNS = [("mean_r1", "mean R@1"), ("i2t_r1", "i2t R@1"), ("t2i_r1", "t2i R@1"), ("t2t_r1", "t2t R@1"),
           ("i2i_r1", "i2i R@1"), ("reranked_mean_r1", "re-ranked mean R@1"), ("seconds", "seconds")]


def cell(value) -> str:
    return "-" if value is None else f"{value:.1f}"


lines = ["| method | " + " | ".join(title for _, title in COLUMNS) + " |",
         "|---|" + "---|" * len(COLUMNS)]
lines += [f"| {name} | " + " | ".join(cell(row[key]) for key, _ in COLUMNS) + " |" for name, row in results.items()]
table = "\n".join(lines)
with open(os.path.join(TOUR_DIR, "tour.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
with open(os.path.join(TOUR_DIR, "tour.md"), "w", encoding="utf-8") as f:
    f.write(table + "\n")
if "ipykernel" in sys.modules:
    from IPython.display import Markdown, display

    display(Markdown(table))
print(table)
