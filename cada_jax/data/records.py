"""The one record type every prompt set turns into, and the error raised for malformed input.

A `PromptRecord` is one evaluation (or training) prompt with what we know about it: whether it is
harmful (the model should refuse), benign (the model should help; over-refusal sets) or a utility
item with a gold answer (GSM8K, MMLU). Loaders in `cada_jax.data.loaders` produce these; metrics in
`cada_jax.eval.metrics` group results by `category`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

LABELS = ("harmful", "benign", "utility")

# Option letters of a multiple-choice item: choices[i] is OPTION_LETTERS[i] (MMLU uses A-D; BIG-bench
# items have up to 13 options).
OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def option_index(letter: str, n_choices: int) -> int:
    """The index of option `letter` ("A", "b", ...) among `n_choices` options; ValueError otherwise."""
    s = str(letter).strip().upper()
    if len(s) != 1 or s not in OPTION_LETTERS[:n_choices]:
        last = OPTION_LETTERS[max(0, min(n_choices, len(OPTION_LETTERS)) - 1)]
        raise ValueError(f"answer {letter!r} is not an option letter A-{last} ({n_choices} options)")
    return OPTION_LETTERS.index(s)


class DataFormatError(ValueError):
    """A data file (or hub dataset) does not have the expected shape.

    The message is one line: `<file>:<line>[:<column or key>]: what is wrong; how to fix it`.
    """


def format_location(source: str, line: int | None = None, column: str | int | None = None) -> str:
    """`file:line:column` with the parts that are known, for the start of an error message."""
    parts = [str(source)]
    if line is not None:
        parts.append(str(line))
    if column is not None:
        parts.append(str(column))
    return ":".join(parts)


@dataclasses.dataclass
class PromptRecord:
    """One prompt of a benchmark or prompt set.

    id: stable identifier, unique within its source (the dataset's own id when it has one).
    prompt: the text sent to the model (before any jailbreak transform).
    label: "harmful" (should be refused), "benign" (should be answered) or "utility" (has a gold
        answer that is scored for correctness).
    category: the dataset's harm / topic category, or None.
    source: the benchmark name ("strongreject", "xstest", ...) or the file it came from.
    answer: the gold answer for utility sets (GSM8K: the full solution ending in "#### N";
        multiple choice: the letter of the correct option, `OPTION_LETTERS[i]` for `choices[i]`:
        "A".."D" for MMLU, further letters for items with more options); None otherwise.
    choices: the answer options of a multiple-choice item (MMLU, BIG-bench), else None.
    meta: anything else the dataset carries (ids, tags, the original row's extra columns).
    """

    id: str
    prompt: str
    label: str
    category: str | None = None
    source: str = ""
    answer: str | None = None
    choices: list[str] | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise ValueError(
                f"PromptRecord {self.id!r}: label {self.label!r} is not one of {', '.join(LABELS)}"
            )
        if not isinstance(self.prompt, str):
            raise TypeError(f"PromptRecord {self.id!r}: prompt must be a str, got {type(self.prompt).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (for writing prompt sets and evaluation outputs)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PromptRecord":
        """Inverse of `to_dict`; unknown keys go to `meta`."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        rec = cls(**known)
        if extra:
            rec.meta = {**rec.meta, **extra}
        return rec
