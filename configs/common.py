"""Shared defaults and the size presets every method config scales with.

A variant name (`tiny`, `small`, `base`, `large`) selects tower shapes and training scale; `base` is the
CLIP ViT-B/16 shape (~150M parameters) and the default when a config is given without a variant.
"""

import ml_collections

from vlp_jax.data import sources, synthetic

SIZES = ("tiny", "small", "base", "large")

# Tower shapes per size: image (image_size, patch, width, depth, heads, mlp) and text (width, depth, heads, mlp,
# max_len, vocab). `base` is CLIP ViT-B/16; `large` is CLIP ViT-L/14.
_TOWERS = {
    "tiny": dict(image=(32, 8, 96, 2, 4, 192), text=(96, 2, 4, 192, 28, 128), embed_dim=96),
    "small": dict(image=(224, 16, 384, 12, 6, 1536), text=(384, 12, 6, 1536, 77, 49408), embed_dim=384),
    "base": dict(image=(224, 16, 768, 12, 12, 3072), text=(512, 12, 8, 2048, 77, 49408), embed_dim=512),
    "large": dict(image=(224, 14, 1024, 24, 16, 4096), text=(768, 12, 12, 3072, 77, 49408), embed_dim=768),
}

# Training scale per size: steps, global batch, peak lr, warmup, AdamW weight decay, log/eval/checkpoint cadence,
# synthetic set sizes. Every size uses AdamW with β = (0.9, 0.98), ε = 1e-6 and decay on matrices and embeddings
# only (not norms, biases or the temperature): CLIP's ViT recipe (Radford et al. 2021, table 20) and open_clip's
# defaults. Real-data recipes: tiny's lr, weight decay and crop were chosen on the emoji set against open_clip
# (docs/results/real-data.md: lr 2e-3 of {2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3}, weight decay 0.5 of {0.2, 0.5, 1.0});
# the larger sizes take the published recipes at their batch (CLIP: lr 5e-4 for ViT-B, 4e-4 for ViT-L, decay 0.2,
# 2,000 warm-up steps), which a CPU cannot check. The embedded world trains well with tiny's recipe (`make demo`).
_SCALE = {
    "tiny": dict(steps=600, batch=256, lr=2e-3, warmup=100, wd=0.5, log=50, eval=300, ckpt=300, n_train=20_000),
    "small": dict(steps=20_000, batch=1024, lr=1e-3, warmup=1_000, wd=0.2, log=100, eval=2_000, ckpt=2_000,
                  n_train=200_000),
    "base": dict(steps=100_000, batch=4096, lr=5e-4, warmup=2_000, wd=0.2, log=100, eval=5_000, ckpt=5_000,
                 n_train=200_000),
    "large": dict(steps=200_000, batch=8192, lr=4e-4, warmup=4_000, wd=0.2, log=100, eval=5_000, ckpt=5_000,
                  n_train=200_000),
}


# Data loading per size: worker processes, read threads, elements prefetched. Tiny runs on a 2-core CPU (CI): no
# workers, one thread that decodes while the step runs.
# Each element a worker keeps ready is one shared-memory segment (an open file): keep worker buffers small.
_LOADER = {
    "tiny": dict(workers=0, threads=1, prefetch=512, worker_buffer=1),
    "small": dict(workers=8, threads=2, prefetch=1024, worker_buffer=16),
    "base": dict(workers=16, threads=2, prefetch=2048, worker_buffer=16),
    "large": dict(workers=16, threads=2, prefetch=2048, worker_buffer=16),
}


# Evaluation per size: the subset scored during training, and retrieval tiles (CPU-cache sized for tiny,
# accelerator sized otherwise).
_EVAL = {
    "tiny": dict(subset=256, query_chunk=256, gallery_chunk=4096),
    "small": dict(subset=1000, query_chunk=2048, gallery_chunk=32768),
    "base": dict(subset=1000, query_chunk=2048, gallery_chunk=32768),
    "large": dict(subset=1000, query_chunk=2048, gallery_chunk=32768),
}


