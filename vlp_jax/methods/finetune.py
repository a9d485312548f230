"""Fine-tuning a pre-trained run (any method) on a downstream task: visual entailment, VQA, referring expressions.

The model is the pre-training run's two towers, a fusion encoder over both towers' tokens, and a task head:

- towers: the run's image and text towers (`config.init_from`; their shapes and its tokenizer are taken from the
  run, `resolve_config`), loaded by the partial reader whatever the method called them (CLIP, SigLIP, COTS and CMAL
  keep them under `towers/`, BriVL and COOKIE at the top);
- fusion: CMAL's unified encoder module (models/unified.py) over [text tokens ; regions], the regions being the
  whole image plus either its patch tokens (VE, VQA) or the candidate boxes RoI-pooled from the patch map (REC). A
  CMAL run hands over its trained unified encoder (the paper fine-tunes it); the two-stream methods, which have no
  cross-modal module, get a fresh one of `config.finetune.fusion`'s size (ours: merged attention over the
  concatenation, as METER's merged variant; a few layers);
- heads (ours where the papers are silent): VE and VQA classify the fused first text slot (BOS) with a two-layer
  MLP; VE by softmax over the three labels, VQA by softmax cross-entropy against the VQA scores of the answer
  vocabulary normalised to sum 1 (items with no answer in the vocabulary add nothing); REC scores every
  candidate region's fused slot with one linear unit, softmax over the record's boxes.

Parameter groups (`config.train.param_groups`, the fine-tuning configs' `backbone_lr_multiplier` and
`freeze_backbone`) give the towers their own learning rate or freeze them. Retrieval fine-tuning is the CLIP
objective on the loaded towers (configs/finetune/retrieval.py), not this method.
"""

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from vlp_jax import checkpoint, stages
from vlp_jax.data import sources, tasks, world_tasks
from vlp_jax.data.pipeline import TOKENIZER_FILE
from vlp_jax.methods.base import Batch, Feature, Method, PyTree
from vlp_jax.methods.clip import ClipMethod
from vlp_jax.models.dual_encoder import DualEncoder
from vlp_jax.models.layers import dense, layer_norm
from vlp_jax.models.regions import regions
from vlp_jax.models.unified import UnifiedEncoder

# Where each pre-training method keeps its towers: (saved path regexes to load, rename rules to ours). CLIP,
# SigLIP, COTS and CMAL hold them with plain projections under towers/ (a DualEncoder); BriVL and COOKIE at the top,
# with heads of their own instead of projections.
_UNDER_TOWERS = (r"towers/(image_tower|text_tower)/.*",)
_AT_TOP = ((r"(image_tower|text_tower)/.*",), (r"^(image_tower|text_tower)/=towers/\1/",))
_TOWER_LAYOUT = {
    "clip": (_UNDER_TOWERS, ()), "siglip": (_UNDER_TOWERS, ()), "cots": (_UNDER_TOWERS, ()),
    "cmal": ((*_UNDER_TOWERS, r"unified/.*"), ()), "brivl": _AT_TOP, "cookie": _AT_TOP,
}
_PROJECTIONS = r"towers/(image_projection|text_projection)/.*"
# Pre-training parts fine-tuning never runs: the towers' [MASK] embeddings (MLM, MVM) and CMAL's swap adapters.
_NOT_LOADED = (r".*_tower/mask_embedding/.*", r"unified/(region_to_text|text_to_region)/.*")


