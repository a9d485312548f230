"""OpenAI CLIP / open_clip weights -> a vlp_jax run directory that everything else reads as if we had trained it.

    python -m vlp_jax.weights.make_run --weights=ViT-B-32.safetensors --origin=openai \\
        --vocab=bpe_simple_vocab_16e6.txt.gz --workdir=runs/clip_b32 [--preset=base] [--image_heads=N --text_heads=N]

The files are the user's own (downloaded by them; nothing is fetched here). The run directory gets a step-0
checkpoint of a `configs/clip.py` run: the imported parameters, a fresh optimizer state, the data position of a run
that has not started, and the config, whose towers come from the weights' shapes (weights/openclip.py `configure`)
and whose text tokenizer is CLIP's BPE (`config.data.tokenizer.kind="clip_bpe"`, path = the vocabulary file).
So the directory works as:
- `python -m vlp_jax.embed --checkpoint=DIR ...` (embeddings, zero-shot of your images);
- `python -m vlp_jax.main --config=configs/clip.py --workdir=DIR --mode=eval` style evaluation, or fine-tuning by
  resuming it (`--workdir=DIR`, with the same model settings) or by `--config.init_from=DIR` from another run;
- another method's partial loads (`Pretrained`, `init_from`), e.g. a COOKIE frozen teacher.
`--preset` picks the rest of the config (data, train, eval) from `configs/clip.py:<preset>`.
"""

import argparse
import sys

import ml_collections

from vlp_jax.weights import openclip, safetensors


def imported_config(state: dict, origin: str, vocab: str, preset: str = "base", image_heads: int = 0,
                    text_heads: int = 0) -> ml_collections.ConfigDict:
    """`configs/clip.py:<preset>` with the checkpoint's towers and CLIP's tokenizer."""
    from etils import epath

    from configs import clip

    config = clip.get_config(preset)
    openclip.configure(config.model, state, origin, image_heads or None, text_heads or None)
    config.data.world.image_size = config.model.image.image_size
    config.data.tokenizer.update(dict(kind="clip_bpe", path=str(epath.Path(vocab).resolve()),
                                      vocab_size=config.model.text.vocab_size))
    return config


def make_run(weights: str, origin: str, vocab: str, workdir: str, preset: str = "base", image_heads: int = 0,
             text_heads: int = 0) -> ml_collections.ConfigDict:
    """Writes the run directory (see the module docstring) and returns its config."""
    from vlp_jax import checkpoint, step, train
    from vlp_jax.data import pipeline, tokenizer

    state = safetensors.load(weights)
    config = imported_config(state, origin, vocab, preset, image_heads, text_heads)
    tokenizer.open_tokenizer(config.data.tokenizer)  # a wrong vocabulary path fails before anything is built
    path = train.prepare_workdir(workdir)
    checkpointer = checkpoint.Checkpointer(path, config.checkpoint)
    if checkpointer.latest_step() is not None:
        checkpointer.close()
        raise FileExistsError(f"--workdir={workdir} already holds a run (checkpoint {checkpointer.latest_step()}); "
                              "pass an empty or new directory")
    run = step.setup(config)
    arrays = checkpoint.leaves_by_path(openclip.import_params(state, config.model))
    targets = checkpoint.leaves_by_path(run.state.params)
    mismatched = sorted(set(arrays) ^ set(targets)) + sorted(
        name for name in set(arrays) & set(targets) if tuple(arrays[name].shape) != tuple(targets[name].shape))
    if mismatched:
        raise ValueError(f"--weights={weights}: the imported parameters do not fit configs/clip.py's model at "
                         f"{len(mismatched)} paths: {', '.join(mismatched[:8])}")
    params = checkpoint.replace_leaves(run.state.params, arrays)
    data_state = pipeline.load(config, path, eval_limit=1).train.get_state()  # a run that has not started
    checkpointer.save(0, run.state.replace(params=params), data_state, config)
    checkpointer.close()
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlp_jax.weights.make_run", description=__doc__.split("\n")[0])
    parser.add_argument("--weights", required=True, help="an OpenAI CLIP or open_clip ViT checkpoint (.safetensors)")
    parser.add_argument("--origin", required=True, choices=sorted(openclip.ACTIVATION_BY_ORIGIN),
                        help="openai: QuickGELU (OpenAI's checkpoints); open_clip: exact GELU (open_clip's own)")
    parser.add_argument("--vocab", required=True, help="CLIP's BPE vocabulary (bpe_simple_vocab_16e6.txt.gz)")
    parser.add_argument("--workdir", required=True, help="the run directory to write (new or empty)")
    parser.add_argument("--preset", default="base", help="configs/clip.py preset for data, train and eval settings")
    parser.add_argument("--image_heads", type=int, default=0, help="attention heads; 0 = width / 64")
    parser.add_argument("--text_heads", type=int, default=0, help="attention heads; 0 = width / 64")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    from vlp_jax import cli

    config = cli.report_errors(make_run, args.weights, args.origin, args.vocab, args.workdir, args.preset,
                               args.image_heads, args.text_heads, debug=args.debug)
    image, text = config.model.image, config.model.text
    print(f"wrote {args.workdir}: {args.origin} ViT {image.image_size} px / patch {image.patch_size}, width "
          f"{image.width}, {image.depth}+{text.depth} layers, embed {config.model.embed_dim}; tokenizer "
          f"{config.data.tokenizer.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
