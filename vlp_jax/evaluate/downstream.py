"""Downstream-task evaluation of a fine-tuned run (methods/finetune.py): visual entailment accuracy, VQA score,
referring-expression accuracy at IoU >= 0.5 and with the given candidate boxes (top-1).

Every task item of the eval records (data/tasks.py; the embedded world writes them, the converters read SNLI-VE,
VQA v2 and RefCOCO) is scored; during training, those of the subset's first images. Beside each figure stands its
chance level on the same items: VE and VQA the score of always answering the most frequent eval label or answer,
REC the mean of 1 / candidates. Items the centre crop made unusable (a REC target cut away) are counted.
"""

import collections
import dataclasses

import jax
import numpy as np

from vlp_jax import parallel
from vlp_jax.data import examples, tasks, transforms
from vlp_jax.data.loader import LoaderOptions, ordered_stream
from vlp_jax.data.skips import SkipLog, Skipped
from vlp_jax.evaluate.context import EvalPass, Evaluator, Result, set_result

IOU_HIT = 0.5  # a REC prediction is correct when its box overlaps the target's by at least this IoU


@dataclasses.dataclass
class TaskItems:
    """The eval set's task items: images [N, S, S, 3] once per record, and per item its record and arrays."""

    images: np.ndarray
    record: np.ndarray  # int [n]: the image of each item
    query: np.ndarray  # int32 [n, L]
    target: np.ndarray  # int32 [n]
    boxes: np.ndarray | None  # REC: float32 [N, max_boxes, 4] and box_mask bool [N, max_boxes] per record
    box_mask: np.ndarray | None
    target_box: np.ndarray | None  # REC: float32 [n, 4]
    answers: list[list[str]] | None  # VQA: each item's answers
    cropped: int  # REC items dropped because the crop cut their box away
    skipped: dict[str, int]


