"""GGUF import: dequantization vs the gguf package, layout vs transformers, tokenizer, errors."""

import json
import os

import gguf
import numpy as np
import pytest

from cada_jax.checkpoints.gguf_import import GGUFError, convert_gguf, dequantize, resolve_model
from cada_jax.checkpoints.hf import load_params
from cada_jax.models.decoder import forward_jit, positions_from_mask
from tests.gguf_fixture import write_llama_gguf, vocab_tokens
from tests.hf_reference import hf_logits, padded_batch


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_dequantize_matches_gguf_reference(qtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 96)).astype(np.float32)
    qt = gguf.GGMLQuantizationType[qtype]
    raw = gguf.quants.quantize(x, qt)
    ref = gguf.quants.dequantize(raw, qt)
    got = dequantize(raw, qtype, (6, 96))
    np.testing.assert_array_equal(got, ref.reshape(6, 96))
    assert np.abs(got - x).max() < 0.3  # and it is close to the original


def _tiny_llama(tied, seed=0):
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=len(vocab_tokens()), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_converted_gguf_matches_the_original_model(tmp_path, tied):
    import transformers

    model = _tiny_llama(tied)
    path = write_llama_gguf(tmp_path / "m.gguf", model)  # F32: the conversion must be exact
    out = convert_gguf(str(path), str(tmp_path / "hf"))
    tokens, mask = padded_batch(model.config.vocab_size, [9, 5], 9)
    ref = hf_logits(model, tokens, mask)
    again = transformers.AutoModelForCausalLM.from_pretrained(out)
    np.testing.assert_allclose(hf_logits(again, tokens, mask), ref, atol=1e-5)
    params, cfg = load_params(out)
    got, _ = forward_jit(params, tokens, positions_from_mask(mask), mask, cfg=cfg)
    v = mask.astype(bool)
    assert np.abs(np.asarray(got)[v] - ref[v]).max() <= 1e-4
    # tokenizer: special tokens whole, merges applied, round trip
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok.encode("<|im_start|>the cat 42<|im_end|>", add_special_tokens=False)
    assert ids[0] == 1 and ids[-1] == 2
    assert vocab_tokens().index("Ġthe") not in ids  # "the" at start has no leading space
    assert vocab_tokens().index("he") in ids
    assert tok.decode(ids) == "<|im_start|>the cat 42<|im_end|>"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n"
    )


def test_quantized_gguf_uses_dequantized_weights(tmp_path):
    model = _tiny_llama(False, seed=1)
    qt = {"ffn_up": "Q4_1", "ffn_gate": "Q4_0", "token_embd": "Q8_0", "attn_v": "F16", "ffn_down": "BF16"}
    path = write_llama_gguf(tmp_path / "q.gguf", model, qtypes=qt)
    out = convert_gguf(str(path), str(tmp_path / "hf"))
    params, cfg = load_params(out)
    up = model.model.layers[1].mlp.up_proj.weight.detach().numpy()
    ref = gguf.quants.dequantize(gguf.quants.quantize(up, gguf.GGMLQuantizationType.Q4_1), gguf.GGMLQuantizationType.Q4_1)
    np.testing.assert_array_equal(np.asarray(params["layers"]["mlp"]["up_proj"][1]), ref.T)


def test_k_quant_gguf_imports_as_gguf_quants_dequantizes_it(tmp_path):
    import torch
    import transformers

    from tests.gguf_fixture import k_quant_blocks

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(vocab_tokens()), hidden_size=256, intermediate_size=256, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)).eval()
    qt = {"ffn_up": "Q4_K", "ffn_gate": "Q5_K", "ffn_down": "Q6_K", "attn_v": "Q3_K", "attn_k": "Q2_K", "attn_q": "Q4_K"}
    path = write_llama_gguf(tmp_path / "k.gguf", model, qtypes=qt)
    params, cfg = load_params(convert_gguf(str(path), str(tmp_path / "hf")))
    from cada_jax.checkpoints.gguf_import import unpermute_qk

    p = params["layers"]
    d = cfg.hidden_size
    hf_weight = {  # our [in, out] (or [in, heads, head_dim]) layout back to the GGUF/HF [out, in]
        "ffn_up": np.asarray(p["mlp"]["up_proj"][0]).T, "ffn_gate": np.asarray(p["mlp"]["gate_proj"][0]).T,
        "ffn_down": np.asarray(p["mlp"]["down_proj"][0]).T,
        "attn_v": np.asarray(p["attn"]["v_proj"][0]).reshape(d, -1).T,
        "attn_k": np.asarray(p["attn"]["k_proj"][0]).reshape(d, -1).T,
        "attn_q": np.asarray(p["attn"]["q_proj"][0]).reshape(d, -1).T,
    }
    for suffix, qtype in qt.items():
        rows, cols = hf_weight[suffix].shape
        raw = k_quant_blocks((rows, cols), qtype, seed=len(f"blk.0.{suffix}"))
        ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(rows, cols)
        if suffix in ("attn_q", "attn_k"):  # llama.cpp stores Q and K rows permuted
            ref = unpermute_qk(ref, 4 if suffix == "attn_q" else 2)
        assert np.isfinite(ref).all() and ref.std() > 0, suffix
        np.testing.assert_array_equal(hf_weight[suffix], ref, err_msg=suffix)


def test_unsupported_quant_type_is_a_clear_error(tmp_path):
    model = _tiny_llama(True)
    path = write_llama_gguf(tmp_path / "k.gguf", model, qtypes={"ffn_up": "Q8_1"})
    with pytest.raises(GGUFError, match=r"blk\.0\.ffn_up\.weight.*Q8_1.*not supported"):
        convert_gguf(str(path), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp")] == []


def test_missing_metadata_and_bad_files(tmp_path):
    model = _tiny_llama(True)
    path = write_llama_gguf(tmp_path / "m.gguf", model, drop_key="feed_forward_length")
    with pytest.raises(GGUFError, match="llama.feed_forward_length"):
        convert_gguf(str(path), str(tmp_path / "hf"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError, match="junk.gguf"):
        convert_gguf(str(junk), str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        convert_gguf(str(tmp_path / "nope.gguf"), str(tmp_path / "hf"))


def test_unwritable_cache_dir(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    monkeypatch.setenv("CADA_JAX_CACHE", str(ro / "cache"))
    if os.access(ro, os.W_OK):  # running as root: permission bits do not bind; use a file as parent
        blocker = tmp_path / "file"
        blocker.write_text("x")
        monkeypatch.setenv("CADA_JAX_CACHE", str(blocker / "cache"))
    with pytest.raises(GGUFError, match="cache dir is not writable.*CADA_JAX_CACHE"):
        resolve_model("smollm2-135m-instruct")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        resolve_model(str(tmp_path / "missing-model"))


def test_convert_never_deletes_what_it_did_not_write(tmp_path, monkeypatch, capsys):
    from cada_jax.cli import main

    path = write_llama_gguf(tmp_path / "t.gguf", _tiny_llama(True))
    keep = tmp_path / "d"
    keep.mkdir()
    (keep / "notes.txt").write_text("keep")
    for out in (keep, tmp_path):  # a folder with notes; the folder that holds the input GGUF
        assert main(["convert-gguf", "--gguf", str(path), "--out", str(out)]) == 1
        err = capsys.readouterr().err.strip()
        assert "holds files a model export does not write" in err and len(err.splitlines()) == 1
    monkeypatch.chdir(keep)
    assert main(["convert-gguf", "--gguf", str(path), "--out", "."]) == 1
    assert (keep / "notes.txt").read_text() == "keep" and path.is_file()
    assert sorted(os.listdir(tmp_path)) == ["d", "t.gguf"]  # no temp folder left behind
    # an empty folder, and an earlier export, may be (re)written
    (tmp_path / "empty").mkdir()
    assert main(["convert-gguf", "--gguf", str(path), "--out", str(tmp_path / "empty")]) == 0
    first = (tmp_path / "empty" / "model.safetensors").read_bytes()
    assert main(["convert-gguf", "--gguf", str(path), "--out", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "model.safetensors").read_bytes() == first
    assert sorted(os.listdir(tmp_path)) == ["d", "empty", "t.gguf"]


def test_publish_swaps_by_rename_and_keeps_a_model_on_failure(tmp_path, monkeypatch):
    from cada_jax.checkpoints import safetensors_io

    out = tmp_path / "m"
    out.mkdir()
    (out / "config.json").write_text("old")
    new = tmp_path / "new"
    new.mkdir()
    (new / "config.json").write_text("new")
    real = os.replace

    def failing_replace(src, dst):
        if str(src) == str(new):
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(safetensors_io.os, "replace", failing_replace)
    with pytest.raises(OSError):
        safetensors_io.publish_dir(str(new), str(out))
    assert (out / "config.json").read_text() == "old"  # the old model is back in place
    monkeypatch.setattr(safetensors_io.os, "replace", real)
    safetensors_io.publish_dir(str(new), str(out))
    assert (out / "config.json").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["m"]
