"""`cada plan`: will a config fit the chips, and how fast can its steps go, before renting them.

The run's own programs are lowered and compiled with abstract arrays (`jax.ShapeDtypeStruct`
carrying the run's shardings; no weight is loaded or allocated) on N host CPU devices standing in
for the N chips of the config's mesh:

* ``sft_step``      the SFT update (`training.sft.sft_update`) on ``sft.batch_size`` rows of ``sft.max_len``
* ``rl_update``     the GRPO update (`training.grpo_batch.grpo_update`) on one micro-batch of ``rl.minibatch_size``
* ``rl_reference``  the reference log-prob pass (`training.grpo_batch.reference_logprob_fn`) on the same micro-batch
* ``rl_prefill``    the rollout sampler's prefill (`Sampler._prefill`) of ``rl.prompts_per_step`` prompts
* ``rl_start``      the decode loop's start state (`sampling._start_state`): the cache widened, repeated n times
* ``rl_decode``     the rollout's decode loop (`Sampler._decode`), ``rl.group_size`` samples per prompt

with the shardings the trainers use (`training.placement.abstract_state`, `sharding.param_shardings`,
`sharding.fit_sharding` for micro-batches). For each: the per-device buffer sizes XLA assigned
(``compiled.memory_analysis()``), what else the trainer keeps on the device meanwhile (the frozen
reference while the update runs, the optimizer state while sampling, ...: ``resident``), their sum
against the chip's HBM, and the FLOPs per device with the time they take at the chip's bf16 peak
(for decode also the HBM-bandwidth floor of reading the weights and the KV cache once per token).

Lengths: the update and the sampler are planned at the longest prompt the config lets through
(``model.max_seq_len - rl.max_new_tokens``, the trainer's own check) unless ``prompt_len`` is given;
SFT at ``sft.max_len``. A plan is the worst case the config allows, not the typical step.

Caveats, said in the output too:

* Buffer sizes come from XLA:CPU's compile. Argument and output sizes are exact (they follow from
  shapes, dtypes and shardings); temporaries depend on the backend's fusion and scheduling
  decisions and differ on TPU/GPU (e.g. CPU may keep f32 copies of bf16 operands; cuDNN flash
  attention on GPU does not materialise the score matrix). Read them as an estimate.
* ``cost_analysis()`` counts the body of a loop once, and the layers are a scanned loop, so its
  FLOPs are about 1/L of a step. `hlo_flops` therefore counts the matmul FLOPs of the compiled,
  partitioned program with every loop body multiplied by its known trip count (XLA's
  ``known_trip_count``); the decode loop's trip count is data-dependent, so decode's figure is one
  token step. XLA's own number is reported beside it as ``xla_flops``.
* JAX on GPU preallocates 75% of the memory by default (``XLA_PYTHON_CLIENT_MEM_FRACTION``); the
  fit check uses that fraction for GPUs unless ``mem_fraction`` is given.

Needs a process whose JAX has at least N CPU devices: `cada plan` starts one with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (see `cada_jax.commands.plan`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Callable

__all__ = ["Chip", "CHIPS", "KNOWN_MODELS", "PROGRAMS", "PlanError", "resolve_model_config", "hlo_flops",
           "device_bytes", "plan", "format_plan", "GiB"]

GiB = 1024 ** 3


class PlanError(ValueError):
    """A plan that cannot be made as asked; the message names the option to change."""


# ----------------------------------------------------------------------------- chips


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int  # memory per chip
    bf16_flops: float  # dense bf16 peak FLOP/s per chip
    hbm_bytes_per_s: float  # HBM bandwidth per chip
    mem_fraction: float  # share of the HBM a JAX program gets by default
    source: str


# Per chip (one TPU chip = what JAX calls one device; v4/v5p chips hold two TensorCores as one
# megacore device). Sources, as published by the vendors:
#   TPU v4   cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM2, 1200 GB/s
#   TPU v5e  cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GiB HBM2, 819 GB/s
#   TPU v5p  cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM2e, 2765 GB/s
#   TPU v6e  cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GiB HBM, 1640 GB/s
#   A100     NVIDIA A100 datasheet (SXM4 80GB): 312 TFLOP/s bf16 dense, 80 GB HBM2e, 2039 GB/s
#   H100     NVIDIA H100 datasheet (SXM5): 989 TFLOP/s bf16 dense (1979 is with sparsity), 80 GB HBM3, 3.35 TB/s
#   H200     NVIDIA H200 datasheet (SXM): 989 TFLOP/s bf16 dense, 141 GB HBM3e, 4.8 TB/s
# The NVIDIA "80 GB" parts hold 80 GiB (nvidia-smi: 81920 MiB on A100, 81559 MiB on H100); the
# H200's "141 GB" is taken as 141e9 bytes (131 GiB) to stay on the safe side.
# GPUs: JAX preallocates XLA_PYTHON_CLIENT_MEM_FRACTION = 0.75 of the memory by default
# (docs.jax.dev/en/latest/gpu_memory_allocation.html); TPUs give a program nearly all of it.
CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("v4", 32 * GiB, 275e12, 1200e9, 1.0, "cloud.google.com/tpu/docs/v4"),
    Chip("v5e", 16 * GiB, 197e12, 819e9, 1.0, "cloud.google.com/tpu/docs/v5e"),
    Chip("v5p", 95 * GiB, 459e12, 2765e9, 1.0, "cloud.google.com/tpu/docs/v5p"),
    Chip("v6e", 32 * GiB, 918e12, 1640e9, 1.0, "cloud.google.com/tpu/docs/v6e"),
    Chip("a100", 80 * GiB, 312e12, 2039e9, 0.75, "NVIDIA A100 80GB SXM datasheet"),
    Chip("h100", 80 * GiB, 989e12, 3350e9, 0.75, "NVIDIA H100 SXM5 datasheet"),
    Chip("h200", 141 * 10 ** 9, 989e12, 4800e9, 0.75, "NVIDIA H200 SXM datasheet"),
)}


# ----------------------------------------------------------------------------- model shapes

# config.json essentials of models whose checkpoints are not on the planning machine. Values from
# the models' published config.json files on the Hugging Face hub (meta-llama/Meta-Llama-3-8B-Instruct,
# Qwen/Qwen2.5-7B-Instruct, meta-llama/Llama-3.2-1B-Instruct, HuggingFaceTB/SmolLM2-135M-Instruct).
KNOWN_MODELS: dict[str, dict] = {
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                      rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False,
                      bos_token_id=128000, eos_token_id=[128001, 128009]),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=False,
                       use_sliding_window=False, eos_token_id=[151645, 151643]),
    "llama3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                        tie_word_embeddings=True, rope_scaling={"rope_type": "llama3", "factor": 32.0,
                        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                        eos_token_id=[128001, 128008, 128009]),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
                         rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True),
}


def resolve_model_config(spec: str | None, model_path: str):
    """The `ModelConfig` to plan: `spec` is a KNOWN_MODELS name, a config.json, or a model directory;
    None reads ``model.path``'s config.json."""
    import json
    import os

    from cada_jax.models.config import config_from_hf, load_config

    if spec in KNOWN_MODELS:
        return spec, config_from_hf(KNOWN_MODELS[spec], source=f"built-in shapes {spec!r}")
    path = spec or model_path
    if os.path.isdir(path):
        return path, load_config(path)
    if os.path.isfile(path) and path.endswith(".json"):
        with open(path) as f:
            hf = json.load(f)
        return path, config_from_hf(hf, source=path)
    known = ", ".join(KNOWN_MODELS)
    if spec is None:
        if path.lower().startswith("smollm2-135m"):
            return "smollm2-135m", config_from_hf(KNOWN_MODELS["smollm2-135m"], source="built-in shapes 'smollm2-135m'")
        raise PlanError(f"model.path={path} has no config.json on this machine; pass --model-config with a config.json, "
                        f"a model directory or one of: {known}")
    raise PlanError(f"--model-config {spec}: not a config.json, a model directory or a known model ({known})")


