"""Train-state checkpoints with orbax, and a preemption guard for clean exits.

A checkpoint at step s holds three items:

* ``state`` — the arrays of the `TrainState` (step, trainable params, optimizer state, rng key);
* ``data``  — the grain iterator state (a small JSON dict), so the data order resumes exactly;
* ``meta``  — any extra JSON (e.g. the config, the number of examples, the exported model path).

Orbax writes each step into a temporary directory and renames it when every item is finalised,
so `restore_latest` only ever sees complete checkpoints; an interrupted save leaves a temporary
directory that orbax ignores.

What is restored is verified: every save records a fingerprint of the state's arrays (a
wrapping sum of each array's bits) in ``meta``, and refuses a state whose floating-point arrays
are not finite. `restore_latest` recomputes the fingerprint and checks finiteness; a checkpoint
that fails, or that orbax cannot read (truncated, emptied), is moved aside to
``<dir>.corrupt/<step>`` with a one-line warning, and the next older one is tried. Since only
healthy states are saved and damaged ones leave the rotation, rotation never deletes the last
healthy checkpoint in favour of a damaged one. Saves may be asynchronous (the device-to-host copy is synchronous,
the file writes run in a background thread): call `close()` (or use the object as a context
manager) before the process exits.

`PreemptionGuard` turns SIGTERM / SIGINT into a flag that the training loop polls at step
boundaries: save, then return. A second signal while the flag is set raises KeyboardInterrupt,
so a stuck run can still be stopped by hand.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cada_jax.config import CheckpointSection, config_changes
from cada_jax.training.optim import TrainState

__all__ = ["Checkpointer", "CheckpointCorrupt", "CheckpointMismatch", "NonFiniteState", "Restored", "PreemptionGuard", "SkipStreak", "fingerprint"]

_INTEGRITY = "_integrity"


class CheckpointCorrupt(ValueError):
    """A checkpoint whose arrays do not match what was saved, or cannot be read."""


class CheckpointMismatch(ValueError):
    """A checkpoint written for another model, LoRA or optimizer configuration."""


class NonFiniteState(ValueError):
    """A train state with NaN or infinite values, which is never saved."""


def _bits_sum(x):
    import jax.numpy as jnp

    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    width = x.dtype.itemsize
    if width in (1, 2, 4) and x.dtype != jnp.uint32:
        x = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width]).astype(jnp.uint32)
    elif width == 8:
        x = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    return jnp.sum(x, dtype=jnp.uint32)


def _all_finite(x):
    import jax.numpy as jnp

    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.all(jnp.isfinite(x))
    return jnp.bool_(True)


@jax.jit
def _fingerprint_device(tree):
    leaves = jax.tree.leaves(tree)
    return [_bits_sum(x) for x in leaves], [_all_finite(x) for x in leaves]


def fingerprint(tree) -> tuple[list[int], list[str]]:
    """(a wrapping uint32 sum of each leaf's bits, the paths of leaves with NaN / inf values).

    Computed on the devices where the arrays live (a sharded array reduces collectively), so it
    costs one pass over the state and no host copy."""
    sums, finite = _fingerprint_device(tree)
    paths = [".".join(_key_name(k) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    bad = [p for p, ok in zip(paths, finite) if not bool(ok)]
    return [int(v) for v in sums], bad


class Restored(tuple):
    """(state, data_state, meta) returned by `Checkpointer.restore_latest`."""

    __slots__ = ()

    def __new__(cls, state, data_state, meta, step):
        return super().__new__(cls, (state, data_state, meta, step))

    state = property(lambda self: self[0])
    data_state = property(lambda self: self[1])
    meta = property(lambda self: self[2])
    step = property(lambda self: self[3])


def _abstract(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


class Checkpointer:
    """Save every `every_steps` steps, keep the `keep` newest, restore the newest complete one."""

    def __init__(self, directory: str, *, every_steps: int = 100, keep: int = 3, async_save: bool = True):
        if every_steps < 1 or keep < 1:
            raise ValueError(f"{directory}: checkpoint every_steps and keep must be >= 1 (got {every_steps}, {keep})")
        self.directory = os.path.abspath(directory)
        self.every_steps = int(every_steps)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(keep),
            enable_async_checkpointing=bool(async_save),
            create=True,
        )
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._saved: set[int] = set(self.manager.all_steps())

    @classmethod
    def from_config(cls, ckpt_cfg: CheckpointSection, run_dir: str) -> "Checkpointer":
        directory = ckpt_cfg.dir or os.path.join(run_dir, "checkpoints")
        return cls(directory, every_steps=ckpt_cfg.every_steps, keep=ckpt_cfg.keep, async_save=ckpt_cfg.async_save)

    # ------------------------------------------------------------------ save
    def should_save(self, step: int) -> bool:
        return step % self.every_steps == 0

    def save(self, step: int, state: TrainState, data_state: dict | None = None, meta: dict | None = None,
             *, force: bool = False) -> bool:
        """Save at `step` when it is a multiple of every_steps (or `force`); False when skipped."""
        step = int(step)
        if step in self._saved or not (force or self.should_save(step)):
            return False
        arrays = state.arrays()
        sums, bad = fingerprint(arrays)
        if bad:
            raise NonFiniteState(
                f"{self.directory}: the train state at step {step} has non-finite values ({', '.join(bad[:3])}); "
                "it was not saved, and the earlier checkpoints are kept: lower optim.lr or check the data"
            )
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(arrays),
            data=ocp.args.JsonSave(dict(data_state or {})),
            meta=ocp.args.JsonSave({**dict(meta or {}), _INTEGRITY: {"sums": sums}}),
        )
        self.manager.save(step, args=args, force=True)
        self._saved.add(step)
        return True

    # ------------------------------------------------------------------ restore
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def restore(self, step: int, state: TrainState) -> Restored:
        """Restore `step` into the structure (and shardings) of `state`."""
        target = state.arrays()
        abstract = jax.tree.map(_abstract, target)
        treedef = jax.tree.structure(target)
        self._check_fits(step, abstract)
        out = self.manager.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        # Orbax hands namedtuples (optax states) back as plain tuples: put the leaves back into
        # the exact tree structure of the live state.
        arrays = jax.tree.unflatten(treedef, jax.tree.leaves(out["state"]))
        meta = dict(out["meta"] or {})
        saved = meta.pop(_INTEGRITY, None)
        sums, bad = fingerprint(arrays)
        if bad:
            raise CheckpointCorrupt(f"non-finite values in {', '.join(bad[:3])}")
        if saved is not None and list(saved.get("sums", [])) != sums:
            n = sum(a != b for a, b in zip(saved.get("sums", []), sums))
            raise CheckpointCorrupt(f"{n} arrays differ from what was saved")
        return Restored(state.with_arrays(arrays), dict(out["data"] or {}), meta, int(step))

    def _check_fits(self, step: int, abstract) -> None:
        """Refuse (before reading any array) a checkpoint whose arrays differ from the live state."""
        stored = {getattr(m, "name", None): m for m in jax.tree.leaves(self.manager.item_metadata(int(step))["state"])}
        want = {".".join(_key_name(k) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
        hint = "it was written by a different model/LoRA/optimizer config — use a new checkpoint.dir"
        missing, extra = sorted(set(want) - set(stored)), sorted(set(stored) - set(want))
        if missing or extra:
            raise CheckpointMismatch(
                f"{self.directory}/{step}: checkpoint arrays differ from the train state (missing: {missing[:3]}, "
                f"unexpected: {extra[:3]}); {hint}"
            )
        for name, exp in want.items():
            got = stored[name]
            if tuple(got.shape) != tuple(exp.shape) or np.dtype(got.dtype) != np.dtype(exp.dtype):
                raise CheckpointMismatch(
                    f"{self.directory}/{step}: checkpoint array {name} is {np.dtype(got.dtype).name}"
                    f"{tuple(got.shape)} but the train state needs {np.dtype(exp.dtype).name}{tuple(exp.shape)}; {hint}"
                )

    def restore_latest(self, state: TrainState) -> Restored | None:
        """The newest healthy checkpoint as (state, data_state, meta, step), or None if there is none.

        A checkpoint that cannot be read or fails its integrity check is moved aside (with a
        warning) and the next older one is tried. One written for a different model or optimizer
        is an error, not a fallback (`_check_fits`)."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self.restore(step, state)
            except CheckpointMismatch:
                raise
            except CheckpointCorrupt as e:
                self._set_aside(step, str(e))
            except Exception as e:  # orbax / tensorstore errors on damaged files
                self._set_aside(step, f"it cannot be read: {type(e).__name__}: {' '.join(str(e).split())[:120]}")
        return None

    def _set_aside(self, step: int, reason: str) -> None:
        """Move a damaged checkpoint out of the rotation, to `<dir>.corrupt/<step>`."""
        aside_root = self.directory.rstrip(os.sep) + ".corrupt"
        aside = os.path.join(aside_root, str(step))
        if jax.process_index() == 0:
            os.makedirs(aside_root, exist_ok=True)
            if os.path.exists(aside):
                aside = f"{aside}.{len(os.listdir(aside_root))}"
            os.replace(os.path.join(self.directory, str(step)), aside)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"cada_set_aside_{step}")
        if jax.process_index() == 0:
            print(f"warning: checkpoint {self.directory}/{step} is damaged ({reason}); moved to {aside}, "
                  "trying the previous one", flush=True)
        self.manager.reload()
        self._saved.discard(int(step))

    # ------------------------------------------------------------------ lifecycle
    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SkipStreak:
    """Stops a run whose updates keep being skipped for non-finite losses or gradients.

    The trainers skip such an update (the state stays as it was) and report `skipped`; after
    `limit` skipped updates in a row (`optim.max_skipped_in_a_row`; 0 = never) `update` raises,
    so a diverged run ends with an error instead of finishing on weights it never changed."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.run = 0
        self.first = None

    def update(self, step: int, skipped: int) -> None:
        if not skipped:
            self.run, self.first = 0, None
            return
        self.run += 1
        self.first = step if self.first is None else self.first
        if self.limit and self.run >= self.limit:
            raise NonFiniteState(
                f"{self.run} updates in a row were skipped for a non-finite loss or gradient (steps {self.first}-{step}); "
                "the last healthy checkpoint is kept: lower optim.lr, check the data, or raise optim.max_skipped_in_a_row"
            )


# Config keys a resumed run may change: how it is shown, saved, placed or how long it runs, not
# what it learns from. Anything else that differs from the checkpoint's config is an error.
# File paths (`model.path`, `sft.data`, `rl.data`) may differ because each host of a multi-host
# job may keep its own copy: the records are compared by their digest instead, and a model of
# another architecture is refused when the arrays are restored (`_check_fits`).
RESUME_MAY_CHANGE = (
    "run.progress", "run.log_every", "run.out_dir", "run.name", "checkpoint.", "mesh.", "model.path", "sft.data",
    "rl.data", "model.remat",
    "model.attention_impl", "optim.max_skipped_in_a_row", "sft.steps", "sft.epochs", "rl.steps", "rl.eval_data",
    "rl.eval_every", "generate.", "judge.", "eval.", "pipeline.",
)


def records_digest(records) -> str:
    """sha256 of the training records as canonical JSON: tells whether a resume sees the same data."""
    import hashlib
    import json

    blob = json.dumps(list(records), sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def check_resume(meta: dict, config: dict, data_digest: str, *, run_dir: str, data_key: str) -> None:
    """Refuse to resume checkpoints written with another training config or other data.

    `meta` is the restored checkpoint's meta (its `config` and `data_sha256`, when recorded);
    `config` the current config as a dict. The error names the keys that changed."""
    saved = meta.get("config")
    changes = config_changes(saved, config, RESUME_MAY_CHANGE) if isinstance(saved, dict) else []
    if meta.get("data_sha256") not in (None, data_digest):
        changes.append(f"{data_key}: the training records differ")
    if changes:
        shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
        raise CheckpointMismatch(
            f"{run_dir}: its checkpoints were written with another config ({shown}); resume with the same "
            "config, or start fresh with another run.name (or delete the run folder)"
        )


class PreemptionGuard:
    """Context manager: SIGTERM/SIGINT set a flag instead of killing the process.

    The training loop calls `should_stop()` at each step boundary; on True it saves a checkpoint
    and returns. On exit the previous handlers come back. Signal handlers can only be installed
    from the main thread; elsewhere the guard is inert (`installed` is False) and never triggers.
    With several processes `should_stop()` is a collective: every process must call it at the
    same step, and all stop if any one was signalled.
    """

    def __init__(self, signals: tuple = (signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self._old: dict[int, Any] = {}
        self.triggered = False
        self.signum: int | None = None
        self.installed = False

    def _handle(self, signum, frame):
        if self.triggered:
            raise KeyboardInterrupt(f"second signal {signal.Signals(signum).name}: stopping without a checkpoint")
        self.triggered = True
        self.signum = signum

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handle)
            self.installed = True
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
        self.installed = False

    def should_stop(self) -> bool:
        flag = bool(self.triggered)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flag = bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
        return flag
