"""COOKIE (ICCV 2021, arXiv 2207.00733): a weight-sharing transformer head on both towers and three contrastive
losses that share knowledge, judged by cross-modal and unimodal (image→image, text→text) retrieval.

What the paper states ([paper], from its abstract; its method section, code, tables and hyper-parameters are not
reachable anywhere, the author repository holds only a README): a double-stream model; a weight-sharing
transformer built on top of the visual and the textual encoder so both paths focus on the same semantics; three
contrastive objectives that share knowledge "between different modalities" (ICCV 2021) / "between different
models" (arXiv 2022); gains on cross-modal retrieval and on unimodal tasks; 3/1000 of a single-stream model's
inference time. Every detail below is ours:

- [ours] The shared head (models/shared_head.py): per-modality linear adapters from each tower's token width to
  the head width, a modality-type embedding, `head.depth` pre-LN blocks with ONE parameter set run on each
  modality's tokens separately (retrieval stays two-stream), `head.pool` pooling ('mean' or a learned 'cls'
  token), one shared projection, L2 normalisation. Depth, width, heads and pooling are `config.method.head`.
- [ours] The three losses, each a symmetric InfoNCE with negatives all-gathered over the replicas
  (objectives/contrastive.py) and a weight in `config.method.weights`:
  1. cross: image ↔ text on the shared-head embeddings (the CLIP objective on the head);
  2. visual knowledge sharing: an image's shared-head embedding ↔ the visual teacher's embedding of that image,
     the other images of the global batch as negatives;
  3. textual knowledge sharing: a caption's shared-head embedding ↔ the textual teacher's embedding of it.
  Teacher embeddings never receive gradient.
- [ours] Teacher per side (`config.method.teacher.image` / `.text`): 'momentum' — the EMA of the whole student
  (towers + shared head), θ' ← m·θ' + (1 − m)·θ before the keys are computed (objectives/momentum.py, as in
  BriVL/COTS), kept in `extra["ema"]`; 'frozen' — another run's encoder (a CLIP or COTS run's tower and
  projection, or a VQ run's mean-pooled code vectors for images), read by the loop's partial reader from the run
  named by `teacher.image_run` / `.text_run`, stored in the parameters under `visual_teacher` / `textual_teacher`
  and kept bit-identical by a frozen parameter group (optimizer.py; the method refuses to start without one);
  'none' — the term is off. When a frozen teacher's embedding width differs from `config.model.embed_dim`, a
  learned linear map (+ L2 normalisation) takes the teacher's embedding into the joint space.
- [ours] One learnable temperature per term (CLIP's clipped log-scale, init `temperature`).
- [ours] Second views (`config.method.second_view.image` / `.text`, off by default): the teacher embeds another
  random resized crop of the same image (data feature "image_view") / another caption of the same image
  ("text_view", one that differs from the student's when the image has several) instead of the student's own
  input, so the term also teaches invariance to the augmentation / to the wording (as in MoCo, BYOL, SimCSE's
  supervised variant).

Logged: each term's loss and top-1 accuracy, each temperature, and per knowledge-sharing term the teacher
agreement (mean cosine between the student's and the teacher's embedding of the same input).
"""

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from vlp_jax import flops
from vlp_jax.checkpoint import leaves_by_path
from vlp_jax.data.pipeline import TOKENIZER_FILE
from vlp_jax.methods import vq
from vlp_jax.methods.base import IMAGE_TEXT, LoadedRun, Method, Pretrained, PyTree, image_text_example
from vlp_jax.models import vq as vq_model
from vlp_jax.models.dual_encoder import DualEncoder, image_tower, text_tower
from vlp_jax.models.heads import Projection, Temperature, l2_normalize
from vlp_jax.models.shared_head import SharedHead
from vlp_jax.objectives import momentum
from vlp_jax.objectives.contrastive import contrastive_blocks, contrastive_loss
from vlp_jax.optimizer import UNGROUPED, param_groups

TEACHER_KINDS = ("momentum", "frozen", "none")
# Knowledge-sharing term -> (modality, its input in the batch).
SIDES = {"visual": "image", "textual": "text"}
# Knowledge-sharing term -> the data feature of its second view (config.method.second_view).
VIEW_FEATURES = {"visual": "image_view", "textual": "text_view"}
TERMS = ("cross", *SIDES)
TOWER_RUNS = ("clip", "cots")  # runs whose params hold a DualEncoder under "towers": frozen teachers of both sides


def teacher_key(side: str) -> str:
    """Where a frozen teacher's parameters live in the params tree (and the name of its loaded run)."""
    return f"{side}_teacher"


def adapter_key(side: str) -> str:
    """Where the learned map from a frozen teacher's embedding width into the joint space lives."""
    return f"{side}_teacher_adapter"


class Temperatures(nn.Module):
    """One 1/τ per active term: {term: scale}."""

    terms: tuple[str, ...]
    tau: float
    learnable: bool
    max_logit_scale: float

    @nn.compact
    def __call__(self) -> dict[str, jax.Array]:
        return {term: Temperature(self.tau, self.learnable, self.max_logit_scale, name=term)() for term in self.terms}


class CookieModel(nn.Module):
    """The student: two towers, the weight-sharing head on their token features, the temperatures."""

    model: ml_collections.ConfigDict  # config.model
    head: ml_collections.ConfigDict  # config.method.head
    terms: tuple[str, ...]
    tau: float
    learn_tau: bool
    max_logit_scale: float

    def setup(self):
        model, head = self.model, self.head
        self.image_tower = image_tower(model)
        self.text_tower = text_tower(model)
        self.shared_head = SharedHead(width=head.width, depth=head.depth, heads=head.heads, mlp_dim=head.mlp_dim,
                                      features=model.embed_dim, pool=head.pool, dtype=jnp.dtype(model.dtype),
                                      remat=model.remat)
        self.temperatures = Temperatures(self.terms, self.tau, self.learn_tau, self.max_logit_scale)

    def encode_image(self, images):
        _, extras = self.image_tower(images)
        return self.shared_head(extras["tokens"], "image")

    def encode_text(self, tokens):
        _, extras = self.text_tower(tokens)
        return self.shared_head(extras["tokens"], "text", extras["mask"])

    def logit_scales(self):
        return self.temperatures()

    def __call__(self, images, tokens):
        return self.encode_image(images), self.encode_text(tokens), self.logit_scales()


@dataclasses.dataclass(frozen=True)
class FrozenTeacher:
    """Another run's encoder of one modality: `embed(params, inputs)` -> unit-norm [b, dim]; `params` are the
    loaded arrays with the logical partitioning of the teacher's own model."""

    embed: Callable[[PyTree, jax.Array], jax.Array]
    params: PyTree  # boxed
    dim: int


def frozen_teacher(modality: str, run: LoadedRun, flag: str) -> FrozenTeacher:
    """The encoder of `modality` in the loaded run: a CLIP/COTS tower + projection, or a VQ run's images."""
    saved, name = run.config, run.config.method.name
    if name in TOWER_RUNS:
        module = DualEncoder(saved.model)
        keys = (f"{modality}_tower", f"{modality}_projection")
        example = (jnp.zeros((1, saved.model.image.image_size, saved.model.image.image_size, 3), jnp.uint8),
                   jnp.zeros((1, saved.model.text.max_len), jnp.int32))
        boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0), *example)["params"]
        boxed, loaded = {key: boxed[key] for key in keys}, {key: run.trees["params"]["towers"][key] for key in keys}
        encode = DualEncoder.encode_image if modality == "image" else DualEncoder.encode_text

        def embed(params, inputs):
            return module.apply({"params": params}, inputs, method=encode)[0]

        dim = saved.model.embed_dim
    elif name == vq.NAME and modality == "image":
        module = vq.build_model(saved)
        size = saved.model.image.image_size
        boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3), jnp.uint8))["params"]
        loaded = run.trees["params"]

        def embed(params, inputs):
            vectors = module.apply({"params": params}, inputs, method=vq_model.VQVAE.encode)  # [b, h, w, d]
            return l2_normalize(vectors.mean(axis=(1, 2)).astype(jnp.float32))

        dim = saved.method.code_dim
    else:
        usable = ", ".join(TOWER_RUNS) + (f" or {vq.NAME}" if modality == "image" else "")
        raise ValueError(f"{flag} is a {name!r} run, which has no {modality} encoder a COOKIE teacher can use; "
                         f"pass the --workdir of a {usable} run")
    return FrozenTeacher(embed, with_values(boxed, loaded, flag), dim)