# ----------------------------------------------------------------------------- FLOPs from HLO

_ARRAY = re.compile(r"^([a-z][a-z0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")


def _split_type(rest: str) -> tuple[str, str]:
    """('type', 'opcode(...)...') from the text after '='; tuple types are parenthesised."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1:].lstrip()
    sp = rest.find(" ")
    return (rest, "") if sp < 0 else (rest[:sp], rest[sp + 1:].lstrip())


def _dims(type_text: str) -> tuple[int, ...] | None:
    m = _ARRAY.match(type_text)
    if not m:
        return None
    return tuple(int(d) for d in m.group(2).split(",") if d)


def _names(text: str) -> list[str]:
    return re.findall(r"%([\w.\-]+)", text)


def _operands(call: str) -> str:
    """The text inside the opcode's parentheses."""
    start = call.find("(")
    depth = 0
    for i in range(start, len(call)):
        depth += call[i] == "("
        depth -= call[i] == ")"
        if depth == 0:
            return call[start + 1: i]
    return call[start + 1:]


def _attr_list(call: str, key: str) -> list[int]:
    m = re.search(key + r"=\{([0-9,]*)\}", call)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


def hlo_flops(hlo_text: str) -> dict:
    """Matmul FLOPs of a compiled HLO module (``compiled.as_text()``), loops counted by trip count.

    Every ``dot`` costs 2 * (output elements) * (contracted size). A computation's FLOPs are its own
    dots plus those of the computations it calls: fusions and calls once, a while body times its
    ``known_trip_count`` (once when XLA could not determine it, e.g. a decode loop that stops on
    EOS), the larger branch of a conditional. Returns ``flops`` and ``loops``, the trip counts
    found ({"n": int or None} per while loop, in text order).
    """
    comps: dict[str, list[str]] = {}
    entry = None
    current = None
    for line in hlo_text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            if line.rstrip().endswith("{"):
                head = line.split("(")[0].split()
                is_entry = head and head[0] == "ENTRY"
                name = head[-1].lstrip("%") if head else ""
                current = comps.setdefault(name, [])
                if is_entry:
                    entry = name
            elif line.startswith("}"):
                current = None
            continue
        if current is not None:
            current.append(line)
    if entry is None:
        raise PlanError("no ENTRY computation in the HLO text; pass compiled.as_text()")

    loops: list[dict] = []
    memo: dict[str, float] = {}

    def cost(name: str, stack: tuple = ()) -> float:
        if name in memo:
            return memo[name]
        if name in stack or name not in comps:
            return 0.0
        shapes: dict[str, tuple] = {}
        total = 0.0
        for line in comps[name]:
            m = _INSTR.match(line)
            if not m:
                continue
            var, rest = m.groups()
            type_text, call = _split_type(rest)
            d = _dims(type_text)
            if d is not None:
                shapes[var] = d
            opcode = call.split("(")[0].strip()
            if opcode == "dot":
                ops = _names(_operands(call))
                lhs = shapes.get(ops[0]) if ops else None
                out = d
                if lhs is None or out is None:
                    # operand shapes printed inline: "dot(f32[2,3]{1,0} %a, ...)"
                    lhs = _dims(_operands(call).strip())
                if lhs is not None and out is not None:
                    k = math.prod(lhs[i] for i in _attr_list(call, "lhs_contracting_dims"))
                    total += 2.0 * math.prod(out) * k
            elif opcode == "while":
                body = re.search(r"body=%([\w.\-]+)", call)
                trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', call)
                n = int(trip.group(1)) if trip else None
                loops.append({"body": body.group(1) if body else None, "n": n})
                if body:
                    total += (n if n is not None else 1) * cost(body.group(1), stack + (name,))
            elif opcode == "conditional":
                branches = _names(re.search(r"branch_computations=\{([^}]*)\}", call).group(1)) if \
                    "branch_computations" in call else _names(" ".join(re.findall(r"(?:true|false)_computation=%[\w.\-]+", call)))
                total += max((cost(b, stack + (name,)) for b in branches), default=0.0)
            else:
                for key in ("calls", "called_computations"):
                    mm = re.search(key + r"=\{?([^},]*(?:,\s*%[\w.\-]+)*)\}?", call)
                    if mm:
                        for callee in _names(mm.group(1)):
                            total += cost(callee, stack + (name,))
                if opcode == "call":
                    mm = re.search(r"to_apply=%([\w.\-]+)", call)
                    if mm:
                        total += cost(mm.group(1), stack + (name,))
        memo[name] = total
        return total

    return {"flops": cost(entry), "loops": loops}


