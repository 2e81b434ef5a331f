"""Per-step metrics: a JSONL file, TensorBoard scalars and a tqdm progress bar.

``metrics.jsonl`` gets one JSON object per logged step, ``{"step": s, "<key>": value, ...}``,
flushed line by line. Integer metrics stay integers, float metrics are written with Python's
shortest round-trip repr (so equal floats give equal lines), non-finite values are written as
null. On resume pass ``resume_step``: lines with ``step > resume_step`` (written after the
checkpoint the run resumes from) are dropped, and a partial last line from a killed writer is
discarded, so a resumed run's file equals an uninterrupted one. TensorBoard gets ``purge_step``
for the same reason. Only process 0 writes by default.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Iterable, Mapping

import jax
import numpy as np

__all__ = ["MetricsLogger", "read_metrics", "scalars"]


def _scalar(key: str, value: Any):
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"metric {key!r} has shape {arr.shape}; log scalars only (reduce it first)")
    item = arr.reshape(()).item()
    if isinstance(item, bool):
        return int(item)
    if isinstance(item, int):
        return item
    item = float(item)
    return item if math.isfinite(item) else None


def scalars(metrics: Mapping[str, Any]) -> dict:
    """The metrics as plain Python scalars, sorted by key, as `MetricsLogger.log` writes them
    (ints stay ints, non-finite floats become None; blocks on device values)."""
    return {k: _scalar(k, metrics[k]) for k in sorted(metrics) if k != "step"}


def read_metrics(path: str) -> list[dict]:
    """The JSON objects of a metrics.jsonl file (a partial last line is ignored)."""
    out = []
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # written without its newline: the writer was killed mid-line
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON object; the metrics file is corrupt, move it away to start fresh") from None
    return out


class MetricsLogger:
    def __init__(
        self,
        out_dir: str,
        total_steps: int,
        *,
        enabled: bool | None = None,
        resume_step: int = 0,
        show_keys: Iterable[str] = ("loss",),
        tensorboard: bool = True,
        progress: bool = True,
        filename: str = "metrics.jsonl",
    ):
        self.enabled = (jax.process_index() == 0) if enabled is None else bool(enabled)
        self.path = os.path.join(out_dir, filename)
        self.total_steps = int(total_steps)
        self.show_keys = tuple(show_keys)
        self._last_step = int(resume_step)
        self._file = None
        self._tb = None
        self._bar = None
        if not self.enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self._truncate(int(resume_step))
        self._file = open(self.path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(out_dir, "tb"), purge_step=int(resume_step) + 1 if resume_step > 0 else None)
        from tqdm.auto import tqdm

        self._bar = tqdm(total=self.total_steps, initial=int(resume_step), disable=not progress, dynamic_ncols=True,
                         unit="step", desc="train")

    def _truncate(self, resume_step: int) -> None:
        """Keep only the lines with step <= resume_step (atomic rewrite)."""
        if not os.path.isfile(self.path):
            return
        keep = [row for row in read_metrics(self.path) if int(row.get("step", 0)) <= resume_step]
        fd, tmp = tempfile.mkstemp(prefix=".tmp-metrics-", dir=os.path.dirname(self.path) or ".")
        try:
            with os.fdopen(fd, "w") as f:
                for row in keep:
                    f.write(json.dumps(row) + "\n")
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Record `metrics` for `step` (blocks on device values); returns the plain dict written."""
        row = {"step": int(step), **scalars(metrics)}
        if not self.enabled:
            return row
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and v is not None:
                    self._tb.add_scalar(k, v, int(step))
        if self._bar is not None:
            self._bar.update(max(0, int(step) - self._last_step))
            shown = {k: row[k] for k in self.show_keys if k in row and row[k] is not None}
            if shown:
                self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in shown.items()}, refresh=False)
        self._last_step = int(step)
        return row

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
