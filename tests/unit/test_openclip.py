"""OpenAI CLIP / open_clip weights: a tiny random open_clip model's embeddings (tests/data/openclip, written by
tools/make_openclip_fixture.py) are reproduced by our towers after import, and CLIP's BPE ids exactly."""

import json
import os

import jax
import numpy as np
import pytest

from configs import clip
from vlp_jax.data.clip_bpe import ClipTokenizer
from vlp_jax.methods.clip import ClipModel
from vlp_jax.weights import openclip, safetensors

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "openclip")


@pytest.fixture(scope="module")
def fixture():
    with open(os.path.join(FIXTURE, "texts.json"), encoding="utf-8") as f:
        meta = json.load(f)
    return (safetensors.load(os.path.join(FIXTURE, "model.safetensors")),
            safetensors.load(os.path.join(FIXTURE, "expected.safetensors")), meta)


def imported(state, meta, origin):
    config = clip.get_config("tiny")
    openclip.configure(config.model, state, origin, image_heads=meta["image_heads"], text_heads=meta["text_heads"])
    config.model.dtype = "float32"
    return config, openclip.import_params(state, config.model)


def embed(config, params, images, tokens):
    model = ClipModel(config.model, config.method.temperature_init, config.method.max_logit_scale)
    out = jax.jit(model.apply)({"params": params}, images, tokens)
    return np.asarray(out["image"]), np.asarray(out["text"])


def test_tokenizer_gives_open_clips_ids_exactly(fixture):
    _, expected, meta = fixture
    tokenizer = ClipTokenizer(os.path.join(FIXTURE, "vocab.txt.gz"))
    ours = tokenizer(meta["texts"], meta["context_length"])
    clip_ids = expected["tokens"]
    np.testing.assert_array_equal(np.where(ours > 0, ours - 1, 0), clip_ids)  # ours are CLIP's + 1, 0 = padding
    assert (ours[clip_ids > 0] > 0).all() and 1 in ours  # CLIP's "!" (id 0) is a real token here (1)
    assert (ours[:, -1] == tokenizer.end + 1)[3]  # the long text is cut and keeps its end token


@pytest.mark.parametrize("origin", ["openai", "open_clip"])
def test_imported_embeddings_match_open_clip(fixture, origin):
    state, expected, meta = fixture
    config, params = imported(state, meta, origin)
    assert config.model.activation == {"openai": "quick_gelu", "open_clip": "gelu_exact"}[origin]
    tokens = ClipTokenizer(os.path.join(FIXTURE, "vocab.txt.gz"))(meta["texts"], meta["context_length"])
    image, text = embed(config, params, expected["images"], tokens)
    np.testing.assert_allclose(image, expected[f"image_{origin}"], atol=1e-4, rtol=0)  # measured: < 1e-6
    np.testing.assert_allclose(text, expected[f"text_{origin}"], atol=1e-4, rtol=0)  # measured: < 1e-6
    # The other origin's activation gives other embeddings: the comparison can fail.
    other = {"openai": "open_clip", "open_clip": "openai"}[origin]
    assert np.abs(image - expected[f"image_{other}"]).max() > 1e-3


def test_export_gives_back_the_open_clip_checkpoint(fixture, tmp_path):
    state, _, meta = fixture
    config, params = imported(state, meta, "openai")
    exported = openclip.export_params(params, config.model)
    assert sorted(exported) == sorted(state)
    for name, value in state.items():
        np.testing.assert_allclose(exported[name], value, atol=2e-6, rtol=0, err_msg=name)
    path = str(tmp_path / "exported.safetensors")
    safetensors.save(exported, path)
    again = safetensors.load(path)
    assert all(np.array_equal(again[name], exported[name]) for name in exported)


def test_export_folds_a_trained_patch_bias_into_the_positions(fixture):
    """Our ViT has a patch bias open_clip lacks: exported and re-imported, the embeddings are the same."""
    state, expected, meta = fixture
    config, params = imported(state, meta, "openai")
    bias = params["towers"]["image_tower"]["patch_embed"]["bias"]
    params["towers"]["image_tower"]["patch_embed"]["bias"] = bias + np.linspace(-1, 1, bias.size, dtype=np.float32)
    tokens = expected["tokens"] + 1
    before, _ = embed(config, params, expected["images"], tokens)
    _, params_again = imported(openclip.export_params(params, config.model), meta, "openai")
    after, _ = embed(config, params_again, expected["images"], tokens)
    np.testing.assert_allclose(after, before, atol=1e-5)
    assert np.abs(before - expected["image_openai"]).max() > 1e-3


