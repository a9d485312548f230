"""The two-tower evaluators of the default suite (`config.eval.evaluators`), each thin over its module:

- retrieval: image↔text R@1/5/10 (retrieval.py); during training on the subset, at the end on the whole set;
- unimodal: text→text (another caption of the same image) and image→image: within the set when it carries image
  groups (another style of the same content), else against re-rendered views of the world's scenes (unimodal.py);
- twins: the world's hard-negative scene pairs (one shape, or the order, changed) told apart (world.py);
- zeroshot: the embedded world's colour and shape tasks when the model trained on the world, and every labelled
  task of `config.eval.zeroshot.tasks` (zeroshot.py, labelled.py);
- efficiency: the timed two-stream retrieval beside the estimated cross-encoder cost (efficiency.py);
- picture: evenly spaced queries with their top results, hits and misses marked (picture.py).
"""

import time

import numpy as np

from vlp_jax.evaluate import efficiency, labelled, picture, unimodal, world, zeroshot
from vlp_jax.evaluate.context import EvalPass, Evaluator, Result, set_result
from vlp_jax.evaluate.retrieval import format_table, retrieval_metrics


def image_labels(dataset) -> np.ndarray:
    """Each image's content label: its group when the set has groups, else its own index. int [N]."""
    groups = getattr(dataset, "image_groups", None)
    return np.arange(len(dataset)) if groups is None else np.asarray(groups)


class RetrievalEvaluator(Evaluator):
    headline = True

    def __call__(self, evaluation: EvalPass) -> Result:
        images, texts = evaluation.embeddings()
        dataset = evaluation.dataset
        metrics = retrieval_metrics(images, texts, dataset.caption_image, image_groups=dataset.image_groups,
                                    scorer=self.context.scorer)
        result = set_result(evaluation, "retrieval", metrics)
        result.summary.append(format_table({evaluation.name: metrics}))
        return result


class UnimodalEvaluator(Evaluator):
    def __call__(self, evaluation: EvalPass) -> Result:
        images, texts = evaluation.embeddings()
        dataset, scorer, config = evaluation.dataset, self.context.scorer, self.context.config
        labels = image_labels(dataset)
        text_labels = labels[dataset.caption_image]
        # One copy of each distinct caption per label: a group's images (one emoji in several art styles) share
        # their captions, and an identical copy would make text→text trivial.
        _, distinct = np.unique(np.concatenate([text_labels[:, None], dataset.captions], axis=1), axis=0,
                                return_index=True)
        distinct.sort()
        results = {}
        if np.bincount(text_labels[distinct]).max() >= 2:
            results |= unimodal.same_label_recall("t2t", texts[distinct], text_labels[distinct], scorer=scorer)
        if dataset.image_groups is not None:
            if np.bincount(labels).max() >= 2:
                results |= unimodal.same_label_recall("i2i", images, labels, scorer=scorer)
        elif world.is_world_eval_split(config, dataset):
            views = world.world_image_views(config.data.world, len(dataset), config.eval.unimodal.max_shift)
            view_emb = self.context.encoders.images(evaluation.params, views)
            results |= unimodal.cross_view_recall(images, view_emb, labels, scorer=scorer)
        result = set_result(evaluation, "unimodal", results)
        text = "  ".join(f"{key} {value:.2f}" for key, value in results.items())
        result.summary.append(f"{evaluation.name} unimodal: {text or 'n/a'}")
        return result


class ZeroShotEvaluator(Evaluator):
    """The world's tasks (when trained on it) and the configured labelled tasks, capped like the eval set."""

    def __init__(self, context, name, options):
        super().__init__(context, name, options)
        self._tasks: list[tuple[zeroshot.ZeroShotTask, dict[str, int]]] | None = None  # built on first use

    def tasks(self) -> list[tuple[zeroshot.ZeroShotTask, dict[str, int]]]:
        """(task, records skipped by reason) of every task."""
        if self._tasks is None:
            config, limit = self.context.config, self.context.scope.limit
            tasks = []
            if world.trained_on_world(config):
                size = min(config.eval.zeroshot.size, limit or config.eval.zeroshot.size)
                tasks += [(task, {}) for task in world.world_zeroshot_tasks(config.data.world, size)]
            configured = config.eval.zeroshot.get("tasks") or {}
            tasks += [labelled.load_task(name, settings, config, limit) for name, settings in configured.items()]
            self._tasks = tasks
        return self._tasks

    def __call__(self, evaluation: EvalPass) -> Result:
        encoders, params = self.context.encoders, evaluation.params
        embedded = []  # (images, their embeddings): the world's colour and shape tasks share one images array

        def embed_images(images: np.ndarray) -> np.ndarray:
            for seen, embeddings in embedded:
                if seen is images:  # the same array object (the tasks hold it alive), not merely equal values
                    return embeddings
            embedded.append((images, encoders.images(params, images)))
            return embedded[-1][1]

        results, scalars, lines = {}, {}, []
        for task, skipped in self.tasks():
            accuracy = zeroshot.evaluate_zeroshot(
                task, embed_images, lambda tokens: encoders.texts(params, tokens), self.context.tokenizer,
                self.context.config.model.text.max_len, scorer=self.context.scorer,
            )
            found = {
                **accuracy,
                "chance_top1": 100.0 / len(task.class_names),
                "num_images": len(task.labels),
                **{f"skipped_{reason}": count for reason, count in skipped.items()},
            }
            results[task.name] = found
            scalars |= {f"eval/zeroshot/{task.name}/{key}": value for key, value in found.items()}
            lines.append(
                f"zero-shot {task.name}: top1 {found['top1']:.1f}%  top5 {found['top5']:.1f}%  "
                f"(chance top1 {found['chance_top1']:.1f}%, {found['num_images']} images"
                + "".join(f", {value} skipped_{key}" for key, value in skipped.items()) + ")"
            )
        return Result(scalars, {"zeroshot": results}, lines)


