"""The one training loop: SFT and GRPO each plug a step into it.

    with Trainer(cfg, hooks=[...]) as loop:      # holds the run folder's lock
        summary = loop.run(SFTTask(cfg, records))

A *task* (`Task`) owns what is particular to a method: its train state, its data iterator and the
step itself. The loop owns what every run needs, in this order, once per step:

1. ``metrics = task.train_step(log_now)``: one step (it advances ``task.step``); metrics on the
   host, or None on a step that is not logged when the task keeps them on the device;
2. the skip-streak check (`SkipStreak`: too many non-finite updates in a row stop the run), the
   task's counters (``task.observe``), and ``<run>/metrics.jsonl`` every ``run.log_every`` steps
   and at the last one;
3. a checkpoint every ``checkpoint.every_steps`` (train state, data-iterator position, ``meta``);
4. the hooks, ``hook(loop)`` (tests use them to send a signal at a chosen step);
5. a SIGTERM / SIGINT since the last step (`PreemptionGuard`): save and return a summary with
   ``preempted: True``.

At the end: a final checkpoint, the model exported to ``<run>/final`` and ``<run>/summary.json``.
An exception of the task's ``resumable_errors`` (GRPO: a judge that keeps failing) saves the state
before the failed step, data position rewound to it, and stops with a message naming the fix.

Resuming happens when the task is built: `start_state` restores the newest healthy checkpoint
(refusing one written with another config or other records), or loads the weights and builds a
fresh state. With several processes every process runs the same loop; process 0 alone writes the
config, metrics, summary and exported model, and the checkpoints are written collectively.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterable, Protocol


from cada_jax.config import Config, dump_yaml, to_dict
from cada_jax.files import atomic_write_json, run_lock
from cada_jax.sharding import is_main_process, shard_params
from cada_jax.training import placement
from cada_jax.training.checkpointing import Checkpointer, PreemptionGuard, SkipStreak, check_resume
from cada_jax.training.data import iterator_state, restore_iterator
from cada_jax.training.logging import MetricsLogger, scalars
from cada_jax.training.optim import TrainState

__all__ = ["Task", "Trainer", "Hook", "Start", "start_state"]


class Task(Protocol):
    """What the loop needs from a method (see `SFTTask`, `GRPOTrainer`)."""

    name: str  # names a step in messages: "SFT", "RL"
    ckpt: Checkpointer
    iterator: Any  # the data iterator; its position is checkpointed
    state: TrainState
    step: int  # steps done
    total_steps: int
    show_keys: tuple[str, ...]  # metrics on the progress bar
    resumable_errors: tuple[type[Exception], ...]  # raised before the state changes: save, then stop
    resume_hint: str  # what to do about one of them

    def train_step(self, log_now: bool) -> dict | None: ...

    def meta(self) -> dict: ...  # JSON saved with every checkpoint (with "config" and "data_sha256")

    def observe(self, metrics: dict) -> None: ...  # fold a step's host metrics into the task's counters

    def describe(self) -> dict: ...  # the task's own fields of the run summary

    def export(self, out_dir: str) -> str: ...

    def close(self) -> None: ...


Hook = Callable[["Trainer"], None]


class Trainer:
    """The loop over a `Task` (see the module doc). `hooks` run after each step's checkpoint."""

    def __init__(self, cfg: Config, *, hooks: Iterable[Hook] = ()):
        self.cfg = cfg
        self.run_dir = os.path.abspath(cfg.run.dir)
        self.hooks = list(hooks)
        self.task: Task | None = None
        self.guard: PreemptionGuard | None = None
        self._lock = None

    def add_hook(self, hook: Hook) -> None:
        self.hooks.append(hook)

    @property
    def step(self) -> int:
        return self.task.step

    def __enter__(self) -> "Trainer":
        """Lock the run folder: a second run in it is refused until this one ends."""
        self._lock = run_lock(self.run_dir, enabled=is_main_process())
        self._lock.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        lock, self._lock = self._lock, None
        lock.__exit__(*exc)

    def run(self, task: Task) -> dict:
        """Train `task` to its ``total_steps`` (or until a signal); returns the run summary."""
        if self._lock is None:
            with self:
                return self.run(task)
        cfg, self.task = self.cfg, task
        os.makedirs(self.run_dir, exist_ok=True)
        if is_main_process():
            dump_yaml(cfg, os.path.join(self.run_dir, "config.yaml"))
        summary: dict[str, Any] = {"run_dir": self.run_dir, "total_steps": task.total_steps, "resumed_from": task.step,
                                   "preempted": False, "skipped": 0, "export_dir": None}
        logger = MetricsLogger(self.run_dir, task.total_steps, resume_step=task.step, show_keys=task.show_keys,
                               progress=cfg.run.progress)
        streak = SkipStreak(cfg.optim.max_skipped_in_a_row)
        try:
            with PreemptionGuard() as self.guard:
                while task.step < task.total_steps:
                    done = task.step + 1
                    log_now = done % cfg.run.log_every == 0 or done == task.total_steps
                    data_state = iterator_state(task.iterator)
                    try:
                        metrics = task.train_step(log_now)
                    except task.resumable_errors as e:
                        task.ckpt.save(task.step, task.state, data_state, task.meta(), force=True)
                        task.ckpt.wait()
                        raise type(e)(f"{task.name} step {done}: {e}; the run is saved at step {task.step} in "
                                      f"{task.ckpt.directory}: {task.resume_hint}") from e
                    if metrics is not None:
                        row = scalars(metrics)
                        summary["skipped"] += int(row["skipped"])
                        streak.update(task.step, int(row["skipped"]))
                        task.observe(row)
                        if log_now:
                            logger.log(task.step, metrics)
                    self._save()
                    for hook in self.hooks:
                        hook(self)
                    if task.step < task.total_steps and self.guard.should_stop():
                        self._save(force=True)
                        summary["preempted"] = True
                        break
                if not summary["preempted"]:
                    self._save(force=True)
            task.ckpt.wait()
        finally:
            logger.close()
            task.ckpt.close()
            task.close()
        summary["steps"] = task.step
        summary.update(task.describe())
        if summary["preempted"]:
            return summary
        summary["export_dir"] = task.export(os.path.join(self.run_dir, "final"))
        if is_main_process():
            atomic_write_json(os.path.join(self.run_dir, "summary.json"), summary)
        return summary

    def _save(self, force: bool = False) -> bool:
        t = self.task
        return t.ckpt.save(t.step, t.state, iterator_state(t.iterator), t.meta(), force=force)


