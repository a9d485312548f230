"""Shared defaults and the size presets every method config scales with.

A variant name (`tiny`, `small`, `base`, `large`) selects tower shapes and training scale; `base` is the
CLIP ViT-B/16 shape (~150M parameters) and the default when a config is given without a variant.
"""

import ml_collections

from vlp_jax.data import synthetic

SIZES = ("tiny", "small", "base", "large")

# Tower shapes per size: image (image_size, patch, width, depth, heads, mlp) and text (width, depth, heads, mlp,
# max_len, vocab). `base` is CLIP ViT-B/16; `large` is CLIP ViT-L/14.
_TOWERS = {
    "tiny": dict(image=(32, 8, 96, 2, 4, 192), text=(96, 2, 4, 192, 28, 128), embed_dim=96),
    "small": dict(image=(224, 16, 384, 12, 6, 1536), text=(384, 12, 6, 1536, 77, 49408), embed_dim=384),
    "base": dict(image=(224, 16, 768, 12, 12, 3072), text=(512, 12, 8, 2048, 77, 49408), embed_dim=512),
    "large": dict(image=(224, 14, 1024, 24, 16, 4096), text=(768, 12, 12, 3072, 77, 49408), embed_dim=768),
}

# Training scale per size: steps, global batch, peak lr, warmup, log/eval/checkpoint cadence, synthetic set sizes.
_SCALE = {
    "tiny": dict(steps=600, batch=256, lr=2e-3, warmup=100, log=50, eval=300, ckpt=300, n_train=20_000),
    "small": dict(steps=20_000, batch=1024, lr=1e-3, warmup=1_000, log=100, eval=2_000, ckpt=2_000, n_train=200_000),
    "base": dict(steps=100_000, batch=4096, lr=5e-4, warmup=2_000, log=100, eval=5_000, ckpt=5_000, n_train=200_000),
    "large": dict(steps=200_000, batch=8192, lr=4e-4, warmup=4_000, log=100, eval=5_000, ckpt=5_000, n_train=200_000),
}


def parse_variant(arg: str | None, extra: tuple[str, ...] = ()) -> str:
    """Returns the size named by `--config=file.py:<variant>`; no variant means `base`."""
    variant = arg or "base"
    allowed = SIZES + extra
    if variant not in allowed:
        raise ValueError(
            f"Unknown config variant {variant!r}. Use one of {', '.join(allowed)}, "
            f"e.g. --config=configs/clip.py:tiny"
        )
    return variant


def model_config(size: str) -> ml_collections.ConfigDict:
    """Two-tower shapes for a size preset; the compute dtype is float32 on CPU presets, bfloat16 otherwise."""
    towers = _TOWERS[size]
    image_size, patch, width, depth, heads, mlp = towers["image"]
    t_width, t_depth, t_heads, t_mlp, max_len, vocab = towers["text"]
    return ml_collections.ConfigDict(
        dict(
            image=dict(
                image_size=image_size, patch_size=patch, width=width, depth=depth, heads=heads, mlp_dim=mlp,
                pool="cls",
            ),
            text=dict(
                vocab_size=vocab, max_len=max_len, width=t_width, depth=t_depth, heads=t_heads, mlp_dim=t_mlp,
                pool="eos",
            ),
            embed_dim=towers["embed_dim"],
            dtype="float32" if size == "tiny" else "bfloat16",
            remat=False,
        )
    )


def base_config(size: str) -> ml_collections.ConfigDict:
    """Everything a run needs except the method block; method configs fill `config.method`."""
    scale = _SCALE[size]
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.size = size
    # Mesh axes sizes; -1 means "all remaining devices". Batch is sharded over ('data', 'fsdp').
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
    config.model = model_config(size)

    world = synthetic.default_config()
    world.image_size = config.model.image.image_size
    config.data = ml_collections.ConfigDict(
        dict(
            source="synthetic",
            world=world,
            train_size=scale["n_train"],
            eval_size=1_000,
            # Sentencepiece model file; empty = train one on the training captions into the workdir.
            tokenizer=dict(path="", vocab_size=config.model.text.vocab_size),
        )
    )

    config.train = ml_collections.ConfigDict(
        dict(
            steps=scale["steps"],
            batch_size=scale["batch"],
            learning_rate=scale["lr"],
            warmup_steps=scale["warmup"],
            end_learning_rate_ratio=0.0,
            weight_decay=0.1,
            b1=0.9,
            b2=0.98,
            eps=1e-6,
            grad_clip_norm=1.0,
            log_every=scale["log"],
            # Bytes available per device for the fail-fast memory check; 0 = ask the device (host RAM on CPU).
            device_memory_bytes=0,
            # Steps with a non-finite loss/gradient are skipped; this many in a row stop the run.
            max_nonfinite_steps=10,
        )
    )
    config.eval = ml_collections.ConfigDict(dict(every=scale["eval"], batch_size=min(scale["batch"], 1024)))
    # Keep the last `keep` checkpoints plus every `keep_every`-th step (0 = none extra); saves are asynchronous.
    config.checkpoint = ml_collections.ConfigDict(dict(every=scale["ckpt"], keep=3, keep_every=0, use_async=True))
    # Workdir of another run to warm-start parameters from (its latest checkpoint); empty = from scratch.
    config.init_from = ""
    return config
