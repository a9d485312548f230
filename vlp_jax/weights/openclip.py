"""OpenAI CLIP and open_clip ViT checkpoints (safetensors) into the towers of configs/clip.py, and back.

    state = safetensors.load("open_clip_model.safetensors")    # e.g. ViT-B-32 from the open_clip hub, downloaded by you
    configure(config.model, state, origin="openai")            # shapes, ln_pre, causal text, QuickGELU, LN eps
    params = import_params(state, config.model)                # the parameters of methods/clip.py's ClipModel
    state = export_params(params, config.model)                # open_clip's names and layout again

What differs between the two layouts, and how it is mapped:
- attention: torch packs q, k, v in one `in_proj_weight` [3w, w] (y = x Wᵀ); ours are [w, heads, head_dim] kernels.
- pixels: open_clip normalises (p/255 - mean)/std per channel; our ViT reads p/127.5 - 1. The difference is affine
  per input channel, so it is folded exactly into the patch kernel and bias; the patch bias (open_clip has none) is
  folded into the patch rows of the position embedding on export.
- tokens: CLIP's id 0 is "!", ours is padding, so our ids are CLIP's + 1 (clip_bpe.ClipTokenizer does this) and the
  token table gains a zero row 0. With causal attention, pooling the last real token (ours) is CLIP's EOT pooling.
- activation by origin: OpenAI's checkpoints were trained with QuickGELU, open_clip's with exact GELU; LayerNorm
  epsilon 1e-5 (torch's) instead of our 1e-6.
"""

import re

import ml_collections
import numpy as np

# open_clip's OPENAI_DATASET_MEAN / STD: the pixel normalisation every OpenAI and most open_clip checkpoints use.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ACTIVATION_BY_ORIGIN = {"openai": "quick_gelu", "open_clip": "gelu_exact"}
HEAD_WIDTH = 64  # CLIP's attention head width: heads = width / 64 unless given
TORCH_LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which CLIP's towers use


def depth_of(state: dict[str, np.ndarray], prefix: str) -> int:
    blocks = {int(m.group(1)) for key in state if (m := re.match(rf"{re.escape(prefix)}resblocks\.(\d+)\.", key))}
    return len(blocks)


def configure(model: ml_collections.ConfigDict, state: dict[str, np.ndarray], origin: str,
              image_heads: int | None = None, text_heads: int | None = None) -> None:
    """Sets config.model's shapes and switches from a checkpoint (heads = width / 64 unless given)."""
    if origin not in ACTIVATION_BY_ORIGIN:
        raise ValueError(f"origin={origin!r}; use one of {', '.join(ACTIVATION_BY_ORIGIN)} (it selects the activation)")
    missing = [k for k in ("visual.conv1.weight", "token_embedding.weight", "visual.proj") if k not in state]
    if missing:
        raise ValueError(f"not an OpenAI/open_clip ViT checkpoint: no {', '.join(missing)}")
    width, _, patch, _ = state["visual.conv1.weight"].shape
    grid = int(round(np.sqrt(state["visual.positional_embedding"].shape[0] - 1)))
    text_width = state["token_embedding.weight"].shape[1]
    model.image.update(dict(
        image_size=grid * patch, patch_size=patch, width=width, depth=depth_of(state, "visual.transformer."),
        heads=image_heads or width // HEAD_WIDTH,
        mlp_dim=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        pool="cls", pre_norm=True,
    ))
    model.text.update(dict(
        vocab_size=state["token_embedding.weight"].shape[0] + 1, max_len=state["positional_embedding"].shape[0],
        width=text_width, depth=depth_of(state, "transformer."), heads=text_heads or text_width // HEAD_WIDTH,
        mlp_dim=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], pool="eos", causal=True,
    ))
    model.embed_dim = state["visual.proj"].shape[1]
    model.activation = ACTIVATION_BY_ORIGIN[origin]
    model.layer_norm_eps = TORCH_LAYER_NORM_EPS