def tower_layout(method: str, flag: str, projections: bool = False
                 ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(include regexes, exclude regexes, rename rules) that load a `method` run's towers into `towers/` (and
    CMAL's unified encoder into `unified/`; with `projections`, the towers' projections where the run has plain
    ones), leaving out the parts fine-tuning never runs."""
    if method not in _TOWER_LAYOUT:
        raise ValueError(f"{flag} is a {method!r} run; fine-tuning loads the towers of "
                         f"{', '.join(sorted(_TOWER_LAYOUT))} runs")
    include, rename = _TOWER_LAYOUT[method]
    if projections and include[0] == _UNDER_TOWERS[0]:
        include = (*include, _PROJECTIONS)
    return include, _NOT_LOADED, rename


def inherit_backbone(config: ml_collections.ConfigDict, projections: bool = False) -> ml_collections.ConfigDict:
    """When `config.init_from` names a run: that run's model (tower shapes) and tokenizer become this run's,
    `config.init` loads its towers (unless set by hand), and a CMAL run's unified encoder sizes become the fusion
    encoder's. A copy; unchanged without init_from (from scratch) or with a stage preflight's untrained stand-in."""
    if not config.init_from or config.init_from == stages.RANDOM:
        return config
    flag = "config.init_from"
    saved, _, _ = checkpoint.saved_run(config.init_from, f"--{flag}")
    include, exclude, rename = tower_layout(saved.method.name, f"{flag}={config.init_from}", projections)
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.model = saved.model
        config.data.tokenizer = saved.data.tokenizer
        if saved.data.tokenizer.get("kind", "sentencepiece") == "sentencepiece" and not saved.data.tokenizer.path:
            config.data.tokenizer.path = str(checkpoint.absolute(config.init_from) / TOKENIZER_FILE)
        if not config.init.include and not config.init.exclude and not config.init.rename:
            config.init.include, config.init.exclude, config.init.rename = include, exclude, rename
        config.finetune.backbone = saved.method.name
        if saved.method.name == "cmal":
            config.finetune.fusion = saved.method.unified
            config.finetune.region_samples = saved.method.regions.samples
    logging.info("fine-tuning the towers of a %s run (%s): its model shapes and tokenizer", saved.method.name,
                 config.init_from)
    return config


def answer_vocabulary(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """VQA's answers: the embedded world's when it trains on the world, else the `config.finetune.max_answers` most
    frequent normalised training answers (ties by first appearance), read from the training records' labels."""
    if config.data.train_sources == sources.SYNTHETIC:
        return world_tasks.answer_vocabulary(config.data.world)
    from vlp_jax.data import pipeline  # the sources; imported here: pipeline imports the whole data package

    parts, _ = pipeline.open_sources(config, "train", config.data.world_dir or ".")
    counts = collections.Counter()
    for part in parts:
        for index in range(len(part)):
            item = part[index]
            record = getattr(item, "record", None)
            if record is None:
                continue
            boxes = 0 if record.boxes is None else len(record.boxes)
            for entry in tasks.valid_items(tasks.VQA, (record.labels or {}).get(tasks.VQA, []), boxes)[0]:
                # each answer once per item, in the item's order (a set's order changes between processes)
                counts.update(list(dict.fromkeys(tasks.normalise_answer(answer) for answer in entry["answers"])))
    if not counts:
        raise ValueError(f"config.data.train_sources={config.data.train_sources} holds no VQA answers "
                         "(labels['vqa']); convert VQA data with `python -m vlp_jax.datasets.convert --format=vqa`")
    return tuple(answer for answer, _ in counts.most_common(config.finetune.max_answers))


class FinetuneModel(nn.Module):
    """Towers + fusion encoder + the task's head (see the module docstring)."""

    model: ml_collections.ConfigDict  # config.model
    finetune: ml_collections.ConfigDict  # config.finetune
    task: str
    outputs: int  # classes (VE: 3; VQA: answers); REC scores regions

    def setup(self):
        cfg, fusion, dtype = self.model, self.finetune.fusion, jnp.dtype(self.model.dtype)
        self.towers = DualEncoder(cfg)
        self.unified = UnifiedEncoder(fusion.width, fusion.depth, fusion.heads, fusion.mlp_dim, cfg.text.max_len,
                                      dtype, cfg.remat)
        if self.task == tasks.REC:
            self.region_score = dense(1, ("embed", None), dtype, "region_score")
        else:
            self.head_hidden = dense(fusion.width * self.finetune.head_expansion, ("embed", "mlp"), dtype,
                                     "head_hidden")
            self.head_norm = layer_norm(dtype, "head_norm")
            self.head_out = dense(self.outputs, ("mlp", None), dtype, "head_out")

    def __call__(self, images, query, boxes, box_mask) -> jax.Array:
        """VE/VQA: class logits [b, outputs]; REC: region scores [b, max_boxes] (-inf where box_mask is False)."""
        _, image_aux = self.towers.encode_image(images)
        _, text_aux = self.towers.encode_text(query)
        patches = image_aux["tokens"][:, 1:] if self.model.image.pool == "cls" else image_aux["tokens"]
        if self.task != tasks.REC:  # VE and VQA see the patches (real VE/VQA records have no boxes), never boxes
            box_mask = jnp.zeros_like(box_mask)
        found = regions(patches, boxes, box_mask, self.finetune.region_samples, patch_fallback=True)
        hidden = self.unified(text_aux["tokens"], text_aux["mask"], found["features"], found["boxes"], found["mask"])
        if self.task == tasks.REC:
            start = query.shape[1] + 1  # after the text slots and the whole-image slot: one slot per box
            scores = self.region_score(hidden[:, start : start + boxes.shape[1]])[..., 0].astype(jnp.float32)
            return jnp.where(box_mask, scores, -jnp.inf)
        x = self.head_norm(nn.gelu(self.head_hidden(hidden[:, 0])))
        return self.head_out(x).astype(jnp.float32)


