"""Streaming safetensors reading and writing on numpy (bf16 via ml_dtypes).

Reading goes through the `safetensors` package: each file is memory-mapped and hands out one
tensor at a time, so loading a model needs about one model's worth of host memory, not two; a
truncated or corrupt file fails with the file named instead of garbage weights.

Writing stays here because the package writes only whole in-memory dicts: `write_safetensors`
produces each tensor just before it writes it (GGUF dequantisation, exports of sharded params), to
a temp file renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class CheckpointError(ValueError):
    """A weights file that cannot be used; the message names the file and tensor."""


class SafetensorsFile:
    """Lazy view of one .safetensors file, read through the `safetensors` package (memory-mapped,
    one tensor at a time); its errors are re-raised as one line naming the file."""

    def __init__(self, path: str):
        from safetensors import SafetensorError, safe_open

        self.path = path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: weights file not found")
        self._error = SafetensorError
        try:
            self._f = safe_open(path, framework="np")
            names = list(self._f.keys())
            self.metadata = self._f.metadata() or {}
            self._shapes = {n: tuple(self._f.get_slice(n).get_shape()) for n in names}
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            size = os.path.getsize(path)
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({size} bytes: truncated or corrupt; re-download or re-export it): {_one_line(e)}"
            ) from None
        for name in names:
            dtype = self._f.get_slice(name).get_dtype()
            if dtype not in _DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple:
        return self._shapes[name]

    def get(self, name: str) -> np.ndarray:
        if name not in self._shapes:
            raise CheckpointError(f"{self.path}: tensor {name!r} not found")
        try:
            return self._f.get_tensor(name)
        except (self._error, OSError, ValueError) as e:
            raise CheckpointError(f"{self.path}: tensor {name!r} cannot be read (the file is corrupt; re-download or re-export it): {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray] | Iterable, metadata: dict | None = None) -> None:
    """Write tensors (name -> array, or an iterable of (name, shape, dtype, produce_fn)) atomically.

    With the iterable form each tensor is produced just before it is written, so the whole model
    never needs to be in host memory at once.
    """
    if isinstance(tensors, Mapping):
        items = [(k, v.shape, v.dtype, (lambda v=v: v)) for k, v in tensors.items()]
    else:
        items = list(tensors)
    header: dict = {}
    offset = 0
    for name, shape, dtype, _ in items:
        dtype = np.dtype(dtype)
        if dtype not in _NAMES:
            raise CheckpointError(f"{path}: cannot write tensor {name!r} of dtype {dtype}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": [int(s) for s in shape], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, shape, dtype, produce in items:
                arr = np.ascontiguousarray(produce(), dtype=np.dtype(dtype))
                if tuple(arr.shape) != tuple(shape):
                    raise CheckpointError(f"{path}: tensor {name!r} produced shape {arr.shape}, declared {tuple(shape)}")
                f.write(arr.tobytes())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# What a model export (export_hf, convert_gguf, the pipeline's final/ copy) puts in a model folder.
MODEL_FILES = frozenset({
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "chat_template.jinja", "added_tokens.json",
})


def _is_model_file(name: str) -> bool:
    return name in MODEL_FILES or (name.startswith("model-") and name.endswith(".safetensors"))


def check_publish_target(out_dir: str) -> None:
    """Refuse a target that holds anything a model export would not have written there.

    An existing empty folder, or one holding only model files (an earlier export), may be replaced;
    anything else (notes, a GGUF file, a source tree, the current folder) is left alone."""
    out_dir = os.path.abspath(out_dir)
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir) or os.path.islink(out_dir):
        raise CheckpointError(f"{out_dir}: exists and is not a model folder; choose a new or empty output folder")
    foreign = sorted(n for n in os.listdir(out_dir) if not _is_model_file(n))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise CheckpointError(
            f"{out_dir}: holds files a model export does not write ({shown}); nothing was replaced: "
            "choose a new or empty output folder"
        )


def publish_dir(tmp: str, out_dir: str) -> str:
    """Move a fully written temp folder into place at `out_dir`.

    An existing `out_dir` must pass `check_publish_target`. It is renamed aside, the new folder is
    renamed in, and only then is the old one deleted, so a crash at any point leaves a whole model
    at `out_dir` or beside it, never none."""
    out_dir = os.path.abspath(out_dir)
    check_publish_target(out_dir)
    os.chmod(tmp, 0o755)
    old = None
    if os.path.isdir(out_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
        os.rmdir(old)
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None and not os.path.exists(out_dir):
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir
