"""The default evaluator: image↔text retrieval during training; the full suite at the end and in --mode=eval.

Every `config.eval.every` steps the train loop scores a fixed subset of the eval set (`PairDataset.first_images`,
`config.eval.subset_size` images with all their captions) by retrieval alone, compiled once and reused. The full
suite (`EvalSuite.full`) adds, on the whole eval set:
- unimodal retrieval: text→text (another caption of the same image), and image→image: within the set when it
  carries image groups (another style of the same content), else against re-rendered views of the embedded
  world's scenes;
- zero-shot classification of the embedded world's colours and shapes, when the model trained on the world, and
  of every labelled task in `config.eval.zeroshot.tasks` (labelled.py);
- the efficiency figures (efficiency.py): the timed two-stream retrieval beside the estimated cross-encoder cost;
- the retrieval picture (picture.py).

The eval set is named after its source (`eval_set_name`: "embedded" for the world, else the dataset's name) in
the metrics keys, the JSON report and the picture; `scope.eval_scope` caps what a short run's full evaluation
reads (scope.py).
"""

import dataclasses
import json
import time

import ml_collections
import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from vlp_jax.data import sources, synthetic
from vlp_jax.data.pipeline import PairDataset
from vlp_jax.data.tokenizer import Tokenizer
from vlp_jax.evaluate import efficiency, labelled, picture, unimodal, zeroshot
from vlp_jax.evaluate.embeddings import Encoders
from vlp_jax.evaluate.retrieval import format_table, retrieval_metrics, scorer_from_config
from vlp_jax.evaluate.scope import eval_batch_size, eval_scope


def image_labels(dataset: PairDataset) -> np.ndarray:
    """Each image's content label: its group when the set has groups, else its own index. int [N]."""
    groups = getattr(dataset, "image_groups", None)
    return np.arange(len(dataset)) if groups is None else np.asarray(groups)


@dataclasses.dataclass
class Evaluation:
    """The full suite's results: `report` nests them as the JSON file does (sets, then zero-shot tasks)."""

    report: dict
    picture: np.ndarray  # uint8 [H, W, 3]

    def scalars(self) -> dict[str, float]:
        """Flat keys for metrics.jsonl and TensorBoard: eval/<set>/<metric> (retrieval and unimodal),
        eval/<set>/efficiency/<figure>, eval/zeroshot/<task>/<metric>."""
        flat = {}
        for name, results in self.report["sets"].items():
            flat |= {f"eval/{name}/{key}": value for key, value in results["retrieval"].items()}
            flat |= {f"eval/{name}/{key}": value for key, value in results["unimodal"].items()}
            flat |= {f"eval/{name}/efficiency/{key}": value for key, value in results["efficiency"].items()}
        for task, results in self.report["zeroshot"].items():
            flat |= {f"eval/zeroshot/{task}/{key}": value for key, value in results.items()}
        return flat

    def summary(self) -> str:
        """Human-readable lines: the retrieval table, then unimodal, zero-shot and efficiency figures."""
        sets = self.report["sets"]
        lines = [format_table({name: results["retrieval"] for name, results in sets.items()})]
        for name, results in sets.items():
            unimodal_text = "  ".join(f"{key} {value:.2f}" for key, value in results["unimodal"].items())
            lines.append(f"{name} unimodal: {unimodal_text or 'n/a'}")
            speed = results["efficiency"]
            lines.append(
                f"{name} efficiency: {speed['num_images']} images x {speed['num_texts']} texts, two-stream "
                f"{speed['two_stream_s']:.3g} s vs cross-encoder {speed['cross_encoder_s_estimated']:.3g} s "
                f"(estimated): {speed['speedup']:,.0f}x"
            )
        for task, results in self.report["zeroshot"].items():
            skipped = {key: value for key, value in results.items() if key.startswith("skipped_")}
            lines.append(
                f"zero-shot {task}: top1 {results['top1']:.1f}%  top5 {results['top5']:.1f}%  "
                f"(chance top1 {results['chance_top1']:.1f}%, {results['num_images']} images"
                + "".join(f", {value} {key}" for key, value in skipped.items()) + ")"
            )
        return "\n".join(lines)


