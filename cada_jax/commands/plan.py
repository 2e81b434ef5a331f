"""`cada plan`: fits before you rent.

    cada plan CONFIG.yaml [key=value ...] --chip v5p [--devices N] [--model-config NAME|config.json|DIR]
              [--prompt-len N] [--programs sft_step,rl_update,...] [--out plan.json]

Compiles the run's SFT/GRPO update, reference pass and sampler programs with abstract arrays on N
CPU devices standing in for the chips (`cada_jax.plan`), prints per-device memory against the
chip's HBM and the FLOPs per step, and writes plan.json. Exit status 0 when every program fits,
3 when one does not.

JAX fixes its device count when its backend starts, so the work runs in a child process started
with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` and ``JAX_PLATFORMS=cpu`` (also on a
TPU/GPU host: the plan never touches the accelerators).
"""

from __future__ import annotations

import os
import subprocess
import sys

EXIT_DOES_NOT_FIT = 3
_CHILD_ENV = "CADA_PLAN_CHILD"


def _devices_needed(args, cfg) -> int:
    if args.devices is not None:
        if args.devices < 1:
            raise ValueError(f"--devices {args.devices}: give the number of chips (>= 1)")
        return args.devices
    sizes = [int(cfg.mesh.data), int(cfg.mesh.fsdp), int(cfg.mesh.tensor)]
    if -1 in sizes:
        raise ValueError(f"{args.config}: mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} has a -1 axis; "
                         f"give --devices N (the number of chips)")
    n = 1
    for s in sizes:
        n *= s
    return n


def _child(args) -> int:
    """Runs inside the process that has the CPU devices."""
    from cada_jax.config import load_config
    from cada_jax.files import atomic_write_json
    from cada_jax.plan import CHIPS, format_plan, plan, resolve_model_config

    cfg = load_config(args.config, args.overrides)
    name, model_cfg = resolve_model_config(args.model_config, cfg.model.path)
    programs = [p.strip() for p in args.programs.split(",") if p.strip()] if args.programs else None
    result = plan(cfg, model_cfg, CHIPS[args.chip], num_devices=_devices_needed(args, cfg), prompt_len=args.prompt_len,
                  programs=programs, mem_fraction=args.mem_fraction, model_name=name, config_path=args.config,
                  log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_plan(result), flush=True)
    if args.out:
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0 if result["fits"] else EXIT_DOES_NOT_FIT


def cmd_plan(args) -> int:
    if os.environ.get(_CHILD_ENV):
        return _child(args)
    from cada_jax.config import load_config

    cfg = load_config(args.config, args.overrides)  # config errors are reported here, before the child starts
    n = _devices_needed(args, cfg)
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    env["JAX_PLATFORMS"] = "cpu"
    env[_CHILD_ENV] = "1"
    # The child imports this same cada_jax (a checkout may differ from the installed package).
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    argv = [sys.executable, "-m", "cada_jax.cli"] + sys_argv_for(args)
    return subprocess.run(argv, env=env).returncode


def sys_argv_for(args) -> list[str]:
    """The `cada plan` argument list that reproduces `args` (for the child process)."""
    out = ["plan", args.config] + list(args.overrides) + ["--chip", args.chip]
    if args.devices is not None:
        out += ["--devices", str(args.devices)]
    if args.model_config:
        out += ["--model-config", args.model_config]
    if args.prompt_len is not None:
        out += ["--prompt-len", str(args.prompt_len)]
    if args.programs:
        out += ["--programs", args.programs]
    if args.mem_fraction is not None:
        out += ["--mem-fraction", str(args.mem_fraction)]
    return out + ["--out", args.out or ""]


def register(subparsers) -> None:
    from cada_jax.plan import CHIPS, KNOWN_MODELS, PROGRAMS

    p = subparsers.add_parser("plan", help="compile a config's programs abstractly: memory per chip and FLOPs per step")
    p.add_argument("config", help="YAML config of the run")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--chip", required=True, choices=sorted(CHIPS), help="accelerator the run will use")
    p.add_argument("--devices", type=int, default=None,
                   help="number of chips (default: data*fsdp*tensor of the config's mesh; needed when an axis is -1)")
    p.add_argument("--model-config", default=None,
                   help=f"model shapes: a config.json, a model directory, or one of {', '.join(KNOWN_MODELS)} "
                        f"(default: model.path's config.json)")
    p.add_argument("--prompt-len", type=int, default=None,
                   help="prompt tokens of the RL update and sampler (default: the longest the config allows)")
    p.add_argument("--programs", default=None, help=f"comma-separated subset of {', '.join(PROGRAMS)}")
    p.add_argument("--mem-fraction", type=float, default=None,
                   help="share of HBM a program may use (default: 0.75 on GPUs, JAX's preallocation; 1.0 on TPUs)")
    p.add_argument("--out", default="plan.json", help="where to write the plan as JSON ('' = do not write)")
    p.set_defaults(fn=cmd_plan)