def default_evaluators() -> ml_collections.ConfigDict:
    """The two-tower suite: retrieval during training and at the end; the rest at the end only."""
    return ml_collections.ConfigDict(
        dict(
            retrieval=dict(type="retrieval", every=-1),
            unimodal=dict(type="unimodal", every=0),
            twins=dict(type="twins", every=0),
            zeroshot=dict(type="zeroshot", every=0),
            efficiency=dict(type="efficiency", every=0),
            picture=dict(type="picture", every=0),
        )
    )


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
                pre_norm=False,  # a LayerNorm before the encoder (CLIP's ln_pre; imported CLIP weights set it)
            ),
            text=dict(
                vocab_size=vocab, max_len=max_len, width=t_width, depth=t_depth, heads=t_heads, mlp_dim=t_mlp,
                pool="eos",
                causal=False,  # causal self-attention (CLIP's text tower; imported CLIP weights set it)
            ),
            embed_dim=towers["embed_dim"],
            dtype="float32" if size == "tiny" else "bfloat16",
            # What each transformer block keeps for the backward pass (models/layers.py REMAT_POLICIES): "none",
            # "full" (everything recomputed), "dots" (matmul outputs kept), "dots_no_batch" (weight matmuls kept).
            remat="none",
            # Both towers' blocks as one nn.scan over stacked parameters: compile time independent of depth, the
            # same outputs; checkpoints differ in layout (layers.stack_blocks / unstack_blocks convert).
            scan_layers=False,
            # Both towers' attention kernel (models/layers.py ATTENTION): "xla" (every backend), "cudnn" (NVIDIA
            # flash attention: bfloat16, head dim % 8), "auto" (cuDNN where it applies, XLA elsewhere).
            attention="xla",
            # Both towers' MLP activation (models/layers.py ACTIVATIONS): "gelu" (tanh approximation), "gelu_exact"
            # (open_clip's weights), "quick_gelu" (OpenAI's).
            activation="gelu",
            layer_norm_eps=1e-6,  # both towers' LayerNorms (flax's default); imported CLIP weights use torch's 1e-5
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
            # Comma-separated sources, each optionally '@WEIGHT' (mixing weight): 'synthetic' (the embedded
            # world), a dataset directory from vlp_jax.datasets.convert ('DIR' or 'DIR:SPLIT'), a glob of ArrayRecord
            # files, or 'tfds:NAME[:SPLIT]' (the [tfds] extra). See vlp_jax/data/sources.py.
            train_sources="synthetic",
            eval_sources="synthetic",
            world=world,
            train_size=scale["n_train"],  # embedded-world scenes per split
            eval_size=1_000,
            # "lazy": each scene rendered when its record is read (nothing written up front); "shards": the world
            # written once as ArrayRecord shards under world_dir and read back (data/world_shards.py).
            world_storage="lazy",
            world_dir="",  # where world_storage="shards" caches the world; empty = <workdir>/data
            # Eval records whose labels[group_label] are equal show the same content (e.g. one emoji in several
            # art styles): retrieval counts any of them as a hit. Empty = every image is its own group.
            group_label="",
            # Fine-tuning (configs/finetune): the downstream task whose ground truth the `task` feature reads
            # ("ve", "vqa", "rec"; data/tasks.py), and VQA's answer vocabulary (empty: the world's, or the most
            # frequent training answers, chosen when the run starts: methods/finetune.py).
            task="",
            answers=(),
            max_boxes=8,  # rows of the `boxes` feature (methods that declare it): object boxes per example
            # The `anchors` feature's (CMAL) synonym/lemma map, JSON like vlp_jax/data/anchor_map.json; "" = that one.
            anchor_map="",
            tfds=sources.default_tfds_config(),
            # kind "sentencepiece": a model file in `path`, or empty = train one on the training captions into the
            # workdir; kind "clip_bpe": CLIP's BPE vocabulary file in `path` (imported CLIP weights).
            tokenizer=dict(kind="sentencepiece", path="", vocab_size=config.model.text.vocab_size,
                           max_captions=1_000_000),
            image=dict(
                max_pixels=50_000_000,  # larger images are skipped (decompression bombs)
                background=(255, 255, 255),  # transparent pixels are composited over this colour
                # Random resized crop for training: area fraction and aspect-ratio range (open_clip's scale).
                crop_scale=(0.9, 1.0),
                crop_ratio=(3 / 4, 4 / 3),
                crop_tries=10,
                # The embedded world's recipe: training on the world alone takes whole-image crops whatever
                # crop_scale says (its scenes are drawn at the model's size and its captions name positions and
                # counts, which a crop would make false; data/pipeline.train_image_options). False crops it too.
                world_whole_image=True,
                resample="bilinear",
                # "opencv": block averaging then plain interpolation, like tf.image.resize (big_vision), ~8x faster;
                # "pil": PIL's antialiased resize (open_clip/torchvision).
                resizer="opencv",
                fast_jpeg=False,  # libjpeg-turbo's fast IDCT and chroma upsampling: a few % faster, a little less exact
            ),
            loader=dict(
                worker_count=_LOADER[size]["workers"],  # grain worker processes (0 = decode in the main process)
                read_threads=_LOADER[size]["threads"],  # reading/decoding threads per process
                prefetch=_LOADER[size]["prefetch"],  # elements prepared ahead per process
                worker_buffer=_LOADER[size]["worker_buffer"],  # elements each worker keeps ready
                skip_log_limit=20,  # skipped records logged one by one per reason; all are counted
            ),
        )
    )
    if size == "tiny":
        # Small icons and clip art at 32 px: a milder aspect range than photos (measured on emoji, where this crop
        # gives +1.0 mean R@1 over none and a 0.5-1 area crop -3.7: docs/results/real-data.md).
        config.data.image.crop_scale = (0.8, 1.0)
        config.data.image.crop_ratio = (0.9, 1.1)

    config.train = ml_collections.ConfigDict(
        dict(
            steps=scale["steps"],
            batch_size=scale["batch"],
            learning_rate=scale["lr"],
            warmup_steps=scale["warmup"],
            end_learning_rate_ratio=0.0,
            weight_decay=scale["wd"],
            b1=0.9,
            b2=0.98,
            eps=1e-6,
            grad_clip_norm=1.0,
            log_every=scale["log"],
            # Bytes available per device for the fail-fast memory check; 0 = ask the device (host RAM on CPU).
            device_memory_bytes=0,
            # Steps with a non-finite loss/gradient are skipped; this many in a row stop the run.
            max_nonfinite_steps=10,
            # > 0: in-batch contrastive losses (CLIP, COOKIE) score the gathered columns this many at a time with an
            # online log-sum-exp, each block recomputed in the backward pass: memory O(b_local × chunk) instead of
            # O(b_local × B), the same loss (objectives/contrastive.py). 0 = the whole [b_local, B] logits at once.
            contrastive_chunk=0,
            # True: the contrastive keys travel round the ring of replicas (ppermute, one hop each) instead of being
            # all-gathered (objectives/contrastive.py, sigmoid.py): the same loss; CLIP, SigLIP and COOKIE.
            contrastive_ring=False,
            # K > 1: the global batch's exact gradient with one micro-batch (B / K examples) of activations live at
            # a time (Method.loss_and_grads: embed all without activations, loss over the whole batch, re-run each
            # micro-batch with its embedding gradient). CLIP, SigLIP, BriVL, COTS and COOKIE; CMAL refuses.
            microbatches=1,
            # Parameter groups by name, each dict(pattern=REGEX, frozen=False, lr_multiplier=1.0, weight_decay=-1.0):
            # the first group (in order) whose pattern fullmatches a parameter's '/'-joined path
            # ("towers/image_tower/encoder/block0/mlp/fc1/kernel") owns it; -1 = the global weight_decay; frozen
            # parameters never change and hold no optimizer state. Empty = one group of defaults. E.g.
            # --config.train.param_groups='{"image": {"pattern": "towers/image_tower/.*", "frozen": True}}'
            param_groups={},
        )
    )
    config.eval = ml_collections.ConfigDict(
        dict(
            every=scale["eval"],  # steps between retrievals on the subset; the full suite runs at the end
            final=True,  # the full suite at the end of training; False leaves it to a later --mode=eval
            batch_size=min(scale["batch"], 1024),
            subset_size=_EVAL[size]["subset"],  # eval images (with all their captions) scored during training; 0 = all
            # Retrieval tiles: query rows × gallery rows scored at once (memory per tile); see evaluate/retrieval.py.
            query_chunk=_EVAL[size]["query_chunk"],
            gallery_chunk=_EVAL[size]["gallery_chunk"],
            # Every rank's tie rule (evaluate/retrieval.py): "against" (a negative scoring exactly as high as the
            # best positive ranks ahead of it) or "favour" (only strictly higher ones do: open_clip's bench harness
            # rule, for side-by-side figures; the two differ where different images share a caption text).
            ties="against",
            # The full evaluation (end of run, --mode=eval) reads at most this many images per set and zero-shot
            # task: 0 = all; -1 = a short run's cap, the images it trained on (steps × batch, at least 64).
            max_examples=-1,
            zeroshot=dict(
                size=256,  # images per zero-shot task of the embedded world
                # Labelled zero-shot tasks by name: each a dict of source, label_field, class_names,
                # class_names_file, templates, max_examples (see vlp_jax/evaluate/labelled.py).
                tasks={},
            ),
            unimodal=dict(max_shift=0.0625),  # image→image: the world's other view moves by up to this × image side
            picture=dict(queries=4, top_k=5, image_px=96),  # retrieval picture: queries per direction, results, px
            # Evaluators by name (vlp_jax/evaluate/run.py registry): type, `every` (steps between runs on the subset
            # during training; -1 = eval.every, 0 = only the full evaluation at the end) and their options. A method
            # adds its own (Method.evaluators); `--config.eval.evaluators.<name>.every=...` changes one.
            evaluators=default_evaluators(),
        )
    )
    # Keep the last `keep` checkpoints plus every `keep_every`-th step (0 = none extra); saves are asynchronous.
    config.checkpoint = ml_collections.ConfigDict(dict(every=scale["ckpt"], keep=3, keep_every=0, use_async=True))
    # Runs this one needs first, by name (vlp_jax/stages.py): dict(config="module:function", output="config.key",
    # description=...). Method configs declare them (COTS: its visual tokenizer).
    config.stages = ml_collections.ConfigDict()
    # Workdir of another run to warm-start parameters from (its latest checkpoint); empty = from scratch.
    config.init_from = ""
    # What init_from loads (checkpoint.load_params): `include`/`exclude` regexes fullmatch '/'-joined parameter
    # paths (no include = all); `rename` rules "pattern=replacement" (re.sub, in order) map saved paths to this
    # run's, e.g. --config.init.include='("towers/image_tower/.*",)' --config.init.rename='("^image=vision",)'.
    config.init = ml_collections.ConfigDict(dict(include=(), exclude=(), rename=()))
    return config