def save_report(directory: epath.PathLike, step: int, report: dict, picture: np.ndarray | None = None) -> epath.Path:
    """Writes <directory>/step_<step>.json and, given a picture, step_<step>.png; returns the JSON's path."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    report = {"step": step, **report}
    if picture is not None:
        picture_path = directory / f"step_{step}.png"
        with picture_path.open("wb") as file:
            Image.fromarray(picture).save(file, format="PNG")
        report["picture"] = picture_path.name
    report_path = directory / f"step_{step}.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report_path


class EvalSuite:
    """Retrieval (`__call__`) and the full suite (`full`) of a two-tower method; everything compiles once."""

    def __init__(self, method, param_shardings, mesh, config: ml_collections.ConfigDict, tokenizer: Tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        self.encoders = Encoders(method, param_shardings, mesh, eval_batch_size(config, mesh))
        self.scorer = scorer_from_config(config.eval, mesh)
        self.scope = eval_scope(config)
        # Built on first use: (task, records skipped by reason) of the world's and the configured tasks.
        self._zeroshot_tasks: list[tuple[zeroshot.ZeroShotTask, dict[str, int]]] | None = None

    def __call__(self, params, extra, dataset: PairDataset) -> dict[str, float]:
        """Image↔text retrieval metrics (retrieval.retrieval_metrics) of `params` on `dataset`.

        `extra` (the train state's non-gradient state) is part of the evaluator protocol; encoding needs params only.
        """
        del extra
        images = self.encoders.images(params, dataset.images)
        texts = self.encoders.texts(params, dataset.captions)
        return self._retrieval(dataset, images, texts)

    def full(self, params, dataset: PairDataset, name: str) -> Evaluation:
        """Retrieval, unimodal retrieval, zero-shot, efficiency and the picture of `params` on `dataset`."""
        self.encoders.images(params, dataset.images[:1])  # compile before the timing starts
        self.encoders.texts(params, dataset.captions[:1])
        started = time.perf_counter()
        images = self.encoders.images(params, dataset.images)
        image_seconds = time.perf_counter() - started
        started = time.perf_counter()
        texts = self.encoders.texts(params, dataset.captions)
        text_seconds = time.perf_counter() - started
        product_seconds = self._time_product(images, texts)
        retrieval = self._retrieval(dataset, images, texts)
        report = {
            "sets": {
                name: {
                    "retrieval": retrieval,
                    "unimodal": self._unimodal(params, dataset, images, texts),
                    "efficiency": efficiency.efficiency_report(
                        self.config.model, len(images), len(texts), image_seconds, text_seconds, product_seconds
                    ),
                }
            },
            "zeroshot": self._zeroshot(params),
        }
        return Evaluation(report, self._picture(dataset, images, texts, name))

    def _time_product(self, images: np.ndarray, texts: np.ndarray) -> float:
        """Seconds to score every image against every text, keeping each image's best (the [N, M] product,
        tiled), after a first untimed run that compiles the tiles."""
        self.scorer.top_k(images, texts, 1)
        started = time.perf_counter()
        self.scorer.top_k(images, texts, 1)
        return time.perf_counter() - started

    def _retrieval(self, dataset: PairDataset, images: np.ndarray, texts: np.ndarray) -> dict[str, float]:
        groups = getattr(dataset, "image_groups", None)
        return retrieval_metrics(images, texts, dataset.caption_image, image_groups=groups, scorer=self.scorer)

    def _unimodal(self, params, dataset: PairDataset, images: np.ndarray, texts: np.ndarray) -> dict[str, float]:
        labels = image_labels(dataset)
        text_labels = labels[dataset.caption_image]
        # One copy of each distinct caption per label: a group's images (one emoji in several art styles) share
        # their captions, and an identical copy would make text→text trivial.
        _, distinct = np.unique(np.concatenate([text_labels[:, None], dataset.captions], axis=1), axis=0,
                                return_index=True)
        distinct.sort()
        results = {}
        if np.bincount(text_labels[distinct]).max() >= 2:
            results |= unimodal.same_label_recall("t2t", texts[distinct], text_labels[distinct], scorer=self.scorer)
        if getattr(dataset, "image_groups", None) is not None:
            if np.bincount(labels).max() >= 2:
                results |= unimodal.same_label_recall("i2i", images, labels, scorer=self.scorer)
        elif self._is_world_eval_split(dataset):
            world = self.config.data.world
            views = unimodal.world_image_views(world, len(dataset), self.config.eval.unimodal.max_shift)
            view_emb = self.encoders.images(params, views)
            results |= unimodal.cross_view_recall(images, view_emb, labels, scorer=self.scorer)
        return results

    def _zeroshot(self, params) -> dict[str, dict[str, float]]:
        if self._zeroshot_tasks is None:
            self._zeroshot_tasks = [(task, {}) for task in self._world_tasks()] + self._configured_tasks()
        embedded = []  # (images, their embeddings): the world's colour and shape tasks share one images array

        def embed_images(images: np.ndarray) -> np.ndarray:
            for seen, embeddings in embedded:
                if seen is images:  # the same array object (the tasks hold it alive), not merely equal values
                    return embeddings
            embedded.append((images, self.encoders.images(params, images)))
            return embedded[-1][1]

        results = {}
        for task, skipped in self._zeroshot_tasks:
            accuracy = zeroshot.evaluate_zeroshot(
                task,
                embed_images,
                lambda tokens: self.encoders.texts(params, tokens),
                self.tokenizer,
                self.config.model.text.max_len,
                scorer=self.scorer,
            )
            results[task.name] = {
                **accuracy,
                "chance_top1": 100.0 / len(task.class_names),
                "num_images": len(task.labels),
                **{f"skipped_{reason}": count for reason, count in skipped.items()},
            }
        return results

    def _world_tasks(self) -> list[zeroshot.ZeroShotTask]:
        """The embedded world's zero-shot tasks when the model trained on the world, else none."""
        data = self.config.data
        specs = sources.parse_specs(data.train_sources, "train", "config.data.train_sources")
        if not any(spec.location == sources.SYNTHETIC for spec in specs):
            return []
        size = self.config.eval.zeroshot.size
        return zeroshot.world_zeroshot_tasks(data.world, min(size, self.scope.limit or size))

    def _configured_tasks(self) -> list[tuple[zeroshot.ZeroShotTask, dict[str, int]]]:
        """The labelled tasks of `config.eval.zeroshot.tasks` (labelled.py), capped like the eval set."""
        tasks = self.config.eval.zeroshot.get("tasks") or {}
        return [labelled.load_task(name, settings, self.config, self.scope.limit) for name, settings in tasks.items()]

    def _is_world_eval_split(self, dataset: PairDataset) -> bool:
        """Whether `dataset` is the world's eval split in order (what re-rendered views must align with)."""
        data = self.config.data
        if data.eval_sources.strip() != sources.SYNTHETIC:
            return False
        aligned = np.array_equal(synthetic.make_split(data.world, "eval", 1).images[0], dataset.images[0])
        if not aligned:
            logging.warning("the eval set does not start with the world's first eval scene; image→image skipped")
        return aligned

    def _picture(self, dataset: PairDataset, images: np.ndarray, texts: np.ndarray, name: str) -> np.ndarray:
        """Evenly spaced image queries with their top captions and caption queries with their top images."""
        settings = self.config.eval.picture
        labels = image_labels(dataset)
        text_labels = labels[dataset.caption_image]
        count, top_k = settings.queries, settings.top_k
        image_ids = np.linspace(0, len(images) - 1, count).astype(int)
        text_ids = (np.linspace(0, len(texts) - 1, count) + len(texts) / (2 * count)).astype(int) % len(texts)
        top_texts, _ = self.scorer.top_k(images[image_ids], texts, min(top_k, len(texts)))
        top_images, _ = self.scorer.top_k(texts[text_ids], images, min(top_k, len(images)))
        image_queries = [
            picture.ImageQuery(
                dataset.images[i], self.tokenizer.decode(dataset.captions[found]), list(text_labels[found] == labels[i])
            )
            for i, found in zip(image_ids, top_texts, strict=True)
        ]
        text_queries = [
            picture.TextQuery(
                self.tokenizer.decode(dataset.captions[t])[0], list(dataset.images[found]),
                list(labels[found] == text_labels[t]),
            )
            for t, found in zip(text_ids, top_images, strict=True)
        ]
        title = f"eval set {name}: {len(images)} images, {len(texts)} captions"
        return picture.retrieval_picture(image_queries, text_queries, settings.image_px, title)
