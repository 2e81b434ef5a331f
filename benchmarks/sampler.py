"""Sampler throughput vs transformers `generate` (PyTorch CPU), same prompts and settings.

    python benchmarks/sampler.py --batch 16 --new-tokens 128
    python benchmarks/sampler.py --batch 16 --new-tokens 128 --device cuda   # HF on the GPU too

With --device cuda the transformers model and its inputs go to the GPU (jax uses its default
backend either way), each timed `generate` ends with torch.cuda.synchronize(), the bandwidth for
roofline_frac is measured on the GPU (torch sum over a 1 GiB f32 tensor) and the JSON adds each
engine's peak GPU memory. Run it with XLA_PYTHON_CLIENT_PREALLOCATE=false so both fit.

SmolLM2-135M-Instruct, f32 weights, temperature 1.0, no top-k/top-p, EOS ignored so every
sequence makes exactly --new-tokens tokens. The prompts go through the chat template, so they open
with the same system turn; the sampler prefills that shared prefix once (`shared_prefix` in the
JSON) unless --no-share-prefix. Both engines' times cover the whole `generate` call, prefill included. The two engines run alternately in one process after
a warm-up; the median of --runs runs each is reported. The last line is JSON.

roofline_frac = measured tokens/s / (batch * bandwidth / weight_bytes): the rate a decode bound by
reading the weights once per step would reach. Bandwidth is measured here as the best of several
streaming reads (numpy sum over a 512 MiB f32 array, one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import numpy as np

PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "Explain how a refrigerator works.",
    "What are the benefits of regular exercise?",
    "Describe the water cycle in simple terms.",
    "Give me a recipe for a vegetable soup.",
    "Why is the sky blue?",
    "Summarize the plot of a heist movie you invent.",
    "What should I pack for a week-long hiking trip?",
]


def measure_bandwidth() -> float:
    a = np.ones(512 * 1024 * 1024 // 4, np.float32)
    best = min(_timed(a.sum) for _ in range(5))
    return a.nbytes / best


def measure_gpu_bandwidth() -> float:
    import torch

    a = torch.ones(1024 * 1024 * 1024 // 4, dtype=torch.float32, device="cuda")

    def run():
        a.sum()
        torch.cuda.synchronize()

    run()
    best = min(_timed(run) for _ in range(5))
    n = a.nbytes
    del a
    torch.cuda.empty_cache()
    return n / best


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers side")
    ap.add_argument("--cache-dtype", default=None)
    ap.add_argument("--no-share-prefix", action="store_true",
                    help="prefill every prompt whole (SamplingParams.share_prefix=False), as transformers does")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where the transformers model runs (default cpu); cada_jax uses jax's default backend")
    args = ap.parse_args(argv)

    import jax
    import torch
    import transformers

    from cada_jax.checkpoints.gguf_import import resolve_model
    from cada_jax.checkpoints.hf import load_params
    from cada_jax.sampling import Sampler, SamplingParams
    from cada_jax.tokenizer import Tokenizer

    model_dir = resolve_model(args.model, progress=False)
    params, cfg = load_params(model_dir)
    tok = Tokenizer(model_dir)
    prompts = [PROMPTS[i % len(PROMPTS)] + f" (request {i})" for i in range(args.batch)]
    sampler = Sampler(cfg, tok)
    sp = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, ignore_eos=True, cache_dtype=args.cache_dtype,
                        share_prefix=not args.no_share_prefix)
    t0 = time.perf_counter()
    sampler.generate(params, prompts, sp)  # warm-up and compile
    compile_s = time.perf_counter() - t0

    hf = hf_inputs = None
    if not args.no_hf:
        torch.set_num_threads(os.cpu_count() or 1)
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().to(args.device)
        htok = transformers.AutoTokenizer.from_pretrained(model_dir)
        htok.padding_side = "left"
        texts = [htok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
        hf_inputs = htok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(args.device)
        gen_kw = dict(
            max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=True, temperature=1.0,
            top_k=None, top_p=None, pad_token_id=htok.pad_token_id,
        )
        with torch.no_grad():
            hf.generate(**hf_inputs, **dict(gen_kw, max_new_tokens=4, min_new_tokens=4))  # warm-up

    cada_times, hf_times, splits = [], [], []
    for r in range(args.runs):
        sp_r = SamplingParams(**{**sp.__dict__, "seed": r})
        t = time.perf_counter()
        out = sampler.generate(params, prompts, sp_r)
        cada_times.append(time.perf_counter() - t)
        splits.append(out.timings)
        assert int(out.lengths.min()) == args.new_tokens
        if hf is not None:
            with torch.no_grad():
                t = time.perf_counter()
                o = hf.generate(**hf_inputs, **gen_kw)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                hf_times.append(time.perf_counter() - t)
            assert o.shape[1] - hf_inputs["input_ids"].shape[1] == args.new_tokens

    # before the bandwidth probe, whose 1 GiB tensor would count in torch's peak
    hf_peak = torch.cuda.max_memory_allocated() if args.device == "cuda" and hf is not None else None
    n_tok = args.batch * args.new_tokens
    cada_tok_s = n_tok / statistics.median(cada_times)
    hf_tok_s = n_tok / statistics.median(hf_times) if hf_times else None
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    bw = measure_gpu_bandwidth() if args.device == "cuda" else measure_bandwidth()
    roof = args.batch * bw / weight_bytes
    result = {
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "cada_tok_s": round(cada_tok_s, 2),
        "hf_tok_s": round(hf_tok_s, 2) if hf_tok_s else None,
        "ratio": round(cada_tok_s / hf_tok_s, 3) if hf_tok_s else None,
        "roofline_frac": round(cada_tok_s / roof, 4),
        "bandwidth_gb_s": round(bw / 1e9, 2),
        "cada_ms_per_step": round(1000 * statistics.median(cada_times) / args.new_tokens, 2),
        "hf_ms_per_step": round(1000 * statistics.median(hf_times) / args.new_tokens, 2) if hf_times else None,
        "prefill_s": round(statistics.median(s["prefill_s"] for s in splits), 4),
        "decode_ms_per_step": round(1000 * statistics.median(s["decode_s"] / s["decode_steps"] for s in splits), 2),
        "shared_prefix": splits[-1]["shared_prefix"],
        "compile_s": round(compile_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "runs": args.runs,
        "device": args.device,
        "jax_backend": jax.default_backend(),
        "jax": jax.__version__,
        "torch": torch.__version__,
    }
    if args.device == "cuda":
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            result["cada_peak_gpu_mb"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
        if hf_peak is not None:
            result["hf_peak_gpu_mb"] = round(hf_peak / 2**20, 1)
        result["gpu"] = torch.cuda.get_device_name(0)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
