"""Skipping bad input: the one error a bad record raises, the marker it becomes in a stream, and the counter.

A record (or a converter's input item) that cannot be used raises SkipRecord with a reason name. Inside the
grain pipeline it becomes a Skipped marker that says also where it was read (grain streams items, not
exceptions, so one bad record never stops training). Every reader counts markers in a SkipLog: by reason, with
the first few of each reason kept as examples (and logged), so a bad record is never silently trained on.
"""

import collections
import dataclasses

from absl import logging


class SkipRecord(ValueError):
    """Input that cannot become a record or an example: ``reason`` names why (a counter key), ``message`` how."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message

    def at(self, where: str, record_id: str | None = None) -> "Skipped":
        """The stream marker of this skip for the record read at ``where``."""
        return Skipped(self.reason, where, record_id, self.message)


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A record the pipeline drops: why (a reason name), where (shard and position), which (id, if known)."""

    reason: str
    where: str
    record_id: str | None
    message: str

    def example(self) -> str:
        """'where (message)' (the id when the place is unknown), printable even if the input was not UTF-8."""
        text = self.where or self.record_id or "(unknown)"
        text = f"{text} ({self.message})" if self.message else text
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclasses.dataclass
class SkipLog:
    """Counts skipped records by reason and keeps the first ``limit`` of each reason as examples, logging them
    (with id and location) when ``log``."""

    limit: int = 0
    log: bool = True
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def add(self, skipped: Skipped) -> None:
        self.counts[skipped.reason] += 1
        count = self.counts[skipped.reason]
        if count > self.limit:
            return
        self.examples.setdefault(skipped.reason, []).append(skipped.example())
        if self.log:
            more = " (later records skipped for this reason are counted, not logged)" if count == self.limit else ""
            logging.warning("skipped record %s at %s: %s: %s%s", skipped.record_id or "(id unknown)", skipped.where,
                            skipped.reason, skipped.message, more)

    def merge(self, other: "SkipLog") -> None:
        """Adds another log's counts, and its examples up to ``limit`` per reason."""
        self.counts.update(other.counts)
        for reason, examples in other.examples.items():
            kept = self.examples.setdefault(reason, [])
            kept.extend(examples[: max(self.limit - len(kept), 0)])

    def to_json(self) -> dict:
        """{"skipped": counts, "examples": examples}: the form reports save."""
        return {"skipped": dict(self.counts), "examples": self.examples}

    @classmethod
    def from_json(cls, saved: dict, limit: int) -> "SkipLog":
        return cls(limit, log=False, counts=collections.Counter(saved["skipped"]), examples=saved["examples"])

    def summary(self, descriptions: dict[str, str]) -> list[str]:
        """Per reason (sorted): its count and description, then its examples, indented for a closing report."""
        lines = []
        for reason, count in sorted(self.counts.items()):
            lines.append(f"  {reason}: {count} ({descriptions[reason]}), e.g.")
            lines.extend(f"    {example}" for example in self.examples.get(reason, []))
        return lines