# ----------------------------------------------------------------------------- bytes


def device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of arrays / ShapeDtypeStructs (the largest shard of each;
    a leaf without a sharding counts whole)."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        shape = tuple(x.shape)
        sh = getattr(x, "sharding", None)
        if sh is not None:
            shape = tuple(sh.shard_shape(shape))
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return int(total)


def _abstract(shapes, shardings):
    import jax

    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _rows(mesh, shape, dtype):
    """A host batch array placed as `sharding.place_rows` places it (batch over data x fsdp where it divides)."""
    import jax
    import jax.numpy as jnp

    from cada_jax.sharding import fit_sharding

    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=fit_sharding(mesh, tuple(shape), ("batch",)))


# ----------------------------------------------------------------------------- the plan

PROGRAMS = ("sft_step", "rl_update", "rl_reference", "rl_prefill", "rl_start", "rl_decode")


def _memory(compiled) -> dict:
    ma = compiled.memory_analysis()
    if ma is None:
        raise PlanError("this JAX backend reports no memory analysis; plan on CPU devices (JAX_PLATFORMS=cpu)")
    out = {
        "argument": int(ma.argument_size_in_bytes),
        "output": int(ma.output_size_in_bytes),
        "temp": int(ma.temp_size_in_bytes),
        "code": int(ma.generated_code_size_in_bytes),
        "alias": int(ma.alias_size_in_bytes),
    }
    # Donated inputs that become outputs are counted in both argument and output: once is real.
    out["program"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["code"]
    return out


def _xla_flops(compiled) -> float | None:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca:
        return None
    v = ca.get("flops")
    return None if v is None else float(v)


def plan(cfg, model_cfg, chip: Chip, *, num_devices: int | None = None, prompt_len: int | None = None,
         programs=None, mem_fraction: float | None = None, log: Callable[[str], None] = print,
         model_name: str = "", config_path: str = "") -> dict:
    """Lower and compile the run's programs for `cfg` on `num_devices` of this process's devices and
    return the plan (a JSON-able dict; see the module doc). `model_cfg` is the model's base config
    (the run's numerics from ``cfg.model`` are applied here, as the trainers do)."""
    import jax
    import jax.numpy as jnp

    from cada_jax.models.decoder import param_shapes
    from cada_jax.training import grpo_batch, placement, sft
    from cada_jax.training.optim import optimizer_for
    from cada_jax.sampling import Sampler, _start_state
    from cada_jax.sharding import MeshConfig, mesh_from_config, param_shardings
    from cada_jax.tokenizer import bucket, length_bucket

    wanted = tuple(programs) if programs else None
    if wanted:
        bad = [p for p in wanted if p not in PROGRAMS]
        if bad:
            raise PlanError(f"unknown program(s) {bad}; choose from {', '.join(PROGRAMS)}")
    stages = set(cfg.pipeline.stages)
    default = [p for p in PROGRAMS if (p.startswith("sft") and "sft" in stages) or (p.startswith("rl") and "rl" in stages)]
    todo = list(wanted or default)

    mc = model_cfg.replace(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat=cfg.model.remat,
                           attention_impl=cfg.model.attention_impl)
    mesh_cfg = MeshConfig(data=int(cfg.mesh.data), fsdp=int(cfg.mesh.fsdp), tensor=int(cfg.mesh.tensor))
    cpu = jax.devices("cpu")
    if num_devices is None:
        sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
        if -1 in sizes:
            raise PlanError(f"mesh {mesh_cfg._describe()} has a -1 axis: give --devices N, the number of chips")
        num_devices = math.prod(sizes)
    if num_devices > len(cpu):
        raise PlanError(f"planning for {num_devices} devices needs as many CPU devices, this process has {len(cpu)}; "
                        f"set XLA_FLAGS=--xla_force_host_platform_device_count={num_devices} before JAX starts (cada plan does)")
    devices = cpu[:num_devices]
    mesh = mesh_from_config(mesh_cfg, mc, devices=devices)
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    # The trainers' own checks, so a plan refuses what a run would refuse.
    if "sft_step" in todo and cfg.sft.batch_size % rows:
        raise PlanError(f"sft.batch_size={cfg.sft.batch_size} rows cannot be split over mesh data*fsdp = {rows} devices; "
                        f"use a multiple of {rows}")
    if any(p.startswith("rl") for p in todo):
        mb = cfg.rl.minibatch_size or cfg.rl.prompts_per_step * cfg.rl.group_size
        if mb % rows or mb % cfg.rl.group_size or (cfg.rl.prompts_per_step * cfg.rl.group_size) % mb:
            raise PlanError(f"rl.minibatch_size={mb} must divide rl.prompts_per_step * rl.group_size, hold whole groups of "
                            f"{cfg.rl.group_size} and split over mesh data*fsdp = {rows} devices (as the GRPO trainer checks)")
    frac = chip.mem_fraction if mem_fraction is None else float(mem_fraction)
    usable = int(chip.hbm_bytes * frac)

    p_shapes = param_shapes(mc)
    n_params = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(p_shapes))
    p_sh = param_shardings(mc, mesh)
    params_abs = _abstract(p_shapes, p_sh)
    lora_cfg = cfg.lora if cfg.lora.enabled else None
    key = jax.random.PRNGKey(0)

    rl = cfg.rl
    G = rl.group_size
    minibatch = rl.minibatch_size or rl.prompts_per_step * G
    budget = min(cfg.model.max_seq_len, mc.max_position_embeddings) - rl.max_new_tokens
    if budget < 1 and any(p.startswith("rl") for p in todo):
        raise PlanError(f"rl.max_new_tokens={rl.max_new_tokens} leaves no room for a prompt in model.max_seq_len={cfg.model.max_seq_len}")
    if prompt_len is not None and prompt_len > budget:
        raise PlanError(f"--prompt-len {prompt_len} exceeds the {budget} tokens a prompt may have "
                        f"(model.max_seq_len - rl.max_new_tokens)")
    P_upd = min(length_bucket(prompt_len or budget), budget)
    C_upd = min(length_bucket(rl.max_new_tokens), rl.max_new_tokens)

    results: dict[str, dict] = {}
    state_bytes: dict[str, int] = {}
    t_all = time.perf_counter()

    def run(i: int, name: str, shapes_desc: str, jitted, args: tuple, kwargs: dict, resident: dict, tokens: int | None):
        tag = f"[{i}/{len(todo)}]" if i else "[for decode's input layout]"
        log(f"{tag} {name} ({shapes_desc}): compiling ...")
        t0 = time.perf_counter()
        lowered = jitted.lower(*args, **kwargs)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        mem = _memory(compiled)
        counted = hlo_flops(compiled.as_text())
        res_total = sum(resident.values())
        peak = mem["program"] + res_total
        flops = counted["flops"]
        entry = {
            "shapes": shapes_desc,
            "memory": mem,
            "resident": resident,
            "resident_total": res_total,
            "peak": peak,
            "fits": peak <= usable,
            "hbm_share": peak / chip.hbm_bytes,
            "flops": flops,
            "xla_flops": _xla_flops(compiled),
            "loops": [lp["n"] for lp in counted["loops"]],
            "seconds_at_peak": flops / chip.bf16_flops,
            "tokens": tokens,
            "lower_s": round(t1 - t0, 2),
            "compile_s": round(t2 - t1, 2),
        }
        results[name] = entry
        log(f"{tag} {name}: compiled in {t2 - t0:.1f} s (lower {t1 - t0:.1f} s); "
            f"peak {peak / GiB:.2f} GiB per device, {flops / 1e12:.3g} TFLOP per device")
        return compiled, entry

    n = 0
    # --- SFT
    if "sft_step" in todo:
        n += 1
        # The run length enters the program only as a constant of the cosine schedule.
        tx = optimizer_for(cfg.optim, max(1, cfg.sft.steps))
        state_abs = placement.abstract_state(tx, key, model_cfg=mc, lora_cfg=lora_cfg, mesh=mesh)
        B, T = cfg.sft.batch_size, cfg.sft.max_len
        from cada_jax.sharding import batch_sharding

        bsh = batch_sharding(mesh)
        batch = {k: jax.ShapeDtypeStruct((B, T), jnp.dtype(dt), sharding=bsh) for k, dt in (
            ("tokens_BT", "int32"), ("targets_BT", "int32"), ("weights_BT", "float32"), ("positions_BT", "int32"),
            ("segment_ids_BT", "int32"))}
        frozen = params_abs if lora_cfg is not None else None
        step = sft.sft_update(mc, lora_cfg, mesh, tx)
        run(n, "sft_step", f"{B} rows x {T}", step, (state_abs, batch, None, frozen), {}, {}, B * T)

    # --- GRPO
    rl_todo = [p for p in todo if p.startswith("rl")]
    if rl_todo:
        total_micro = rl.steps * rl.mu * ((rl.prompts_per_step * G) // minibatch)
        tx = optimizer_for(cfg.optim, max(1, total_micro))
        state_abs = placement.abstract_state(tx, key, model_cfg=mc, lora_cfg=lora_cfg, mesh=mesh)
        state_b = device_bytes(state_abs)
        opt_b = device_bytes(state_abs.opt_state)
        params_b = device_bytes(params_abs)
        trainable_b = device_bytes(state_abs.params)
        full = lora_cfg is None
        ref_b = params_b if rl.beta > 0 else 0  # full: a frozen copy; LoRA: the base itself (counted as frozen)
        state_bytes.update(state=state_b, optimizer=opt_b, params=params_b, trainable=trainable_b)

        N = minibatch // G
        ub = {
            "prompt_tokens_NP": _rows(mesh, (N, P_upd), "int32"), "prompt_mask_NP": _rows(mesh, (N, P_upd), "int32"),
            "completion_tokens_BC": _rows(mesh, (minibatch, C_upd), "int32"),
            "completion_mask_BC": _rows(mesh, (minibatch, C_upd), "int32"),
            "old_logp_BC": _rows(mesh, (minibatch, C_upd), "float32"), "advantages_B": _rows(mesh, (minibatch,), "float32"),
        }
        if rl.beta > 0:
            ub["ref_logp_BC"] = _rows(mesh, (minibatch, C_upd), "float32")
        upd_tokens = N * P_upd + minibatch * (C_upd - 1)
        desc = f"{N} prompts x {P_upd} + {minibatch} completions x {C_upd}"
        if "rl_update" in rl_todo:
            n += 1
            loss_cfg = grpo_batch.loss_config(rl)
            upd = grpo_batch.grpo_update(mc, lora_cfg, loss_cfg, mesh, tx)
            frozen = params_abs if not full else None
            resident = {"reference": ref_b} if full else {}
            run(n, "rl_update", desc, upd, (state_abs, ub, None, frozen), {}, resident, upd_tokens)
        if "rl_reference" in rl_todo:
            n += 1
            fn = grpo_batch.reference_logprob_fn(mc, mesh)
            resident = {"train_state": state_b}
            run(n, "rl_reference", desc, fn, (params_abs, ub["prompt_tokens_NP"], ub["prompt_mask_NP"],
                                               ub["completion_tokens_BC"], ub["completion_mask_BC"]), {}, resident,
                upd_tokens)

        sampling = [p for p in rl_todo if p in ("rl_prefill", "rl_start", "rl_decode")]
        if sampling:
            # What the device holds besides the sampler's arguments while the rollout runs.
            if full:
                s_res = {"optimizer": opt_b}
                if rl.beta > 0:
                    s_res["reference"] = ref_b
            else:  # policy = merge_lora(base, adapters): a merged copy next to the base and the adapters' state
                s_res = {"base": params_b, "adapter_state": state_b}
            sampler = Sampler(mc, None, max_seq_len=budget + rl.max_new_tokens, mesh=mesh if mesh.size > 1 else None,
                              unroll_layers=False)
            Bp = bucket(rl.prompts_per_step)
            P_s = min(length_bucket(prompt_len or budget), budget)
            slots = P_s + rl.max_new_tokens
            cache_dtype = mc.dtype
            tok = _rows(mesh, (Bp, P_s), "int32")
            desc_p = f"{Bp} prompts x {P_s}"
            # The prefill always runs (its outputs' shardings feed the start state and decode).
            n += "rl_prefill" in sampling
            pre, _ = run(n if "rl_prefill" in sampling else 0, "rl_prefill", desc_p, sampler._prefill,
                         (params_abs, tok, tok, None), dict(cfg=mc, cache_dtype=cache_dtype, unroll=False), s_res, Bp * P_s)
            last_s, cache_s, pos_s = jax.tree_util.tree_map(
                lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                tuple(pre.out_info), tuple(pre.output_shardings))
            valid = jax.ShapeDtypeStruct((Bp,), jnp.bool_)
            n += "rl_start" in sampling
            S = Bp * G
            start, _ = run(n if "rl_start" in sampling else 0, "rl_start", f"{S} rows x {slots} slots", _start_state,
                           (last_s, cache_s, pos_s, valid), dict(n=G, max_new=rl.max_new_tokens, slots=slots), s_res, None)
            state_s = jax.tree_util.tree_map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                             start.out_info, start.output_shardings)
            if "rl_decode" in sampling:
                n += 1
                keys = jax.ShapeDtypeStruct((S, 2), jnp.uint32)
                eos = tuple(mc.eos_token_ids) or (-1,)
                scal = jax.ShapeDtypeStruct((), jnp.float32)
                _, entry = run(n, "rl_decode", f"{S} rows x {slots} slots, one token step", sampler._decode,
                               (params_abs, state_s, keys, eos, scal, scal),
                               dict(cfg=mc, steps=rl.max_new_tokens, max_new=rl.max_new_tokens, greedy=rl.temperature == 0,
                                    top_k=int(rl.top_k), use_top_p=rl.top_p < 1.0, unroll=False,
                                    unit_temperature=rl.temperature == 1.0), s_res, S)
                # Floor of one token step: read the weights and the whole KV cache once.
                kv_b = device_bytes({"k": state_s["cache"]["k"], "v": state_s["cache"]["v"]})
                entry["bytes_per_step"] = params_b + kv_b
                entry["seconds_at_bandwidth"] = (params_b + kv_b) / chip.hbm_bytes_per_s
                entry["kv_cache_bytes"] = kv_b
            for name in ("rl_prefill", "rl_start"):
                if name not in sampling:
                    results.pop(name, None)

    ordered = {k: results[k] for k in PROGRAMS if k in results}
    return {
        "config": config_path,
        "model": model_name,
        "n_params": int(n_params),
        "numerics": {"dtype": mc.dtype, "param_dtype": mc.param_dtype, "remat": mc.remat,
                     "attention_impl": mc.attention_impl, "lora": bool(lora_cfg)},
        "mesh": dict(mesh.shape),
        "devices": num_devices,
        "chip": dataclasses.asdict(chip),
        "usable_bytes": usable,
        "mem_fraction": frac,
        "prompt_len": P_upd if rl_todo else None,
        "state_bytes": state_bytes,
        "programs": ordered,
        "fits": all(p["fits"] for p in ordered.values()),
        "plan_s": round(time.perf_counter() - t_all, 1),
        "jax": jax.__version__,
        "backend_note": "memory from XLA:CPU buffer assignment (arguments/outputs exact; temporaries differ on TPU/GPU)",
    }