def read_items(config, task: str, tokenizer, limit: int) -> TaskItems:
    """The task items of the first `limit` usable eval records (0 = all) of `config.data.eval_sources`."""
    from vlp_jax.data import pipeline  # the sources (pipeline imports the evaluation's data package)

    parts, _ = pipeline.open_sources(config, "eval", config.data.world_dir or ".")
    image = transforms.ImageOptions.from_config(config.data.image, config.model.image.image_size)
    options = examples.FeatureOptions(image, tokenizer, config.model.text.max_len, config.data.max_boxes,
                                      task=task,
                                      answers=tuple(tasks.normalise_answer(a) for a in config.data.get("answers", ())))
    loader = LoaderOptions.from_config(config.data.loader)
    skips = SkipLog(loader.skip_log_limit)
    found = collections.defaultdict(list)
    cropped = 0
    for item in ordered_stream(parts, examples.TaskEvalExamples(image, options), loader):
        if isinstance(item, Skipped):
            skips.add(item)
            continue
        found["images"].append(item["image"])
        found["query"].append(item["query"])
        found["target"].append(item["target"])
        found["record"].append(np.full(len(item["target"]), len(found["images"]) - 1))
        for key in ("boxes", "box_mask", "target_box", "answers"):
            if key in item:
                found[key].append(item[key])
        cropped += item.get("cropped_items", 0)
        if len(found["images"]) == limit:
            break
    if not found["images"]:
        raise ValueError(f"config.data.eval_sources={config.data.eval_sources} holds no usable {task!r} item "
                         f"({dict(skips.counts)} records skipped)")

    def stacked(key, join=np.concatenate):
        return join(found[key]) if key in found else None

    return TaskItems(images=np.stack(found["images"]), record=stacked("record"), query=stacked("query"),
                     target=stacked("target"), boxes=stacked("boxes", np.stack), box_mask=stacked("box_mask", np.stack),
                     target_box=stacked("target_box"),
                     answers=[a for group in found["answers"] for a in group] if "answers" in found else None,
                     cropped=cropped, skipped=dict(skips.counts))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of matching rows of two [n, 4] (x0, y0, x1, y1) box arrays."""
    x0, y0 = np.maximum(a[:, 0], b[:, 0]), np.maximum(a[:, 1], b[:, 1])
    x1, y1 = np.minimum(a[:, 2], b[:, 2]), np.minimum(a[:, 3], b[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return np.where(area > 0, inter / np.maximum(area, 1e-12), 0.0)


def task_metrics(task: str, outputs: np.ndarray, items: TaskItems, answers: tuple[str, ...]) -> dict[str, float]:
    """The task's figures (percent) from the model's outputs [n, classes | max_boxes], with their chance levels."""
    predicted = outputs.argmax(axis=-1)
    count = len(items.target)
    if task == tasks.VE:
        metrics = {"ve_accuracy": 100 * float(np.mean(predicted == items.target)),
                   "ve_chance": 100 * np.bincount(items.target, minlength=len(tasks.VE_LABELS)).max() / count}
        for index, label in enumerate(tasks.VE_LABELS):
            chosen = items.target == index
            if chosen.any():
                metrics[f"ve_accuracy_{label}"] = 100 * float(np.mean(predicted[chosen] == index))
        return metrics
    if task == tasks.VQA:
        scores = [tasks.vqa_score(answers[p], a) for p, a in zip(predicted, items.answers, strict=True)]
        common = collections.Counter(tasks.normalise_answer(a[0]) for a in items.answers).most_common(1)[0][0]
        return {"vqa_score": 100 * float(np.mean(scores)),
                "vqa_chance": 100 * float(np.mean([tasks.vqa_score(common, a) for a in items.answers])),
                "vqa_in_vocabulary": 100 * float(np.mean(items.target >= 0))}
    boxes = items.boxes[items.record, predicted]  # [n, 4]
    candidates = items.box_mask[items.record].sum(axis=-1)
    return {"rec_accuracy_iou50": 100 * float(np.mean(box_iou(boxes, items.target_box) >= IOU_HIT)),
            "rec_top1": 100 * float(np.mean(predicted == items.target)),
            "rec_chance": 100 * float(np.mean(1.0 / candidates))}


class DownstreamEvaluator(Evaluator):
    """The fine-tuned task's figures on the eval set's task items (read once per size, predicted in batches)."""

    headline = True

    def __init__(self, context, name, options):
        super().__init__(context, name, options)
        self.task = tasks.check_task(context.config.data.task, "config.data.task")
        self._items: dict[int, TaskItems] = {}
        self._predict = jax.jit(
            context.method.predict, in_shardings=(context.param_shardings, parallel.batch_sharding(context.mesh)),
            out_shardings=parallel.replicated(context.mesh))

    def __call__(self, evaluation: EvalPass) -> Result:
        limit = len(evaluation.dataset)
        if limit not in self._items:
            self._items[limit] = read_items(self.context.config, self.task, self.context.tokenizer, limit)
        items = self._items[limit]
        outputs = self.predict(evaluation.params, items)
        metrics = task_metrics(self.task, outputs, items, tuple(self.context.config.data.get("answers", ())))
        metrics["items"] = float(len(items.target))
        if items.cropped:
            metrics["items_cropped"] = float(items.cropped)
        result = set_result(evaluation, "downstream", metrics)
        result.summary.append(f"{evaluation.name} {self.task}: " + "  ".join(
            f"{key} {value:.2f}" for key, value in metrics.items() if key != "items") + f" ({len(items.target)} items)")
        return result

    def predict(self, params, items: TaskItems) -> np.ndarray:
        """The model's outputs for every item, in global batches (padded; each process feeds its rows)."""
        batch_size, mesh = self.context.batch_size, self.context.mesh
        local = batch_size // jax.process_count()
        first = jax.process_index() * local
        count, outputs = len(items.target), []
        box_shape = (self.context.config.data.max_boxes,)
        for start in range(0, count, batch_size):
            rows = np.arange(start, min(count, start + batch_size))
            rows = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])  # padding: repeats a row
            owners = items.record[rows]
            batch = {
                "image": items.images[owners], "query": items.query[rows],
                "boxes": (items.boxes[owners] if items.boxes is not None
                          else np.zeros((batch_size, *box_shape, 4), np.float32)),
                "box_mask": items.box_mask[owners] if items.box_mask is not None else np.zeros((batch_size, *box_shape),
                                                                                            bool),
            }
            local_batch = {key: value[first : first + local] for key, value in batch.items()}
            with parallel.mesh_context(mesh):
                out = self._predict(params, parallel.global_batch_from_local(local_batch, mesh))
            outputs.append(np.asarray(out)[: min(batch_size, count - start)])
        return np.concatenate(outputs)
