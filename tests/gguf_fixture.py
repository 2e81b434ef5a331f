"""Build small GGUF files the way llama.cpp's converter lays them out (for tests)."""

from __future__ import annotations

import numpy as np


def _byte_chars():
    # GPT-2 byte-level alphabet: printable bytes map to themselves, the rest are shifted past 255.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def vocab_tokens():
    toks = SPECIAL + _byte_chars()
    for m in MERGES:
        toks.append(m.replace(" ", ""))
    return toks


# Byte offsets of the f16 scale fields (d, dmin) inside one 256-value block of each K-quant, as
# llama.cpp lays the blocks out (ggml-common.h: block_q2_K ... block_q6_K).
K_QUANT_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def k_quant_blocks(shape, qtype, seed=0):
    """Random K-quant blocks for a [rows, cols] tensor (cols a multiple of 256), with every f16
    scale field set to 0.01 so the values stay small and finite. gguf-py cannot quantize to
    K-quants, so tests write the blocks and take `gguf.quants.dequantize` of them as the truth."""
    import gguf

    qt = gguf.GGMLQuantizationType[qtype]
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qt]
    rows, cols = shape
    assert cols % block_values == 0, f"{qtype} needs rows of a multiple of {block_values} values"
    data = np.random.default_rng(seed).integers(0, 256, size=(rows, cols // block_values, block_bytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    for off in K_QUANT_SCALES[qtype]:
        data[:, :, off:off + 2] = scale
    return data.reshape(rows, -1)


def write_llama_gguf(path, hf_model, *, qtypes=None, arch="llama", drop_key=None):
    """Write `hf_model` (a transformers LlamaForCausalLM) as GGUF.

    `qtypes`: dict gguf-tensor-suffix -> quant name (e.g. {"ffn_up": "Q4_1"}); default F32.
    """
    import gguf

    qtypes = qtypes or {}
    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    meta = {
        "block_count": cfg.num_hidden_layers,
        "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size,
        "feed_forward_length": cfg.intermediate_size,
    }
    for k, v in meta.items():
        if k != drop_key:
            w.add_uint32(f"{arch}.{k}", v)
    w.add_uint32(f"{arch}.attention.head_count", heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", kv)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_uint32(f"{arch}.rope.dimension_count", cfg.hidden_size // heads)
    toks = vocab_tokens()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(toks)
    w.add_token_types([3] * len(SPECIAL) + [1] * (len(toks) - len(SPECIAL)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(TEMPLATE)

    from cada_jax.checkpoints.gguf_import import permute_qk

    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
    layer_names = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    for name, arr in sd.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name in names:
            g = names[name]
        else:
            i, rest = name[len("model.layers."):].split(".", 1)
            g = f"blk.{i}.{layer_names[rest.rsplit('.', 1)[0]]}"
            if g.endswith("attn_q"):
                arr = permute_qk(arr, heads)
            elif g.endswith("attn_k"):
                arr = permute_qk(arr, kv)
        suffix = g.split(".")[-1]
        q = qtypes.get(suffix, "F32")
        arr = np.ascontiguousarray(arr, np.float32)
        if q == "F32":
            w.add_tensor(g + ".weight", arr)
        elif q in K_QUANT_SCALES:
            w.add_tensor(g + ".weight", k_quant_blocks(arr.shape, q, seed=len(g)), raw_dtype=gguf.GGMLQuantizationType[q])
        else:
            qt = gguf.GGMLQuantizationType[q]
            try:
                data = gguf.quants.quantize(arr, qt)
            except NotImplementedError:  # a type gguf-py cannot write: zero blocks of the right size
                data = np.zeros(gguf.quants.quant_shape_to_byte_shape(arr.shape, qt), np.uint8)
            w.add_tensor(g + ".weight", data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