# (name, vision width, layers, patch, text width, embed): ViT-B/32, B/16 and L/14 at 224 px, text context 77.
SHAPES = [("ViT-B-32", 768, 12, 32, 512, 512), ("ViT-B-16", 768, 12, 16, 512, 512),
          ("ViT-L-14", 1024, 24, 14, 768, 768)]


@pytest.mark.parametrize("name,width,layers,patch,text_width,embed", SHAPES)
def test_configure_reads_the_shapes_of_released_clip_models(name, width, layers, patch, text_width, embed):
    """Shapes only (no weights): the arrays a released checkpoint has, as open_clip names them."""
    del name
    state = {"visual.conv1.weight": np.empty((width, 3, patch, patch)),
             "visual.positional_embedding": np.empty(((224 // patch) ** 2 + 1, width)),
             "visual.proj": np.empty((width, embed)), "token_embedding.weight": np.empty((49408, text_width)),
             "positional_embedding": np.empty((77, text_width)),
             "visual.transformer.resblocks.0.mlp.c_fc.weight": np.empty((4 * width, width)),
             "transformer.resblocks.0.mlp.c_fc.weight": np.empty((4 * text_width, text_width))}
    for i in range(layers):
        state[f"visual.transformer.resblocks.{i}.ln_1.weight"] = np.empty(width)
    for i in range(12):
        state[f"transformer.resblocks.{i}.ln_1.weight"] = np.empty(text_width)
    config = clip.get_config("base")
    openclip.configure(config.model, state, "openai")
    image, text = config.model.image, config.model.text
    assert (image.image_size, image.patch_size, image.width, image.depth, image.heads, image.mlp_dim) == (
        224, patch, width, layers, width // 64, 4 * width)
    assert (text.vocab_size, text.max_len, text.width, text.depth, text.heads) == (49409, 77, text_width, 12,
                                                                                    text_width // 64)
    assert (config.model.embed_dim, image.pre_norm, text.causal, config.model.layer_norm_eps) == (embed, True, True,
                                                                                                  1e-5)
    with pytest.raises(ValueError, match="origin"):
        openclip.configure(config.model, state, "laion")


def test_the_pipeline_opens_clips_tokenizer_by_kind_and_it_decodes_words_back(fixture, tmp_path):
    import ml_collections

    from vlp_jax.data import tokenizer

    _, _, meta = fixture
    vocab = os.path.join(FIXTURE, "vocab.txt.gz")
    settings = ml_collections.ConfigDict(dict(kind="clip_bpe", path=vocab, vocab_size=0))
    opened = tokenizer.open_tokenizer(settings)
    assert isinstance(opened, ClipTokenizer) and opened.path == vocab
    text = meta["texts"][0]
    tokens = opened.encode([text], 40)
    np.testing.assert_array_equal(tokens, opened([text], 40))
    assert opened.decode(tokens) == [text]  # CLIP's decoding: word ends become spaces
    with pytest.raises(ValueError, match="kind='clip_bpe'.*no word alignment"):
        opened.word_alignment(text, 40)
    with pytest.raises(ValueError, match="config.data.tokenizer.kind='wordpiece'; use one of sentencepiece, clip_bpe"):
        tokenizer.open_tokenizer(ml_collections.ConfigDict(dict(kind="wordpiece", path=vocab)))
    with pytest.raises(ValueError, match="needs config.data.tokenizer.path"):
        tokenizer.open_tokenizer(ml_collections.ConfigDict(dict(kind="clip_bpe", path="")))
    with pytest.raises(FileNotFoundError, match="missing.gz does not exist"):
        tokenizer.open_tokenizer(ml_collections.ConfigDict(dict(kind="clip_bpe", path=str(tmp_path / "missing.gz"))))
