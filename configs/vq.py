"""VQ-VAE visual tokenizer (EMA codebook): the targets of COTS's masked vision modelling.

[ours] COTS does not specify its tokenizer; vlp_jax/models/vq.py documents our design. One code per ViT patch
of `config.model.image` (tiny: 32px / patch 8 = 16 codes; base: 224px / patch 16 = 196 codes).

Usage: python -m vlp_jax.main --config=configs/vq.py:tiny --workdir=workdir/vq-tiny
A COTS run declares its tokenizer as a stage (configs/cots.py) whose config is `for_cots(cots_config)`.
"""

import math

import ml_collections

from configs import common

# Per size: codebook (codebook_size, code_dim), network (width, res_blocks) and training scale; short runs use a
# faster codebook EMA (ema_decay) so the codes keep up with the encoder.
_CODEBOOK = {"tiny": (256, 32), "small": (8192, 32), "base": (8192, 32), "large": (8192, 32)}
_NETWORK = {"tiny": (64, 1), "small": (256, 2), "base": (384, 2), "large": (512, 3)}
_SCALE = {
    "tiny": dict(steps=300, batch=64, lr=4e-3, warmup=30, ema=0.95, log=50, eval=300, ckpt=300, n_train=4_096),
    "small": dict(steps=20_000, batch=256, lr=1e-3, warmup=500, ema=0.99, log=100, eval=2_000, ckpt=2_000,
                  n_train=200_000),
    "base": dict(steps=50_000, batch=512, lr=1e-3, warmup=1_000, ema=0.99, log=100, eval=5_000, ckpt=5_000,
                 n_train=200_000),
    "large": dict(steps=50_000, batch=512, lr=1e-3, warmup=1_000, ema=0.99, log=100, eval=5_000, ckpt=5_000,
                  n_train=200_000),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size = common.parse_variant(arg)
    config = common.base_config(size)
    codebook_size, code_dim = _CODEBOOK[size]
    width, res_blocks = _NETWORK[size]
    # The text tower is unused; model.image fixes the patch grid the codes live on.
    config.model.vq = ml_collections.ConfigDict(dict(width=width, res_blocks=res_blocks))
    scale = _SCALE[size]
    config.method = ml_collections.ConfigDict(
        dict(
            name="vq",
            codebook_size=codebook_size,
            code_dim=code_dim,
            commitment_weight=0.25,  # β: pulls encoder outputs towards their codes (VQ-VAE)
            ema_decay=scale["ema"],  # of the codebook's counts and sums
            # A code assigned fewer times per step (EMA, over the global batch) is re-seeded from the batch.
            dead_code_threshold=1.0,
        )
    )
    config.data.train_size = scale["n_train"]
    config.train.update(
        dict(
            steps=scale["steps"],
            batch_size=scale["batch"],
            learning_rate=scale["lr"],
            warmup_steps=scale["warmup"],
            weight_decay=0.0,  # a pure reconstruction objective; no decay on the convolutions
            log_every=scale["log"],
        )
    )
    config.eval.update(dict(every=scale["eval"], batch_size=min(scale["batch"], config.eval.batch_size)))
    config.checkpoint.every = scale["ckpt"]
    # Image-text retrieval does not apply to an image-only model; the method adds its reconstruction evaluator.
    config.eval.evaluators = ml_collections.ConfigDict()
    return config


def matching(run_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The tokenizer run a COTS run needs: its seed, mesh, data and patch grid, with `config.method.mvm`'s
    codebook_size, tokenizer_steps and tokenizer_batch_size where given (else this file's defaults)."""
    config = get_config(run_config.size)
    config.seed = run_config.seed
    config.mesh = run_config.mesh.copy_and_resolve_references()
    config.data = run_config.data.copy_and_resolve_references()
    config.model.dtype = run_config.model.dtype
    config.model.text = run_config.model.text.copy_and_resolve_references()  # the data's tokenizer checks it
    config.model.image.image_size = run_config.model.image.image_size
    config.model.image.patch_size = run_config.model.image.patch_size
    mvm = run_config.method.get("mvm") or ml_collections.ConfigDict()
    config.method.codebook_size = mvm.get("codebook_size", config.method.codebook_size)
    steps = mvm.get("tokenizer_steps", config.train.steps)
    # Another step count keeps the schedule's shape: warmup stays the same fraction of the run.
    config.train.warmup_steps = round(config.train.warmup_steps * steps / config.train.steps)
    config.train.steps = steps
    config.train.batch_size = mvm.get("tokenizer_batch_size", config.train.batch_size)
    config.eval.batch_size = min(config.eval.batch_size, config.train.batch_size)
    return config


def for_cots(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The tokenizer stage of a COTS run: `matching` with `tokenizer_steps` / `_batch_size` resolved. -1 steps:
    this size's default, at most `tokenizer_fraction` of the COTS steps (at least 1); -1 batch: the VQ default,
    at most the COTS batch size."""
    mvm = config.method.mvm
    defaults = get_config(config.size).train
    resolved = config.copy_and_resolve_references()
    if mvm.tokenizer_steps < 0:
        cap = max(1, math.ceil(mvm.tokenizer_fraction * config.train.steps))
        resolved.method.mvm.tokenizer_steps = min(defaults.steps, cap)
    if mvm.tokenizer_batch_size < 0:
        resolved.method.mvm.tokenizer_batch_size = min(defaults.batch_size, config.train.batch_size)
    return matching(resolved)
