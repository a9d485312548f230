"""Downstream-task ground truth as records carry it: visual entailment, VQA and referring expressions.

A record holds any number of task items per image under its labels (so a dataset with five questions per image
stores the image once):

    labels["ve"]  = [{"hypothesis": str, "label": "entailment" | "neutral" | "contradiction"}, ...]   (SNLI-VE)
    labels["vqa"] = [{"question": str, "answers": [str, ...]}, ...]      (VQA v2: ten human answers; world: one)
    labels["rec"] = [{"expression": str, "box": int}, ...]               (RefCOCO: `box` indexes record.boxes;
                                                                           the record's other boxes are the
                                                                           distractors every candidate set holds)

The embedded world writes them (data/world_tasks.py), the converters write them from SNLI-VE, VQA v2 and
RefCOCO files (datasets/convert.py), and the fine-tuning pipeline reads them (data/examples.py `task` feature,
evaluate/downstream.py). `valid_items` is the one check all three use.

VQA answers are compared after `normalise_answer` (lower case, no punctuation, articles dropped, number words as
digits: the official VQA evaluation's rules, simplified), and scored with `vqa_score`: min(1, humans who gave the
answer / 3), the VQA v2 accuracy without its 10-choose-9 averaging (ours; equal when every answer is unanimous),
and with fewer than three answers divided by their number.
"""

import re

VE, VQA, REC = "ve", "vqa", "rec"
TASKS = (VE, VQA, REC)
VE_LABELS = ("entailment", "neutral", "contradiction")
# The text field each task's query lives in.
QUERY_FIELD = {VE: "hypothesis", VQA: "question", REC: "expression"}
VQA_HUMANS_FOR_FULL_SCORE = 3  # an answer given by this many annotators scores 1

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile(r"[^\w\s]")


def check_task(task: str, flag: str = "task") -> str:
    """`task` when it is one of TASKS; otherwise an error naming the flag."""
    if task not in TASKS:
        raise ValueError(f"{flag}={task!r} is not a downstream task; use one of {', '.join(TASKS)}")
    return task


def normalise_answer(answer: str) -> str:
    """An answer as VQA compares it: lower case, punctuation and articles dropped, number words as digits."""
    words = _PUNCTUATION.sub(" ", answer.lower()).split()
    return " ".join(_NUMBER_WORDS.get(word, word) for word in words if word not in _ARTICLES)


def vqa_score(prediction: str, answers: list[str]) -> float:
    """min(1, annotators who gave `prediction` / 3), both sides normalised; with fewer than three answers (the
    world's single one) the divisor is their number, so an item with one answer scores 1 or 0."""
    wanted = normalise_answer(prediction)
    agreeing = sum(normalise_answer(answer) == wanted for answer in answers)
    return min(1.0, agreeing / min(VQA_HUMANS_FOR_FULL_SCORE, len(answers)))


def valid_items(task: str, items, num_boxes: int) -> tuple[list[dict], list[str]]:
    """(the well-formed items of `labels[task]`, a reason for each one dropped). An item is well-formed when its
    query is non-blank text and its target is a VE label, a non-empty list of non-blank answers, or the index of
    one of the record's `num_boxes` boxes."""
    if not isinstance(items, list):
        return [], [f"labels[{task!r}] is {type(items).__name__}, not a list"]
    kept, reasons = [], []
    query_field = QUERY_FIELD[task]
    for position, item in enumerate(items):
        where = f"labels[{task!r}][{position}]"
        query = item.get(query_field) if isinstance(item, dict) else None
        if not isinstance(query, str) or not query.strip():
            reasons.append(f"{where} has no {query_field} text")
        elif task == VE and item.get("label") not in VE_LABELS:
            reasons.append(f"{where} label {item.get('label')!r} is not one of {', '.join(VE_LABELS)}")
        elif task == VQA and not _answers_ok(item.get("answers")):
            reasons.append(f"{where} needs a non-empty list of answer strings")
        elif task == REC and not (isinstance(item.get("box"), int) and 0 <= item["box"] < num_boxes):
            reasons.append(f"{where} box {item.get('box')!r} is not the index of one of the record's {num_boxes} "
                           "boxes")
        else:
            kept.append(item)
    return kept, reasons


def _answers_ok(answers) -> bool:
    return (isinstance(answers, list) and bool(answers)
            and all(isinstance(answer, str) and answer.strip() for answer in answers))
