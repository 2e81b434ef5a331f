"""One process of the two-process test in tests/test_sharding.py.

Started by ``launch/multihost_local.sh -n 2 -d 4 -- python -m tests.multihost_worker CKPT_DIR``, which
sets CADA_COORDINATOR / CADA_NUM_PROCESSES / CADA_PROCESS_ID and 4 CPU devices per process. Each
process joins `jax.distributed` through `cada_jax.sharding.initialize_distributed`, runs the shared
GRPO scenario of tests/mesh_worker.py on a data=2 x fsdp=2 x tensor=2 mesh spanning both processes
(CPU collectives over gloo), saves the train state collectively with an orbax CheckpointManager,
restores it into the same shardings, takes one more step from the saved and from the restored
state, and writes ``result_<process index>.json`` (next to CKPT_DIR) with checksums for the test to
compare across processes.
"""

from __future__ import annotations

import os
import sys


def main(ckpt_dir: str) -> dict:
    from cada_jax.distributed import initialize_distributed

    method = initialize_distributed()

    import jax
    import orbax.checkpoint as ocp

    from cada_jax.distributed import main_print
    from cada_jax.sharding import MeshConfig, make_mesh
    from tests.mesh_worker import checksum, grpo_scenario

    res: dict = {
        "method": method,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "global_devices": jax.device_count(),
    }
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sc = grpo_scenario(mesh, steps=2)
    state, step, state_sh = sc["state"], sc["step"], sc["state_shardings"]
    res["losses"] = sc["losses"]
    res["checksum"] = checksum(state.params)

    mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2))
    mngr.save(int(state.step), args=ocp.args.StandardSave(state.arrays()))
    mngr.wait_until_finished()
    main_print("checkpoint saved at step", int(state.step))

    abstract = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state.arrays(), state_sh.arrays()
    )
    restored = state.with_arrays(mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(abstract)))
    mngr.close()
    res["restored_step"] = int(restored.step)
    res["restored_checksum"] = checksum(restored.params)
    res["restored_opt_checksum"] = checksum(restored.opt_state)
    res["saved_opt_checksum"] = checksum(state.opt_state)
    res["restored_sharding_ok"] = all(
        r.sharding == s for r, s in zip(jax.tree_util.tree_leaves(restored.arrays()),
                                        jax.tree_util.tree_leaves(state_sh.arrays()))
    )

    # Continue from the saved state and from the restored one: the next step must agree exactly.
    # The new params depend on the restored Adam moments too, not only on the restored params.
    s_saved, m_saved = step(state, sc["gbatch"])  # donates `state`
    s_restored, m_restored = step(restored, sc["gbatch"])
    res["next_loss_saved"] = float(m_saved["loss"])
    res["next_loss_restored"] = float(m_restored["loss"])
    res["next_checksum_saved"] = checksum(s_saved.params)
    res["next_checksum_restored"] = checksum(s_restored.params)
    return res


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.multihost_worker CHECKPOINT_DIR")
    out = main(sys.argv[1])
    # A file per process, next to the checkpoint directory: two processes' long stdout lines can
    # interleave in the launcher's shared pipe (writes over 4 KiB are not atomic).
    from tests.mesh_worker import write_result

    write_result(os.path.dirname(os.path.abspath(sys.argv[1])), out)