# ----------------------------------------------------------------------------- where a run starts


@dataclasses.dataclass
class Start:
    """Where a task starts: its train state and step, and the weights it keeps beside them."""

    state: TrainState
    step: int
    frozen: Any  # the base weights under LoRA, else None
    reference: Any  # the reference weights when asked for, else None


def start_state(cfg: Config, ckpt: Checkpointer, iterator, tx, *, lora_key, state_key, model_dir: str, model_cfg,
                mesh, data_digest: str, data_key: str, micro_per_step: int = 1, reference: bool = False) -> Start:
    """Resume from the newest healthy checkpoint in `ckpt`, or start fresh from the model's weights.

    Resuming checks the checkpoint's config and records against this run's (`check_resume`) and
    that it holds ``micro_per_step`` updates per step, moves `iterator` to the saved position, and
    reads the arrays straight into their shards: a full fine-tune never holds two copies of the
    weights. The base weights are loaded only when needed: LoRA (they stay frozen beside the
    adapters), a fresh start, or `reference` (a frozen copy of the initial policy; under LoRA the
    base weights themselves, no second copy)."""
    lora_cfg = cfg.lora if cfg.lora.enabled else None
    where = dict(model_cfg=model_cfg, lora_cfg=lora_cfg, mesh=mesh)
    restored = None
    if ckpt.latest_step() is not None:  # damaged checkpoints are set aside by restore_latest
        restored = ckpt.restore_latest(placement.abstract_state(tx, state_key, **where))
    if restored is not None:
        run_dir = os.path.abspath(cfg.run.dir)
        check_resume(restored.meta, to_dict(cfg), data_digest, run_dir=run_dir, data_key=data_key)
        saved, want = int(restored.state.step), restored.step * micro_per_step
        if saved != want:
            raise ValueError(f"{ckpt.directory}/{restored.step}: {saved} micro-batches saved for {restored.step} steps, "
                             f"expected {want}; it was written with other batch settings (rl.mu, rl.minibatch_size) "
                             "or is corrupt: use a new checkpoint.dir")
        restore_iterator(iterator, restored.data_state, source=f"{ckpt.directory}/{restored.step}")
    base = None
    if lora_cfg is not None or restored is None or reference:
        from cada_jax.checkpoints.load import load_model

        base = load_model(model_dir, config=model_cfg, mesh=mesh, progress=False).params
    trainable, frozen = None, None
    if lora_cfg is not None:
        from cada_jax.training.lora import init_lora

        frozen = base
        if restored is None:
            trainable = shard_params(init_lora(base, model_cfg, lora_cfg, lora_key),
                                     placement.trainable_shardings(model_cfg, mesh, lora_cfg))
    elif restored is None:
        # Without a reference the weights are donated to the first update: nothing else holds them.
        trainable = placement.copy_tree(base) if reference else base
    if restored is not None:
        return Start(restored.state, restored.step, frozen, base if reference else None)
    # Fresh and restored states carry the same shardings, so a resumed run (and the next run in the
    # same process) reuses the compiled programs.
    state = placement.create_state(trainable, tx, state_key, **where)
    return Start(state, 0, frozen, base if reference else None)
