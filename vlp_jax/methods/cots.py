"""COTS (CVPR 2022, arXiv 2204.07441): two independent streams with three levels of interaction.

- Instance level [paper]: momentum contrastive learning (MomentumContrastMethod in brivl.py). [ours] Negatives are
  the all-gathered momentum keys of the global batch; the paired queue is optional (`queue_size > 0`).
- Token level [paper]: masked vision-language modelling without a cross-stream network. [ours] MLM: BERT masking
  (15%; 80/10/10) of the caption, predicted from the masked text's tokens fused with the paired image's global
  feature (`fusion`: add or concat). MVM: BEiT-style blockwise masking (~40%) of the patches, predicting the codes
  of our trainable VQ tokenizer (methods/vq.py) from the unmasked patches fused with the paired text's global
  feature. A run whose config names no tokenizer (`method.mvm.tokenizer=""`) trains one first, as a logged stage,
  into `<workdir>/tokenizer` (`prepare`).
- Task level [paper]: KL alignment of the image→text and text→image retrieval distributions over the same
  negatives; column k of both is pair k (instance loss's logits). [ours] Symmetrised by default.
- Adaptive momentum filter [paper, details ours]: see objectives/momentum.py. Filtered pairs get weight 0 in every
  term and are not enqueued.

Total L = L_inst + λ_kl L_kl + λ_mlm L_mlm + λ_mvm L_mvm; each term and the filtered fraction are logged.
"""

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from etils import epath
from jax.sharding import Mesh

from vlp_jax.checkpoint import Checkpointer
from vlp_jax.methods import vq
from vlp_jax.methods.brivl import MomentumContrastMethod, Temperature
from vlp_jax.models.dual_encoder import DualEncoder
from vlp_jax.models.heads import TokenPredictionHead
from vlp_jax.objectives.masking import block_mask, mlm_mask

RANDOM_TOKENIZER = "random"  # an untrained tokenizer: for benchmarks and tests, where targets need not mean much
TOKENIZER_STAGE = "tokenizer"  # the sub-directory of the workdir a tokenizer stage trains into


class CotsModel(nn.Module):
    """Dual encoder (no cross-stream module) + MLM and MVM prediction heads + temperature."""

    config: ml_collections.ConfigDict  # the whole run config
    codebook_size: int

    def setup(self):
        cfg = self.config.method
        self.towers = DualEncoder(self.config.model)
        self.mlm_head = TokenPredictionHead(self.config.model.text.vocab_size, cfg.mlm.fusion,
                                            jnp.dtype(self.config.model.dtype))
        self.mvm_head = TokenPredictionHead(self.codebook_size, cfg.mvm.fusion, jnp.dtype(self.config.model.dtype))
        self.temperature = Temperature(cfg)

    def encode_image(self, images, patch_mask=None):
        return self.towers.encode_image(images, patch_mask)

    def encode_text(self, tokens, token_mask=None):
        return self.towers.encode_text(tokens, token_mask)

    def logit_scale(self):
        return self.temperature()

    def predict_words(self, text_tokens, image_global):
        return self.mlm_head(text_tokens, image_global)

    def predict_codes(self, patch_tokens, text_global):
        return self.mvm_head(patch_tokens, text_global)

    def __call__(self, images, tokens, patch_mask, token_mask):
        """Touches every parameter (used by init)."""
        _, image_aux = self.encode_image(images, patch_mask)
        _, text_aux = self.encode_text(tokens, token_mask)
        num_patches = patch_mask.shape[1]
        return (self.predict_words(text_aux["tokens"], image_aux["pooled"]),
                self.predict_codes(image_aux["tokens"][:, -num_patches:], text_aux["pooled"]),
                self.logit_scale())


