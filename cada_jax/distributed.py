"""Joining a multi-host job: cluster detection, `jax.distributed` start-up, printing once per job.

Call ``initialize_distributed()`` first thing in the program; it starts ``jax.distributed`` on Cloud
TPU pods, SLURM/Open MPI clusters and from ``CADA_*`` / ``JAX_*`` environment variables, and does
nothing on a single host. Which process feeds which rows is the mesh's business
(`cada_jax.sharding.data_shard`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax

from cada_jax.sharding import ShardingError, is_main_process

__all__ = ["detect_cluster", "initialize_distributed", "main_print"]


def _env_int(env, keys, default=None):
    for k in keys:
        v = env.get(k)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                raise ShardingError(f"environment variable {k}={v!r} must be an integer") from None
    return default


def detect_cluster(env: Mapping | None = None) -> tuple[str, dict]:
    """How this process should join a multi-host job: (method, kwargs for jax.distributed.initialize).

    method is one of "single" (nothing to do), "env" (CADA_COORDINATOR / JAX_COORDINATOR_ADDRESS with
    the process count and id), "tpu" (Cloud TPU pod slice or multislice: JAX reads the TPU metadata
    itself), "slurm" or "mpi" (JAX's own cluster detection).
    """
    env = os.environ if env is None else env
    coord = env.get("CADA_COORDINATOR") or env.get("JAX_COORDINATOR_ADDRESS")
    if coord:
        if ":" not in coord:
            raise ShardingError(f"CADA_COORDINATOR={coord!r} must be host:port, e.g. 10.0.0.2:8476")
        n = _env_int(env, ("CADA_NUM_PROCESSES", "JAX_NUM_PROCESSES"))
        pid = _env_int(env, ("CADA_PROCESS_ID", "JAX_PROCESS_ID"))
        if n is None:
            raise ShardingError("CADA_COORDINATOR is set but CADA_NUM_PROCESSES is not; set it to the number of processes")
        if n < 1:
            raise ShardingError(f"CADA_NUM_PROCESSES={n} must be >= 1")
        if n == 1:
            return "single", {}
        if pid is None:
            raise ShardingError("CADA_COORDINATOR is set but CADA_PROCESS_ID is not; set it to this process's rank 0..N-1")
        if not 0 <= pid < n:
            raise ShardingError(f"CADA_PROCESS_ID={pid} must be in [0, CADA_NUM_PROCESSES={n})")
        kw = {"coordinator_address": coord, "num_processes": n, "process_id": pid}
        local = env.get("CADA_LOCAL_DEVICE_IDS")
        if local:
            try:
                kw["local_device_ids"] = [int(x) for x in local.split(",")]
            except ValueError:
                raise ShardingError(f"CADA_LOCAL_DEVICE_IDS={local!r} must be comma-separated ints, e.g. 0,1,2,3") from None
        return "env", kw
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS") or _env_int(env, ("MEGASCALE_NUM_SLICES",), 1) > 1:
        return "tpu", {}
    if _env_int(env, ("SLURM_NTASKS",), 1) > 1 and env.get("SLURM_JOB_ID"):
        return "slurm", {}
    if _env_int(env, ("OMPI_COMM_WORLD_SIZE",), 1) > 1:
        return "mpi", {}
    return "single", {}


def initialize_distributed(env: Mapping | None = None) -> str:
    """Start `jax.distributed` when this is a multi-host job; a no-op on one host. Returns the method.

    Call it before any other JAX call. Safe to call twice.
    """
    method, kw = detect_cluster(env)
    if method == "single" or jax.distributed.is_initialized():
        return method
    jax.distributed.initialize(**kw)
    return method


def main_print(*args, **kwargs) -> None:
    """`print` on process 0 only (flushed), so a pod's logs are not N copies of each line."""
    if is_main_process():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)
