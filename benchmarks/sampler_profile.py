"""Where a decode step's time goes: matmuls / attention / sampling / loop overhead.

    python benchmarks/sampler_profile.py --batch 16 --new-tokens 64

Profiles one `generate` call of SmolLM2-135M (f32, temperature 1, EOS ignored) with
`jax.profiler`, maps every executed XLA op of the decode program back to the JAX operation that
produced it (HLO `op_name` metadata), and prints ms per decode step for each class as one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np


def classify(op_name: str) -> str:
    """Class of an op from its `op_name`: the unrolled CPU path names its scopes (models/unrolled.py, _layer_fm)."""
    if "/attention/" in op_name:
        return "attention"
    if any(k in op_name for k in ("/projections/", "/mlp/", "/lm_head/")):
        return "matmuls"
    sampling_ops = ("log_softmax", "cumsum", "uniform", "argmax", "categorical", "take_along_axis", "fold_in", "random",
                    "top_k", "sort", "reduce_max", "reduce_sum", "/exp", "/log", "/pad", "/lt")
    if any(k in op_name for k in sampling_ops):
        return "sampling"
    return "other"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--top", type=int, default=0, help="also list the N costliest ops (ms per step) on stderr")
    args = ap.parse_args(argv)

    from cada_jax.checkpoints.gguf_import import resolve_model
    from cada_jax.checkpoints.hf import load_params
    from cada_jax.sampling import SLOT_MULTIPLE, Sampler, SamplingParams, _start_state
    from cada_jax.tokenizer import Tokenizer, length_bucket
    from benchmarks.sampler import PROMPTS

    d = resolve_model(args.model, progress=False)
    params, cfg = load_params(d)
    tok = Tokenizer(d)
    sampler = Sampler(cfg, tok)
    prompts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(args.batch)]
    # whole-prompt prefill, so the decode program lowered below has the shapes generate() uses
    sp = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, ignore_eos=True, share_prefix=False)
    sampler.generate(params, prompts, sp)  # compile

    # The decode program's HLO, for op -> op_name.
    ids = sampler.encode_prompts(prompts)
    tokens, mask = tok.pad(ids, side="left", length=length_bucket(max(map(len, ids))), batch=args.batch)
    last, cache, pos = sampler._prefill(params, jnp.asarray(tokens), jnp.asarray(mask), cfg=cfg, cache_dtype=cfg.dtype,
                                        unroll=sampler.unroll_layers)
    slots = tokens.shape[1] + sp.max_new_tokens
    if sampler.unroll_layers:
        slots = -(-slots // SLOT_MULTIPLE) * SLOT_MULTIPLE
    state = _start_state(last, cache, pos, jnp.ones(args.batch, bool), n=1, max_new=sp.max_new_tokens, slots=slots)
    keys = jax.random.split(jax.random.PRNGKey(0), args.batch)
    text = sampler._decode.lower(params, state, keys, (-1,), jnp.float32(1.0), jnp.float32(1.0), cfg=cfg, steps=sp.max_new_tokens,
                                 max_new=sp.max_new_tokens, greedy=False, top_k=0, use_top_p=False, unroll=sampler.unroll_layers,
                                 unit_temperature=True).compile().as_text()
    names = {}
    for m in re.finditer(r"%(\S+) = .*?metadata=\{op_name=\"([^\"]+)\"", text):
        names[m.group(1)] = m.group(2)

    trace_dir = tempfile.mkdtemp()
    jax.profiler.start_trace(trace_dir)
    out = sampler.generate(params, prompts, sp)
    jax.profiler.stop_trace()
    f = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]
    events = json.load(gzip.open(f))["traceEvents"]
    per = collections.Counter()
    by_op = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or "hlo_op" not in e.get("args", {}):
            continue
        if "decode" not in e["args"].get("hlo_module", ""):
            continue
        op = e["args"]["hlo_op"]
        if op.startswith(("while", "call", "conditional")):
            continue  # containers: their children are counted
        per[classify(names.get(op, op))] += e["dur"] / 1000.0
        by_op[(op.split(".")[0], names.get(op, op))] += e["dur"] / 1000.0
    steps = out.timings["decode_steps"]
    for (op, name), ms in by_op.most_common(args.top):
        print(f"{ms / steps:8.3f} ms  {classify(name):9s} {op:28s} {name[-90:]}", file=sys.stderr)
    result = {k: round(v / steps, 2) for k, v in per.items()}
    result["measured_ms_per_step"] = round(1000 * out.timings["decode_s"] / steps, 2)
    result["ops_total_ms_per_step"] = round(sum(per.values()) / steps, 2)
    result.update(batch=args.batch, new_tokens=args.new_tokens)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
