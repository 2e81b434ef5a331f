"""MetricsLogger: JSONL lines, resume truncation, TensorBoard files, disabled processes."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from cada_jax.training.logging import MetricsLogger, read_metrics


def lines(path):
    with open(path) as f:
        return f.read().splitlines()


def test_lines_are_flushed_and_typed(tmp_path):
    with MetricsLogger(str(tmp_path), 10, enabled=True, progress=False) as log:
        log.log(1, {"loss": jnp.float32(0.5), "skipped": jnp.int32(0), "kl": np.float64(np.nan), "n": 3})
        # flushed: readable while the logger is still open
        assert json.loads(lines(tmp_path / "metrics.jsonl")[0]) == {"step": 1, "kl": None, "loss": 0.5, "n": 3, "skipped": 0}
        with pytest.raises(ValueError, match="metric 'v' has shape \\(2,\\)"):
            log.log(2, {"v": jnp.ones(2)})
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "tb"))


def test_resume_truncates_lines_after_the_restored_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(str(tmp_path), 8, enabled=True, progress=False, tensorboard=False) as log:
        for s in range(1, 6):
            log.log(s, {"loss": 1.0 / s})
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # a writer killed mid-line
    uninterrupted = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 9)]
    with MetricsLogger(str(tmp_path), 8, enabled=True, progress=False, tensorboard=False, resume_step=3) as log:
        assert [r["step"] for r in read_metrics(str(path))] == [1, 2, 3]
        for s in range(4, 9):
            log.log(s, {"loss": 1.0 / s})
    assert lines(path) == uninterrupted
    # a fresh start (resume_step=0) empties the file
    MetricsLogger(str(tmp_path), 8, enabled=True, progress=False, tensorboard=False).close()
    assert lines(path) == []


def test_corrupt_middle_line_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON object"):
        MetricsLogger(str(tmp_path), 5, enabled=True, progress=False, tensorboard=False, resume_step=1)


def test_disabled_logger_writes_nothing(tmp_path):
    with MetricsLogger(str(tmp_path / "x"), 5, enabled=False) as log:
        row = log.log(1, {"loss": 2.0})
    assert row == {"step": 1, "loss": 2.0}
    assert not os.path.exists(tmp_path / "x")
