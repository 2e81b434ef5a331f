"""Files: atomic writes (every output goes through a temp file in the same folder and a rename,
so a crash leaves the old file or the new one, never half of one), the JSONL object reader with
file:line errors, and the run-folder lock."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` (parents created) through a temp file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, *, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def read_jsonl_objects(path: str | Path, error: type[Exception], *, what: str) -> list[dict]:
    """The JSON objects of a JSONL file, one per non-blank line.

    A line that is not UTF-8, not JSON or not an object raises `error` naming `path:line` and the
    fix; `what` says what each object should hold (for that message)."""
    out: list[dict] = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{path}:{i}: not UTF-8 text (byte {e.start} of the line is {raw[e.start]:#04x}); "
                            "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{i}: invalid JSON ({e.msg}); one JSON object per line") from None
            if not isinstance(rec, dict):
                raise error(f"{path}:{i}: expected a JSON object with {what}, got {type(rec).__name__}")
            out.append(rec)
    return out


def jsonl_records(text: str, path, fail: Callable[..., Exception]) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of JSONL `text` read from `path`. A line that
    is not JSON or not an object raises ``fail(path, line, None, problem, fix)``, the caller's
    one-line error builder (field None: the whole line)."""
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            raise fail(path, lineno, None, f"invalid JSON ({e.msg} at column {e.colno})",
                       "write one JSON object per line") from None
        if not isinstance(rec, dict):
            raise fail(path, lineno, None, f"expected a JSON object, got {type(rec).__name__}",
                       "write one JSON object per line")
        yield lineno, rec


class RunLocked(RuntimeError):
    """Another process holds the run folder."""


@contextlib.contextmanager
def run_lock(run_dir: str | Path, *, enabled: bool = True):
    """Hold an exclusive lock on the run folder itself for the duration (an flock on the
    directory: nothing is written, and the lock goes with the process if it dies), so two runs
    never write one run folder at once. `enabled=False` (processes other than the first of a
    multi-host job) makes it a no-op."""
    if not enabled:
        yield
        return
    import fcntl

    os.makedirs(run_dir, exist_ok=True)
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(f"{run_dir}: another run is using this folder; wait for it to finish or use another run.name") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock
