"""Input pipelines on grain: seeded shuffling, per-process sharding, batching, resumable iterators.

`prompt_dataset` turns an in-memory list of records (prompts for RL, tokenised examples for SFT)
into a ``grain.MapDataset``:

    records -> shard (process k of p takes records k, k+p, ...; the tail n % p is dropped so
               every process sees the same number of records and no process waits on another)
            -> shuffle(seed)        (a new permutation every epoch, a pure function of seed and epoch)
            -> repeat(num_epochs)   (None: forever; the trainer stops after its step count)
            -> batch(batch_size)    (per-process rows; a batch is a list of records by default)

A MapDataset is random access, so the iterator's whole state is a position (``{"next_index": i}``);
`make_iterator` gives an iterator whose ``get_state()`` / ``set_state()`` round-trip through the
JSON item of a checkpoint, and a restored iterator yields exactly the batches the interrupted run
would have yielded next.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import grain
import jax

__all__ = ["prompt_dataset", "make_iterator", "iterator_state", "restore_iterator", "prompt_of"]


def prompt_of(rec: dict, field: str, where: str, error: type[Exception]):
    """The prompt ``rec[field]``, checked: a non-empty string, or a non-empty list of chat messages
    (returned as fresh ``{"role", "content"}`` dicts); anything else raises `error` naming `where`."""
    value = rec[field]
    if isinstance(value, str):
        if not value.strip():
            raise error(f"{where}: field '{field}' is empty; every record needs a prompt")
        return value
    if isinstance(value, list) and value:
        for j, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise error(f"{where}: {field}[{j}] must be an object with string 'role' and 'content'")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise error(f"{where}: field '{field}' must be a non-empty string or a non-empty list of chat messages")


def prompt_dataset(
    records: Sequence[Any],
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    *,
    batch_size: int | None = None,
    drop_remainder: bool = True,
    batch_fn: Callable[[Sequence[Any]], Any] | None = list,
    process_index: int | None = None,
    process_count: int | None = None,
    name: str = "records",
) -> grain.MapDataset:
    """A sharded, shuffled, repeated, batched MapDataset over `records` (see the module doc).

    `batch_size` is per process; None leaves the dataset unbatched. `name` labels errors.
    """
    records = list(records)
    if not records:
        raise ValueError(f"{name}: no records to train on; check the data file and any filters applied to it")
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= pi < pc:
        raise ValueError(f"{name}: process_index {pi} is outside [0, {pc})")
    if len(records) < pc:
        raise ValueError(f"{name}: {len(records)} records cannot be split over {pc} processes; add records or use fewer hosts")
    if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs < 1):
        raise ValueError(f"{name}: num_epochs must be a positive int or None (forever), got {num_epochs!r}")
    even = (len(records) // pc) * pc
    ds = grain.MapDataset.source(records[:even])
    if pc > 1:
        ds = ds[pi::pc]
    if shuffle:
        ds = ds.shuffle(seed=int(seed))
    ds = ds.repeat(num_epochs)
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"{name}: batch_size must be >= 1, got {batch_size}")
        per_epoch = even // pc
        if num_epochs is not None and drop_remainder and per_epoch * num_epochs < batch_size:
            raise ValueError(
                f"{name}: {per_epoch * num_epochs} records per process cannot fill one batch of {batch_size}; "
                f"lower the batch size or add records"
            )
        ds = ds.batch(int(batch_size), drop_remainder=drop_remainder, batch_fn=batch_fn)
    return ds


def make_iterator(ds: grain.MapDataset, *, num_threads: int = 0, prefetch: int = 0):
    """A checkpointable iterator over `ds` (no background threads by default: records are in
    memory and collation is cheap, so determinism and a small footprint win)."""
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)).__iter__()


def iterator_state(it) -> dict:
    """The iterator's state as a JSON-serialisable dict (checked)."""
    state = it.get_state()
    try:
        json.dumps(state)
    except TypeError as e:
        raise TypeError(f"grain iterator state is not JSON-serialisable ({e}); use an in-memory MapDataset pipeline") from None
    return state


def restore_iterator(it, state: dict | None, *, source: str = "checkpoint"):
    """Set `it` to `state` (from a checkpoint); an empty/None state leaves it at the start."""
    if not state:
        return it
    if not isinstance(state, dict):
        raise ValueError(f"{source}: data iterator state must be a JSON object, got {type(state).__name__}; the checkpoint is corrupt")
    try:
        it.set_state(state)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{source}: data iterator state {state!r} does not fit this pipeline ({e}); use a new checkpoint.dir") from None
    return it