def with_values(boxed: PyTree, arrays: PyTree, flag: str) -> PyTree:
    """`boxed` (abstract, with logical partitioning) holding `arrays`, checked leaf by leaf."""
    want, got = leaves_by_path(nn.meta.unbox(boxed)), leaves_by_path(arrays)
    if set(want) != set(got) or any(tuple(want[path].shape) != tuple(got[path].shape) for path in want):
        raise ValueError(f"{flag}: the run's saved parameters do not match the model its saved config describes")

    def fill(leaf, value):
        value = jnp.asarray(value)
        return leaf.replace_boxed(value) if isinstance(leaf, nn.meta.AxisMetadata) else value

    return jax.tree.map(fill, boxed, arrays, is_leaf=lambda leaf: isinstance(leaf, nn.meta.AxisMetadata))


def check_config(config: ml_collections.ConfigDict) -> None:
    method = config.method
    for modality in SIDES.values():
        kind = method.teacher[modality]
        if kind not in TEACHER_KINDS:
            raise ValueError(f"config.method.teacher.{modality}={kind!r}; use one of {', '.join(TEACHER_KINDS)}")
    for term in TERMS:
        if method.weights[term] < 0:
            raise ValueError(f"config.method.weights.{term}={method.weights[term]} must be non-negative")


def check_frozen_group(config: ml_collections.ConfigDict, side: str, params: PyTree) -> None:
    """A frozen teacher must be owned by a frozen parameter group, or AdamW's weight decay would move it."""
    groups = param_groups(config.train)
    for path in leaves_by_path({teacher_key(side): params}):
        owner = next((group for group in groups if group.pattern.fullmatch(path)), None)
        if owner is None or not owner.frozen:
            raise ValueError(
                f"config.method.teacher.{SIDES[side]}='frozen' but its parameter {path} is in the parameter group "
                f"{owner.name if owner else UNGROUPED!r}, which trains it; add a frozen group, e.g. "
                "--config.train.param_groups='{\"teachers\": {\"pattern\": \"(visual|textual)_teacher/.*\", "
                "\"frozen\": True}}' (configs/cookie.py:use_frozen_teachers does this)"
            )


def teacher_tokenizer(run_dir: str, saved: ml_collections.ConfigDict) -> epath.Path:
    """The tokenizer a run read its captions with: its config's, or the one it trained into its workdir."""
    return epath.Path(saved.data.tokenizer.path or epath.Path(run_dir) / TOKENIZER_FILE)


def check_text_teacher(config: ml_collections.ConfigDict, run: LoadedRun) -> None:
    """A frozen text teacher reads our token ids: both runs must use one tokenizer file (content), and our
    captions must fit its position table."""
    run_dir = config.method.teacher.text_run
    theirs = teacher_tokenizer(run_dir, run.config)
    ours = config.data.tokenizer.path
    if not ours or not epath.Path(ours).exists() or not theirs.exists() \
            or epath.Path(ours).read_bytes() != theirs.read_bytes():
        raise ValueError(
            f"config.method.teacher.text='frozen' reads our token ids, so the run must tokenize with the teacher's "
            f"tokenizer: pass --config.data.tokenizer.path={theirs} (config.data.tokenizer.path={ours!r} is not "
            "that file)"
        )
    if config.model.text.max_len > run.config.model.text.max_len:
        raise ValueError(f"config.model.text.max_len={config.model.text.max_len} exceeds the textual teacher's "
                         f"{run.config.model.text.max_len}; lower it to that")