# ----------------------------------------------------------------------------- the table


def _gib(b: float) -> str:
    return f"{b / GiB:.2f}"


def _secs(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    return f"{s * 1e3:.1f} ms"


def format_plan(p: dict) -> str:
    chip = p["chip"]
    mesh = p["mesh"]
    num = p["numerics"]
    lines = [
        f"model {p['model']}: {p['n_params'] / 1e9:.2f} B params, weights {num['param_dtype']}, compute {num['dtype']}, "
        f"remat {num['remat']}{', LoRA' if num['lora'] else ', full fine-tuning'}",
        f"mesh data={mesh['data']} x fsdp={mesh['fsdp']} x tensor={mesh['tensor']} on {p['devices']} x {chip['name']} "
        f"({chip['hbm_bytes'] / GiB:.1f} GiB HBM, {p['mem_fraction']:.2f} usable = {p['usable_bytes'] / GiB:.1f} GiB; "
        f"{chip['bf16_flops'] / 1e12:.0f} TFLOP/s bf16; {chip['hbm_bytes_per_s'] / 1e9:.0f} GB/s)",
        "",
        "GiB per device      args   out  temp  alias  program  +resident   peak   of HBM  fits   TFLOP/dev  at peak",
    ]
    for name, e in p["programs"].items():
        m = e["memory"]
        lines.append(
            f"{name:<16} {_gib(m['argument']):>7} {_gib(m['output']):>5} {_gib(m['temp']):>5} {_gib(m['alias']):>6} "
            f"{_gib(m['program']):>8} {_gib(e['resident_total']):>10} {_gib(e['peak']):>6} {e['hbm_share'] * 100:>7.0f}% "
            f"{'yes' if e['fits'] else 'NO':>5} {e['flops'] / 1e12:>11.3g} {_secs(e['seconds_at_peak']):>9}"
        )
    lines.append("")
    for name, e in p["programs"].items():
        extra = ""
        if e.get("resident"):
            extra = "; resident: " + ", ".join(f"{k} {_gib(v)}" for k, v in e["resident"].items())
        lines.append(f"  {name}: {e['shapes']}{extra}; compiled in {e['lower_s'] + e['compile_s']:.1f} s")
        if "seconds_at_bandwidth" in e:
            floor = max(e["seconds_at_bandwidth"], e["seconds_at_peak"])
            lines.append(f"    decode floor per token step: reads {_gib(e['bytes_per_step'])} GiB (weights + KV cache "
                         f"{_gib(e['kv_cache_bytes'])}) = {_secs(e['seconds_at_bandwidth'])} at HBM bandwidth; "
                         f"<= {e['tokens'] / floor:,.0f} tokens/s per device")
    lines += [
        "",
        "peak = program (args + out - alias + temp + code) + what the trainer keeps on the device meanwhile (resident).",
        "Buffer sizes are XLA:CPU's: arguments/outputs exact, temporaries an estimate of what TPU/GPU would need.",
        "TFLOP/dev: matmul FLOPs of the partitioned program with loops counted by trip count (decode: one token step);",
        "'at peak' = that / the chip's dense bf16 peak, a lower bound on the step time.",
        f"{'fits' if p['fits'] else 'DOES NOT FIT'}: every program {'within' if p['fits'] else 'must be within'} "
        f"{p['usable_bytes'] / GiB:.1f} GiB per device (plan took {p['plan_s']:.0f} s)",
    ]
    return "\n".join(lines)
