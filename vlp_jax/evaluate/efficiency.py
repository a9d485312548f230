"""The two-stream efficiency claim made measurable (COTS: 10,800× faster; COOKIE: 3/1000 of the time).

Retrieval over N images × M texts costs a two-stream model N + M encoder passes plus one matrix product; a
single-stream (cross-encoder) model must run once per pair, N·M passes. We time the first and estimate the second
from its FLOPs at the FLOP rate our encoders reached in the same timing, so both figures come from one machine.
"""

import ml_collections

from vlp_jax import flops


def cross_encoder_flops_per_pair(model: ml_collections.ConfigDict) -> float:
    """Forward FLOPs of a single-stream model of the two towers' size scoring one image-text pair.

    The model: one transformer as wide as the image tower and as deep as both towers together, over the image's
    patches (+ CLS) and the caption's tokens, after the image's patch embedding. `model` is config.model.
    """
    image, text = model.image, model.text
    num_patches = (image.image_size // image.patch_size) ** 2
    tokens = num_patches + (1 if image.get("pool") == "cls" else 0) + text.max_len
    patch_embed = 2 * num_patches * (image.patch_size**2 * flops.IMAGE_CHANNELS) * image.width
    return patch_embed + flops.encoder_flops(tokens, image.width, image.depth + text.depth, image.mlp_dim)


def efficiency_report(
    model: ml_collections.ConfigDict,
    num_images: int,
    num_texts: int,
    image_seconds: float,
    text_seconds: float,
    product_seconds: float,
    encode_flops: dict[str, float] | None = None,
) -> dict[str, float]:
    """Measured two-stream retrieval time beside the estimated cross-encoder time for the same N × M.

    image_seconds / text_seconds: wall time to embed the N images / M texts; product_seconds: wall time of the
    [N, M] score product (every image against every text, each image's best kept); encode_flops: the method's
    forward FLOPs per image and per text (Method.encode_flops; default the towers and projections alone).
    """
    per_input = encode_flops or flops.tower_encode_flops(model)
    encode_seconds = image_seconds + text_seconds
    total_encode_flops = num_images * per_input["image"] + num_texts * per_input["text"]
    flops_per_second = total_encode_flops / encode_seconds  # what the encoders reached on this machine
    pair_flops = cross_encoder_flops_per_pair(model)
    two_stream_seconds = encode_seconds + product_seconds
    cross_encoder_seconds = num_images * num_texts * pair_flops / flops_per_second
    return {
        "num_images": num_images,
        "num_texts": num_texts,
        "encoder_passes": num_images + num_texts,
        "image_encode_s": image_seconds,
        "text_encode_s": text_seconds,
        "product_s": product_seconds,
        "two_stream_s": two_stream_seconds,
        "encoder_tflops_per_s": flops_per_second / 1e12,
        "cross_encoder_passes": num_images * num_texts,
        "cross_encoder_gflops_per_pair": pair_flops / 1e9,
        "cross_encoder_s_estimated": cross_encoder_seconds,
        "speedup": cross_encoder_seconds / two_stream_seconds,
    }