class CookieMethod(Method):
    """COOKIE on the Method protocol; `extra` = {"ema": the momentum student} when a side has a momentum teacher."""

    @classmethod
    def features(cls, config):
        views = config.method.get("second_view", {})
        return (*IMAGE_TEXT, *(VIEW_FEATURES[side] for side, modality in SIDES.items() if views.get(modality)))

    @classmethod
    def example_batch(cls, config):
        example = image_text_example(config)
        views = config.method.get("second_view", {})
        return example | {VIEW_FEATURES[side]: example[modality] for side, modality in SIDES.items()
                          if views.get(modality)}

    @classmethod
    def encode_flops(cls, config):
        """The towers' FLOPs plus the shared head's on each modality's tokens (adapter, blocks, projection)."""
        model, head = config.model, config.method.head
        image_tokens = (model.image.image_size // model.image.patch_size) ** 2 + (model.image.pool == "cls")
        towers = super().encode_flops(config)

        def head_flops(tokens: int, tower_width: int) -> float:
            blocks = flops.encoder_flops(tokens + (head.pool == "cls"), head.width, head.depth, head.mlp_dim)
            return 2 * tokens * tower_width * head.width + blocks + 2 * head.width * model.embed_dim

        return {"image": towers["image"] + head_flops(image_tokens, model.image.width),
                "text": towers["text"] + head_flops(model.text.max_len, model.text.width)}

    @classmethod
    def pretrained(cls, config):
        method = config.method
        return {teacher_key(side): Pretrained(f"method.teacher.{modality}_run") for side, modality in SIDES.items()
                if method.teacher[modality] == "frozen" and method.weights[side] > 0}

    def __init__(self, config, mesh, pretrained):
        check_config(config)
        super().__init__(config, mesh, pretrained)
        self.cfg = config.method
        self.kinds = {side: self.cfg.teacher[modality] if self.cfg.weights[side] > 0 else "none"
                      for side, modality in SIDES.items()}
        self.terms = ("cross", *(side for side, kind in self.kinds.items() if kind != "none"))
        self.model = CookieModel(config.model, self.cfg.head, self.terms, self.cfg.temperature,
                                 self.cfg.learn_temperature, self.cfg.max_logit_scale)
        self.frozen: dict[str, FrozenTeacher] = {}
        for side, kind in self.kinds.items():
            if kind != "frozen":
                continue
            modality = SIDES[side]
            flag = f"config.method.teacher.{modality}_run={self.cfg.teacher[f'{modality}_run']}"
            run = pretrained[teacher_key(side)]
            if modality == "text":
                check_text_teacher(config, run)
            elif run.config.model.image.image_size != config.model.image.image_size:
                raise ValueError(f"{flag} was trained on {run.config.model.image.image_size}px images, this model "
                                 f"uses {config.model.image.image_size}px; pick a teacher of the same image size")
            self.frozen[side] = frozen_teacher(modality, run, flag)
            check_frozen_group(config, side, nn.meta.unbox(self.frozen[side].params))
        self.adapter = Projection(config.model.embed_dim, jnp.dtype(config.model.dtype))

    # -- protocol ------------------------------------------------------------------------------------------------
    def init(self, rng, batch):
        model_rng, adapter_rng = jax.random.split(rng)
        params = dict(self.model.init(model_rng, batch["image"], batch["text"])["params"])
        for side, teacher in self.frozen.items():
            params[teacher_key(side)] = teacher.params
            if self.needs_adapter(side):
                params[adapter_key(side)] = self.adapter.init(adapter_rng, jnp.zeros((1, teacher.dim)))["params"]
        extra = {}
        if "momentum" in self.kinds.values():
            extra["ema"] = jax.tree.map(jnp.copy, self.student(params, with_temperatures=False))
        return params, extra

    # -- the loss: Method.loss's default, so micro-batches (config.train.microbatches) give its exact gradient -------
    def embed(self, params, batch):
        """The student's unit-norm embeddings of both modalities."""
        student = self.student(params)
        return {"visual": self.apply(student, "encode_image", batch["image"]),
                "textual": self.apply(student, "encode_text", batch["text"])}

    def momentum_teacher(self, params, extra) -> PyTree:
        """`extra` with the momentum student advanced (θ' ← m·θ' + (1 − m)·θ) before its keys are computed."""
        if "ema" not in extra:
            return extra
        student = self.student(jax.lax.stop_gradient(params), with_temperatures=False)
        return {**extra, "ema": momentum.ema_update(extra["ema"], student, self.cfg.momentum)}

    def embed_constants(self, params, extra, batch, step):
        """Each unimodal side's teacher embedding (momentum or frozen; of the second view when declared)."""
        del step
        advanced = self.momentum_teacher(params, extra)
        return {side: jax.lax.stop_gradient(self.teacher_embedding(
            side, params, advanced, batch.get(VIEW_FEATURES[side], batch[SIDES[side]]))) for side in self.terms[1:]}

    def embedding_loss(self, params, embeddings, constants, extra, rng, step):
        """The cross-modal term and each side's student-teacher term over the global batch (the frozen teachers'
        adapters are trained here); the momentum student advances once a step."""
        del rng, step
        weights = self.cfg.weights
        scales = self.apply(self.student(params), "logit_scales")
        blocks = contrastive_blocks(self.config.train)
        cross = contrastive_loss(embeddings["visual"], embeddings["textual"], scales["cross"], self.mesh, **blocks)
        loss = weights.cross * cross["loss"]
        metrics = {"cross_loss": cross["loss"], "i2t_accuracy": cross["accuracy"], "temperature": 1.0 / scales["cross"]}
        for side in self.terms[1:]:
            teacher = constants[side]
            if self.needs_adapter(side):
                teacher = self.adapter.apply({"params": params[adapter_key(side)]}, teacher)
            term = contrastive_loss(embeddings[side], teacher, scales[side], self.mesh, **blocks)
            loss += weights[side] * term["loss"]
            metrics.update({
                f"{side}_loss": term["loss"],
                f"{side}_accuracy": term["accuracy"],
                f"{side}_temperature": 1.0 / scales[side],
                f"{side}_teacher_agreement": jnp.mean(jnp.sum(embeddings[side] * teacher, axis=-1)),
            })
        return loss, (metrics, self.momentum_teacher(params, extra))

    def encode(self, params, batch):
        student, embeddings = self.student(params), {}
        if "image" in batch:
            embeddings["image"] = self.apply(student, "encode_image", batch["image"])
        if "text" in batch:
            embeddings["text"] = self.apply(student, "encode_text", batch["text"])
        return embeddings

    # -- helpers -------------------------------------------------------------------------------------------------
    def student(self, params: PyTree, with_temperatures: bool = True) -> PyTree:
        """The CookieModel's parameters: without the teachers, and without the temperatures for the EMA."""
        own = {"image_tower", "text_tower", "shared_head"} | ({"temperatures"} if with_temperatures else set())
        return {name: value for name, value in params.items() if name in own}

    def needs_adapter(self, side: str) -> bool:
        return side in self.frozen and self.frozen[side].dim != self.config.model.embed_dim

    def teacher_embedding(self, side: str, params: PyTree, extra: PyTree, inputs: jax.Array) -> jax.Array:
        """The teacher's unit-norm embedding of `inputs` (images or tokens) [b, d]."""
        if self.kinds[side] == "momentum":
            method = "encode_image" if side == "visual" else "encode_text"
            return self.apply(extra["ema"], method, inputs)
        frozen = self.frozen[side]
        return frozen.embed(jax.lax.stop_gradient(params[teacher_key(side)]), inputs)

    def apply(self, params, method: str, *args):
        return self.model.apply({"params": params}, *args, method=getattr(CookieModel, method))