class CotsMethod(MomentumContrastMethod):
    """COTS on the Method protocol; `extra` adds {"tokenizer": frozen VQ tokenizer {"params", "codebook"}}."""

    online_only = ("temperature", "mlm_head", "mvm_head")

    @staticmethod
    def prepare(config, workdir, train_fn):
        return prepare(config, workdir, train_fn)

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, tokenizer=None):
        """`tokenizer` = (vq_config, tokenizer pytree) overrides `config.method.mvm.tokenizer` (tests)."""
        if tokenizer is None:
            tokenizer = load_or_make_tokenizer(config, mesh)
        self.vq_config, self.tokenizer = tokenizer
        check_tokenizer(config, self.vq_config)
        self.codebook_size = self.vq_config.method.codebook_size
        super().__init__(config, mesh)

    def build_model(self) -> CotsModel:
        return CotsModel(self.config, self.codebook_size)

    @property
    def grid(self) -> int:
        return self.config.model.image.image_size // self.config.model.image.patch_size

    def init_inputs(self, batch):
        size = batch["image"].shape[0]
        patch_mask = jnp.zeros((size, self.grid * self.grid), jnp.bool_)
        return batch["image"], batch["text"], patch_mask, jnp.zeros(batch["text"].shape, jnp.bool_)

    def init(self, rng, batch):
        params, extra = super().init(rng, batch)
        return params, {**extra, "tokenizer": jax.tree.map(jnp.asarray, self.tokenizer)}

    def extra_terms(self, params, extra, batch, rng, weights, image_aux, text_aux):
        cfg = self.cfg
        mlm_rng, mvm_rng = jax.random.split(jax.random.fold_in(rng, 1))
        metrics, loss = {}, 0.0
        if cfg.mlm.weight > 0:
            inputs, embed_mask, predict = mlm_mask(mlm_rng, batch["text"], cfg.mlm,
                                                   self.config.model.text.vocab_size)
            _, masked = self._apply(params, "encode_text", inputs, embed_mask)
            logits = self._apply(params, "predict_words", masked["tokens"], image_aux["pooled"])
            mlm_loss, mlm_acc = _masked_cross_entropy(logits, batch["text"], predict, weights)
            loss += cfg.mlm.weight * mlm_loss
            metrics.update({"mlm_loss": mlm_loss, "mlm_accuracy": mlm_acc})
        if cfg.mvm.weight > 0:
            patch_mask = block_mask(mvm_rng, batch["image"].shape[0], self.grid, cfg.mvm)
            codes = jax.lax.stop_gradient(vq.image_codes(self.vq_config, extra["tokenizer"], batch["image"]))
            _, masked = self._apply(params, "encode_image", batch["image"], patch_mask)
            patches = masked["tokens"][:, -patch_mask.shape[1]:]
            logits = self._apply(params, "predict_codes", patches, text_aux["pooled"])
            mvm_loss, mvm_acc = _masked_cross_entropy(logits, codes, patch_mask, weights)
            loss += cfg.mvm.weight * mvm_loss
            metrics.update({"mvm_loss": mvm_loss, "mvm_accuracy": mvm_acc, "mvm_masked_fraction": patch_mask.mean()})
        return loss, metrics