class FinetuneMethod(Method):
    """The Method protocol for downstream fine-tuning (config.method.name="finetune", task config.data.task)."""

    def __init__(self, config, mesh, pretrained):
        super().__init__(config, mesh, pretrained)
        self.task = tasks.check_task(config.data.task, "config.data.task")
        self.model = FinetuneModel(config.model, config.finetune, self.task, self.outputs(config))

    @staticmethod
    def outputs(config) -> int:
        return {tasks.VE: len(tasks.VE_LABELS), tasks.VQA: len(config.data.answers), tasks.REC: 1}[config.data.task]

    @classmethod
    def resolve_config(cls, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        config = inherit_backbone(config)
        if config.data.task == tasks.VQA and not config.data.answers:
            config = config.copy_and_resolve_references()
            with config.unlocked():
                config.data.answers = answer_vocabulary(config)
            logging.info("VQA: %d answers in the vocabulary", len(config.data.answers))
        return config

    @classmethod
    def features(cls, config):
        return ("image", "boxes", "task")

    @classmethod
    def example_batch(cls, config):
        image, text = config.model.image, config.model.text
        example = {
            "image": Feature((image.image_size, image.image_size, 3), "uint8"),
            "boxes": Feature((config.data.max_boxes, 4), "float32"),
            "box_mask": Feature((config.data.max_boxes,), "bool"),
            "query": Feature((text.max_len,), "int32", text.vocab_size),
            "target": Feature((), "int32", config.data.max_boxes if config.data.task == tasks.REC
                              else cls.outputs(config)),
        }
        if config.data.task == tasks.VQA:
            example["answer_scores"] = Feature((len(config.data.answers),), "float32")
        return example

    @classmethod
    def evaluators(cls, config):
        return {"downstream": {"type": "downstream", "every": -1}}

    def init(self, rng: jax.Array, batch: Batch) -> tuple[PyTree, PyTree]:
        variables = self.model.init(rng, batch["image"], batch["query"], batch["boxes"], batch["box_mask"])
        return variables["params"], {}

    def predict(self, params, batch) -> jax.Array:
        """Logits [b, classes] (VE, VQA) or region scores [b, max_boxes] (REC)."""
        return self.model.apply({"params": params}, batch["image"], batch["query"], batch["boxes"], batch["box_mask"])

    def loss(self, params, extra, batch, rng, step):
        del rng, step
        logits = self.predict(params, batch)
        if self.task == tasks.VQA:
            scores = batch["answer_scores"]
            total = scores.sum(axis=-1, keepdims=True)
            targets = jnp.where(total > 0, scores / jnp.maximum(total, 1e-9), 0.0)
            per_example = optax.softmax_cross_entropy(logits, targets)
            correct = jnp.take_along_axis(scores, jnp.argmax(logits, -1)[:, None], axis=-1)[:, 0]
        else:
            safe = jnp.where(jnp.isfinite(logits), logits, -1e9)  # REC's padded regions
            per_example = optax.softmax_cross_entropy_with_integer_labels(safe, batch["target"])
            correct = (jnp.argmax(safe, -1) == batch["target"]).astype(jnp.float32)
        loss = per_example.mean()
        return loss, ({"loss": loss, "task_loss": loss, "train_accuracy": correct.mean()}, extra)

    def encode(self, params, batch):
        embeddings = {}
        if "image" in batch:
            embeddings["image"] = self.model.apply({"params": params}, batch["image"],
                                                   method=lambda m, x: m.towers.encode_image(x)[0])
        if "text" in batch:
            embeddings["text"] = self.model.apply({"params": params}, batch["text"],
                                                  method=lambda m, x: m.towers.encode_text(x)[0])
        return embeddings


class RetrievalFinetuneMethod(ClipMethod):
    """Retrieval fine-tuning: the CLIP objective on a pre-trained run's towers (configs/finetune/retrieval.py)."""

    @classmethod
    def resolve_config(cls, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        return inherit_backbone(config, projections=True)
