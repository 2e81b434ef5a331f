"""One process of the two-process trainer test in tests/test_sharding.py.

Started by ``launch/multihost_local.sh -n 2 -d 4 -- python -m tests.multihost_trainer_worker ROOT``:
two processes of 4 CPU devices joined with `jax.distributed`, one data=2 x fsdp=2 x tensor=2 mesh
over both. Through the real entry points, on a run directory both processes share:

* GRPO (`train_grpo`): a straight 2-step run, and a run preempted by SIGTERM after step 1 (a
  training-loop hook, `tests.trainer_worker.sigterm_after`; `PreemptionGuard.should_stop` stops both processes together), saved
  collectively by orbax and resumed to step 2;
* SFT through the CLI (`cada sft CONFIG k=v ...`, which joins the job itself): a straight 3-step
  run, and a 2-step run resumed from its checkpoint to step 3; each process loads only its slice of
  every batch.

Each process writes ``ROOT_DIR/result_<process index>.json`` with what it saw: its data slice, the metrics both runs
wrote (process 0 writes them) and checksums of the exported models, for the test to compare
across processes and between straight and resumed runs.
"""

from __future__ import annotations

import json
import os
import sys


def _export_checksum(path: str) -> float:
    import jax
    import numpy as np

    from cada_jax.checkpoints.hf import load_params

    params, _ = load_params(path)
    total = 0.0
    for i, leaf in enumerate(jax.tree_util.tree_leaves(params)):
        host = np.asarray(leaf, np.float64)
        total += float(np.sum(np.abs(host))) + (i + 1) * float(np.sum(host))
    return total


def main(root: str) -> dict:
    from cada_jax.distributed import initialize_distributed

    method = initialize_distributed()

    import jax
    from jax.experimental import multihost_utils

    from cada_jax.cli import main as cli_main
    from cada_jax.config import dump_yaml, load_config
    from cada_jax.training.grpo import train_grpo
    from cada_jax.sharding import data_shard, mesh_from_config
    from tests.mesh_worker import tiny_model_dir
    from tests.trainer_worker import GRPO_RECORDS, grpo_overrides, metrics_rows, sft_overrides, sft_records, sigterm_after

    pid = jax.process_index()
    res: dict = {"method": method, "process_index": pid, "process_count": jax.process_count(),
                 "global_devices": jax.device_count()}
    # Each process converts its own copy of the tiny model (no race on one directory).
    mdir = os.path.join(root, f"model{pid}")
    os.makedirs(mdir, exist_ok=True)
    model_dir = tiny_model_dir(mdir)
    out = os.path.join(root, "runs")

    # --- GRPO: straight vs preempted at step 1 and resumed
    straight = train_grpo(load_config(None, grpo_overrides(model_dir, out, "rl_a", 2, "d2f2t2")), GRPO_RECORDS)
    cfg_b = load_config(None, grpo_overrides(model_dir, out, "rl_b", 2, "d2f2t2"))
    first = train_grpo(cfg_b, GRPO_RECORDS, hooks=[sigterm_after(1)])
    resumed = train_grpo(cfg_b, GRPO_RECORDS)
    multihost_utils.sync_global_devices("grpo runs done")
    res["grpo"] = {
        "straight_steps": straight["steps"], "first": [first["preempted"], first["steps"]],
        "resumed": [resumed["resumed_from"], resumed["steps"]],
        "metrics_a": metrics_rows(straight["run_dir"]), "metrics_b": metrics_rows(resumed["run_dir"]),
        "checkpoints_b": sorted(os.listdir(os.path.join(resumed["run_dir"], "checkpoints"))),
        "export_a": _export_checksum(straight["export_dir"]), "export_b": _export_checksum(resumed["export_dir"]),
    }

    # --- SFT through the CLI: straight 3 steps vs 2 steps resumed to 3
    data = os.path.join(root, f"sft{pid}.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in sft_records())
    yaml_path = dump_yaml(load_config(None, [f"sft.data={data}"]), os.path.join(root, f"sft{pid}.yaml"))

    def cada_sft(name: str, steps: int) -> int:
        return cli_main(["sft", yaml_path, *sft_overrides(model_dir, out, name, steps, "d2f2t2")])

    rc = [cada_sft("sft_a", 3), cada_sft("sft_b", 2), cada_sft("sft_b", 3)]
    multihost_utils.sync_global_devices("sft runs done")
    res["sft"] = {
        "rc": rc, "data_shard": list(data_shard(mesh_from_config(load_config(None, sft_overrides(
            model_dir, out, "x", 1, "d2f2t2")).mesh))),
        "metrics_a": metrics_rows(os.path.join(out, "sft_a")), "metrics_b": metrics_rows(os.path.join(out, "sft_b")),
        "checkpoints_b": sorted(os.listdir(os.path.join(out, "sft_b", "checkpoints"))),
        "export_a": _export_checksum(os.path.join(out, "sft_a", "final")),
        "export_b": _export_checksum(os.path.join(out, "sft_b", "final")),
    }
    return res


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.multihost_trainer_worker ROOT_DIR")
    result = main(sys.argv[1])
    # a file per process: see tests/multihost_worker.py
    from tests.mesh_worker import write_result

    write_result(sys.argv[1], result)