def _masked_cross_entropy(logits, targets, positions, weights) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy over the predicted positions, each row weighted (AMF); and the top-1 accuracy."""
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [b, t]
    counted = positions.astype(jnp.float32) * weights[:, None]
    total = jnp.maximum(counted.sum(), 1.0)
    accuracy = ((jnp.argmax(logits, -1) == targets) * counted).sum() / total
    return (per_token * counted).sum() / total, accuracy


def check_tokenizer(config: ml_collections.ConfigDict, vq_config: ml_collections.ConfigDict) -> None:
    """MVM predicts one code per ViT patch, so the tokenizer must see the same image size and patch grid."""
    want = (config.model.image.image_size, config.model.image.patch_size)
    got = (vq_config.model.image.image_size, vq_config.model.image.patch_size)
    if want != got:
        raise ValueError(
            f"config.method.mvm.tokenizer={config.method.mvm.tokenizer!r} was trained on {got[0]}px images with "
            f"{got[1]}px patches but this model uses {want[0]}px / {want[1]}px; train a matching tokenizer (leave "
            "config.method.mvm.tokenizer empty and COTS trains one first)"
        )


def tokenizer_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The VQ run config a COTS run trains first: configs/vq.matching with `tokenizer_steps` / `_batch_size`
    resolved. -1 steps: the VQ size's default, at most `tokenizer_fraction` of the COTS steps (at least 1);
    -1 batch: the VQ default, at most the COTS batch size."""
    from configs import vq as vq_configs  # configs import vlp_jax modules, not the other way round at import time

    mvm = config.method.mvm
    defaults = vq_configs.get_config(config.size).train
    resolved = config.copy_and_resolve_references()
    if mvm.tokenizer_steps < 0:
        cap = max(1, math.ceil(mvm.tokenizer_fraction * config.train.steps))
        resolved.method.mvm.tokenizer_steps = min(defaults.steps, cap)
    if mvm.tokenizer_batch_size < 0:
        resolved.method.mvm.tokenizer_batch_size = min(defaults.batch_size, config.train.batch_size)
    return vq_configs.matching(resolved)


def load_or_make_tokenizer(config: ml_collections.ConfigDict, mesh: Mesh):
    """(vq_config, tokenizer) named by `config.method.mvm.tokenizer`: a VQ run directory, or "random"."""
    path = config.method.mvm.tokenizer
    if not path:
        raise ValueError(
            "config.method.mvm.tokenizer is empty: COTS's masked vision modelling needs a visual tokenizer. "
            "train.train_and_evaluate trains one first; elsewhere pass the --workdir of a configs/vq.py run, or "
            f"{RANDOM_TOKENIZER!r} for an untrained one (benchmarks)"
        )
    if path != RANDOM_TOKENIZER:
        return vq.load_tokenizer(path)
    vq_config = tokenizer_config(config)
    method = vq.VQMethod(vq_config, mesh)
    image = jnp.zeros((1, config.model.image.image_size, config.model.image.image_size, 3), jnp.uint8)
    params, codebook = nn.meta.unbox(method.init(jax.random.PRNGKey(config.seed), {"image": image}))
    return vq_config, {"params": params, "codebook": codebook}


def prepare(config: ml_collections.ConfigDict, workdir: epath.Path, train_fn: Callable | None):
    """Runs the stages a COTS run needs before its own: the visual tokenizer, when none is configured.

    It trains into `<workdir>/tokenizer` (resuming or skipping a finished stage) and returns the config pointing
    at it. `train_fn(config, workdir)` trains a run; None (evaluation) only accepts a finished stage.
    """
    if config.method.mvm.tokenizer:
        return config
    stage_dir = workdir / TOKENIZER_STAGE
    stage_config = tokenizer_config(config)
    if not _finished(stage_dir, stage_config):
        if train_fn is None:
            raise FileNotFoundError(
                f"{stage_dir} holds no finished visual tokenizer; train the COTS run first (--mode=train)"
            )
        logging.info("stage 1/2: training the visual tokenizer (%d steps) into %s", stage_config.train.steps,
                     stage_dir)
        train_fn(stage_config, str(stage_dir))
        logging.info("stage 2/2: COTS pre-training with the tokenizer from %s", stage_dir)
    config = config.copy_and_resolve_references()
    config.method.mvm.tokenizer = str(stage_dir)
    return config


def _finished(run_dir: epath.Path, config: ml_collections.ConfigDict) -> bool:
    """True when `run_dir` holds a complete checkpoint at the run's last step."""
    if not (run_dir / "checkpoints").is_dir():
        return False
    checkpointer = Checkpointer(run_dir, config.checkpoint)
    try:
        latest = checkpointer.latest_step()
    finally:
        checkpointer.close()
    return latest is not None and latest >= config.train.steps