class TwinsEvaluator(Evaluator):
    """The world's hard-negative twins told apart (world.twin_accuracy), when the eval set is the world's eval split
    and holds twins; nothing otherwise."""

    def __call__(self, evaluation: EvalPass) -> Result:
        config, dataset = self.context.config, evaluation.dataset
        if not world.is_world_eval_split(config, dataset):
            return Result({}, {})
        images, texts = evaluation.embeddings()
        found = world.twin_accuracy(config.data.world, dataset, images, texts)
        result = set_result(evaluation, "twins", found)
        if found:
            result.summary.append(f"{evaluation.name} twins (chance 50): " + "  ".join(
                f"{key.removeprefix('twins_')} {value:.1f}" for key, value in found.items() if "pairs" not in key))
        return result


class EfficiencyEvaluator(Evaluator):
    def __call__(self, evaluation: EvalPass) -> Result:
        images, texts = evaluation.embeddings()
        image_seconds, text_seconds = evaluation.seconds()
        scorer = self.context.scorer
        scorer.top_k(images, texts, 1)  # compiles the tiles before the timing
        started = time.perf_counter()
        scorer.top_k(images, texts, 1)  # every image against every text, keeping each image's best
        product_seconds = time.perf_counter() - started
        config = self.context.config
        speed = efficiency.efficiency_report(config.model, len(images), len(texts), image_seconds, text_seconds,
                                             product_seconds, type(self.context.method).encode_flops(config))
        result = set_result(evaluation, "efficiency", speed, key_prefix="efficiency/")
        result.summary.append(
            f"{evaluation.name} efficiency: {speed['num_images']} images x {speed['num_texts']} texts, two-stream "
            f"{speed['two_stream_s']:.3g} s vs cross-encoder {speed['cross_encoder_s_estimated']:.3g} s "
            f"(estimated): {speed['speedup']:,.0f}x"
        )
        return result


class PictureEvaluator(Evaluator):
    """Evenly spaced image queries with their top captions and caption queries with their top images."""

    def __call__(self, evaluation: EvalPass) -> Result:
        images, texts = evaluation.embeddings()
        dataset, scorer, tokenizer = evaluation.dataset, self.context.scorer, self.context.tokenizer
        settings = self.context.config.eval.picture
        labels = image_labels(dataset)
        text_labels = labels[dataset.caption_image]
        count, top_k = settings.queries, settings.top_k
        image_ids = np.linspace(0, len(images) - 1, count).astype(int)
        text_ids = (np.linspace(0, len(texts) - 1, count) + len(texts) / (2 * count)).astype(int) % len(texts)
        top_texts, _ = scorer.top_k(images[image_ids], texts, min(top_k, len(texts)))
        top_images, _ = scorer.top_k(texts[text_ids], images, min(top_k, len(images)))
        image_queries = [
            picture.ImageQuery(
                dataset.images[i], tokenizer.decode(dataset.captions[found]), list(text_labels[found] == labels[i])
            )
            for i, found in zip(image_ids, top_texts, strict=True)
        ]
        text_queries = [
            picture.TextQuery(
                tokenizer.decode(dataset.captions[t])[0], list(dataset.images[found]),
                list(labels[found] == text_labels[t]),
            )
            for t, found in zip(text_ids, top_images, strict=True)
        ]
        title = f"eval set {evaluation.name}: {len(images)} images, {len(texts)} captions"
        drawn = picture.retrieval_picture(image_queries, text_queries, settings.image_px, title)
        return Result({}, {}, picture=drawn, picture_tag="retrieval")