def _block_in(state, prefix: str, heads: int) -> dict:
    """One torch residual block -> our EncoderBlock parameters."""
    get = lambda name: np.asarray(state[prefix + name], np.float32)  # noqa: E731
    width = get("ln_1.weight").shape[0]
    head_dim = width // heads
    attention = {}
    for name, weight, bias in zip(("query", "key", "value"), np.split(get("attn.in_proj_weight"), 3),
                                  np.split(get("attn.in_proj_bias"), 3), strict=True):
        attention[name] = weight.T.reshape(width, heads, head_dim)  # [w, heads, head_dim]
        attention[f"{name}_bias"] = bias.reshape(heads, head_dim)
    attention["out"] = get("attn.out_proj.weight").T.reshape(heads, head_dim, width)
    attention["out_bias"] = get("attn.out_proj.bias")
    return {
        "attention": attention,
        "ln1": {"scale": get("ln_1.weight"), "bias": get("ln_1.bias")},
        "ln2": {"scale": get("ln_2.weight"), "bias": get("ln_2.bias")},
        "mlp": {"fc1": {"kernel": get("mlp.c_fc.weight").T, "bias": get("mlp.c_fc.bias")},
                "fc2": {"kernel": get("mlp.c_proj.weight").T, "bias": get("mlp.c_proj.bias")}},
    }


def _block_out(block: dict, prefix: str) -> dict[str, np.ndarray]:
    """Our EncoderBlock parameters -> one torch residual block."""
    a = {k: np.asarray(v, np.float32) for k, v in block["attention"].items()}
    width = a["query"].shape[0]
    qkv = ("query", "key", "value")
    return {
        prefix + "attn.in_proj_weight": np.concatenate([a[n].reshape(width, width).T for n in qkv]),
        prefix + "attn.in_proj_bias": np.concatenate([a[f"{n}_bias"].reshape(width) for n in qkv]),
        prefix + "attn.out_proj.weight": a["out"].reshape(width, width).T,
        prefix + "attn.out_proj.bias": a["out_bias"],
        prefix + "ln_1.weight": np.asarray(block["ln1"]["scale"]),
        prefix + "ln_1.bias": np.asarray(block["ln1"]["bias"]),
        prefix + "ln_2.weight": np.asarray(block["ln2"]["scale"]),
        prefix + "ln_2.bias": np.asarray(block["ln2"]["bias"]),
        prefix + "mlp.c_fc.weight": np.asarray(block["mlp"]["fc1"]["kernel"]).T,
        prefix + "mlp.c_fc.bias": np.asarray(block["mlp"]["fc1"]["bias"]),
        prefix + "mlp.c_proj.weight": np.asarray(block["mlp"]["fc2"]["kernel"]).T,
        prefix + "mlp.c_proj.bias": np.asarray(block["mlp"]["fc2"]["bias"]),
    }


def _encoder_in(state, prefix: str, depth: int, heads: int, final_ln: str) -> dict:
    encoder = {f"block{i}": _block_in(state, f"{prefix}resblocks.{i}.", heads) for i in range(depth)}
    encoder["ln_final"] = {"scale": np.asarray(state[f"{final_ln}.weight"], np.float32),
                           "bias": np.asarray(state[f"{final_ln}.bias"], np.float32)}
    return encoder


def _encoder_out(encoder: dict, prefix: str, final_ln: str) -> dict[str, np.ndarray]:
    out = {f"{final_ln}.weight": np.asarray(encoder["ln_final"]["scale"]),
           f"{final_ln}.bias": np.asarray(encoder["ln_final"]["bias"])}
    for i in range(sum(name.startswith("block") for name in encoder)):
        out.update(_block_out(encoder[f"block{i}"], f"{prefix}resblocks.{i}."))
    return out


def _pixel_affine(mean, std) -> tuple[np.ndarray, np.ndarray]:
    """(a, c) per channel with (p/255 - mean)/std = a·x + c for our x = p/127.5 - 1."""
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    return 0.5 / std, (0.5 - mean) / std


