"""Tests for cada_jax/sharding.py and launch/.

The test process has one CPU device (tests/conftest.py), and JAX fixes the device count at start,
so the multi-device checks run in subprocesses:

* ``python -m tests.mesh_worker`` with 8 host devices: sharded forward (two meshes, two model
  families, with and without a KV cache) against the single-device forward, a GRPO update on a
  data=2 x fsdp=2 x tensor=2 mesh against an unsharded reference, bytes per device, mesh errors,
  greedy `Sampler.generate` on two meshes against one device (tokens, batch and KV-cache layout).
* ``launch/multihost_local.sh -n 2 -d 4 -- python -m tests.multihost_worker``: two processes joined
  with jax.distributed (CPU collectives) running the same GRPO update, an orbax checkpoint saved
  collectively and restored, checksums compared across processes and with the 8-device run.
* ``python -m tests.trainer_worker`` twice, side by side: on 8 devices and on 1. GRPO and SFT (full
  and LoRA) through the trainers' entry points with the config's ``mesh`` section; the exported
  models and per-step metrics of the mesh runs equal the single-device runs.
* ``launch/multihost_local.sh -n 2 -d 4 -- python -m tests.multihost_trainer_worker``: the GRPO
  trainer and ``cada sft`` in two processes: preempted or stopped, checkpointed collectively,
  resumed; resumed runs equal straight ones and both processes agree.

Both subprocesses compile with ``--xla_backend_optimization_level=0``: the models are tiny, compile
time is what costs, and every comparison is between two runs under the same flags.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from cada_jax.config import ConfigError, load_config
from cada_jax.distributed import detect_cluster, initialize_distributed, main_print
from cada_jax.memory import memory_estimate
from cada_jax.models.config import ModelConfig
from cada_jax.models.decoder import param_logical_axes, param_shapes
from cada_jax.sharding import (
    LOGICAL_RULES,
    MeshConfig,
    ShardingError,
    batch_sharding,
    is_main_process,
    logical_to_mesh,
    make_mesh,
    opt_state_shardings,
    param_shardings,
    rules_for,
    shard_params,
    validate,
)
from tests.mesh_worker import per_device_param_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = "--xla_backend_optimization_level=0"


def tiny(**kw) -> ModelConfig:
    base = dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=8)
    return ModelConfig(**{**base, **kw})


def _result_files(directory, processes: int) -> list[dict]:
    """The per-process results of a multi-process worker (see tests/mesh_worker.write_result)."""
    paths = [os.path.join(directory, f"result_{i}.json") for i in range(processes)]
    missing = [p for p in paths if not os.path.isfile(p)]
    assert not missing, f"worker results missing: {missing}"
    out = []
    for p in paths:
        with open(p) as f:
            out.append(json.load(f))
    return out


def _results(stdout: str) -> list[dict]:
    out = []
    for line in stdout.splitlines():
        if "RESULT " in line:
            out.append(json.loads(line.split("RESULT ", 1)[1]))
    return out


# ----------------------------------------------------------------------------- mesh and rules


def test_mesh_config_errors_name_sizes_and_device_count():
    with pytest.raises(ShardingError, match=r"mesh.fsdp=0"):
        MeshConfig(fsdp=0)
    with pytest.raises(ShardingError, match="only one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1)
    assert MeshConfig(data=-1, fsdp=2, tensor=2).resolve(8) == (2, 2, 2)
    with pytest.raises(ShardingError, match=r"= 8 devices, but 1 devices are available"):
        make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with pytest.raises(ShardingError, match=r"multiple of 3 devices but there are 8"):
        MeshConfig(data=-1, tensor=3).resolve(8)


def test_cache_logical_axes_follow_the_decoder_layout():
    from cada_jax.models.decoder import init_cache
    from cada_jax.sharding import cache_logical_axes

    cfg = tiny(num_layers=3, num_kv_heads=2, head_dim=8)
    names = cache_logical_axes(cfg)
    shape = jax.eval_shape(lambda: init_cache(cfg, 5, 7))["k"].shape
    sizes = dict(zip(names, shape))
    assert sizes == {"cache_layers": 3, "cache_batch": 5, "cache_slots": 7, "cache_heads": 2, "cache_head_dim": 8}


def test_make_mesh_single_device_axes():
    mesh = make_mesh()
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


def test_logical_to_mesh_rules():
    assert logical_to_mesh(P("layers", "embed", "heads", "head_dim")) == P(None, "fsdp", "tensor", None)
    assert logical_to_mesh(("batch", None)) == P(("data", "fsdp"), None)
    assert logical_to_mesh(("cache_layers", "cache_batch", "cache_slots", "cache_heads", "cache_head_dim")) == P(
        None, ("data", "fsdp"), None, "tensor", None
    )
    with pytest.raises(ShardingError, match="'nonsense' has no sharding rule"):
        logical_to_mesh(("nonsense",))
    with pytest.raises(ShardingError, match="maps mesh axis 'fsdp' to two dimensions"):
        logical_to_mesh(("batch", "embed"))


def test_every_parameter_axis_has_exactly_one_rule():
    names = [n for n, _ in LOGICAL_RULES]
    assert len(names) == len(set(names))
    for fam in ("llama", "qwen2", "qwen3"):
        cfg = tiny(model_type=fam, attention_bias=fam == "qwen2", qk_norm=fam == "qwen3")
        for spec in jax.tree_util.tree_leaves(param_logical_axes(cfg), is_leaf=lambda x: isinstance(x, P)):
            for name in spec:
                assert name in names, name


def test_validate_errors_name_the_dimension():
    mesh_t3 = {"data": 1, "fsdp": 1, "tensor": 3}
    with pytest.raises(ShardingError, match=r"num_attention_heads=4 .* 'tensor' axis \(3\).*\[1, 2, 4\]"):
        validate(tiny(), mesh_t3)
    with pytest.raises(ShardingError, match=r"vocab_size=130 is not divisible by the mesh 'tensor' axis \(4\)"):
        validate(tiny(vocab_size=130, num_heads=8, num_kv_heads=4), {"tensor": 4})
    with pytest.raises(ShardingError, match=r"intermediate_size=66 "):
        validate(tiny(intermediate_size=66), {"tensor": 4})
    with pytest.raises(ShardingError, match=r"hidden_size=32 is not divisible by the mesh 'fsdp' axis \(3\)"):
        validate(tiny(), {"fsdp": 3})
    with pytest.raises(ShardingError, match=r"batch size 6 is not divisible by data\*fsdp = 2\*2 = 4"):
        validate(tiny(), {"data": 2, "fsdp": 2, "tensor": 2}, batch=6)
    validate(tiny(), {"data": 2, "fsdp": 2, "tensor": 2}, batch=8)


def test_kv_heads_replicated_when_tensor_does_not_divide_them():
    cfg = tiny(num_heads=8, num_kv_heads=2, head_dim=4)
    mesh = {"data": 1, "fsdp": 1, "tensor": 4}
    validate(cfg, mesh)  # accepted: query heads split, KV heads replicated
    rules = rules_for(cfg, mesh)
    axes = param_logical_axes(cfg)
    assert logical_to_mesh(axes["layers"]["attn"]["k_proj"], rules) == P(None, "fsdp", None, None)
    assert logical_to_mesh(axes["layers"]["attn"]["q_proj"], rules) == P(None, "fsdp", "tensor", None)
    assert rules["cache_heads"] is None
    assert rules_for(cfg, {"tensor": 2})["kv_heads"] == "tensor"


def test_opt_state_shardings_mirror_params_and_replicate_the_rest():
    cfg = tiny()
    mesh = make_mesh()
    p_sh = param_shardings(cfg, mesh)
    adam = jax.eval_shape(optax.adamw(1e-3).init, param_shapes(cfg))
    sh = opt_state_shardings(adam, p_sh, mesh)
    assert jax.tree_util.tree_structure(sh[0].mu) == jax.tree_util.tree_structure(p_sh)
    assert sh[0].mu["layers"]["attn"]["q_proj"].spec == P(None, "fsdp", "tensor", None)
    assert sh[0].nu["lm_head"].spec == P("fsdp", "tensor")
    assert sh[0].count.spec == P()
    # Factored second moments (shapes unlike the params) fall back to replication.
    fac = jax.eval_shape(optax.adafactor(1e-3).init, param_shapes(cfg))
    fac_sh = opt_state_shardings(fac, p_sh, mesh)
    fac_leaves = jax.tree_util.tree_leaves(fac)
    sh_leaves = jax.tree_util.tree_leaves(fac_sh)
    assert len(fac_leaves) == len(sh_leaves)
    for x, s in zip(fac_leaves, sh_leaves):
        assert len(s.spec) <= len(x.shape)


def test_shard_params_and_bytes_on_one_device():
    cfg = tiny()
    mesh = make_mesh()
    host = jax.tree_util.tree_map(lambda s: np.ones(s.shape, s.dtype), param_shapes(cfg))
    placed = shard_params(host, param_shardings(cfg, mesh))
    per_dev = per_device_param_bytes(placed)
    assert list(per_dev) == [jax.devices()[0]]
    assert per_dev[jax.devices()[0]] == sum(x.nbytes for x in jax.tree_util.tree_leaves(host))
    assert batch_sharding(mesh).spec == P(("data", "fsdp"))


# ----------------------------------------------------------------------------- memory sizing


LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                 num_heads=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", param_dtype="bfloat16")


def test_memory_estimate_llama3_8b_by_hand():
    cfg = ModelConfig(**LLAMA3_8B)
    est = memory_estimate(cfg, MeshConfig(data=1, fsdp=8, tensor=1), batch=16, seq_len=2048)
    D, F, N, K, H, V, L = 4096, 14336, 32, 8, 128, 128256, 32
    n = L * (2 * D * N * H + 2 * D * K * H + 3 * D * F + 2 * D) + 2 * V * D + D
    assert est["n_params"] == n == 8_030_261_248
    norms = L * 2 * D + D
    local = (n - norms) // 8 + norms
    assert est["params"] == est["reference"] == est["grads"] == 2 * local == 2_008_031_232
    assert est["optimizer"] == 2 * 4 * local
    assert est["kv_cache"] == 2 * L * 2 * 2048 * K * H * 2 == 536_870_912
    assert est["logits"] == 2 * 2048 * V * 4
    assert est["activations"] == L * 2 * 2048 * D * 2
    assert est["total"] == 17_768_177_664
    # tensor=2 halves KV heads and vocab per device; no reference copy with reference=False.
    est2 = memory_estimate(cfg, MeshConfig(data=-1, fsdp=4, tensor=2), batch=16, seq_len=2048, num_devices=8,
                           reference=False, opt_dtype="bfloat16")
    assert est2["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    assert est2["reference"] == 0
    assert est2["optimizer"] == est2["params"] * 2
    assert est2["kv_cache"] == 2 * L * 4 * 2048 * (K // 2) * H * 2
    assert est2["logits"] == 4 * 2048 * (V // 2) * 4
    with pytest.raises(ShardingError, match="pass num_devices"):
        memory_estimate(cfg, MeshConfig(), batch=8, seq_len=16)


@pytest.mark.parametrize("fam", ["llama", "qwen2", "qwen3"])
def test_memory_estimate_counts_every_parameter(fam):
    cfg = tiny(model_type=fam, attention_bias=fam == "qwen2", qk_norm=fam == "qwen3", tie_word_embeddings=fam == "qwen3")
    est = memory_estimate(cfg, MeshConfig(data=1, fsdp=1, tensor=1), batch=1, seq_len=4)
    assert est["n_params"] == sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(param_shapes(cfg)))
    assert est["params"] == 4 * est["n_params"]


# ----------------------------------------------------------------------------- multi-host setup


def test_detect_cluster_from_environment():
    assert detect_cluster({}) == ("single", {})
    env = {"CADA_COORDINATOR": "10.0.0.2:8476", "CADA_NUM_PROCESSES": "4", "CADA_PROCESS_ID": "3"}
    assert detect_cluster(env) == ("env", {"coordinator_address": "10.0.0.2:8476", "num_processes": 4, "process_id": 3})
    env_jax = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0",
               "CADA_LOCAL_DEVICE_IDS": "0,1"}
    assert detect_cluster(env_jax)[1]["local_device_ids"] == [0, 1]
    assert detect_cluster({"CADA_COORDINATOR": "h:1", "CADA_NUM_PROCESSES": "1"}) == ("single", {})
    with pytest.raises(ShardingError, match="CADA_PROCESS_ID is not"):
        detect_cluster({"CADA_COORDINATOR": "h:1", "CADA_NUM_PROCESSES": "2"})
    with pytest.raises(ShardingError, match="CADA_NUM_PROCESSES is not"):
        detect_cluster({"CADA_COORDINATOR": "h:1"})
    with pytest.raises(ShardingError, match="must be host:port"):
        detect_cluster({"CADA_COORDINATOR": "hostonly", "CADA_NUM_PROCESSES": "2", "CADA_PROCESS_ID": "0"})
    with pytest.raises(ShardingError, match=r"CADA_PROCESS_ID=2 must be in \[0, CADA_NUM_PROCESSES=2\)"):
        detect_cluster({"CADA_COORDINATOR": "h:1", "CADA_NUM_PROCESSES": "2", "CADA_PROCESS_ID": "2"})
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "t-w-0,t-w-1"}) == ("tpu", {})
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "localhost"}) == ("single", {})
    assert detect_cluster({"MEGASCALE_COORDINATOR_ADDRESS": "x:1"})[0] == "tpu"
    assert detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"})[0] == "slurm"
    assert detect_cluster({"OMPI_COMM_WORLD_SIZE": "2"})[0] == "mpi"


def test_initialize_distributed_single_host_is_a_noop(capsys):
    assert initialize_distributed({}) == "single"
    assert jax.process_count() == 1 and is_main_process()
    main_print("hello", 3)
    assert capsys.readouterr().out == "hello 3\n"


# ----------------------------------------------------------------------------- 8 devices, one process


@pytest.fixture(scope="module")
def mesh8():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
    proc = subprocess.run([sys.executable, "-m", "tests.mesh_worker"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (res,) = _results(proc.stdout)
    return res


def test_sharded_forward_matches_single_device(mesh8):
    assert mesh8["device_count"] == 8
    for key in ("llama_d1f4t2", "qwen3_d2f2t2", "kvrep_d2f1t4"):
        assert mesh8[f"fwd_{key}_maxdiff"] <= 1e-5, key
        assert mesh8[f"fwd_{key}_logits_spec"] == "P(('data', 'fsdp'), None, None)"


def test_sharded_prefill_into_donated_cache(mesh8):
    assert mesh8["cache_logits_maxdiff"] <= 1e-5
    assert mesh8["cache_k_maxdiff"] <= 1e-5
    # layers 2, batch 8, slots 16, kv heads 2, head_dim 8 in the decoder's layout: batch split over
    # data*fsdp = 4, kv heads over tensor = 2, slots and the rest whole.
    shape, shard = mesh8["cache_k_shape"], mesh8["cache_k_shard_shape"]
    assert shape[1] == 8 and shard[1] == 2
    slots = shape.index(16)
    heads = ({2, 3} - {slots}).pop()
    assert shard[slots] == 16 and shape[heads] == 2 and shard[heads] == 1
    assert shard[0] == shape[0] and shard[4] == shape[4]
    assert mesh8["cache_donated"] is True
    assert mesh8["cache_index"] == 10
    assert mesh8["bad_batch_error"].startswith("batch size 6 is not divisible by data*fsdp = 2*2 = 4")


def test_param_bytes_per_device_follow_fsdp_times_tensor(mesh8):
    for key, shards in (("llama_d1f4t2", 8), ("qwen3_d2f2t2", 4)):
        b = mesh8[f"bytes_{key}"]
        assert b["n_devices"] == 8
        assert len(set(b["per_device"])) == 1, b  # every device holds the same amount
        # Everything split fsdp*tensor ways except the norm scales, which every device holds whole.
        assert b["per_device"][0] == (b["total"] - b["norms"]) // shards + b["norms"]
        assert b["per_device"][0] < 1.1 * b["total"] / shards


def test_sharded_grpo_update_matches_unsharded(mesh8):
    np.testing.assert_allclose(mesh8["update_losses"], mesh8["update_ref_losses"], rtol=1e-5)
    assert mesh8["update_losses"][1] != mesh8["update_losses"][0]  # the update changed the policy
    assert mesh8["update_rel_delta_err"] < 1e-3
    assert mesh8["update_param_maxdiff"] < 1e-4
    assert mesh8["update_step"] == 2
    assert mesh8["opt_mu_spec_matches_params"] is True
    assert mesh8["opt_count_spec"] == "P()"


def test_greedy_sampling_on_the_mesh_gives_the_same_tokens(mesh8):
    s = mesh8["sampling"]
    ref = s["ref_ids"]
    assert s["vocab_size"] % 2 == 0  # the vocabulary (the fixture tokenizer's) splits over tensor=2
    # the reference is not degenerate: 8 different completions of 16 tokens, many distinct tokens
    assert len(ref) == 8 and all(len(c) == 16 for c in ref)
    assert len({tuple(c) for c in ref}) == 8
    assert len({t for c in ref for t in c}) >= 20
    # d2f2t2 samples the requests behind a common preamble, prefilled once and broadcast
    assert s["ref_shared_prefix"] == 0 and s["shared_ref_shared_prefix"] >= 16
    assert s["d1f4t2_shared_prefix"] == 0 and s["d2f2t2_shared_prefix"] == s["shared_ref_shared_prefix"]
    assert len({tuple(c) for c in s["shared_ref_ids"]}) >= 4  # not degenerate either
    for key, name in (("d1f4t2", "ref"), ("d2f2t2", "shared_ref")):
        assert s[f"{key}_ids"] == s[f"{name}_ids"], key
        assert s[f"{key}_reasons"] == s[f"{name}_reasons"], key
        assert s[f"{key}_logp_maxdiff"] < 1e-4, key
        # the params passed in are used in place: not donated, not re-laid-out; only norms whole
        assert s[f"{key}_params_kept"] is True, key
        assert s[f"{key}_params_whole"] and all("norm" in name for name in s[f"{key}_params_whole"]), key
        # the prompt batch [8, P] is split 4 ways over ('data', 'fsdp')
        assert s[f"{key}_tokens_spec"] == "P(('data', 'fsdp'),)", key
        assert s[f"{key}_tokens_shard"][0] == 2, key
        # per-layer keys [B, K, H, S] after prefill, [B, K, S/c, H, c] after the decode loop:
        # batch over data*fsdp = 4, the 2 KV heads over tensor = 2, on all 8 devices (not gathered)
        for name, ndim in (("prefill_k", 4), ("decode_k", 5)):
            shape, shard = s[f"{key}_{name}_shape"], s[f"{key}_{name}_shard"]
            assert len(shape) == ndim and shape[:2] == [8, 2] and shard == [2, 1, *shape[2:]], (key, name, shape, shard)
            assert s[f"{key}_{name}_ndev"] == 8, (key, name)


def test_mesh_size_mismatch_error_on_8_devices(mesh8):
    assert mesh8["mesh_size_error"] == (
        "mesh data=3 x fsdp=1 x tensor=2 = 6 devices, but 8 devices are available; "
        "make data*fsdp*tensor = 8 (or set one axis to -1)"
    )


# ----------------------------------------------------------------------------- two processes


def test_two_processes_update_checkpoint_restore(mesh8, tmp_path):
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE, PYTHON=sys.executable)
    cmd = ["bash", os.path.join(ROOT, "launch", "multihost_local.sh"), "-n", "2", "-d", "4", "-t", "240", "--",
           sys.executable, "-m", "tests.multihost_worker", str(tmp_path / "ckpt")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = _result_files(tmp_path, 2)
    assert [r["process_index"] for r in results] == [0, 1]
    r0, r1 = results
    for r in results:
        assert r["method"] == "env"
        assert (r["process_count"], r["local_devices"], r["global_devices"]) == (2, 4, 8)
        assert r["restored_step"] == 2
        assert r["restored_checksum"] == r["checksum"]
        assert r["restored_opt_checksum"] == r["saved_opt_checksum"]
        assert r["restored_sharding_ok"] is True
        assert r["next_loss_restored"] == r["next_loss_saved"]
        assert r["next_checksum_restored"] == r["next_checksum_saved"] != r["checksum"]
    # Both processes agree on the restored params ...
    assert r0["restored_checksum"] == r1["restored_checksum"]
    assert r0["losses"] == r1["losses"]
    # ... and the two-process run equals the one-process run of the same update on 8 devices.
    np.testing.assert_allclose(r0["losses"], mesh8["update_losses"], rtol=1e-5)
    np.testing.assert_allclose(r0["checksum"], mesh8["update_checksum"], rtol=1e-6)
    assert os.path.isdir(tmp_path / "ckpt" / "2")


# ----------------------------------------------------------------------------- launch scripts


def test_multihost_local_stops_all_when_one_fails():
    script = os.path.join(ROOT, "launch", "multihost_local.sh")
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", script, "-n", "3", "--", "sh", "-c", 'echo "id=$CADA_PROCESS_ID n=$CADA_NUM_PROCESSES $XLA_FLAGS"; '
         'test "$CADA_PROCESS_ID" != 1 || exit 7; sleep 60'],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 7, proc.stderr
    assert time.monotonic() - t0 < 30  # the sleeping processes were stopped, not waited for
    assert "[1] id=1 n=3 --xla_force_host_platform_device_count=1" in proc.stdout
    assert "process 1 exited with status 7" in proc.stderr
    bad = subprocess.run(["bash", script, "-n", "0", "--", "true"], capture_output=True, text=True)
    assert bad.returncode == 2 and "-n must be a positive integer" in bad.stderr


def test_tpu_vm_dry_run_commands():
    script = os.path.join(ROOT, "launch", "tpu_vm.sh")
    proc = subprocess.run(
        ["bash", script, "--dry-run", "all", "--name", "cada-t", "--zone", "us-central2-b", "--accelerator", "v4-8",
         "--spot", "--", "rl", "--config", "c.yaml"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [l for l in proc.stdout.splitlines() if l.startswith("+ gcloud")]
    assert lines[0].startswith("+ gcloud compute tpus tpu-vm create cada-t --zone=us-central2-b")
    assert "--accelerator-type=v4-8 --version=tpu-ubuntu2204-base --spot" in lines[0]
    assert all("--worker=all" in l for l in lines[1:4])
    assert "pip\\ install\\ -q\\ -e\\ \\'.\\[tpu\\]\\'" in lines[2]
    assert lines[3].endswith("cada\\ rl\\ --config\\ c.yaml")
    assert lines[4] == "+ gcloud compute tpus tpu-vm delete cada-t --zone=us-central2-b --quiet"
    missing = subprocess.run(["bash", script, "run", "--name", "x"], capture_output=True, text=True)
    assert missing.returncode == 2 and "--zone is required" in missing.stderr


def test_gpu_dry_run_commands(tmp_path):
    script = os.path.join(ROOT, "launch", "gpu.sh")
    venv = str(tmp_path / "venv")
    proc = subprocess.run(["bash", script, "--dry-run", "--venv", venv, "--", "cada", "rl"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == f"+ python3 -m venv {venv}"
    assert any(l.endswith("pip install -q -e " + ROOT + "\\[cuda\\]") for l in out)
    assert out[-1] == "+ cada rl"
    assert not os.path.exists(venv)
    none = subprocess.run(["bash", script, "--dry-run"], capture_output=True, text=True)
    assert none.returncode == 2 and "no command given" in none.stderr


# ----------------------------------------------------------------------------- the trainers on a mesh


def _trainer_env(devices: int) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}")


@pytest.fixture(scope="module")
def np_model_dir(tmp_path_factory):
    """The tiny Llama of tests/mesh_worker.py (numpy weights, fixture tokenizer; no torch import)."""
    from tests.mesh_worker import tiny_model_dir

    return tiny_model_dir(str(tmp_path_factory.mktemp("np_model")))


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory, np_model_dir):
    """tests/trainer_worker.py on 8 devices (meshes) and on 1, run side by side on one tiny model."""
    root = tmp_path_factory.mktemp("trainers")
    model_dir = np_model_dir
    procs = {kind: subprocess.Popen([sys.executable, "-m", "tests.trainer_worker", str(root / kind), model_dir, kind],
                                    cwd=ROOT, env=_trainer_env(8 if kind == "mesh" else 1), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for kind in ("mesh", "single")}
    out = {}
    for kind, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
        (out[kind],) = _results(stdout)
    out["model_dir"] = model_dir
    return out


def _max_abs_diff(dir_a: str, dir_b: str) -> float:
    from cada_jax.checkpoints.hf import load_params

    a, _ = load_params(dir_a)
    b, _ = load_params(dir_b)
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize("run", ["grpo", "sft", "lora"])
def test_trainers_on_a_mesh_match_one_device(trainer_runs, run):
    mesh, single = trainer_runs["mesh"][run], trainer_runs["single"][run]
    assert trainer_runs["mesh"]["devices"] == 8 and trainer_runs["single"]["devices"] == 1
    assert len(mesh["metrics"]) == len(single["metrics"]) >= 2
    for got, want in zip(mesh["metrics"], single["metrics"]):
        assert got.keys() == want.keys()
        for k, v in want.items():
            if isinstance(v, int):  # counts, lengths: exactly equal (the same tokens were sampled)
                assert got[k] == v, (run, k)
            else:
                assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-5), (run, k)
    # the runs moved the model, and the mesh run moved it to the same place (measured: <= 7e-6)
    assert _max_abs_diff(single["export"], trainer_runs["model_dir"]) > 1e-3
    assert _max_abs_diff(mesh["export"], single["export"]) < 5e-5
    if run == "grpo":
        assert single["metrics"][0]["advantage_std"] > 0.5  # the groups had a signal to learn from
        assert single["metrics"][1]["kl"] > 0  # the reference (beta > 0) was used


def test_trainer_state_lives_in_its_shards(trainer_runs):
    g = trainer_runs["mesh"]["grpo"]
    assert g["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    for key in ("q_proj_spec", "mu_q_proj_spec", "ref_q_proj_spec"):  # policy, Adam moment, frozen reference
        assert g[key] == "P(None, 'fsdp', 'tensor', None)", key
    b = g["param_bytes"]
    assert len(b["per_device"]) == 8 and len(set(b["per_device"])) == 1
    assert b["per_device"][0] < 1.1 * b["total"] / 8  # split fsdp*tensor = 8 ways (norm scales whole)


def test_bad_mesh_config_is_a_one_line_error(np_model_dir, tmp_path):
    from cada_jax.training.grpo import GRPOTrainer
    from cada_jax.training.sft import train_sft

    base = [f"model.path={np_model_dir}", f"run.out_dir={tmp_path}", "run.progress=false", "sft.max_len=128"]
    recs = [{"prompt": "hi", "completion": "there"}] * 8
    with pytest.raises(ShardingError, match=r"^mesh data=2 x fsdp=1 x tensor=1 = 2 devices, but 1 devices are available; "
                                            r"make data\*fsdp\*tensor = 1 \(or set one axis to -1\)$"):
        train_sft(load_config(None, base + ["mesh.data=2", "sft.steps=1"]), recs)
    with pytest.raises(ShardingError, match=r"^mesh data=-1 x fsdp=1 x tensor=2: the fixed axes need a multiple of 2 devices"):
        GRPOTrainer(load_config(None, base + ["mesh.tensor=2", "rl.rewards=[{name: length_penalty}]"]),
                    records=[{"prompt": "hi"}])
    with pytest.raises(ConfigError, match=r"mesh.fsdp: must be a positive number of devices or -1"):
        load_config(None, ["mesh.fsdp=0"])
    with pytest.raises(ConfigError, match=r"mesh: only one of data, fsdp, tensor may be -1"):
        load_config(None, ["mesh.fsdp=-1"])
    with pytest.raises(ConfigError, match=r"unknown key 'mesh.model'"):
        load_config(None, ["mesh.model=2"])


def test_mesh_errors_on_8_devices(trainer_runs):
    e = trainer_runs["mesh"]["errors"]
    assert e["size"] == ("mesh data=3 x fsdp=1 x tensor=2 = 6 devices, but 8 devices are available; "
                         "make data*fsdp*tensor = 8 (or set one axis to -1)")
    assert e["heads"] == ("num_attention_heads=4 is not divisible by the mesh 'tensor' axis (8); "
                          "set mesh.tensor to one of [1, 2, 4] (divisors of num_attention_heads)")
    assert e["sft_batch"] == "sft.batch_size=6 rows cannot be split over mesh data*fsdp = 4 devices; use a multiple of 4"
    assert e["rl_minibatch"].startswith("rl.minibatch_size=6 completions per update cannot be split over mesh "
                                        "data*fsdp = 4 devices; use a multiple of 4")


def test_two_processes_train_checkpoint_resume_and_agree(tmp_path):
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE, PYTHON=sys.executable)
    cmd = ["bash", os.path.join(ROOT, "launch", "multihost_local.sh"), "-n", "2", "-d", "4", "-t", "280", "--",
           sys.executable, "-m", "tests.multihost_trainer_worker", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    r0, r1 = _result_files(tmp_path, 2)
    assert (r0["process_index"], r1["process_index"]) == (0, 1)
    for r in (r0, r1):
        assert r["method"] == "env" and r["process_count"] == 2 and r["global_devices"] == 8
        g, s = r["grpo"], r["sft"]
        # GRPO: SIGTERM after step 1 stopped both processes there; the resumed run equals the straight one
        assert g["straight_steps"] == 2 and g["first"] == [True, 1] and g["resumed"] == [1, 2]
        assert g["checkpoints_b"] == ["1", "2"]
        assert g["metrics_a"] == g["metrics_b"] and len(g["metrics_a"]) == 2
        assert g["export_a"] == g["export_b"]
        assert g["metrics_a"][0]["advantage_std"] > 0.5 and g["metrics_a"][1]["kl"] > 0
        # SFT through `cada sft`: 2 steps, then resumed to 3, equals 3 straight steps
        assert s["rc"] == [0, 0, 0]
        assert s["checkpoints_b"] == ["1", "2", "3"]
        assert s["metrics_a"] == s["metrics_b"] and len(s["metrics_a"]) == 3
        assert s["export_a"] == s["export_b"]
    # each process loads its own half of every SFT batch ...
    assert r0["sft"]["data_shard"] == [0, 2] and r1["sft"]["data_shard"] == [1, 2]
    # ... and both see the same run (process 0 wrote it)
    assert r0["grpo"] == r1["grpo"] and r0["sft"]["metrics_a"] == r1["sft"]["metrics_a"]
    # only process 0 prints the CLI's summary line
    summaries = [line for line in proc.stdout.splitlines() if '"run_dir":' in line and "RESULT" not in line]
    assert len(summaries) == 3 and all(line.startswith("[0] {") for line in summaries)
