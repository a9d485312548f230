"""Writes tests/data/openclip/: a tiny randomly initialised open_clip CLIP, its inputs and its outputs, for the
parity test of vlp_jax/weights/openclip.py and vlp_jax/data/clip_bpe.py (which need no torch and no network).

Run once, with open_clip installed (torch is never a dependency of vlp_jax):
    bash ../shared/bench-openclip/setup.sh /tmp/oc-venv
    /tmp/oc-venv/bin/python tools/make_openclip_fixture.py [--out=tests/data/openclip]

Files: vocab.txt.gz (the first MERGES merges of the BPE vocabulary shipped with open_clip), model.safetensors (the
weights, float32), expected.safetensors (uint8 images, open_clip's token ids, and the normalised image and text
embeddings of the same weights built as OpenAI's models (QuickGELU) and as open_clip's (GELU)), texts.json. The
safetensors files are written by the safetensors package; the test reads them with vlp_jax's own reader.
"""

import argparse
import gzip
import json
import os

import numpy as np
import open_clip
import torch
from open_clip.tokenizer import SimpleTokenizer
from safetensors.numpy import save_file

MERGES = 40
CONTEXT = 12
IMAGE, PATCH, WIDTH, DEPTH, HEAD_WIDTH, EMBED = 32, 8, 16, 2, 8, 8
TEXTS = [
    "a red circle left of a small blue square",
    "The THE the!!  there's   two &amp; three",
    "café 42 ½ x_y #hash @at",
    "a very long caption that is cut at the context length of this tiny model",
    "",
]


def tiny_vocab(path: str) -> str:
    """The packaged vocabulary's header line and first MERGES merges, gzipped, with no trailing newline."""
    packaged = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(packaged, "rt", encoding="utf-8").read().split("\n")[: 1 + MERGES]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path


def build(vocab_size: int, quick_gelu: bool) -> open_clip.CLIP:
    vision = dict(layers=DEPTH, width=WIDTH, head_width=HEAD_WIDTH, mlp_ratio=2.0, patch_size=PATCH, image_size=IMAGE)
    text = dict(context_length=CONTEXT, vocab_size=vocab_size, width=WIDTH, heads=WIDTH // HEAD_WIDTH, layers=DEPTH,
                mlp_ratio=2.0)
    return open_clip.CLIP(EMBED, vision, text, quick_gelu=quick_gelu).eval()


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (LayerNorm scales around 1), so that each one's mapping is tested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.2
            is_norm_scale = "ln" in name and name.endswith("weight")
            param.copy_(1.0 + noise if is_norm_scale else noise)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="tests/data/openclip")
    out = parser.parse_args().out
    os.makedirs(out, exist_ok=True)
    tokenizer = SimpleTokenizer(bpe_path=tiny_vocab(os.path.join(out, "vocab.txt.gz")), context_length=CONTEXT)
    tokens = tokenizer(TEXTS)  # [n, CONTEXT] int64
    images = np.random.default_rng(0).integers(0, 256, (4, IMAGE, IMAGE, 3), dtype=np.uint8)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1)
                 for v in (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD))
    pixels = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    expected = {"images": images, "tokens": tokens.numpy().astype(np.int32)}
    reference = build(tokenizer.vocab_size, quick_gelu=False)
    randomise(reference, seed=0)
    weights = {k: v.detach().numpy().copy() for k, v in reference.state_dict().items() if k != "attn_mask"}
    for origin, quick_gelu in (("openai", True), ("open_clip", False)):
        model = build(tokenizer.vocab_size, quick_gelu)
        model.load_state_dict(reference.state_dict())
        with torch.no_grad():
            expected[f"image_{origin}"] = model.encode_image(pixels, normalize=True).numpy()
            expected[f"text_{origin}"] = model.encode_text(tokens, normalize=True).numpy()
    # Written by the reference safetensors library: the test reads them with vlp_jax's own reader.
    save_file(weights, os.path.join(out, "model.safetensors"))
    save_file({k: np.ascontiguousarray(v) for k, v in expected.items()}, os.path.join(out, "expected.safetensors"))
    with open(os.path.join(out, "texts.json"), "w", encoding="utf-8") as f:
        json.dump({"texts": TEXTS, "context_length": CONTEXT, "image_heads": WIDTH // HEAD_WIDTH,
                   "text_heads": WIDTH // HEAD_WIDTH}, f, indent=1, ensure_ascii=False)
    print({name: os.path.getsize(os.path.join(out, name)) for name in sorted(os.listdir(out))})


if __name__ == "__main__":
    main()