def import_params(state: dict[str, np.ndarray], model: ml_collections.ConfigDict, mean=CLIP_MEAN,
                  std=CLIP_STD) -> dict:
    """A checkpoint's arrays -> the parameters of methods.clip.ClipModel for `model` (see `configure`)."""
    conv = np.asarray(state["visual.conv1.weight"], np.float64).transpose(2, 3, 1, 0)  # [kh, kw, in, out]
    scale, shift = _pixel_affine(mean, std)
    patch_bias = np.einsum("hwio,i->o", conv, shift)  # the constant the normalisation shift adds to every patch
    if "visual.conv1.bias" in state:
        patch_bias = patch_bias + np.asarray(state["visual.conv1.bias"], np.float64)
    tokens = np.asarray(state["token_embedding.weight"], np.float32)
    image = {
        "patch_embed": {"kernel": (conv * scale[None, None, :, None]).astype(np.float32),
                        "bias": patch_bias.astype(np.float32)},
        "cls": np.asarray(state["visual.class_embedding"], np.float32).reshape(1, 1, -1),
        "pos_embedding": np.asarray(state["visual.positional_embedding"], np.float32)[None],
        "ln_pre": {"scale": np.asarray(state["visual.ln_pre.weight"], np.float32),
                   "bias": np.asarray(state["visual.ln_pre.bias"], np.float32)},
        "encoder": _encoder_in(state, "visual.transformer.", model.image.depth, model.image.heads, "visual.ln_post"),
    }
    text = {
        "token_embed": {"embedding": np.concatenate([np.zeros_like(tokens[:1]), tokens])},  # row 0: padding
        "pos_embedding": np.asarray(state["positional_embedding"], np.float32)[None],
        "encoder": _encoder_in(state, "transformer.", model.text.depth, model.text.heads, "ln_final"),
    }
    return {
        "towers": {
            "image_tower": image, "text_tower": text,
            "image_projection": {"dense": {"kernel": np.asarray(state["visual.proj"], np.float32)}},
            "text_projection": {"dense": {"kernel": np.asarray(state["text_projection"], np.float32)}},
        },
        "logit_scale": {"log_scale": np.asarray(state.get("logit_scale", np.log(1 / 0.07)), np.float32).reshape(())},
    }


def export_params(params: dict, model: ml_collections.ConfigDict, mean=CLIP_MEAN,
                  std=CLIP_STD) -> dict[str, np.ndarray]:
    """ClipModel parameters (pre_norm ViT, causal text; see `configure`) -> open_clip's state dict layout."""
    if not (model.image.get("pre_norm", False) and model.text.get("causal", False) and model.image.pool == "cls"
            and model.text.pool == "eos"):
        raise ValueError("open_clip's layout needs config.model.image.pre_norm=True, pool='cls' and "
                         "config.model.text.causal=True, pool='eos'")
    towers = params["towers"]
    image, text = towers["image_tower"], towers["text_tower"]
    scale, shift = _pixel_affine(mean, std)
    kernel = np.asarray(image["patch_embed"]["kernel"], np.float64) / scale[None, None, :, None]  # open_clip's W
    patch_bias = np.asarray(image["patch_embed"]["bias"], np.float64) - np.einsum("hwio,i->o", kernel, shift)
    pos = np.asarray(image["pos_embedding"], np.float64)[0]
    pos[1:] += patch_bias  # open_clip's patch embedding has no bias: it moves into the patch rows' positions
    state = {
        "visual.conv1.weight": kernel.transpose(3, 2, 0, 1),
        "visual.class_embedding": np.asarray(image["cls"]).reshape(-1),
        "visual.positional_embedding": pos,
        "visual.ln_pre.weight": np.asarray(image["ln_pre"]["scale"]),
        "visual.ln_pre.bias": np.asarray(image["ln_pre"]["bias"]),
        "visual.proj": np.asarray(towers["image_projection"]["dense"]["kernel"]),
        "token_embedding.weight": np.asarray(text["token_embed"]["embedding"])[1:],
        "positional_embedding": np.asarray(text["pos_embedding"])[0],
        "text_projection": np.asarray(towers["text_projection"]["dense"]["kernel"]),
        "logit_scale": np.asarray(params["logit_scale"]["log_scale"]).reshape(()),
        **_encoder_out(image["encoder"], "visual.transformer.", "visual.ln_post"),
        **_encoder_out(text["encoder"], "transformer.", "ln_final"),
    }
    return {name: np.ascontiguousarray(value, np.float32) for name, value in state.items()}
